"""What the slice views show: the fixed image with the warping moving image (or a channel) over it."""
from __future__ import annotations

__all__ = ["show_in_slice_views"]


def show_in_slice_views(scene, background=None, foreground=None, opacity: float = 0.5, label=None) -> None:
    """Set the layers of every slice view (what ``slicer.util.setSliceViewerLayers`` does, without needing
    the application object, so it also works headless)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(opacity)
        if label is not None:
            composite.SetLabelVolumeID(label.GetID())
