"""IterativeRegistration: Slicer scripted module (Module / Widget / Logic / Test only; DESIGN.md §5).

The engine (``iterreg``) runs in a background worker process; ``iterreg_slicer`` puts its steps into the
scene. This file wires the panel to them. The parameter node uses the explicit get/set pattern of Slicer's
classic module template (rather than ``parameterNodeWrapper``) so the same code runs under the headless
test harness, where only slicer-core is available.
"""
import os
import sys

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

try:  # Slicer >= 5.6 has translations; older versions fall back to plain strings
    from slicer.i18n import tr as _
except ImportError:  # pragma: no cover
    def _(text):
        return text

# The engine and glue packages sit next to this file in a source checkout and in the extension's install tree.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

SIMILARITIES = ("lncc", "mse", "nmi")
OVERLAYS = ("moving image", "channel")
REPRESENTATIONS = ("freeform", "diffeomorphic", "svf")


def polishApplies(option_names, representation: str) -> bool:
    """Whether a method with these options takes the polish on the image grid in this representation: the polish
    is a free-form correction, so DIO's diffeomorphic representations go without it (the engine refuses both)."""
    return "polish_iterations" in option_names and (
        "representation" not in option_names or representation in ("", REPRESENTATIONS[0]))


def cubicVoxelsOptIn(options) -> bool:
    """Whether a method (its catalogue options: name -> default) offers cubic voxels as an opt-in: the classical
    optimizer works on the volume's own grid by default; the networks work on cubic voxels always."""
    return isinstance(options, dict) and options.get("working_voxels") == "image"


class IterativeRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Iterative Registration")
        self.parent.categories = [_("Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["IterativeRegistration developers"]
        self.parent.helpText = _(
            "Learned iterative deformable registration (RIIR, DEQReg, IIRP-Net, R2N2, DIO) and a classical "
            "optimizer, shown step by step: the moving image warping, the displacement field and the "
            "networks' hidden states. Registration runs in a background process; Slicer stays responsive.")
        self.parent.acknowledgementText = _(
            "Sample anatomy: MNI ICBM152 2009 template as distributed with nilearn (BSD-3-Clause).")


# --------------------------------------------------------------------------------------------------------------
class IterativeRegistrationLogic(ScriptedLoadableModuleLogic):
    """Headless: builds runs from MRML nodes. No widgets here."""

    PARAMETERS = {  # name -> default (strings: the parameter node stores text)
        "Method": "classical", "Steps": "", "Device": "auto", "Checkpoint": "", "Similarity": "lncc",
        "RegularizationWeight": "1.0", "Tolerance": "0.0001", "ChannelVolumes": "true", "Jacobian": "true", "Centres": "true",
        "KeepPrevious": "true", "UsePrompts": "false", "Overlay": "moving image", "Series": "false", "FixedFrame": "0",
        "Representation": "freeform", "WorkingSize": "0", "WeightSearch": "false", "CubicVoxels": "false",
        "RefineIterations": "0", "Precision": "float32", "PolishIterations": "0",
    }
    REFERENCES = ("FixedVolume", "MovingVolume", "FixedLandmarks", "MovingLandmarks")

    def __init__(self, worker_command=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.worker_command = worker_command
        self._catalogue = None
        self.runs = []

    def setDefaultParameters(self, parameterNode):
        for name, value in self.PARAMETERS.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    def method_catalogue(self) -> dict:
        """Methods, their defaults and whether a GPU is visible, asked once from the worker's interpreter."""
        if self._catalogue is None:
            from iterreg.worker_client import describe_methods
            self._catalogue = describe_methods(self.worker_command)
        return self._catalogue

    def method_info(self, name: str) -> dict:
        for info in self.method_catalogue()["methods"]:
            if info["name"] == name:
                return info
        raise ValueError(f"unknown method '{name}'")

    @staticmethod
    def input_problem(fixed, moving, fixed_landmarks=None, moving_landmarks=None, series=False):
        from iterreg_slicer.scene_registration import SceneRegistration
        return SceneRegistration.input_problem(fixed, moving, fixed_landmarks, moving_landmarks, series)

    def settings_from_parameters(self, parameterNode):
        from iterreg_slicer.scene_registration import RunSettings
        p = parameterNode.GetParameter
        method = p("Method")
        options = {}
        option_names = self.method_info(method)["options"] if self._catalogue else {}
        for key, parameter, cast in (("similarity", "Similarity", str),
                                     ("regularization_weight", "RegularizationWeight", float),
                                     ("tolerance", "Tolerance", float)):
            if key in option_names and p(parameter):
                options[key] = cast(p(parameter))
        if "working_size" in option_names and int(p("WorkingSize") or 0) > 0:  # 0: the checkpoint's own grid
            options["working_size"] = int(p("WorkingSize"))
        if "precision" in option_names and p("Precision") == "bfloat16":  # float32: the engine's default
            options["precision"] = p("Precision")
        if polishApplies(option_names, p("Representation")) and int(p("PolishIterations") or 0) > 0:  # 0: none
            options["polish_iterations"] = int(p("PolishIterations"))
        if "representation" in option_names and p("Representation"):
            options["representation"] = p("Representation")
        if "frame_axis" in option_names and p("Series") == "true":
            # a 2D+t series loads as a volume whose slices (array axis 0, K) are the time frames
            options["frame_axis"], options["fixed_frame"] = 0, int(p("FixedFrame") or 0)
        if cubicVoxelsOptIn(option_names) and p("CubicVoxels") == "true":
            options["working_voxels"] = "isotropic"
        if "weight_search" in option_names and p("WeightSearch") == "true":
            options["weight_search"] = True
        if "refine_iterations" in option_names and int(p("RefineIterations") or 0) > 0:  # 0: the network's own
            options["refine_iterations"] = int(p("RefineIterations"))
        return RunSettings(method=method, steps=int(p("Steps")) if p("Steps") else None,
                           checkpoint=p("Checkpoint") or None, device=p("Device") or "auto", options=options,
                           channel_volumes=p("ChannelVolumes") == "true", jacobian=p("Jacobian") == "true",
                           mark_centres=p("Centres") != "false",
                           keep_previous=p("KeepPrevious") == "true", use_landmarks_as_prompts=p("UsePrompts") == "true")

    def start(self, fixed, moving, settings, fixed_landmarks=None, moving_landmarks=None, on_step=None,
              on_finished=None):
        """Start a run in the background; returns the :class:`SceneRegistration` (poll it, or ``wait()``)."""
        from iterreg_slicer.scene_registration import SceneRegistration
        run = SceneRegistration(slicer.mrmlScene, fixed, moving, settings, fixed_landmarks, moving_landmarks,
                                command=self.worker_command, on_step=on_step, on_finished=on_finished)
        run.start()
        self.runs.append(run)
        return run

    def refine(self, run, settings, fixed_landmarks, moving_landmarks, on_step=None, on_finished=None):
        """Continue a finished run from its result with the landmarks as prompts (a new run in the scene,
        replayable on its own); the refined run stays untouched so :meth:`undo_refinement` can go back to it."""
        from iterreg_slicer.scene_registration import SceneRegistration
        if not self.method_info(run.settings.method).get("refines"):
            raise ValueError(f"{run.settings.method} cannot refine a result; use DIO or the classical optimizer.")
        settings.method, settings.checkpoint = run.settings.method, run.settings.checkpoint
        refinement = SceneRegistration(slicer.mrmlScene, run.fixed_node, run.moving_node, settings, fixed_landmarks,
                                       moving_landmarks, command=self.worker_command, on_step=on_step,
                                       on_finished=on_finished, refine=run)
        refinement.start()
        self.runs.append(refinement)
        return refinement

    def undo_refinement(self, refinement):
        """Remove a refinement's outputs; the run it refined is the result again (returned)."""
        parent = refinement.undo()
        if refinement in self.runs:
            self.runs.remove(refinement)
        return parent

    @staticmethod
    def missing_dependencies():
        from iterreg_slicer.dependencies import missing_packages
        return missing_packages()

    @staticmethod
    def install_dependencies(requirements):
        from iterreg_slicer.dependencies import install
        install(requirements)


# --------------------------------------------------------------------------------------------------------------
class IterativeRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. PythonQt style (properties as attributes, ``signal.connect``) so it also runs on PySide6
    through the test harness's flat ``qt`` shim."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self.run = None
        self.timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IterativeRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        for selector in (self.ui.fixedSelector, self.ui.movingSelector, self.ui.fixedLandmarksSelector,
                         self.ui.movingLandmarksSelector):
            selector.setMRMLScene(slicer.mrmlScene)
            selector.currentNodeChanged.connect(self.updateParameterNodeFromGUI)
        if self.logic is None:
            self.logic = IterativeRegistrationLogic()
        self.ui.similarityComboBox.addItems(list(SIMILARITIES))
        self.ui.representationComboBox.addItems(list(REPRESENTATIONS))
        for place in (self.ui.fixedPlaceWidget, self.ui.movingPlaceWidget):
            place.setMRMLScene(slicer.mrmlScene)
        self.ui.fixedLandmarksSelector.currentNodeChanged.connect(self.ui.fixedPlaceWidget.setCurrentNode)
        self.ui.movingLandmarksSelector.currentNodeChanged.connect(self.ui.movingPlaceWidget.setCurrentNode)
        self.ui.overlayComboBox.addItems(list(OVERLAYS))
        self._fillMethods()
        for combo in (self.ui.methodComboBox, self.ui.deviceComboBox, self.ui.similarityComboBox,
                      self.ui.checkpointComboBox, self.ui.representationComboBox, self.ui.precisionComboBox):
            combo.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.methodComboBox.currentIndexChanged.connect(self.onMethodChanged)
        self.ui.representationComboBox.currentIndexChanged.connect(self.updatePolishAvailability)
        self.ui.checkpointComboBox.currentIndexChanged.connect(self.onCheckpointChanged)
        self.ui.overlayComboBox.currentIndexChanged.connect(self.onOverlayChanged)
        for spin in (self.ui.stepsSpinBox, self.ui.regularizationSpinBox, self.ui.toleranceSpinBox,
                     self.ui.workingSizeSpinBox, self.ui.fixedFrameSpinBox, self.ui.refineGaussianSpinBox,
                     self.ui.polishSpinBox):
            spin.valueChanged.connect(self.updateParameterNodeFromGUI)
        for box in (self.ui.channelVolumesCheckBox, self.ui.jacobianCheckBox, self.ui.centresCheckBox,
                    self.ui.keepPreviousCheckBox, self.ui.promptCheckBox, self.ui.seriesCheckBox,
                    self.ui.weightSearchCheckBox, self.ui.cubicVoxelsCheckBox):
            box.toggled.connect(self.updateParameterNodeFromGUI)
        self.ui.runButton.clicked.connect(self.onRun)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.refineButton.clicked.connect(self.onRefine)
        self.ui.undoRefineButton.clicked.connect(self.onUndoRefine)
        self.ui.checkpointBrowseButton.clicked.connect(self.onBrowseCheckpoint)
        self.ui.stepSlider.valueChanged.connect(self.onStepSlider)
        self.ui.channelIndexSpinBox.valueChanged.connect(self.onChannelChanged)
        self.ui.channelComboBox.currentIndexChanged.connect(self.onChannelChanged)
        # A closed scene takes the parameter node (and any run's nodes) with it: stop and start afresh.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.setParameterNode(self.logic.getParameterNode())
        self.onMethodChanged()

    def enter(self):
        self.setParameterNode(self.logic.getParameterNode())

    def onSceneStartClose(self, caller, event):
        self._stopRun()
        self.run = None
        self._parameterNode = None
        self.ui.stepSlider.enabled = False
        self.ui.statusLabel.text = ""

    def onSceneEndClose(self, caller, event):
        if self.parent.isVisible():
            self.setParameterNode(self.logic.getParameterNode())

    def _fillMethods(self):
        try:
            catalogue = self.logic.method_catalogue()
        except RuntimeError as exc:
            missing = self.logic.missing_dependencies()
            self.ui.statusLabel.text = (_("Missing Python packages: {0}. Press Run to install them.").format(
                ", ".join(missing)) if missing else str(exc))
            return
        for info in catalogue["methods"]:
            self.ui.methodComboBox.addItem(info["title"], info["name"])
        self.ui.deviceComboBox.addItem(_("auto (GPU if available)"), "auto")
        self.ui.deviceComboBox.addItem("CPU", "cpu")
        for i, name in enumerate(catalogue.get("cuda_devices", [])):
            self.ui.deviceComboBox.addItem(f"GPU {i}: {name}", f"cuda:{i}")
        self.ui.precisionComboBox.addItem("float32", "float32")
        native = catalogue.get("bfloat16_devices", [])
        if native:  # offered only where the hardware has it; emulated it would be slower than float32
            self.ui.precisionComboBox.addItem(_("bfloat16 (faster; native on {0})").format(", ".join(native)),
                                              "bfloat16")

    def cleanup(self):
        self.removeObservers()
        self._stopRun()

    def _stopRun(self):
        if self.run is not None and self.run.running:
            self.run.cancel()
            self.run.wait(timeout=30)  # the worker stops at the next step; its files and memory are freed

    # --- parameter node <-> GUI ---------------------------------------------------------------------------
    def setParameterNode(self, parameterNode):
        self.logic.setDefaultParameters(parameterNode)
        self._parameterNode = parameterNode
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self):
        p = self._parameterNode
        if p is None:
            return
        self._updatingGUI = True
        try:
            for name, selector in (("FixedVolume", self.ui.fixedSelector), ("MovingVolume", self.ui.movingSelector),
                                   ("FixedLandmarks", self.ui.fixedLandmarksSelector),
                                   ("MovingLandmarks", self.ui.movingLandmarksSelector)):
                node = p.GetNodeReference(name)
                if node is not None:
                    selector.setCurrentNode(node)
            _selectData(self.ui.methodComboBox, p.GetParameter("Method"))
            _selectData(self.ui.deviceComboBox, p.GetParameter("Device"))
            _selectData(self.ui.precisionComboBox, p.GetParameter("Precision"))
            self.ui.similarityComboBox.currentIndex = max(0, self.ui.similarityComboBox.findText(p.GetParameter("Similarity")))
            self.ui.representationComboBox.currentIndex = max(
                0, self.ui.representationComboBox.findText(p.GetParameter("Representation")))
            if p.GetParameter("Steps"):
                self.ui.stepsSpinBox.value = int(p.GetParameter("Steps"))
            self.ui.regularizationSpinBox.value = float(p.GetParameter("RegularizationWeight"))
            self.ui.toleranceSpinBox.value = float(p.GetParameter("Tolerance"))
            self.ui.workingSizeSpinBox.value = int(p.GetParameter("WorkingSize") or 0)
            self.ui.channelVolumesCheckBox.checked = p.GetParameter("ChannelVolumes") == "true"
            self.ui.jacobianCheckBox.checked = p.GetParameter("Jacobian") == "true"
            self.ui.centresCheckBox.checked = p.GetParameter("Centres") != "false"
            self.ui.seriesCheckBox.checked = p.GetParameter("Series") == "true"
            self.ui.weightSearchCheckBox.checked = p.GetParameter("WeightSearch") == "true"
            self.ui.cubicVoxelsCheckBox.checked = p.GetParameter("CubicVoxels") == "true"
            self.ui.refineGaussianSpinBox.value = int(p.GetParameter("RefineIterations") or 0)
            self.ui.polishSpinBox.value = int(p.GetParameter("PolishIterations") or 0)
            self.ui.fixedFrameSpinBox.value = int(p.GetParameter("FixedFrame") or 0)
            self.ui.keepPreviousCheckBox.checked = p.GetParameter("KeepPrevious") == "true"
            self.ui.promptCheckBox.checked = p.GetParameter("UsePrompts") == "true"
        finally:
            self._updatingGUI = False
        self.updateRunButton()

    def updateParameterNodeFromGUI(self, *_args):
        p = self._parameterNode
        if p is None or self._updatingGUI:
            return
        wasModified = p.StartModify()
        for name, selector in (("FixedVolume", self.ui.fixedSelector), ("MovingVolume", self.ui.movingSelector),
                               ("FixedLandmarks", self.ui.fixedLandmarksSelector),
                               ("MovingLandmarks", self.ui.movingLandmarksSelector)):
            p.SetNodeReferenceID(name, selector.currentNodeID())
        p.SetParameter("Method", _currentData(self.ui.methodComboBox) or "")
        p.SetParameter("Device", _currentData(self.ui.deviceComboBox) or "auto")
        p.SetParameter("Precision", _currentData(self.ui.precisionComboBox) or "float32")
        p.SetParameter("Steps", str(self.ui.stepsSpinBox.value))
        p.SetParameter("Checkpoint", _currentData(self.ui.checkpointComboBox) or "")
        p.SetParameter("Similarity", self.ui.similarityComboBox.currentText)
        p.SetParameter("Representation", self.ui.representationComboBox.currentText)
        p.SetParameter("RegularizationWeight", str(self.ui.regularizationSpinBox.value))
        p.SetParameter("Tolerance", str(self.ui.toleranceSpinBox.value))
        p.SetParameter("WorkingSize", str(self.ui.workingSizeSpinBox.value))
        p.SetParameter("ChannelVolumes", "true" if self.ui.channelVolumesCheckBox.checked else "false")
        p.SetParameter("Jacobian", "true" if self.ui.jacobianCheckBox.checked else "false")
        p.SetParameter("Centres", "true" if self.ui.centresCheckBox.checked else "false")
        p.SetParameter("Series", "true" if self.ui.seriesCheckBox.checked else "false")
        p.SetParameter("WeightSearch", "true" if self.ui.weightSearchCheckBox.checked else "false")
        p.SetParameter("CubicVoxels", "true" if self.ui.cubicVoxelsCheckBox.checked else "false")
        p.SetParameter("RefineIterations", str(self.ui.refineGaussianSpinBox.value))
        p.SetParameter("PolishIterations", str(self.ui.polishSpinBox.value))
        p.SetParameter("FixedFrame", str(self.ui.fixedFrameSpinBox.value))
        p.SetParameter("KeepPrevious", "true" if self.ui.keepPreviousCheckBox.checked else "false")
        p.SetParameter("UsePrompts", "true" if self.ui.promptCheckBox.checked else "false")
        p.EndModify(wasModified)
        self._observeLandmarks()
        self.updateRunButton()

    def _observeLandmarks(self):
        """Placing or deleting a point changes what can run: watch the chosen landmark lists."""
        events = (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, slicer.vtkMRMLMarkupsNode.PointRemovedEvent)
        for node in getattr(self, "_observedLandmarks", []):
            for event in events:
                self.removeObserver(node, event, self._onLandmarksChanged)
        self._observedLandmarks = [n for n in (self.ui.fixedLandmarksSelector.currentNode(),
                                               self.ui.movingLandmarksSelector.currentNode()) if n is not None]
        self._observedLandmarks = list(dict.fromkeys(self._observedLandmarks))  # the same list twice: once
        for node in self._observedLandmarks:
            for event in events:
                self.addObserver(node, event, self._onLandmarksChanged)

    def _onLandmarksChanged(self, caller, event):
        self.updateRunButton()

    def onMethodChanged(self, *_args):
        name = _currentData(self.ui.methodComboBox)
        if not name:
            return
        info = self.logic.method_info(name)
        self._updatingGUI = True
        self.ui.stepsSpinBox.minimum = 1
        self.ui.stepsSpinBox.maximum = info["max_steps"]
        self.ui.stepsSpinBox.value = info["default_steps"]
        self._updatingGUI = False
        self.ui.methodDescriptionLabel.text = info["description"]
        self.ui.checkpointComboBox.clear()
        for path in info.get("bundled_checkpoints", []):
            self.ui.checkpointComboBox.addItem(_("{0} (bundled)").format(os.path.basename(path)), path)
        self.ui.checkpointComboBox.enabled = info["needs_checkpoint"]
        self.ui.checkpointBrowseButton.enabled = info["needs_checkpoint"]
        options = info["options"]
        self.ui.similarityComboBox.enabled = "similarity" in options
        self.ui.representationComboBox.enabled = "representation" in options
        self.ui.precisionComboBox.enabled = "precision" in options and self.ui.precisionComboBox.count > 1
        self.ui.regularizationSpinBox.enabled = "regularization_weight" in options
        self.ui.toleranceSpinBox.enabled = "tolerance" in options
        self.ui.workingSizeSpinBox.enabled = "working_size" in options
        self.ui.seriesCheckBox.enabled = self.ui.fixedFrameSpinBox.enabled = "frame_axis" in options
        self.ui.weightSearchCheckBox.enabled = "weight_search" in options
        self.ui.cubicVoxelsCheckBox.enabled = cubicVoxelsOptIn(options)
        self.ui.refineGaussianSpinBox.enabled = "refine_iterations" in options
        self.updatePolishAvailability()
        for key, widget in (("regularization_weight", self.ui.regularizationSpinBox),
                            ("tolerance", self.ui.toleranceSpinBox)):
            if key in options:
                widget.value = float(options[key])
        self.updateParameterNodeFromGUI()

    def updatePolishAvailability(self, *_args):
        name = _currentData(self.ui.methodComboBox)
        self.ui.polishSpinBox.enabled = bool(name) and polishApplies(
            self.logic.method_info(name)["options"], self.ui.representationComboBox.currentText)

    def updateRunButton(self):
        running = self.run is not None and self.run.running
        problem = self.logic.input_problem(self.ui.fixedSelector.currentNode(), self.ui.movingSelector.currentNode(),
                                           self.ui.fixedLandmarksSelector.currentNode(),
                                           self.ui.movingLandmarksSelector.currentNode(),
                                           series=self.ui.seriesCheckBox.checked and self.ui.seriesCheckBox.enabled)
        name = _currentData(self.ui.methodComboBox)
        if problem is None and not name:
            problem = _("No registration method is available; see the status below.")
        if problem is None and self.logic.method_info(name)["needs_checkpoint"] and not _currentData(self.ui.checkpointComboBox):
            problem = _("This method is learned: choose a checkpoint.")
        self.ui.runButton.enabled = problem is None and not running
        self.ui.runButton.toolTip = problem or _("Register the moving volume onto the fixed volume")
        self.ui.cancelButton.enabled = running
        refine_problem = None if running else self._refineProblem()
        self.ui.refineButton.enabled = not running and refine_problem is None
        self.ui.refineButton.toolTip = refine_problem or _(
            "Continue the last result with the landmark pairs as prompts; each refinement can be undone")
        refined = self.run is not None and self.run.parent is not None and not running
        self.ui.undoRefineButton.enabled = refined
        self.ui.undoRefineButton.toolTip = _("Remove the last refinement and go back to the result it refined") \
            if refined else _("The last run is not a refinement")

    def _refineProblem(self):
        """Why "Refine with landmarks" cannot run now, or None."""
        run = self.run
        if run is None or run.result_displacement is None:
            return _("Run a registration first; a refinement continues its result.")
        if not self.logic.method_info(run.settings.method).get("refines"):
            return _("{0} cannot refine a result; run DIO or the classical optimizer.").format(run.settings.method)
        fixed, moving = self.ui.fixedLandmarksSelector.currentNode(), self.ui.movingLandmarksSelector.currentNode()
        if fixed is None or moving is None:
            return _("Choose (or create) a fixed and a moving landmark list and place matching points.")
        return self.logic.input_problem(run.fixed_node, run.moving_node, fixed, moving)

    def onCheckpointChanged(self, *_args):
        """A bundled checkpoint that decides its own step count (RIIR: the T it was trained with) sets the steps."""
        name, path = _currentData(self.ui.methodComboBox), _currentData(self.ui.checkpointComboBox)
        if self._updatingGUI or not name or not path:
            return
        steps = self.logic.method_info(name).get("checkpoint_default_steps", {}).get(path)
        if steps:
            self.ui.stepsSpinBox.value = steps

    def onBrowseCheckpoint(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Checkpoint"), "", "Checkpoints (*.safetensors)")
        if path:
            self.ui.checkpointComboBox.addItem(os.path.basename(path), path)
            self.ui.checkpointComboBox.setCurrentIndex(self.ui.checkpointComboBox.count - 1)

    # --- run ----------------------------------------------------------------------------------------------
    def onRun(self):
        missing = self.logic.missing_dependencies()
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    _("IterativeRegistration needs these Python packages: {0}. Install them now?").format(", ".join(missing))):
                self.ui.statusLabel.text = _("Not started: required packages are missing.")
                return
            self.logic.install_dependencies(missing)
        from iterreg_slicer.worker_timer import WorkerTimer
        p = self._parameterNode
        settings = self.logic.settings_from_parameters(p)
        settings.steps = self.ui.stepsSpinBox.value
        settings.channel_index = self.ui.channelIndexSpinBox.value
        fixed, moving = p.GetNodeReference("FixedVolume"), p.GetNodeReference("MovingVolume")
        try:
            self.run = self.logic.start(fixed, moving, settings, p.GetNodeReference("FixedLandmarks"),
                                        p.GetNodeReference("MovingLandmarks"), on_step=self.onStep,
                                        on_finished=self.onFinished)
        except (ValueError, RuntimeError) as exc:
            self.ui.statusLabel.text = str(exc)
            return
        self.ui.progressBar.maximum = settings.steps
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting the worker...")
        self.ui.stepSlider.enabled = False
        self.onOverlayChanged()
        self._showChart()
        self.timer = WorkerTimer(self.run)
        self.timer.start()
        self.updateRunButton()

    def onRefine(self):
        from iterreg_slicer.worker_timer import WorkerTimer
        p = self._parameterNode
        settings = self.logic.settings_from_parameters(p)
        settings.steps = self.ui.stepsSpinBox.value
        settings.channel_index = self.ui.channelIndexSpinBox.value
        try:
            self.run = self.logic.refine(self.run, settings, self.ui.fixedLandmarksSelector.currentNode(),
                                         self.ui.movingLandmarksSelector.currentNode(), on_step=self.onStep,
                                         on_finished=self.onFinished)
        except (ValueError, RuntimeError) as exc:
            self.ui.statusLabel.text = str(exc)
            return
        for place in (self.ui.fixedPlaceWidget, self.ui.movingPlaceWidget):
            place.placeModeEnabled = False  # clicks in the views during the run must not add points
        self.ui.progressBar.maximum = settings.steps
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Refining with {0} landmark pairs...").format(
            self.ui.fixedLandmarksSelector.currentNode().GetNumberOfControlPoints())
        self.ui.stepSlider.enabled = False
        self.onOverlayChanged()
        self._showChart()
        self.timer = WorkerTimer(self.run)
        self.timer.start()
        self.updateRunButton()

    def onUndoRefine(self):
        try:
            self.run = self.logic.undo_refinement(self.run)
        except ValueError as exc:
            self.ui.statusLabel.text = str(exc)
            return
        self.ui.statusLabel.text = _("Refinement undone: {0} is the result again.").format(self.run.name)
        self._showSteps(self.run)
        self.onOverlayChanged()
        self.updateRunButton()

    def onCancel(self):
        if self.run is not None:
            self.run.cancel()
            self.ui.statusLabel.text = _("Cancelling after the current step...")

    def onStep(self, run, step):
        total = run.client.info.get("steps") or self.ui.progressBar.maximum
        self.ui.progressBar.maximum = total
        self.ui.progressBar.value = run.steps_done
        note = f" (note: {run.warnings[-1]})" if run.warnings else ""
        self.ui.statusLabel.text = f"{run.progress_text()} — {step.phase}{note}"
        if self.ui.channelComboBox.count == 0 and step.channels:
            self.ui.channelComboBox.addItems(list(step.channels))

    def onFinished(self, run):
        if run.state == "completed" and run.steps_done:  # converged before the step budget: the run is done
            self.ui.progressBar.maximum = run.steps_done
            self.ui.progressBar.value = run.steps_done
        message = run.message
        before, after = run.summary.get("tre_before_mm"), run.summary.get("tre_after_mm")
        if before is not None and after is not None and before == before and after == after:  # not NaN
            message += _(" Landmark distance {0:.2f} mm before, {1:.2f} mm after.").format(before, after)
        self.ui.statusLabel.text = message
        self._showSteps(run)
        self.updateRunButton()

    def _showSteps(self, run):
        browser = run.nodes.get("browser")
        self.ui.stepSlider.enabled = browser is not None
        if browser is not None:
            self.ui.stepSlider.maximum = browser.GetNumberOfItems() - 1
            self.ui.stepSlider.value = browser.GetNumberOfItems() - 1

    def onStepSlider(self, value):
        browser = self.run.nodes.get("browser") if self.run is not None else None
        if browser is not None:
            browser.SetSelectedItemNumber(int(value))
            self.ui.stepLabel.text = _("step {0}").format(browser.GetMasterSequenceNode().GetNthIndexValue(int(value)))

    def onChannelChanged(self, *_args):
        if self.run is None:
            return
        if self.ui.channelComboBox.currentText and self.run.running:
            self.run.channel_name = self.ui.channelComboBox.currentText  # a tensor switch applies to later steps
        self.run.select_channel_map(self.ui.channelIndexSpinBox.value)

    def onOverlayChanged(self, *_args):
        from iterreg_slicer.views import show_in_slice_views
        if self.run is None:
            return
        wantChannel = self.ui.overlayComboBox.currentText == "channel" and "channel" in self.run.nodes
        foreground = self.run.nodes["channel"] if wantChannel else self.run.nodes["warping"]
        show_in_slice_views(slicer.mrmlScene, self.run.fixed_node, foreground, 0.5)

    def _showChart(self):
        plots = getattr(getattr(slicer, "modules", None), "plots", None)
        if plots is not None:
            plots.logic().ShowChartInLayout(self.run.nodes["chart"])


def _currentData(combo):
    index = combo.currentIndex
    return combo.itemData(index) if index >= 0 else None


def _selectData(combo, value):
    index = combo.findData(value)
    if index >= 0:
        combo.currentIndex = index


# --------------------------------------------------------------------------------------------------------------
class IterativeRegistrationTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the engine registers the bundled pair, and the Logic streams a real run into the
    scene (transform, sequences, plot)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_engine_registers_the_bundled_pair()
        self.setUp()
        self.test_logic_streams_a_run_into_the_scene()
        self.setUp()
        self.test_a_result_is_refined_with_landmarks_and_the_refinement_undone()

    def _sample(self):
        os.environ.setdefault("ITERREG_RESOURCES", os.path.join(_HERE, "..", "Resources"))
        from iterreg.resources import sample_pair_dir
        from iterreg.sample_data import read_pair
        return read_pair(sample_pair_dir())

    def test_engine_registers_the_bundled_pair(self):
        self.delayDisplay("Registering the bundled sample pair with the classical optimizer")
        import numpy as np
        import SimpleITK as sitk
        import torch

        from iterreg.imaging import prepare_pair
        from iterreg.methods import get_method
        from iterreg.metrics import dice
        from iterreg.spatial import warp_labels

        pair = self._sample()
        prepared = prepare_pair(pair.fixed, pair.moving)
        steps = list(get_method("classical").create().run(prepared.fixed, prepared.moving, steps=60))
        moving_labels = torch.from_numpy(sitk.GetArrayFromImage(pair.moving_labels).astype(np.int64))[None, None]
        fixed_labels = sitk.GetArrayFromImage(pair.fixed_labels)
        before = dice(fixed_labels, moving_labels[0, 0].numpy())["mean"]
        after = dice(fixed_labels, warp_labels(moving_labels, steps[-1].displacement)[0, 0].numpy())["mean"]
        self.assertGreater(after, before)
        self.delayDisplay(f"Dice {before:.3f} -> {after:.3f} in {len(steps)} steps")

    def test_logic_streams_a_run_into_the_scene(self):
        self.delayDisplay("Running the classical method through the background worker")
        from iterreg_slicer.scene_registration import RunSettings

        _, fixed, moving = self._sample_volumes()
        logic = IterativeRegistrationLogic()
        run = logic.start(fixed, moving, RunSettings(steps=15))
        self._wait(run)
        self.assertEqual(run.state, "completed", run.message)
        self.assertEqual(run.plot.table.GetTable().GetNumberOfRows(), run.steps_done)
        self.assertGreater(run.nodes["browser"].GetNumberOfItems(), 1)
        self.assertIsNone(moving.GetParentTransformNode())
        self.delayDisplay(run.message)

    def _sample_volumes(self):
        """The bundled pair as two volume nodes in the scene: (pair, fixed node, moving node)."""
        import SimpleITK as sitk
        from iterreg.geometry import Geometry
        from iterreg_slicer.mrml_arrays import new_volume_like
        pair = self._sample()
        nodes = [new_volume_like(slicer.mrmlScene, name, sitk.GetArrayFromImage(image), Geometry.of(image))
                 for name, image in (("fixed", pair.fixed), ("moving", pair.moving))]
        return pair, *nodes

    def _wait(self, run):
        import time
        while run.poll():
            slicer.app.processEvents()
            time.sleep(0.02)  # poll like the panel's timer does, leaving the CPU to the worker

    def test_a_result_is_refined_with_landmarks_and_the_refinement_undone(self):
        self.delayDisplay("Refining a classical result with five landmark pairs")
        from iterreg_slicer.scene_registration import RunSettings

        pair, fixed, moving = self._sample_volumes()
        logic = IterativeRegistrationLogic()
        first = logic.start(fixed, moving, RunSettings(steps=10))
        self._wait(first)
        lists = []
        for name, points in (("F", pair.fixed_landmarks_ras[:5]), ("M", pair.moving_landmarks_ras[:5])):
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            for point in points:
                node.AddControlPoint(*[float(v) for v in point])
            lists.append(node)
        refined = logic.refine(first, RunSettings(steps=20), *lists)
        self._wait(refined)
        self.assertEqual(refined.state, "completed", refined.message)
        self.assertLess(refined.summary["tre_after_mm"], refined.summary["tre_before_mm"])
        self.assertIs(logic.undo_refinement(refined), first)
        self.assertEqual(refined.nodes, {})
        self.delayDisplay(f"Landmark distance {refined.summary['tre_before_mm']:.2f} -> "
                          f"{refined.summary['tre_after_mm']:.2f} mm; undone")
