"""Screenshots for the user guide, made by the real renderer from a real run.

Runs the classical method through the background worker on the bundled sample pair in a real MRML scene
(slicer-core), and renders Slicer's axial slice view (vtkMRMLSliceLogic, offscreen EGL) at chosen steps:
the moving image warping under the run's grid transform, the fixed/moving overlay before and after, the
optimiser's gradient channel as a colour overlay and the Jacobian map; the convergence chart is drawn by
VTK's chart renderer (as Slicer's plot view does) from the run's MRML table.

    .venv/bin/python Docs/make_screenshots.py          # writes Docs/images/*.png
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "Testing"))

import numpy as np  # noqa: E402
import slicer_harness  # noqa: E402
import vtk  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from iterreg.resources import sample_pair_dir  # noqa: E402
sys.path.insert(0, str(HERE.parent / "IterativeRegistration"))
from iterreg.sample_data import read_pair  # noqa: E402
from iterreg_slicer.scene_registration import RunSettings, SceneRegistration  # noqa: E402
from iterreg_slicer.views import show_in_slice_views  # noqa: E402

OUT = HERE / "images"
SHOW_STEPS = (1, 10, 30)  # plus the last one


def save_view(view, name: str) -> Path:
    path = OUT / f"{name}.png"
    tmp = OUT / f".{name}.tmp.png"
    view.png(tmp)
    os.replace(tmp, path)
    return path


def chart_png(plot, path: Path, size=(640, 360)) -> None:
    """Draw the run's convergence table as Slicer's plot view would (VTK charts), offscreen."""
    table = vtk.vtkTable()
    source = plot.table.GetTable()
    step = vtk.vtkFloatArray()
    step.SetName("step")
    for i in range(source.GetNumberOfRows()):
        step.InsertNextValue(source.GetValueByName(i, "step").ToDouble() + 1)
    table.AddColumn(step)
    view = vtk.vtkContextView()
    view.GetRenderWindow().SetOffScreenRendering(1)
    view.GetRenderWindow().SetSize(*size)
    view.GetRenderer().SetBackground(1, 1, 1)
    chart = vtk.vtkChartXY()
    view.GetScene().AddItem(chart)
    chart.SetShowLegend(True)
    chart.GetAxis(vtk.vtkAxis.BOTTOM).SetTitle("step")
    chart.GetAxis(vtk.vtkAxis.LEFT).SetTitle("value")
    chart.SetTitle("classical: convergence (similarity = -LNCC; regularizer; update norm, voxels)")
    for key in ("similarity", "regularizer", "update_norm"):
        column = vtk.vtkFloatArray()
        column.SetName(key)
        for v in plot.column(key):
            column.InsertNextValue(v)
        table.AddColumn(column)
        line = chart.AddPlot(vtk.vtkChart.LINE)
        line.SetInputData(table, 0, table.GetNumberOfColumns() - 1)
        r, g, b = plot.series[key].GetColor()
        line.SetColor(int(255 * r), int(255 * g), int(255 * b), 255)
        line.SetWidth(2.0)
    view.GetRenderWindow().Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(view.GetRenderWindow())
    grab.Update()
    writer = vtk.vtkPNGWriter()
    tmp = path.with_name(f".{path.name}")
    writer.SetFileName(str(tmp))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    os.replace(tmp, path)


def strip(paths_and_labels, path: Path) -> None:
    tiles = []
    for p, label in paths_and_labels:
        tile = Image.open(p).convert("RGB")
        ImageDraw.Draw(tile).text((6, 6), label, fill=(255, 255, 0))
        tiles.append(tile)
    w, h = tiles[0].size
    canvas = Image.new("RGB", (w * len(tiles), h))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * w, 0))
    tmp = path.with_name(f".{path.name}")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)


def network_strip(scene, view, fixed, moving, method: str, channel: str, steps: int, marks, name: str) -> None:
    """A learned method with its bundled checkpoint: the warping image and one channel map at chosen steps
    (``marks``: step numbers, or a predicate on the streamed step)."""
    from iterreg.resources import default_checkpoint
    if default_checkpoint(method, 3) is None:
        print(f"no bundled 3D {method} checkpoint: {name}.png not made")
        return
    shots = []

    def on_step(run, step):
        chosen = marks(step) if callable(marks) else step.index + 1 in marks
        if step.displacement is not None and (chosen or step.final):
            label = f"{method} step {step.index + 1}"
            if "level" in step.metrics:  # IIRP-Net: say where in the pyramid
                label += f" (level {int(step.metrics['level'])})"
            if "scale" in step.metrics:  # DIO: which feature scale the optimizer is at
                label += f" (scale 1/{int(step.metrics['scale'])})"
            show_in_slice_views(scene, run.nodes["warping"], None)
            shots.append((save_view(view, f"{name}_warp_{step.index + 1}"), label))
            show_in_slice_views(scene, fixed, run.nodes["channel"], 0.7)
            shots.append((save_view(view, f"{name}_{channel}_{step.index + 1}"), f"{channel}, step {step.index + 1}"))

    run = SceneRegistration(scene, fixed, moving, RunSettings(method=method, steps=steps, channel=channel),
                            on_step=on_step)
    run.start().wait(timeout=600)
    print(method, run.message)
    strip(shots, OUT / f"{name}.png")
    for path, _ in shots:
        path.unlink()


def panel_png(pair, path: Path) -> None:
    """The module panel itself after a finished run: the real .ui and widget code under Qt (offscreen); the
    Slicer-specific widgets (node selectors, markups place buttons) are drawn by their test stand-ins."""
    import time

    slicer_harness.install_module_standins()
    import qt
    app = qt.QApplication.instance() or qt.QApplication([])
    import IterativeRegistration as module

    scene = slicer_harness.new_scene()
    fixed = slicer_harness.add_volume(scene, "MNI fixed", pair.fixed)
    moving = slicer_harness.add_volume(scene, "MNI moving", pair.moving)
    widget = module.IterativeRegistrationWidget()
    widget.logic = module.IterativeRegistrationLogic()
    widget.setup()
    widget.ui.fixedSelector.setCurrentNode(fixed)
    widget.ui.movingSelector.setCurrentNode(moving)
    widget.ui.stepsSpinBox.value = 40
    widget.parent.resize(440, 1000)
    widget.parent.show()
    widget.ui.runButton.click()
    deadline = time.monotonic() + 300
    while widget.run is not None and widget.run.client is not None and widget.run.client.running \
            and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.02)
    for _ in range(20):
        app.processEvents()
    widget.parent.adjustSize()
    tmp = path.with_name(f".{path.name}.tmp.png")
    widget.parent.grab().save(str(tmp))
    os.replace(tmp, path)
    widget.cleanup()


def main() -> int:
    OUT.mkdir(exist_ok=True)
    pair = read_pair(sample_pair_dir())
    scene = slicer_harness.new_scene()
    fixed = slicer_harness.add_volume(scene, "fixed", pair.fixed)
    moving = slicer_harness.add_volume(scene, "moving", pair.moving)
    view = slicer_harness.SliceView(scene, "Red", size=256)
    show_in_slice_views(scene, fixed, None)
    view.fit()
    view.set_offset(view.logic.GetSliceOffset() + 6.0)  # a level through the ventricles
    shots = [(save_view(view, "fixed"), "fixed")]
    show_in_slice_views(scene, moving, None)
    shots.append((save_view(view, "moving_before"), "moving, before"))
    show_in_slice_views(scene, fixed, moving, 0.5)
    save_view(view, "overlay_before")

    def on_step(run, step):
        if step.displacement is not None and step.index + 1 in SHOW_STEPS:
            show_in_slice_views(scene, run.nodes["warping"], None)
            shots.append((save_view(view, f"warping_step_{step.index + 1:03d}"), f"step {step.index + 1}"))
            if step.index + 1 == SHOW_STEPS[1] and "channel" in run.nodes:
                show_in_slice_views(scene, fixed, run.nodes["channel"], 0.6)
                save_view(view, "channel_gradient")

    run = SceneRegistration(scene, fixed, moving, RunSettings(steps=80), on_step=on_step)
    run.start().wait(timeout=600)
    print(run.message)
    show_in_slice_views(scene, run.nodes["warping"], None)
    shots.append((save_view(view, "warping_final"), f"step {run.steps_done} (final)"))
    show_in_slice_views(scene, fixed, run.nodes["warping"], 0.5)
    save_view(view, "overlay_after")
    show_in_slice_views(scene, fixed, run.nodes["jacobian"], 0.7)
    save_view(view, "jacobian")
    shots.append((OUT / "channel_gradient.png", f"gradient channel, step {SHOW_STEPS[1]}"))
    strip(shots, OUT / "steps_strip.png")

    # |fixed - moving| before and at recorded steps (the per-step warped volumes the run keeps for playback)
    from iterreg.geometry import Geometry
    from iterreg_slicer.mrml_arrays import new_volume_like
    import SimpleITK as sitk
    geometry = Geometry.of(pair.fixed)
    fixed_array = sitk.GetArrayFromImage(pair.fixed).astype(np.float32)
    differences = [("before", sitk.GetArrayFromImage(pair.moving).astype(np.float32))]
    by_index = {r.index + 1: r for r in run.records if r.warped is not None}
    for k in (*SHOW_STEPS, run.steps_done):
        record = by_index.get(k) or min(by_index.values(), key=lambda r: abs(r.index + 1 - k))
        differences.append((f"step {record.index + 1}", record.warped))
    diff_shots = []
    for label, warped in differences:
        node = new_volume_like(scene, f"difference {label}", np.abs(fixed_array - warped), geometry)
        node.GetDisplayNode().SetAutoWindowLevel(False)
        node.GetDisplayNode().SetWindowLevelMinMax(0, 0.5 * float(fixed_array.max()))
        show_in_slice_views(scene, node, None)
        diff_shots.append((save_view(view, f"difference_{label.replace(' ', '_')}"), f"|fixed - moving|, {label}"))
    strip(diff_shots, OUT / "difference_strip.png")
    for path, _ in diff_shots:
        path.unlink()
    chart_png(run.plot, OUT / "convergence.png")
    network_strip(scene, view, fixed, moving, "riir", "h1", 6, (1, 3, 6), "riir_hidden_state")
    network_strip(scene, view, fixed, moving, "deqreg", "residual_map", 48, (1, 12, 48), "deqreg_residual")
    network_strip(scene, view, fixed, moving, "iirp", "residual_flow", 40,
                  lambda step: step.metrics.get("iteration") == 1 and step.metrics.get("level") in (3, 1), "iirp_levels")
    network_strip(scene, view, fixed, moving, "dio", "fixed_features", 350,
                  lambda step: step.metrics.get("iteration") == 1, "dio_features")
    panel_png(pair, OUT / "panel.png")
    print(f"wrote {len(list(OUT.glob('*.png')))} pictures to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
