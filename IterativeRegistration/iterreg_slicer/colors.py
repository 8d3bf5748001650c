"""Colour tables made here (so Slicer and the headless tests show the same thing): a diverging map for
signed channels and a Jacobian map that marks folding."""
from __future__ import annotations

import numpy as np
import slicer

__all__ = ["diverging_colors", "jacobian_colors", "show_signed", "JACOBIAN_RANGE"]

JACOBIAN_RANGE = (0.0, 2.0)  # 1 = volume preserved, in the middle


def _table(scene, name: str, rgba: np.ndarray):
    node = scene.GetFirstNodeByName(name)
    if node is not None and node.IsA("vtkMRMLColorTableNode"):
        return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetTypeToUser()
    node.SetNumberOfColors(len(rgba))
    for i, (r, g, b, a) in enumerate(rgba):
        node.SetColor(i, f"{i}", float(r), float(g), float(b), float(a))
    node.SetAttribute("Category", "IterativeRegistration")
    scene.AddNode(node)
    return node


def diverging_colors(scene):
    """Cyan-blue (negative), black (zero), red-yellow (positive): signed maps over a grey image."""
    t = np.linspace(-1, 1, 256)
    neg, pos = np.clip(-t, 0, 1), np.clip(t, 0, 1)
    rgba = np.stack([np.clip(2 * pos, 0, 1), np.clip(2 * pos - 1, 0, 1) + np.clip(2 * neg - 1, 0, 1),
                     np.clip(2 * neg, 0, 1), np.ones_like(t)], axis=1)
    return _table(scene, "IterativeRegistration diverging", rgba)


def jacobian_colors(scene):
    """Over JACOBIAN_RANGE: blue (shrinking) - white (1) - red (growing); magenta at <= 0 (folding)."""
    t = np.linspace(JACOBIAN_RANGE[0], JACOBIAN_RANGE[1], 256)
    below, above = np.clip(1 - t, 0, 1), np.clip(t - 1, 0, 1)
    rgba = np.stack([1 - below, 1 - np.maximum(below, above), 1 - above, np.ones_like(t)], axis=1)
    rgba[t <= 0.0 + (t[1] - t[0])] = (1.0, 0.0, 1.0, 1.0)
    return _table(scene, "IterativeRegistration Jacobian", rgba)


def show_signed(display, array: np.ndarray, percentile: float = 99.0) -> None:
    """Window a signed map symmetrically around 0 from its own values (set explicitly on every update:
    automatic window/level is not recomputed when a volume's voxels change)."""
    magnitude = float(np.percentile(np.abs(array), percentile)) or float(np.abs(array).max()) or 1.0
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(-magnitude, magnitude)
