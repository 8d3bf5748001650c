"""Slicer without the application, for tests and the documentation screenshots (DESIGN.md §6).

- ``new_scene()``: a real MRML scene (slicer-core) with the logics Slicer would have registered (colours,
  sequences, application logic) and the three slice views of the default layout.
- ``SliceView``: a real ``vtkMRMLSliceLogic`` pipeline; ``rgba()`` reads the blended slice Slicer would draw,
  ``layer(...)`` one layer's greys, ``png(path)`` renders it offscreen (EGL).
- ``install_module_standins()``: ``slicer.ScriptedLoadableModule`` base classes (not part of slicer-core) and
  the flat ``qt`` shim on ``sys.path``, so ``IterativeRegistration.py`` imports as in Slicer.
"""
from __future__ import annotations

import os
import sys
import types
import unittest
from pathlib import Path

import numpy as np

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parent / "IterativeRegistration"
for path in (str(HERE / "qt_shim"), str(MODULE_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)

import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
_logics = []  # keep the logics alive as long as their scene


def new_scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app_logic = slicer.vtkMRMLApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLScene(scene)
    _logics[:] = [app_logic, colors, sequences]
    scene.app_logic = app_logic
    for name, orientation in VIEWS.items():
        slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        slice_node.SetName(name)
        slice_node.SetLayoutName(name)
        getattr(slice_node, f"SetOrientationTo{orientation}")()
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
    return scene


def add_volume(scene, name, image):
    """A SimpleITK image as a scalar volume node (geometry kept)."""
    import SimpleITK as sitk
    from iterreg.geometry import Geometry
    from iterreg_slicer.mrml_arrays import new_volume_like
    return new_volume_like(scene, name, sitk.GetArrayFromImage(image).astype(np.float32), Geometry.of(image))


def add_landmarks(scene, name, points_ras):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for p in points_ras:
        node.AddControlPoint(*[float(v) for v in p])
    return node


class SliceView:
    """One slice view of the scene, rendered as Slicer's slice logic does."""

    def __init__(self, scene, name: str = "Red", size: int = 256):
        self.scene = scene
        self.slice_node = next(scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
                               for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))
                               if scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetLayoutName() == name)
        self.slice_node.SetDimensions(size, size, 1)
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(scene.app_logic)
        self.logic.SetMRMLScene(scene)
        self.logic.SetSliceNode(self.slice_node)
        self.composite = self.logic.GetSliceCompositeNode()
        self.size = size

    def fit(self):
        self.logic.FitSliceToAll()

    def set_offset(self, offset_mm: float):
        self.logic.SetSliceOffset(offset_mm)

    def rgba(self) -> np.ndarray:
        """The blended slice (all layers, as displayed): ``[H, W, 4]`` uint8."""
        producer = self.logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        w, h, _ = image.GetDimensions()
        return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1).copy()

    def layer(self, volume) -> np.ndarray:
        """Greys of ``volume`` alone as this view would draw it (through its transforms), ``[H, W]`` float."""
        saved = (self.composite.GetBackgroundVolumeID(), self.composite.GetForegroundVolumeID(),
                 self.composite.GetLabelVolumeID())
        self.composite.SetBackgroundVolumeID(volume.GetID())
        self.composite.SetForegroundVolumeID(None)
        self.composite.SetLabelVolumeID(None)
        grey = self.rgba()[..., :3].astype(float).mean(axis=-1)
        self.composite.SetBackgroundVolumeID(saved[0])
        self.composite.SetForegroundVolumeID(saved[1])
        self.composite.SetLabelVolumeID(saved[2])
        return grey

    def png(self, path) -> None:
        """Render the view offscreen to a PNG (a real VTK render window, EGL)."""
        mapper = vtk.vtkImageMapper()
        mapper.SetInputConnection(self.logic.GetImageDataConnection())
        mapper.SetColorWindow(255)
        mapper.SetColorLevel(127.5)
        actor = vtk.vtkActor2D()
        actor.SetMapper(mapper)
        renderer = vtk.vtkRenderer()
        renderer.AddViewProp(actor)
        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(1)
        window.AddRenderer(renderer)
        window.SetSize(self.size, self.size)
        window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(window)
        grab.Update()
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()
        window.Finalize()


def install_module_standins() -> None:
    """``slicer.ScriptedLoadableModule`` as the module file expects it (the real one ships with Slicer)."""
    if "slicer.ScriptedLoadableModule" in sys.modules:
        return
    import qt

    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent if parent is not None else qt.QWidget()
            self.layout = self.parent.layout() or qt.QVBoxLayout(self.parent)
            self.moduleName = type(self).__name__[:-len("Widget")]

        def resourcePath(self, filename):
            return str(MODULE_DIR / "Resources" / filename)

        def setup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[:-len("Logic")]

        def getParameterNode(self):
            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetName(self.moduleName)
                if hasattr(self, "setDefaultParameters"):
                    self.setDefaultParameters(node)
                node = scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = module
    slicer.ScriptedLoadableModule = module


def update_proxies(browser) -> None:
    """What Slicer's Sequences module does when the browser's selected item changes."""
    for logic in _logics:
        if isinstance(logic, slicer.vtkSlicerSequencesLogic):
            logic.UpdateProxyNodesFromSequences(browser)
