"""R2N2 (Sandkühler et al., 2019): registration as a sequence of local Gaussian deformations.

Each step adds one rotated anisotropic Gaussian displacement, predicted by the recurrent network on the working
grid (:mod:`iterreg.networks.r2n2`) and evaluated exactly on the image grid (its parameters do not depend on the
grid). Streamed per step: the Gaussian's ``center_k`` (voxels of the image grid, array axis k), ``sigma_k``
(widths as fractions of the half-extent, the paper's units), ``rotation`` (degrees; 3D: ``rotation_0..2``),
``weight_k`` (displacement at the centre, voxels) and ``confidence`` (the position network's, 0..2 per level,
summed), with the standard metrics; channels ``local_deformation`` (this step's displacement) and ``gaussian``
(its profile, 0..1). The parameters of the final transform are ``steps`` x (3 ndim + 1 | 3) numbers.

Single-slice volumes (one axis of size 1) are registered in 2D with a 2D checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .base import Prompts, Step
from .learned import LearnedIterativeMethod, WorkingGridOptions
from ..networks.r2n2 import R2N2Config, R2N2Network, gaussian_displacement
from ..spatial import spatial_ndim


@dataclass(frozen=True)
class R2N2Options(WorkingGridOptions):
    pass


class R2N2Method(LearnedIterativeMethod):
    name = "r2n2"
    title = "R2N2 (sequence of local Gaussian deformations)"
    description = ("A recurrent network places one local Gaussian deformation per step where the images still "
                   "differ: a compact transform of a few numbers per step.")
    default_steps = 25
    max_steps = 200
    needs_checkpoint = True
    Options = R2N2Options
    network_class, config_class = R2N2Network, R2N2Config

    def check_inputs(self, fixed, moving, steps):
        if self._single_slice_axis(fixed) is not None:  # judge the 2D slice, not the 3D volume
            fixed, moving = (t.squeeze(2 + self._single_slice_axis(fixed)) for t in (fixed, moving))
        return super().check_inputs(fixed, moving, steps)

    def _single_slice_axis(self, image: torch.Tensor) -> int | None:
        """The size-1 axis of a single-slice 3D volume when this checkpoint is 2D, else None."""
        if spatial_ndim(image) != 3 or self.network.config.ndim != 2:
            return None
        singles = [k for k, n in enumerate(image.shape[2:]) if n == 1]
        return singles[0] if len(singles) == 1 else None

    def run(self, fixed, moving, steps=None, prompts: Prompts | None = None,
            init: torch.Tensor | None = None) -> Iterator[Step]:
        steps = self.check_inputs(fixed, moving, steps)
        axis = self._single_slice_axis(fixed)
        if axis is None:
            yield from self._run(fixed, moving, steps, prompts, init)
            return
        # a single-slice volume: register the slice, then give the field back its third (zero) component
        drop = lambda t: None if t is None else t.squeeze(2 + axis)  # noqa: E731
        init2d = None if init is None else drop(init[:, [c for c in range(3) if c != axis]])
        for step in self._run(drop(fixed), drop(moving), steps, prompts, init2d):
            u = step.displacement.unsqueeze(2 + axis)
            u = torch.cat([u[:, :axis], torch.zeros_like(u[:, :1]), u[:, axis:]], dim=1)
            yield Step(step.index, u, lambda s=step: s.warped.unsqueeze(2 + axis), step.metrics, step.channels,
                       step.phase, step.final)

    def _run(self, fixed, moving, steps, prompts, init):
        fixed, moving, grid, start = self._prepare(fixed, moving, prompts, init)
        fixed_w, moving_w = grid.image_down(fixed), grid.image_down(moving)
        nd = spatial_ndim(fixed)
        half = torch.tensor([(n - 1) / 2 for n in grid.image_shape])
        displacement = init.to(self.device, torch.float32) if init is not None else None
        previous = start
        with torch.no_grad():
            for t, state in enumerate(self.network.iterate(fixed_w, moving_w, steps, start)):
                g = state.gaussian
                local, _ = gaussian_displacement(g, grid.image_shape)  # exact on the image grid
                displacement = local if displacement is None else displacement + local
                extra = {"confidence": float(state.confidences.sum())}
                center = (g.center[0].cpu() + 1) * half
                for k in range(nd):
                    extra[f"center_{k}"] = float(center[k])
                    extra[f"sigma_{k}"] = float(g.sigma[0, k])
                    extra[f"weight_{k}"] = float(g.weight[0, k] * half[k])
                angles = torch.rad2deg(g.angles[0]).tolist()
                extra.update({"rotation": angles[0]} if nd == 2 else {f"rotation_{k}": a for k, a in enumerate(angles)})
                channels = {"local_deformation": state.local[0], "gaussian": state.profile[0]}
                where = ", ".join(f"{c:.0f}" for c in center.tolist())
                size = math.sqrt(sum(float(local[0, k].abs().max()) ** 2 for k in range(nd)))
                phase = f"step {t + 1}/{steps}: Gaussian at ({where}), {size:.1f} voxels"
                yield self._step(t, fixed_w, moving_w, moving, grid, state.displacement, previous, channels, phase,
                                 t == steps - 1, extra, displacement=displacement)
                previous = state.displacement
