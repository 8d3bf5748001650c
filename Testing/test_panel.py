"""The module panel under PySide6 (offscreen) through the flat ``qt`` shim, on a real MRML scene.

Specification: Run stays disabled, with a tooltip that says why, until the inputs can run; choosing a
method sets its step default and range and enables the checkpoint only for learned methods; Run streams
steps into the progress bar and status, ends with the step slider driving the sequence browser; Cancel
stops the run and re-enables Run; the parameter node and the panel mirror each other; missing packages are
installed only after the user agreed.
"""
from __future__ import annotations

import pytest


import slicer_harness  # noqa: E402  (also puts the qt shim and the module folder on sys.path)
slicer_harness.install_module_standins()

import slicer  # noqa: E402

import IterativeRegistration as module  # noqa: E402

_catalogue = {}


@pytest.fixture
def panel(qtbot, sample_pair):
    scene = slicer_harness.new_scene()
    logic = module.IterativeRegistrationLogic()
    if _catalogue:
        logic._catalogue = _catalogue["value"]  # ask the worker once per test session
    widget = module.IterativeRegistrationWidget()
    widget.logic = logic
    widget.setup()
    _catalogue["value"] = logic.method_catalogue()
    qtbot.addWidget(widget.parent)
    yield widget, scene
    widget.cleanup()
    if widget.run is not None and widget.run.client is not None:
        widget.run.client.close()


def add_pair(scene, sample_pair):
    return (slicer_harness.add_volume(scene, "fixed", sample_pair.fixed),
            slicer_harness.add_volume(scene, "moving", sample_pair.moving))


def select_pair(widget, scene, sample_pair):
    """Add the sample volumes and choose them as fixed and moving in the panel."""
    fixed, moving = add_pair(scene, sample_pair)
    widget.ui.fixedSelector.setCurrentNode(fixed)
    widget.ui.movingSelector.setCurrentNode(moving)
    return fixed, moving


def test_run_is_disabled_with_the_reason_until_the_inputs_can_run(panel, sample_pair):
    widget, scene = panel
    ui = widget.ui
    assert not ui.runButton.enabled and ui.runButton.toolTip == "Select a fixed and a moving volume."
    fixed, moving = add_pair(scene, sample_pair)
    ui.fixedSelector.setCurrentNode(fixed)
    ui.movingSelector.setCurrentNode(fixed)
    assert not ui.runButton.enabled and "same node" in ui.runButton.toolTip
    ui.movingSelector.setCurrentNode(moving)
    assert ui.runButton.enabled and ui.runButton.toolTip.startswith("Register")
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert ui.movingSelector.findText("labels") < 0  # label maps are not offered as images


def test_choosing_a_method_sets_its_steps_and_checkpoint_controls(panel):
    widget, _ = panel
    ui = widget.ui
    titles = [ui.methodComboBox.itemText(i) for i in range(ui.methodComboBox.count)]
    assert any("Classical" in t for t in titles) and any("Identity" in t for t in titles)
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("identity")
    assert ui.stepsSpinBox.value == 1 and ui.stepsSpinBox.maximum == 1
    assert not ui.checkpointComboBox.enabled and not ui.similarityComboBox.enabled
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("classical")
    assert ui.stepsSpinBox.value == 150 and ui.similarityComboBox.enabled
    assert widget._parameterNode.GetParameter("Method") == "classical"
    assert [ui.deviceComboBox.itemData(i) for i in range(ui.deviceComboBox.count)][:2] == ["auto", "cpu"]


def test_the_parameter_node_and_the_panel_mirror_each_other(panel, sample_pair):
    widget, scene = panel
    fixed, moving = add_pair(scene, sample_pair)
    p = widget._parameterNode
    p.SetNodeReferenceID("FixedVolume", fixed.GetID())
    p.SetNodeReferenceID("MovingVolume", moving.GetID())
    p.SetParameter("Similarity", "mse")
    p.SetParameter("Jacobian", "false")
    widget.updateGUIFromParameterNode()
    assert widget.ui.fixedSelector.currentNode() is fixed and widget.ui.movingSelector.currentNode() is moving
    assert widget.ui.similarityComboBox.currentText == "mse" and not widget.ui.jacobianCheckBox.checked
    widget.ui.regularizationSpinBox.value = 0.25
    assert float(p.GetParameter("RegularizationWeight")) == 0.25
    settings = widget.logic.settings_from_parameters(p)
    assert settings.options["similarity"] == "mse" and settings.options["regularization_weight"] == 0.25
    assert settings.jacobian is False


def test_run_streams_steps_and_the_slider_scrubs_the_result(panel, qtbot, sample_pair):
    widget, scene = panel
    ui = widget.ui
    select_pair(widget, scene, sample_pair)
    ui.stepsSpinBox.value = 12
    statuses = []
    ui.progressBar.valueChanged.connect(lambda _v: statuses.append(ui.statusLabel.text))
    ui.runButton.click()
    assert not ui.runButton.enabled and ui.cancelButton.enabled
    qtbot.waitUntil(lambda: not widget.run.running, timeout=120000)
    assert ui.statusLabel.text.startswith("Done: 12 steps") and ui.progressBar.value == 12
    assert any(s.startswith("step 3/12") for s in statuses)
    assert ui.runButton.enabled and not ui.cancelButton.enabled
    browser = widget.run.nodes["browser"]
    assert ui.stepSlider.enabled and ui.stepSlider.maximum == browser.GetNumberOfItems() - 1
    ui.stepSlider.value = 2
    assert browser.GetSelectedItemNumber() == 2 and ui.stepLabel.text == "step 2"
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == widget.run.nodes["warping"].GetID()
    ui.overlayComboBox.currentIndex = ui.overlayComboBox.findText("channel")
    assert composite.GetForegroundVolumeID() == widget.run.nodes["channel"].GetID()
    assert ui.channelComboBox.currentText == "gradient"


def test_a_run_that_converges_before_its_step_budget_ends_with_a_full_progress_bar(panel, qtbot, sample_pair):
    widget, scene = panel
    select_pair(widget, scene, sample_pair)
    widget.ui.stepsSpinBox.value = 1000
    widget.ui.toleranceSpinBox.value = 0.01  # a loose stopping rule: converged within a few steps
    widget.ui.runButton.click()
    qtbot.waitUntil(lambda: not widget.run.running, timeout=300000)
    assert widget.run.state == "completed" and widget.run.steps_done < 1000  # stopped by its own rule
    assert widget.ui.progressBar.value == widget.ui.progressBar.maximum == widget.run.steps_done


def test_cancel_stops_the_run_and_re_enables_run(panel, qtbot, sample_pair):
    widget, scene = panel
    ui = widget.ui
    select_pair(widget, scene, sample_pair)
    ui.stepsSpinBox.value = 150
    ui.runButton.click()
    qtbot.waitUntil(lambda: widget.run.steps_done >= 3, timeout=60000)
    ui.cancelButton.click()
    qtbot.waitUntil(lambda: not widget.run.running, timeout=60000)
    assert ui.statusLabel.text.startswith("Cancelled after") and ui.runButton.enabled
    assert widget.run.steps_done < 150


def test_missing_packages_are_installed_only_after_the_user_agrees(panel, sample_pair, monkeypatch):
    widget, scene = panel
    select_pair(widget, scene, sample_pair)
    installed, asked = [], []
    monkeypatch.setattr(widget.logic, "missing_dependencies", lambda: ["monai>=1.4"])
    monkeypatch.setattr(widget.logic, "install_dependencies", installed.append)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **k: asked.append(text) or False)
    widget.ui.runButton.click()
    assert asked and "monai>=1.4" in asked[0] and installed == [] and widget.run is None
    assert widget.ui.statusLabel.text.startswith("Not started")


def test_the_modules_own_self_test_passes_here(monkeypatch, sample_pair):
    """The ScriptedLoadableModuleTest that Slicer runs, run against the harness (slicer.app stands in)."""
    import types
    slicer_harness.new_scene()
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: None), raising=False)
    case = module.IterativeRegistrationTest()
    case.setUp()
    case.test_logic_streams_a_run_into_the_scene()
    case.setUp()
    case.test_a_result_is_refined_with_landmarks_and_the_refinement_undone()


def test_closing_the_scene_stops_the_run_and_starts_afresh(panel, qtbot, sample_pair):
    widget, scene = panel
    select_pair(widget, scene, sample_pair)
    widget.ui.stepsSpinBox.value = 150
    widget.ui.runButton.click()
    qtbot.waitUntil(lambda: widget.run.steps_done >= 2, timeout=60000)
    client = widget.run.client
    widget.parent.show()
    scene.Clear(0)
    assert not client.running and widget.run is None
    assert widget._parameterNode is not None and widget._parameterNode.GetScene() is scene
    assert not widget.ui.runButton.enabled  # the volumes are gone


def test_a_learned_method_offers_its_bundled_checkpoint(panel, sample_pair):
    widget, scene = panel
    ui = widget.ui
    select_pair(widget, scene, sample_pair)
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("voxelmorph")
    assert ui.checkpointComboBox.enabled and ui.checkpointComboBox.count >= 1
    assert ui.checkpointComboBox.itemText(0).endswith("(bundled)")
    assert ui.stepsSpinBox.maximum == 1 and ui.runButton.enabled
    assert widget._parameterNode.GetParameter("Checkpoint").endswith(".safetensors")
    ui.checkpointComboBox.clear()
    widget.updateRunButton()
    assert not ui.runButton.enabled and ui.runButton.toolTip == "This method is learned: choose a checkpoint."


def test_a_checkpoint_that_decides_its_step_count_sets_the_steps(panel):
    import copy
    widget, _ = panel
    ui = widget.ui
    catalogue = copy.deepcopy(widget.logic.method_catalogue())
    riir = next(m for m in catalogue["methods"] if m["name"] == "riir")
    first, *others = riir["bundled_checkpoints"]
    assert others, "RIIR bundles a 3D and a 2D checkpoint"
    riir["checkpoint_default_steps"][others[0]] = 9  # as a checkpoint trained with T = 9 would say
    widget.logic._catalogue = catalogue
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("riir")
    assert ui.stepsSpinBox.value == riir["checkpoint_default_steps"][first]
    ui.checkpointComboBox.currentIndex = ui.checkpointComboBox.findData(others[0])
    assert ui.stepsSpinBox.value == 9 and widget._parameterNode.GetParameter("Steps") == "9"
    ui.checkpointComboBox.currentIndex = ui.checkpointComboBox.findData(first)
    assert ui.stepsSpinBox.value == riir["checkpoint_default_steps"][first]


def test_the_network_grid_is_offered_for_learned_iterative_methods_and_reaches_the_run(panel, sample_pair):
    widget, scene = panel
    ui = widget.ui
    select_pair(widget, scene, sample_pair)
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("classical")
    assert not ui.workingSizeSpinBox.enabled  # the classical optimizer has no network grid
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("riir")
    assert ui.workingSizeSpinBox.enabled and ui.workingSizeSpinBox.value == 0  # 0 shows "as trained"
    settings = widget.logic.settings_from_parameters(widget._parameterNode)
    assert "working_size" not in settings.options  # the checkpoint's own grid
    ui.workingSizeSpinBox.value = 64
    assert widget._parameterNode.GetParameter("WorkingSize") == "64"
    assert widget.logic.settings_from_parameters(widget._parameterNode).options["working_size"] == 64


def test_bfloat16_is_offered_where_native_for_methods_that_take_it_and_reaches_the_run(panel, sample_pair):
    widget, scene = panel
    ui = widget.ui
    select_pair(widget, scene, sample_pair)
    native = widget.logic.method_catalogue()["bfloat16_devices"]  # what the worker's interpreter found
    assert ui.precisionComboBox.count == (2 if native else 1) and ui.precisionComboBox.currentData == "float32"
    if not native:  # as on a CPU with AVX512-BF16 or AMX
        ui.precisionComboBox.addItem("bfloat16", "bfloat16")
    for method, offered in (("classical", False), ("r2n2", False), ("riir", True), ("dio", True)):
        ui.methodComboBox.currentIndex = ui.methodComboBox.findData(method)
        assert ui.precisionComboBox.enabled == offered, method
    ui.precisionComboBox.currentIndex = ui.precisionComboBox.findData("bfloat16")
    assert widget._parameterNode.GetParameter("Precision") == "bfloat16"
    assert widget.logic.settings_from_parameters(widget._parameterNode).options["precision"] == "bfloat16"
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("r2n2")  # it computes in float32 only
    assert "precision" not in widget.logic.settings_from_parameters(widget._parameterNode).options


def test_series_mode_for_r2n2_lets_a_2d_plus_t_volume_be_both_fixed_and_moving(panel, sample_pair):
    widget, scene = panel
    ui = widget.ui
    fixed, moving = select_pair(widget, scene, sample_pair)
    ui.movingSelector.setCurrentNode(fixed)
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("classical")
    assert not ui.seriesCheckBox.enabled  # only methods that register 2D frames offer it
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("r2n2")
    assert ui.seriesCheckBox.enabled and "same node" in ui.runButton.toolTip
    ui.seriesCheckBox.checked = True
    ui.fixedFrameSpinBox.value = 3
    assert "same node" not in ui.runButton.toolTip
    settings = widget.logic.settings_from_parameters(widget._parameterNode)
    assert settings.options["frame_axis"] == 0 and settings.options["fixed_frame"] == 3


def test_r2n2s_weight_search_is_offered_only_for_r2n2_and_reaches_the_run_settings(panel, sample_pair):
    widget, scene = panel
    ui = widget.ui
    select_pair(widget, scene, sample_pair)
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("riir")
    assert not ui.weightSearchCheckBox.enabled
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("r2n2")
    assert ui.weightSearchCheckBox.enabled and not ui.weightSearchCheckBox.checked
    assert "weight_search" not in widget.logic.settings_from_parameters(widget._parameterNode).options  # as trained
    ui.weightSearchCheckBox.checked = True
    assert widget._parameterNode.GetParameter("WeightSearch") == "true"
    assert widget.logic.settings_from_parameters(widget._parameterNode).options["weight_search"] is True


def test_cubic_voxels_are_offered_where_they_are_an_opt_in_and_reach_the_run_settings(panel, sample_pair):
    """The classical optimizer works on the volume's grid unless asked; the networks always on cubic voxels."""
    widget, scene = panel
    ui = widget.ui
    select_pair(widget, scene, sample_pair)
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("riir")
    assert not ui.cubicVoxelsCheckBox.enabled
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("classical")
    assert ui.cubicVoxelsCheckBox.enabled and not ui.cubicVoxelsCheckBox.checked
    assert "working_voxels" not in widget.logic.settings_from_parameters(widget._parameterNode).options
    ui.cubicVoxelsCheckBox.checked = True
    assert widget._parameterNode.GetParameter("CubicVoxels") == "true"
    assert widget.logic.settings_from_parameters(widget._parameterNode).options["working_voxels"] == "isotropic"
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("riir")  # not sent where it is no opt-in
    assert "working_voxels" not in widget.logic.settings_from_parameters(widget._parameterNode).options


def test_r2n2s_gaussian_refinement_is_offered_only_for_r2n2_and_reaches_the_run_settings(panel, sample_pair):
    widget, scene = panel
    ui = widget.ui
    select_pair(widget, scene, sample_pair)
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("dio")
    assert not ui.refineGaussianSpinBox.enabled
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("r2n2")
    assert ui.refineGaussianSpinBox.enabled and ui.refineGaussianSpinBox.value == 0
    assert "refine_iterations" not in widget.logic.settings_from_parameters(widget._parameterNode).options  # off
    ui.refineGaussianSpinBox.value = 10
    assert widget._parameterNode.GetParameter("RefineIterations") == "10"
    assert widget.logic.settings_from_parameters(widget._parameterNode).options["refine_iterations"] == 10


def test_landmark_refinement_of_a_dio_result_can_be_watched_scored_and_undone(panel, qtbot, sample_pair,
                                                                              tmp_path):
    """The clinician's prompt workflow: register with DIO, place landmark pairs (slicer-core markups), refine,
    read the landmark distance before and after, undo."""
    import numpy as np
    from slicer.util import arrayFromGridTransform as transform_displacement
    from test_riir_deqreg import checkpoint
    widget, scene = panel
    ui = widget.ui
    select_pair(widget, scene, sample_pair)
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("dio")
    assert ui.representationComboBox.enabled
    ui.representationComboBox.currentIndex = ui.representationComboBox.findText("diffeomorphic")
    ui.checkpointComboBox.addItem("test", checkpoint(tmp_path, "dio", 3, channels=[8, 8, 8, 8], feature_channels=4))
    ui.checkpointComboBox.currentIndex = ui.checkpointComboBox.count - 1
    ui.stepsSpinBox.value = 20
    assert not ui.refineButton.enabled and "Run a registration first" in ui.refineButton.toolTip
    ui.runButton.click()
    qtbot.waitUntil(lambda: not widget.run.running, timeout=120000)
    first = widget.run
    assert first.state == "completed", first.message
    assert first.settings.options["representation"] == "diffeomorphic"
    before = transform_displacement(first.nodes["transform"]).copy()
    assert "landmark list" in ui.refineButton.toolTip and not ui.refineButton.enabled

    fixed_points = slicer_harness.add_landmarks(scene, "F", sample_pair.fixed_landmarks_ras[:5])
    moving_points = slicer_harness.add_landmarks(scene, "M", sample_pair.moving_landmarks_ras[:4])
    ui.fixedLandmarksSelector.setCurrentNode(fixed_points)
    ui.movingLandmarksSelector.setCurrentNode(moving_points)
    assert ui.fixedPlaceWidget.currentNode() is fixed_points  # the place buttons add to the chosen lists
    assert not ui.refineButton.enabled and "5 fixed but 4 moving" in ui.refineButton.toolTip
    moving_points.AddControlPoint(*sample_pair.moving_landmarks_ras[4])  # placing the fifth partner
    assert ui.refineButton.enabled

    ui.refineButton.click()
    assert not ui.runButton.enabled and not ui.refineButton.enabled
    qtbot.waitUntil(lambda: not widget.run.running, timeout=120000)
    refined = widget.run
    assert refined.state == "completed" and refined.parent is first, refined.message
    assert "Landmark distance" in ui.statusLabel.text
    assert refined.summary["tre_after_mm"] < 0.5 * refined.summary["tre_before_mm"]
    assert refined.nodes["browser"].GetNumberOfItems() > 1  # the refinement steps replay on their own
    assert "prompt_distance_mm" in refined.client.history[-1]
    np.testing.assert_array_equal(transform_displacement(first.nodes["transform"]), before)  # untouched

    assert ui.undoRefineButton.enabled
    ui.undoRefineButton.click()
    assert widget.run is first and not ui.undoRefineButton.enabled
    assert refined.nodes == {} and scene.GetNodeByID(first.nodes["transform"].GetID()) is not None
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == first.nodes["warping"].GetID()
    assert ui.refineButton.enabled  # refine again from the restored result


def test_the_polish_is_offered_for_the_network_methods_that_take_it_and_reaches_the_run(panel, sample_pair):
    widget, scene = panel
    ui = widget.ui
    select_pair(widget, scene, sample_pair)
    for method, offered in (("classical", False), ("r2n2", False), ("dio", True), ("voxelmorph", True),
                            ("deqreg", True), ("iirp", True), ("riir", True)):
        ui.methodComboBox.currentIndex = ui.methodComboBox.findData(method)
        assert ui.polishSpinBox.enabled == offered, method
    assert ui.polishSpinBox.value == 0  # "off": the paper's method alone
    assert "polish_iterations" not in widget.logic.settings_from_parameters(widget._parameterNode).options
    ui.polishSpinBox.value = 2
    assert widget._parameterNode.GetParameter("PolishIterations") == "2"
    assert widget.logic.settings_from_parameters(widget._parameterNode).options["polish_iterations"] == 2
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("r2n2")  # its transform stays its Gaussians
    assert "polish_iterations" not in widget.logic.settings_from_parameters(widget._parameterNode).options
    # DIO takes it in its free-form representation only: the polish is a free-form correction
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("dio")
    ui.representationComboBox.currentIndex = ui.representationComboBox.findText("freeform")
    assert ui.polishSpinBox.enabled
    assert widget.logic.settings_from_parameters(widget._parameterNode).options["polish_iterations"] == 2
    ui.representationComboBox.currentIndex = ui.representationComboBox.findText("diffeomorphic")
    assert not ui.polishSpinBox.enabled
    options = widget.logic.settings_from_parameters(widget._parameterNode).options
    assert options["representation"] == "diffeomorphic" and "polish_iterations" not in options
