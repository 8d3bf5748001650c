"""R2N2 (Sandkühler et al., 2019): registration as a sequence of local Gaussian deformations.

Each step adds one rotated anisotropic Gaussian displacement, predicted by the recurrent network on the working
grid (:mod:`iterreg.networks.r2n2`) and evaluated exactly on the image grid (its parameters do not depend on the
grid). Streamed per step: the Gaussian's ``center_k`` (voxels of the image grid, array axis k), ``sigma_k``
(widths as fractions of the half-extent, the paper's units), ``rotation`` (degrees; 3D: ``rotation_0..2``),
``weight_k`` (displacement at the centre, voxels) and ``confidence`` (the position network's, 0..2 per level,
summed) and, with the opt-in ``weight_search``, ``weight_scale`` (the factor it chose), with the standard
metrics; channels ``local_deformation`` (this step's displacement), ``gaussian`` (its profile, 0..1) and
``attention`` (the finest level's position soft-max: where the network looks). The parameters of the final
transform are ``steps`` x (3 ndim + 1 | 3) numbers. With the opt-in ``refine_iterations`` each Gaussian is refined
on the images before it is added, and everything streamed is the refined Gaussian.

Single-slice volumes (one axis of size 1) are registered in 2D with a 2D checkpoint. A 2D+t series stored as a
3D volume (frames along ``frame_axis``) is registered frame by frame with a 2D checkpoint, the paper's use: every
frame of the moving volume to frame ``fixed_frame`` of it (or, with ``fixed_frame`` -1, to the same frame of the
fixed volume). All frames run together as one batch, so each streamed step moves every frame; the result is one
3D field with no through-frame component, which Slicer shows and saves as any other grid transform.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .base import Prompts, Step, standard_step_metrics
from .learned import LearnedIterativeMethod, WorkingGridOptions
from ..errors import InputError
from ..networks.r2n2 import R2N2Config, R2N2Network, gaussian_displacement
from ..spatial import normalised_to_voxels, spatial_ndim, vector_length, warp


@dataclass(frozen=True)
class R2N2Options(WorkingGridOptions):
    frame_axis: int = -1  # >= 0: the volume is a 2D+t series with frames along this array axis
    fixed_frame: int = -1  # series: register every frame to this frame of the moving volume; -1: to the fixed
    # True: scale each step's Gaussian weight by the factor (0.5-4) that lowers the MSE most (not in the paper;
    # networks/r2n2.py); False: as the checkpoint was trained (the bundled ones: no search)
    weight_search: bool = False
    # > 0: refine each step's Gaussian (centre, widths, rotation, weight) by this many Adam steps on the MSE
    # before it is added (test-time refinement, not in the paper; networks/r2n2.py). 0: the network's own
    refine_iterations: int = 0

    def check(self) -> None:
        super().check()
        if self.frame_axis not in (-1, 0, 1, 2):
            raise InputError(f"frame_axis must be -1 (not a series) or an array axis 0, 1 or 2, got {self.frame_axis}")
        if self.fixed_frame < -1:
            raise InputError(f"fixed_frame must be -1 (the fixed volume) or a frame index, got {self.fixed_frame}")
        if not 0 <= self.refine_iterations <= 1000:
            raise InputError(f"refine_iterations must be 0 (off) to 1000 Adam steps per Gaussian, got "
                             f"{self.refine_iterations}; 10 is a good start")


DEEPEST_STRIDE = 16  # the network's coarsest level keeps every 16th working-grid voxel (networks/r2n2.py)


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
        axis = self.options.frame_axis
        if axis >= 0:  # a series: check the volume, then the step count and dimension on one frame
            if spatial_ndim(fixed) != 3 or self.network.config.ndim != 2:
                raise InputError("series registration (frame_axis) needs a 3D volume of 2D frames and a 2D r2n2 "
                                 "checkpoint")
            if fixed.shape != moving.shape:
                raise InputError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must be on one grid")
            count = fixed.shape[2 + axis]
            if self.options.fixed_frame >= count:
                raise InputError(f"fixed_frame {self.options.fixed_frame} does not exist: the series has frames "
                                 f"0 to {count - 1} along axis {axis}")
            fixed, moving = fixed.select(2 + axis, 0), moving.select(2 + axis, 0)
        elif self._single_slice_axis(fixed) is not None:  # judge the 2D slice, not the 3D volume
            fixed, moving = (t.squeeze(2 + self._single_slice_axis(fixed)) for t in (fixed, moving))
        return super().check_inputs(fixed, moving, steps)

    def _working_grid(self, fixed, spacing):
        grid = super()._working_grid(fixed, spacing)
        # the stem and three recurrent units each halve the grid: a deepest level of one voxel has no instance
        # norm statistics and no place to find, so refuse it here rather than fail deep inside the network
        if math.prod(-(-n // DEEPEST_STRIDE) for n in grid.shape) < 2:
            raise InputError(f"the working grid {'x'.join(map(str, grid.shape))} is too small for r2n2 (its "
                             f"deepest level is 1/{DEEPEST_STRIDE}); set working_size to at least "
                             f"{2 * DEEPEST_STRIDE}, or 0 for the checkpoint's own grid")
        return grid

    def _single_slice_axis(self, image: torch.Tensor) -> int | None:
        """The size-1 axis of a single-slice 3D volume when this checkpoint is 2D, else None."""
        if spatial_ndim(image) != 3 or self.network.config.ndim != 2:
            return None
        singles = [k for k, n in enumerate(image.shape[2:]) if n == 1]
        return singles[0] if len(singles) == 1 else None

    def network_steps(self, fixed, moving, steps=None, prompts: Prompts | None = None,
                      init: torch.Tensor | None = None, spacing: Sequence[float] | None = None) -> Iterator[Step]:
        if self.options.frame_axis >= 0:
            yield from self._run_series(fixed, moving, steps, prompts, init, spacing)
            return
        steps = self.check_inputs(fixed, moving, steps)
        axis = self._single_slice_axis(fixed)
        if axis is None:
            yield from self._run(fixed, moving, steps, prompts, init, spacing)
            return
        # a single-slice volume: register the slice, then give the field back its third (zero) component
        drop = lambda t: None if t is None else t.squeeze(2 + axis)  # noqa: E731
        init2d = None if init is None else drop(init[:, [c for c in range(3) if c != axis]])
        for step in self._run(drop(fixed), drop(moving), steps, prompts, init2d, _without_axis(spacing, axis)):
            u = step.displacement.unsqueeze(2 + axis)
            u = torch.cat([u[:, :axis], torch.zeros_like(u[:, :1]), u[:, axis:]], dim=1)
            channels = {name: c.unsqueeze(1 + axis) for name, c in step.channels.items()}  # maps of the volume
            yield Step(step.index, u, lambda s=step: s.warped.unsqueeze(2 + axis), _metrics_in_3d(step.metrics, axis),
                       channels, step.phase, step.final)

    def _iterate(self, fixed_w, moving_w, steps, init=None):
        """The network's steps on the working grid with this run's test-time options."""
        return self.network.iterate(fixed_w, moving_w, steps, init,
                                    weight_search=self.options.weight_search or None,  # None: as trained
                                    refine_iterations=self.options.refine_iterations)

    def _run_series(self, fixed, moving, steps, prompts, init, spacing=None):
        steps = self.check_inputs(fixed, moving, steps)
        if prompts is not None or init is not None:
            raise InputError("series registration starts from the identity and takes no prompts")
        axis, k = self.options.frame_axis, self.options.fixed_frame
        count = fixed.shape[2 + axis]
        moving_frames = moving[0].movedim(1 + axis, 0)  # [F, 1, *frame]
        fixed_frames = (moving_frames[k:k + 1].expand_as(moving_frames) if k >= 0
                        else fixed[0].movedim(1 + axis, 0)).to(self.device)
        moving_frames = moving_frames.to(self.device)
        as_volume = lambda t: t.movedim(0, 1 + axis).unsqueeze(0)  # noqa: E731  [F, C, *frame] -> [1, C, *volume]
        in_plane = [a for a in range(3) if a != axis]
        grid = self._working_grid(fixed_frames, _without_axis(spacing, axis))
        fixed_w, moving_w = grid.image_down(fixed_frames), grid.image_down(moving_frames)
        previous = None
        total = None
        with torch.no_grad():
            for t, state in enumerate(self._iterate(fixed_w, moving_w, steps)):
                local, profile = gaussian_displacement(state.gaussian, grid.image_shape)  # [F, 2 | 1, *frame]
                total = local if total is None else total + local
                volume_u = torch.zeros((1, 3, *fixed.shape[2:]), device=total.device, dtype=total.dtype)
                volume_u[:, in_plane] = as_volume(total)
                metrics = standard_step_metrics(fixed_w, warp(moving_w, state.displacement), state.displacement,
                                                previous, self.similarity, self.similarity_kwargs)
                metrics["update_norm"] = float(vector_length(local).max())
                metrics["frames"] = float(count)
                channels = {"gaussian": as_volume(profile)[0]}
                phase = f"step {t + 1}/{steps}: one Gaussian in each of {count} frames"
                yield Step(t, volume_u, lambda u=volume_u: warp(moving, u), metrics, channels, phase,
                           t == steps - 1)
                previous = state.displacement

    def _run(self, fixed, moving, steps, prompts, init, spacing=None):
        fixed, moving, grid, start = self._prepare(fixed, moving, prompts, init, spacing)
        fixed_w, moving_w = grid.image_down(fixed), grid.image_down(moving)
        nd = spatial_ndim(fixed)
        displacement = init.to(self.device, torch.float32) if init is not None else None
        previous = start
        with torch.no_grad():
            for t, state in enumerate(self._iterate(fixed_w, moving_w, steps, start)):
                g = state.gaussian
                local, _ = gaussian_displacement(g, grid.image_shape)  # exact on the image grid
                displacement = local if displacement is None else displacement + local
                extra = {"confidence": float(state.confidences.sum())}
                if state.weight_scale is not None:  # the weight search's factor (already in the weight below)
                    extra["weight_scale"] = float(state.weight_scale[0])
                center = normalised_to_voxels(g.center[0].cpu(), grid.image_shape, points=True)
                weight = normalised_to_voxels(g.weight[0].cpu(), grid.image_shape)
                for k in range(nd):
                    extra[f"center_{k}"] = float(center[k])
                    extra[f"sigma_{k}"] = float(g.sigma[0, k])
                    extra[f"weight_{k}"] = float(weight[k])
                angles = torch.rad2deg(g.angles[0]).tolist()
                extra.update({"rotation": angles[0]} if nd == 2 else {f"rotation_{k}": a for k, a in enumerate(angles)})
                channels = {"local_deformation": state.local[0], "gaussian": state.profile[0],
                            "attention": state.attention[0][0]}  # where the finest position soft-max looks
                where = ", ".join(f"{c:.0f}" for c in center.tolist())
                size = math.sqrt(sum(float(local[0, k].abs().max()) ** 2 for k in range(nd)))
                phase = f"step {t + 1}/{steps}: Gaussian at ({where}), {size:.1f} voxels"
                yield self._step(t, fixed_w, moving_w, moving, grid, state.displacement, previous, channels, phase,
                                 t == steps - 1, extra, displacement=displacement)
                previous = state.displacement


def _metrics_in_3d(metrics: dict, axis: int) -> dict:
    """A single slice's per-axis metrics (centre, weight) renumbered to the volume's axes; the slice axis gets 0."""
    out = {k: v for k, v in metrics.items() if not k.startswith(("center_", "weight_"))}
    slice_axes = [a for a in range(3) if a != axis]
    for name in ("center", "weight"):
        out[f"{name}_{axis}"] = 0.0
        for k, a in enumerate(slice_axes):
            out[f"{name}_{a}"] = metrics[f"{name}_{k}"]
    return out


def _without_axis(spacing: Sequence[float] | None, axis: int) -> tuple[float, ...] | None:
    """A volume's spacing for its slices or frames: the mm of every array axis but ``axis``."""
    return None if spacing is None else tuple(s for a, s in enumerate(spacing) if a != axis)
