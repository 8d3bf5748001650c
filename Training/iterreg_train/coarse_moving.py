"""Training pairs whose moving image was acquired on a coarser grid (thick slices, coarser in-plane), for a method
that reads the moving image on its own grid (DIO's ``features_on_own_grid``, paper §3.1: each image alone, so fixed
and moving may differ in size and spacing). A network trained only on isotropic grids gives thick-slice features
that disagree with the isotropic ones (Docs/benchmarks.md, 'dio-robustness'); these pairs teach it not to.

The coarse copy is made as a scanner would (:func:`iterreg.sample_data.on_coarser_grid`) and reaches the method
as :class:`iterreg.imaging.MovingOnOwnGrid`, exactly as ``prepare_pair`` hands one over at inference. The loss
still reads the full-resolution moving image and its labels: they are the truth the coarse copy was made from.

Config ``data.coarse_moving``: ``probability`` (share of training iterations; 0 = off), ``slice_factors`` (one
random axis gets one of these spacing factors), ``in_plane_factors`` (the other axes share one of these),
``voxels`` (DIO's ``own_grid_voxels``: ``working`` or ``acquired``).
Validation adds ``coarse_*`` scores on copies with the largest slice factor along the first array axis.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from iterreg.errors import InputError
from iterreg.geometry import Geometry
from iterreg.imaging import MovingOnOwnGrid
from iterreg.methods.dio import OWN_GRID_VOXELS
from iterreg.sample_data import on_coarser_grid

__all__ = ["CoarseMovingSettings", "coarse_moving"]


@dataclass(frozen=True)
class CoarseMovingSettings:
    probability: float
    slice_factors: tuple[float, ...]
    in_plane_factors: tuple[float, ...]
    voxels: str = "working"  # DIO's own_grid_voxels: which voxels the network extracts the features on

    @classmethod
    def from_config(cls, data_config: dict, method_cls) -> "CoarseMovingSettings | None":
        """None when the config asks for none (absent or probability 0)."""
        raw = data_config.get("coarse_moving") or {}
        if not raw or float(raw.get("probability", 0)) == 0:
            return None
        settings = cls(float(raw["probability"]), tuple(float(f) for f in raw["slice_factors"]),
                       tuple(float(f) for f in raw["in_plane_factors"]), str(raw.get("voxels", "working")))
        if not 0 < settings.probability <= 1:
            raise InputError(f"data.coarse_moving.probability must be within 0-1, got {settings.probability}")
        if not settings.slice_factors or not settings.in_plane_factors or \
                min(settings.slice_factors + settings.in_plane_factors) < 1:
            raise InputError("data.coarse_moving.slice_factors and in_plane_factors must be non-empty lists of "
                             "factors >= 1")
        if settings.voxels not in OWN_GRID_VOXELS:
            raise InputError(f"data.coarse_moving.voxels must be {' or '.join(map(repr, OWN_GRID_VOXELS))}, "
                             f"got {settings.voxels!r}")
        if not getattr(method_cls, "reads_moving_on_own_grid", False):
            raise InputError(f"data.coarse_moving is for methods that read the moving image on its own grid (dio); "
                             f"'{method_cls.name}' resamples it onto the fixed grid first: set its probability to 0")
        return settings

    def draw(self, ndim: int, rng: np.random.Generator) -> tuple[float, ...] | None:
        """Spacing factors per array axis for this iteration, or None (an isotropic pair)."""
        if rng.random() >= self.probability:
            return None
        factors = [float(rng.choice(self.in_plane_factors))] * ndim
        factors[int(rng.integers(ndim))] = float(rng.choice(self.slice_factors))
        return tuple(factors)

    def validation_factors(self, ndim: int) -> tuple[float, ...]:
        return (max(self.slice_factors),) + (1.0,) * (ndim - 1)

    def predict_arguments(self, moving: torch.Tensor, spacing, factors) -> dict:
        """The method's ``predict`` keywords for ``moving`` re-acquired with spacing ``factors``."""
        return {"moving_own_grid": coarse_moving(moving, spacing, factors), "own_grid_voxels": self.voxels}


def coarse_moving(moving: torch.Tensor, spacing, factors) -> MovingOnOwnGrid:
    """``moving`` ``[B, 1, *shape]`` (one grid of ``spacing`` mm per array axis) re-acquired with its spacing
    multiplied by ``factors`` (array order), with the map from fixed-grid voxels to the new grid's voxels."""
    nd = moving.dim() - 2
    spacing = tuple(float(s) for s in (spacing or (1.0,) * nd))
    fine = Geometry(size=tuple(moving.shape[2:][::-1]), spacing=spacing[::-1], origin=(0.0,) * nd)
    coarse_images = []
    coarse = None
    for sample in moving.detach().cpu():
        image = fine.apply_to(sitk.GetImageFromArray(sample[0].numpy().astype(np.float32)))
        image = on_coarser_grid(image, tuple(factors)[::-1])
        coarse = Geometry.of(image)
        coarse_images.append(torch.from_numpy(sitk.GetArrayFromImage(image))[None])
    return MovingOnOwnGrid(torch.stack(coarse_images).to(moving.device), fine.array_index_map_to(coarse),
                           coarse.array_spacing, fine.array_spacing)
