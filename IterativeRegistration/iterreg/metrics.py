"""Evaluation metrics (not differentiated): overlap, surface distance, landmark error, field regularity.

Label maps are integer arrays on the fixed grid; spacing is per *array axis* in mm
(:attr:`iterreg.geometry.Geometry.array_spacing`). Displacements are voxel fields ``[1, ndim, *spatial]``.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
import torch

from .spatial import jacobian_determinant

# MONAI 1.6 warns about its own internal use of a deprecated argument in get_mask_edges.
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)

__all__ = ["dice", "hd95", "tre", "global_ncc", "folding_percent", "std_log_jacobian", "mean_grad_jacobian",
           "field_regularity", "label_values"]


def label_values(*label_maps: np.ndarray) -> list[int]:
    """Foreground labels present in any of the maps (0 is background)."""
    values = set()
    for lab in label_maps:
        values.update(int(v) for v in np.unique(np.asarray(lab)))
    values.discard(0)
    return sorted(values)


def _one_hot(labels: np.ndarray, values: Sequence[int]) -> torch.Tensor:
    lab = torch.as_tensor(np.asarray(labels))
    return torch.stack([(lab == v) for v in values]).unsqueeze(0).float()


def dice(labels_a: np.ndarray, labels_b: np.ndarray, values: Iterable[int] | None = None) -> dict:
    """Dice per label and their mean: ``{"per_label": {label: dice}, "mean": float}``.

    A label absent from both maps is skipped (its Dice is undefined), not counted as 1.
    """
    values = list(values) if values is not None else label_values(labels_a, labels_b)
    present = [v for v in values if np.any(labels_a == v) or np.any(labels_b == v)]
    if not present:
        return {"per_label": {}, "mean": float("nan")}
    from monai.metrics import compute_dice  # lazy: importing MONAI costs seconds (see losses.py)
    scores = compute_dice(_one_hot(labels_a, present), _one_hot(labels_b, present), include_background=True)
    per_label = {int(v): float(s) for v, s in zip(present, scores[0])}
    return {"per_label": per_label, "mean": float(np.mean(list(per_label.values())))}


def hd95(labels_a: np.ndarray, labels_b: np.ndarray, spacing: Sequence[float],
         values: Iterable[int] | None = None) -> dict:
    """95th-percentile symmetric Hausdorff distance in mm per label and mean (MONAI's surface distance).

    Labels missing from either map are skipped.
    """
    values = list(values) if values is not None else label_values(labels_a, labels_b)
    present = [v for v in values if np.any(labels_a == v) and np.any(labels_b == v)]
    if not present:
        return {"per_label": {}, "mean": float("nan")}
    from monai.metrics import compute_hausdorff_distance
    dist = compute_hausdorff_distance(_one_hot(labels_a, present), _one_hot(labels_b, present),
                                      include_background=True, percentile=95, spacing=list(spacing))
    per_label = {int(v): float(d) for v, d in zip(present, dist[0])}
    return {"per_label": per_label, "mean": float(np.mean(list(per_label.values())))}


def tre(points_a_mm: np.ndarray, points_b_mm: np.ndarray) -> dict:
    """Target registration error: Euclidean distances between paired points in mm."""
    a = np.asarray(points_a_mm, dtype=float)
    b = np.asarray(points_b_mm, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"landmark sets differ in shape: {a.shape} vs {b.shape}")
    d = np.linalg.norm(a - b, axis=1)
    return {"per_point": d.tolist(), "mean": float(d.mean()), "median": float(np.median(d)),
            "max": float(d.max())}


@torch.no_grad()
def global_ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised cross-correlation of two whole images (1 = identical up to gain and offset); IIRP-Net's
    IterStop similarity."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


@torch.no_grad()
def folding_percent(displacement: torch.Tensor) -> float:
    """Percentage of voxels where the Jacobian determinant is <= 0."""
    det = jacobian_determinant(displacement)
    return float((det <= 0).float().mean() * 100)


@torch.no_grad()
def std_log_jacobian(displacement: torch.Tensor) -> float:
    """Standard deviation of log det J, determinants clipped to [1e-9, 1e9] (Learn2Reg's convention)."""
    det = jacobian_determinant(displacement).clamp(1e-9, 1e9)
    return float(torch.log(det).std())


@torch.no_grad()
def mean_grad_jacobian(displacement: torch.Tensor) -> float:
    """Mean magnitude of the spatial gradient of det J (per voxel): how abruptly volume change varies."""
    det = jacobian_determinant(displacement)
    nd = det.dim() - 1
    grads = torch.gradient(det, dim=tuple(range(1, nd + 1)))
    return float(torch.sqrt(sum(g ** 2 for g in grads)).mean())


@torch.no_grad()
def field_regularity(displacement: torch.Tensor) -> dict:
    """All Jacobian-based regularity figures of a displacement at once."""
    det = jacobian_determinant(displacement)
    nd = det.dim() - 1
    grads = torch.gradient(det, dim=tuple(range(1, nd + 1)))
    return {
        "folding_percent": float((det <= 0).float().mean() * 100),
        "std_log_jacobian": float(torch.log(det.clamp(1e-9, 1e9)).std()),
        "mean_grad_jacobian": float(torch.sqrt(sum(g ** 2 for g in grads)).mean()),
        "min_jacobian": float(det.min()),
    }
