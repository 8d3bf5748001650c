"""What a clinician sees: slice views rendered by Slicer's own slice logic (slicer-core, offscreen).

Specification: while a run streams in, the moving image shown in the slice view changes from step to step
(it is displayed through the run's grid transform), ends closer to the fixed image than it started, and the
channel overlay and the final view render to real PNGs.
"""
from __future__ import annotations

import numpy as np
import pytest

import slicer_harness  # noqa: E402  (also puts the qt shim and the module folder on sys.path)

from iterreg_slicer.scene_registration import RunSettings, SceneRegistration  # noqa: E402
from iterreg_slicer.views import show_in_slice_views  # noqa: E402


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    mask = (a > 0) | (b > 0)
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


def test_the_displayed_moving_image_warps_step_by_step_and_ends_aligned(sample_pair, tmp_path):
    scene = slicer_harness.new_scene()
    fixed = slicer_harness.add_volume(scene, "fixed", sample_pair.fixed)
    moving = slicer_harness.add_volume(scene, "moving", sample_pair.moving)
    view = slicer_harness.SliceView(scene, "Red", size=128)
    show_in_slice_views(scene, fixed, moving, 0.5)
    view.fit()
    fixed_slice = view.layer(fixed)
    initial = view.layer(moving)
    shown = []

    def on_step(run, step):
        if step.displacement is not None:
            shown.append(view.layer(run.nodes["warping"]))

    run = SceneRegistration(scene, fixed, moving, RunSettings(steps=40, threads=2), on_step=on_step)
    run.start()
    show_in_slice_views(scene, fixed, run.nodes["warping"], 0.5)
    run.wait(timeout=180)
    assert run.state == "completed" and len(shown) >= 10
    changes = [np.abs(b - a).mean() for a, b in zip(shown, shown[1:])]
    assert sum(c > 0 for c in changes) >= 0.8 * len(changes)  # the view really animates
    before, after = correlation(initial, fixed_slice), correlation(shown[-1], fixed_slice)
    assert after > before + 0.02, (before, after)
    assert correlation(shown[0], fixed_slice) < after  # the alignment is reached over the steps, not at once
    final = view.layer(run.nodes["warping"])
    assert correlation(final, fixed_slice) == pytest.approx(after, abs=1e-6)  # the result stays shown

    show_in_slice_views(scene, fixed, run.nodes["channel"], 0.5)
    blended = view.rgba()
    assert blended[..., :3].std() > 0
    view.png(tmp_path / "channel.png")
    assert (tmp_path / "channel.png").stat().st_size > 1000
