"""The module's Logic on a real MRML scene (slicer-core) with the real worker.

Specification: a run streams every step into the scene live (grid transform updated in place, channel
volume, convergence table), and at the end leaves a warped volume on the fixed grid, a Jacobian map with a
folding label map, sequences the browser plays and scrubs, and a comparison row; the user's own nodes are
never modified; cancel keeps the steps so far; a failed run leaves the scene as it was plus a clear message;
re-runs keep or replace earlier outputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import slicer_harness  # noqa: E402  (also puts the qt shim and the module folder on sys.path)
import slicer  # noqa: E402

from iterreg.geometry import Geometry  # noqa: E402
from iterreg_slicer.mrml_arrays import volume_geometry  # noqa: E402
from iterreg_slicer.scene_registration import (COMPARISON_TABLE_NAME, ROLE_ATTRIBUTE, RunSettings,  # noqa: E402
                                               SceneRegistration)


def ras_vectors(displacement_vox, geometry: Geometry) -> np.ndarray:
    return geometry.displacement_voxels_to_ras(displacement_vox).astype(np.float32)


def build_scene(sample_pair):
    """A scene holding the sample pair's volumes and landmark lists (fixed, moving, F, M)."""
    scene = slicer_harness.new_scene()
    return (scene, slicer_harness.add_volume(scene, "fixed", sample_pair.fixed),
            slicer_harness.add_volume(scene, "moving", sample_pair.moving),
            slicer_harness.add_landmarks(scene, "F", sample_pair.fixed_landmarks_ras),
            slicer_harness.add_landmarks(scene, "M", sample_pair.moving_landmarks_ras))


@pytest.fixture
def scene_with_pair(sample_pair):
    return build_scene(sample_pair)


@pytest.fixture(scope="module")
def finished_run(sample_pair):
    """One 15-step classical run with landmarks, observed step by step."""
    scene, fixed, moving, fixed_lm, moving_lm = build_scene(sample_pair)
    moving_before = slicer.util.arrayFromVolume(moving).copy()
    moving_image = moving.GetImageData()
    observed = []

    def on_step(run, step):  # what the views would show right now
        grid = run.nodes["transform"].GetTransformFromParent().GetDisplacementGrid()
        observed.append({"index": step.index, "grid_object": grid,
                         "field": slicer.util.arrayFromGridTransform(run.nodes["transform"]).copy(),
                         "displacement": None if step.displacement is None else step.displacement.copy(),
                         "rows": run.plot.table.GetTable().GetNumberOfRows()})

    run = SceneRegistration(scene, fixed, moving, RunSettings(steps=15, threads=2), fixed_lm, moving_lm,
                            on_step=on_step)
    run.start().wait(timeout=180)
    return {"scene": scene, "run": run, "fixed": fixed, "moving": moving, "observed": observed,
            "moving_before": moving_before, "moving_image": moving_image, "pair": sample_pair}


def test_each_step_updates_the_transform_in_place_and_adds_a_plot_row(finished_run):
    observed, run = finished_run["observed"], finished_run["run"]
    geometry = Geometry.of(finished_run["pair"].fixed)
    assert run.state == "completed" and len(observed) == run.steps_done >= 10
    assert len({id(o["grid_object"]) for o in observed}) == 1  # one grid, rewritten each step
    for o in observed:
        assert o["rows"] == o["index"] + 1
        if o["displacement"] is not None:
            np.testing.assert_allclose(o["field"], ras_vectors(o["displacement"], geometry), atol=1e-4)
    assert not np.allclose(observed[1]["field"], observed[-1]["field"])  # the field grows


def test_the_transform_lives_on_the_fixed_grid(finished_run):
    run, fixed = finished_run["run"], finished_run["fixed"]
    transform = run.nodes["transform"].GetTransformFromParent()
    assert transform.IsA("vtkOrientedGridTransform")
    grid = transform.GetDisplacementGrid()
    ijk_to_ras = volume_geometry(fixed).ijk_to_ras_matrix()
    assert grid.GetDimensions() == fixed.GetImageData().GetDimensions()
    np.testing.assert_allclose(grid.GetOrigin(), ijk_to_ras[:3, 3], atol=1e-6)
    np.testing.assert_allclose(grid.GetSpacing(), fixed.GetSpacing(), atol=1e-6)


def test_the_users_nodes_are_untouched(finished_run):
    moving = finished_run["moving"]
    assert moving.GetParentTransformNode() is None
    assert moving.GetImageData() is finished_run["moving_image"]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving), finished_run["moving_before"])
    warping = finished_run["run"].nodes["warping"]
    assert warping.GetImageData() is moving.GetImageData()  # the animation shares the voxels, no copy
    assert warping.GetParentTransformNode() is finished_run["run"].nodes["transform"]


def test_outputs_at_the_end(finished_run):
    run, fixed = finished_run["run"], finished_run["fixed"]
    warped = run.nodes["warped"]
    assert volume_geometry(warped).same_grid(volume_geometry(fixed))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(warped), run.client.result.arrays["warped"], atol=1e-5)
    jacobian = slicer.util.arrayFromVolume(run.nodes["jacobian"])
    folding = slicer.util.arrayFromVolume(run.nodes["folding"])
    assert run.nodes["folding"].IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(folding, (jacobian <= 0).astype(folding.dtype))
    assert abs(jacobian.mean() - 1) < 0.1
    s = run.summary
    assert s["tre_after_mm"] < s["tre_before_mm"] and s["state"] == "completed"
    table = finished_run["scene"].GetFirstNodeByName(COMPARISON_TABLE_NAME).GetTable()
    assert table.GetNumberOfRows() == 1 and table.GetValueByName(0, "method").ToString() == "classical"


def test_the_convergence_chart_has_the_standard_and_the_method_specific_series(finished_run):
    run = finished_run["run"]
    chart = run.nodes["chart"]
    names = {chart.GetNthPlotSeriesNode(i).GetYColumnName() for i in range(chart.GetNumberOfPlotSeriesNodes())}
    assert {"similarity", "regularizer", "update_norm", "folding_percent", "level", "iteration"} <= names
    similarity = run.plot.column("similarity")
    assert len(similarity) == run.steps_done and similarity[-1] < similarity[0]


def test_the_sequence_browser_replays_every_recorded_step(finished_run):
    run, observed = finished_run["run"], finished_run["observed"]
    browser = run.nodes["browser"]
    transforms = run.nodes["transforms"]
    with_arrays = [o for o in observed if o["displacement"] is not None]
    assert browser.GetNumberOfItems() == transforms.GetNumberOfDataNodes() == len(with_arrays)
    assert browser.GetProxyNode(transforms) is run.nodes["transform"]  # playback moves the shown transform
    assert browser.IsSynchronizedSequenceNodeID(run.nodes["warped_volumes"].GetID())
    assert browser.IsSynchronizedSequenceNodeID(run.nodes["channel_volumes"].GetID())
    for item in (0, len(with_arrays) // 2, len(with_arrays) - 1):
        browser.SetSelectedItemNumber(item)
        slicer_harness.update_proxies(browser)
        shown = slicer.util.arrayFromGridTransform(run.nodes["transform"])
        np.testing.assert_allclose(shown, with_arrays[item]["field"], atol=1e-4)
    assert browser.GetPlaybackLooped()


def test_the_channel_volume_shows_the_methods_gradient(finished_run):
    run = finished_run["run"]
    channel = run.nodes["channel"]
    assert channel.GetAttribute("IterativeRegistration.channel") == "gradient[0]"
    assert channel.GetDisplayNode().GetColorNodeID() is not None
    assert np.abs(slicer.util.arrayFromVolume(channel)).max() > 0


def test_cancel_keeps_the_steps_so_far_and_a_consistent_scene(scene_with_pair):
    scene, fixed, moving, *_ = scene_with_pair

    def on_step(run, step):
        if run.steps_done == 4:
            run.cancel()

    run = SceneRegistration(scene, fixed, moving, RunSettings(steps=150, threads=2), on_step=on_step)
    run.start().wait(timeout=120)
    assert run.state == "cancelled" and "Cancelled after" in run.message
    assert 4 <= run.steps_done < 150 and run.nodes["browser"].GetNumberOfItems() >= 1
    assert run.plot.table.GetTable().GetNumberOfRows() == run.steps_done
    assert moving.GetParentTransformNode() is None


def test_a_failed_run_says_why_and_leaves_the_scene_as_it_was(scene_with_pair):
    scene, fixed, moving, *_ = scene_with_pair
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    run = SceneRegistration(scene, fixed, moving, RunSettings(steps=5, options={"similarity": "nope"}))
    run.start().wait(timeout=60)
    assert run.state == "failed" and "unknown similarity 'nope'" in run.message
    after = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    added = {scene.GetNodeByID(i).GetName() for i in after - before}
    assert added == {COMPARISON_TABLE_NAME}  # only the run log row


def test_reruns_keep_or_replace_earlier_outputs(scene_with_pair):
    scene, fixed, moving, *_ = scene_with_pair

    def transforms():
        return [scene.GetNthNodeByClass(i, "vtkMRMLGridTransformNode")
                for i in range(scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode"))
                if scene.GetNthNodeByClass(i, "vtkMRMLGridTransformNode").GetAttribute(ROLE_ATTRIBUTE) == "transform"]

    for keep in (True, True):
        SceneRegistration(scene, fixed, moving, RunSettings(steps=3, threads=2, keep_previous=keep)).start().wait(60)
    assert len(transforms()) == 2
    names = sorted(t.GetName() for t in transforms())
    assert names == ["moving to fixed (classical) 2 transform", "moving to fixed (classical) transform"]
    SceneRegistration(scene, fixed, moving, RunSettings(steps=3, threads=2, keep_previous=False)).start().wait(60)
    assert len(transforms()) == 1
    assert scene.GetFirstNodeByName(COMPARISON_TABLE_NAME).GetTable().GetNumberOfRows() == 3


@pytest.mark.parametrize("change, expected", [
    ("same", "same node"),
    ("labelmap", "not a label map"),
    ("no_moving", "Select a fixed and a moving volume"),
    ("landmarks_mismatch", "3 fixed but 20 moving"),
    ("one_landmark_set", "both fixed and moving landmarks"),
    ("nonlinear_parent", "harden or remove it first"),
])
def test_inputs_that_cannot_run_are_explained(scene_with_pair, change, expected):
    scene, fixed, moving, fixed_lm, moving_lm = scene_with_pair
    args = [fixed, moving, None, None]
    if change == "same":
        args[1] = fixed
    elif change == "labelmap":
        args[1] = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        args[1].SetAndObserveImageData(moving.GetImageData())
    elif change == "no_moving":
        args[1] = None
    elif change == "landmarks_mismatch":
        short = slicer_harness.add_landmarks(scene, "short", np.zeros((3, 3)))
        args[2:] = [short, moving_lm]
    elif change == "one_landmark_set":
        args[2] = fixed_lm
    elif change == "nonlinear_parent":
        grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
        from iterreg_slicer.mrml_arrays import set_grid_transform
        set_grid_transform(grid, np.zeros((3, 4, 4, 4), np.float32), Geometry((4, 4, 4), (1, 1, 1), (0, 0, 0)))
        moving.SetAndObserveTransformNodeID(grid.GetID())
    problem = SceneRegistration.input_problem(*args)
    assert problem is not None and expected in problem


def test_a_linear_parent_transform_is_part_of_the_volume_geometry(scene_with_pair):
    scene, fixed, moving, *_ = scene_with_pair
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = slicer.util.vtkMatrixFromArray(np.array([[1, 0, 0, 5.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    shift.SetMatrixTransformToParent(matrix)
    before = volume_geometry(moving)
    moving.SetAndObserveTransformNodeID(shift.GetID())
    after = volume_geometry(moving)
    np.testing.assert_allclose(np.array(after.origin) - np.array(before.origin), [-5.0, 0, 0])  # +5 mm R = -5 L


def test_a_worker_error_mid_run_keeps_the_received_steps_playable(scene_with_pair):
    from test_worker import TEST_WORKER
    scene, fixed, moving, *_ = scene_with_pair
    settings = RunSettings(method="scripted", steps=8, options={"fault": "raise", "fault_at": 3})
    run = SceneRegistration(scene, fixed, moving, settings, command=TEST_WORKER)
    run.start().wait(timeout=60)
    assert run.state == "failed" and "simulated failure inside the method" in run.message
    assert run.nodes["browser"].GetNumberOfItems() == 3  # steps 0-2 arrived before the error
    assert "warped" not in run.nodes  # no final result was produced: no half-made outputs
    assert moving.GetParentTransformNode() is None


def test_another_channel_map_can_be_shown_after_the_run_at_every_step(finished_run):
    run = finished_run["run"]
    sequence, browser = run.nodes["channel_volumes"], run.nodes["browser"]
    records = [r for r in run.records if r.channel is not None]
    assert records[0].channel.shape[0] == 3  # the classical gradient: one map per axis
    try:
        run.select_channel_map(2)
        assert run.nodes["channel"].GetAttribute("IterativeRegistration.channel") == "gradient[2]"
        for record in (records[0], records[-1]):
            item = sequence.GetDataNodeAtValue(str(record.index))
            np.testing.assert_allclose(slicer.util.arrayFromVolume(item), record.channel[2], atol=1e-6)
        browser.SetSelectedItemNumber(0)
        slicer_harness.update_proxies(browser)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(run.nodes["channel"]), records[0].channel[2], atol=1e-6)
    finally:
        run.select_channel_map(0)
