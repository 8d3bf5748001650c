"""Differentiable losses: similarities and regularisers. Every function returns a scalar where lower is better.

Inputs follow :mod:`iterreg.spatial`: images ``[B, 1, *spatial]`` in [0, 1], displacements
``[B, ndim, *spatial]`` in voxels. Derivatives are taken per voxel (not per mm) as the papers do.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Callable

import torch

from .spatial import sample_displacement_at, spatial_ndim

# MONAI 1.6's spatial_gradient indexes with a list, which torch deprecates; harmless, but noisy in the CLI.
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing",
                        module="monai")

__all__ = [
    "mse", "lncc_loss", "nmi_loss", "diffusion", "curvature", "bending_energy", "linear_elastic",
    "isotropic_tv", "landmark_distance", "similarity_loss", "regularizer_loss", "SIMILARITIES",
    "REGULARIZERS",
]


def mse(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference."""
    return torch.mean((fixed - warped) ** 2)


@lru_cache(maxsize=16)
def _lncc_module(ndim: int, window: int):
    # MONAI is imported on first use: importing it loads all of MONAI (~3 s), which every worker start
    # would otherwise pay even for methods that never touch these losses.
    from monai.losses import LocalNormalizedCrossCorrelationLoss
    return LocalNormalizedCrossCorrelationLoss(spatial_dims=ndim, kernel_size=window, kernel_type="rectangular")


def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 5) -> torch.Tensor:
    """Negative local (squared) normalised cross-correlation in a ``window``^ndim box, in [-1, 0].

    MONAI's convention, which is also VoxelMorph's: the squared local correlation, averaged over voxels;
    windows are zero-padded at the image border.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"LNCC window must be a positive odd number, got {window}")
    return _lncc_module(spatial_ndim(fixed), int(window))(warped, fixed)


def nmi_loss(fixed: torch.Tensor, warped: torch.Tensor, bins: int = 32, sigma_bins: float = 0.5,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative normalised mutual information ``(H(F) + H(W)) / H(F, W)`` in [-2, -1].

    Parzen-window histogram: each intensity (in [0, 1]) spreads over the bins with a Gaussian of width
    ``sigma_bins`` bin widths. Written here because MONAI provides (unnormalised) MI only.
    """
    if bins < 4:
        raise ValueError(f"NMI needs at least 4 bins, got {bins}")
    f = fixed.reshape(-1).clamp(0, 1)
    w = warped.reshape(-1).clamp(0, 1)
    if mask is not None:
        keep = mask.reshape(-1) > 0
        f, w = f[keep], w[keep]
    centres = torch.linspace(0, 1, bins, device=fixed.device, dtype=fixed.dtype)
    width = sigma_bins / (bins - 1)
    pf = torch.exp(-0.5 * ((f[:, None] - centres[None]) / width) ** 2)
    pw = torch.exp(-0.5 * ((w[:, None] - centres[None]) / width) ** 2)
    pf = pf / pf.sum(1, keepdim=True).clamp_min(1e-12)
    pw = pw / pw.sum(1, keepdim=True).clamp_min(1e-12)
    joint = pf.T @ pw / f.numel()
    eps = 1e-10
    h_joint = -(joint * torch.log(joint + eps)).sum()
    h_f = -(joint.sum(1) * torch.log(joint.sum(1) + eps)).sum()
    h_w = -(joint.sum(0) * torch.log(joint.sum(0) + eps)).sum()
    return -(h_f + h_w) / h_joint.clamp_min(eps)


@lru_cache(maxsize=4)
def _diffusion_module():
    from monai.losses import DiffusionLoss
    return DiffusionLoss()


def diffusion(displacement: torch.Tensor) -> torch.Tensor:
    """Mean squared first derivatives: mean over voxels and components of ``sum_d (du_c/dx_d)^2``.

    MONAI's DiffusionLoss (central differences on the interior).
    """
    return _diffusion_module()(displacement)


def _first_derivatives(displacement: torch.Tensor) -> list[torch.Tensor]:
    nd = spatial_ndim(displacement)
    return list(torch.gradient(displacement, dim=tuple(range(2, 2 + nd))))


def curvature(displacement: torch.Tensor) -> torch.Tensor:
    """Curvature regulariser (Fischer & Modersitzki): mean over voxels and components of ``(Laplacian u_c)^2``.

    Second differences ``u[x+1] - 2u[x] + u[x-1]`` on the interior.
    """
    nd = spatial_ndim(displacement)
    lap = 0
    for d in range(nd):
        axis = 2 + d
        n = displacement.shape[axis]
        lap_d = (displacement.narrow(axis, 2, n - 2) - 2 * displacement.narrow(axis, 1, n - 2)
                 + displacement.narrow(axis, 0, n - 2))
        # crop every other axis to the common interior so the terms line up
        for other in range(nd):
            if other != d:
                core_axis = 2 + other
                lap_d = lap_d.narrow(core_axis, 1, displacement.shape[core_axis] - 2)
        lap = lap + lap_d
    return torch.mean(lap ** 2)


@lru_cache(maxsize=4)
def _bending_module():
    from monai.losses import BendingEnergyLoss
    return BendingEnergyLoss()


def bending_energy(displacement: torch.Tensor) -> torch.Tensor:
    """MONAI's bending energy (all second derivatives squared)."""
    return _bending_module()(displacement)


def linear_elastic(displacement: torch.Tensor, lam: float = 1.0, mu: float = 1.0) -> torch.Tensor:
    """Linear-elastic energy density, mean over voxels: ``mu * ||eps||_F^2 + lam / 2 * tr(eps)^2``.

    ``eps = (grad u + grad u^T) / 2`` is the small-strain tensor; ``lam``, ``mu`` are Lamé constants.
    """
    grads = _first_derivatives(displacement)  # grads[d][:, c] = du_c / dx_d
    nd = len(grads)
    strain_sq = 0
    trace = 0
    for i in range(nd):
        for j in range(nd):
            eps_ij = 0.5 * (grads[j][:, i] + grads[i][:, j])
            strain_sq = strain_sq + eps_ij ** 2
        trace = trace + grads[i][:, i]
    return torch.mean(mu * strain_sq + 0.5 * lam * trace ** 2)


def isotropic_tv(displacement: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Isotropic total variation: mean over voxels of ``sum_c sqrt(sum_d (du_c/dx_d)^2)``."""
    grads = torch.stack(_first_derivatives(displacement), dim=0)  # [ndim_d, B, C, ...]
    return torch.mean(torch.sqrt((grads ** 2).sum(0) + eps).sum(1))


def landmark_distance(displacement: torch.Tensor, fixed_points: torch.Tensor, moving_points: torch.Tensor,
                      spacing: torch.Tensor | tuple[float, ...] | None = None, squared: bool = False) -> torch.Tensor:
    """Mean distance (mm if ``spacing`` per array axis is given) between ``x_f + u(x_f)`` and ``x_m``.

    Points are ``[N, ndim]`` array-order voxel coordinates on the fixed grid (the moving image has been
    resampled onto it). Differentiable in the displacement.
    """
    mapped = fixed_points.to(displacement.dtype) + sample_displacement_at(displacement, fixed_points)
    diff = mapped - moving_points.to(displacement.dtype)
    if spacing is not None:
        diff = diff * torch.as_tensor(spacing, dtype=diff.dtype, device=diff.device)
    sq = (diff ** 2).sum(1)
    return sq.mean() if squared else torch.sqrt(sq + 1e-12).mean()


SIMILARITIES: dict[str, Callable[..., torch.Tensor]] = {"mse": mse, "lncc": lncc_loss, "nmi": nmi_loss}
REGULARIZERS: dict[str, Callable[..., torch.Tensor]] = {
    "diffusion": diffusion, "curvature": curvature, "bending": bending_energy, "elastic": linear_elastic,
    "tv": isotropic_tv,
}


def similarity_loss(name: str, fixed: torch.Tensor, warped: torch.Tensor, **kwargs) -> torch.Tensor:
    try:
        fn = SIMILARITIES[name]
    except KeyError:
        raise ValueError(f"unknown similarity '{name}'; choose one of {sorted(SIMILARITIES)}") from None
    return fn(fixed, warped, **kwargs)


def regularizer_loss(name: str, displacement: torch.Tensor, **kwargs) -> torch.Tensor:
    try:
        fn = REGULARIZERS[name]
    except KeyError:
        raise ValueError(f"unknown regularizer '{name}'; choose one of {sorted(REGULARIZERS)}") from None
    return fn(displacement, **kwargs)
