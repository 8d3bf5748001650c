"""Classical iterative registration: multi-scale Adam on a dense displacement field.

Per level (coarse to fine) the displacement is optimised directly for ``similarity + lambda * regularizer``.
Each gradient is Gaussian-smoothed before the Adam update (a preconditioner toward smooth updates, as in
FireANTs/DIO) and the field itself is lightly smoothed after it (the "warp smoothing" of demons-style
optimisers). Every iteration is streamed as a :class:`Step`; a level ends early when the loss stopped
improving (relative decrease < ``tolerance`` for ``patience`` iterations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .base import WORKING_VOXELS, MethodOptions, MonitorGrid, Prompts, RegistrationMethod, Step, warp_later
from .. import losses
from ..adam import Adam
from ..errors import InputError
from ..spatial import gaussian_smooth, resize_displacement, resize_image, shape_for_cubic_voxels, warp


@dataclass(frozen=True)
class ClassicalOptions(MethodOptions):
    similarity: str = "lncc"  # lncc | mse | nmi
    window: int = 5  # LNCC window (voxels of each level)
    regularizer: str = "diffusion"
    regularization_weight: float = 1.0
    levels: tuple = (4, 2, 1)  # downsampling factor per level, coarse to fine
    level_share: tuple = (0.5, 0.3, 0.2)  # fraction of the step budget per level
    learning_rate: float = 0.2  # voxels of the level per Adam step (roughly); 0.5 stops early, 0.1 is slower
    grad_sigma: float = 1.0  # Gaussian smoothing of the gradient (voxels of the level)
    warp_sigma: float = 0.5  # Gaussian smoothing of the field after each update
    tolerance: float = 1e-4  # relative loss decrease below which a level counts as converged
    patience: int = 5
    prompt_weight: float = 1.0  # weight of the landmark term when prompts are given (mm^2)
    # image: every level on the scan's grid downsampled by the level's factor (the finest is the scan's grid);
    # isotropic (opt-in): every level on cubic voxels in mm, the finest at the scan's finest voxel size, so a
    # thick-slice axis is interpolated up and the result resampled back onto the scan's grid. More accurate on
    # thick slices at ~3x the time and (slice thickness / pixel size) x the memory (Docs/benchmarks.md,
    # 'thick-slices'). Needs the spacing (run_pair); without it the grids are the image's
    working_voxels: str = "image"

    def check(self) -> None:
        if self.similarity not in losses.SIMILARITIES:
            raise InputError(f"unknown similarity '{self.similarity}'; choose {sorted(losses.SIMILARITIES)}")
        if self.regularizer not in losses.REGULARIZERS:
            raise InputError(f"unknown regularizer '{self.regularizer}'; choose {sorted(losses.REGULARIZERS)}")
        if self.regularization_weight < 0:
            raise InputError("regularization_weight must be >= 0")
        if not self.levels or any(int(f) < 1 for f in self.levels):
            raise InputError(f"levels must be downsampling factors >= 1, got {self.levels}")
        if len(self.level_share) != len(self.levels) or any(s <= 0 for s in self.level_share):
            raise InputError("level_share needs one positive fraction per level")
        if self.learning_rate <= 0 or self.tolerance < 0 or self.patience < 1:
            raise InputError("learning_rate must be > 0, tolerance >= 0 and patience >= 1")
        if self.working_voxels not in WORKING_VOXELS:
            raise InputError(f"working_voxels must be one of {list(WORKING_VOXELS)}, got '{self.working_voxels}'")


class ClassicalMethod(RegistrationMethod):
    name = "classical"
    title = "Classical optimizer (multi-scale Adam)"
    description = "Dense displacement optimised per image pair; no training needed."
    default_steps = 150
    max_steps = 5000
    memory_per_voxel = 700  # bytes per fixed-grid voxel, measured (Docs/benchmarks.md, 'memory')
    Options = ClassicalOptions
    refines = True

    def _similarity_kwargs(self) -> dict:
        return {"window": self.options.window} if self.options.similarity == "lncc" else {}

    def _budget(self, steps: int) -> list[int]:
        shares = torch.tensor(self.options.level_share, dtype=torch.float64)
        counts = (shares / shares.sum() * steps).floor().long().clamp_min(1)
        counts[-1] += max(steps - int(counts.sum()), 0)
        return [int(c) for c in counts]

    def pair_inputs(self, pair) -> dict:
        return {**super().pair_inputs(pair), "spacing": pair.geometry.array_spacing}

    def level_shape(self, full_shape, factor: int, spacing: Sequence[float] | None) -> list[int]:
        return level_shape(full_shape, factor, spacing if self.options.working_voxels == "isotropic" else None)

    @classmethod
    def grid_voxels_per_image_voxel(cls, options: dict | None, shape: Sequence[int],
                                    spacing: Sequence[float] | None) -> float:
        isotropic = (options or {}).get("working_voxels", ClassicalOptions.working_voxels) == "isotropic"
        if not isotropic or spacing is None:
            return 1.0
        return math.prod(level_shape(shape, 1, spacing)) / math.prod(int(n) for n in shape)

    def run(self, fixed, moving, steps=None, prompts: Prompts | None = None,
            init: torch.Tensor | None = None, spacing: Sequence[float] | None = None) -> Iterator[Step]:
        """``spacing``: mm per array axis of the fixed grid (``run_pair`` gives it), for the coarse levels' grids."""
        steps = self.check_inputs(fixed, moving, steps)
        opts = self.options
        nd = fixed.dim() - 2
        full_shape = fixed.shape[2:]
        fixed, moving = fixed.to(self.device), moving.to(self.device)
        sim_kwargs = self._similarity_kwargs()
        levels = [int(f) for f in opts.levels]
        budget = self._budget(steps)
        if init is not None:
            # Refinement: the given field already holds the coarse alignment; coarse levels would only
            # perturb it (Adam's first steps move every voxel by ~learning_rate coarse voxels).
            levels, budget = levels[-1:], [steps]
        # A warm start keeps the given field at full resolution and optimises a correction on top of it.
        base = None if init is None else init.to(self.device, fixed.dtype)
        correction = None
        previous_full = base
        monitor = MonitorGrid(fixed, moving)
        index = 0
        for level_number, (factor, n_iter) in enumerate(zip(levels, budget), start=1):
            shape = self.level_shape(full_shape, factor, spacing)
            fixed_l = resize_image(fixed, shape)
            moving_l = resize_image(moving, shape)
            base_l = 0 if base is None else resize_displacement(base, shape)
            if correction is None:
                start = torch.zeros(1, nd, *shape, device=self.device, dtype=fixed.dtype)
            else:
                start = resize_displacement(correction, shape)
            field = start.clone().requires_grad_(True)
            optimiser = Adam([field], lr=opts.learning_rate)
            best, stale = float("inf"), 0
            points = self._prompt_points(prompts, full_shape, shape)
            for iteration in range(n_iter):
                optimiser.zero_grad(set_to_none=True)
                total = base_l + field
                warped_l = warp(moving_l, total)
                loss = losses.similarity_loss(opts.similarity, fixed_l, warped_l, **sim_kwargs)
                loss = loss + opts.regularization_weight * losses.regularizer_loss(opts.regularizer, total)
                if points is not None:
                    loss = loss + opts.prompt_weight * prompts.weight * losses.landmark_distance(
                        total, points[0], points[1], points[2], squared=True)
                loss.backward()
                with torch.no_grad():
                    if opts.grad_sigma > 0:
                        field.grad.copy_(gaussian_smooth(field.grad, opts.grad_sigma))
                    optimiser.step()
                    if opts.warp_sigma > 0:
                        field.copy_(gaussian_smooth(field, opts.warp_sigma))
                value = float(loss.detach())
                improved = best == float("inf") or best - value > opts.tolerance * abs(best)
                best, stale = (value, 0) if improved else (min(best, value), stale + 1)
                converged = stale >= opts.patience
                last_of_level = converged or iteration == n_iter - 1
                final = last_of_level and level_number == len(levels)
                with torch.no_grad():
                    # clone: the optimised field keeps changing in place
                    full = resize_displacement(field.detach(), full_shape).clone()
                    if base is not None:
                        full = full + base
                    metrics = monitor.metrics(full, previous_full, opts.similarity, sim_kwargs, opts.regularizer)
                metrics.update(level=level_number, iteration=iteration + 1, level_loss=value)
                # the full-resolution warped image only if someone reads it (a streamed step, the last one)
                yield Step(index, full, warp_later(moving, full), metrics,
                           channels={"gradient": field.grad.detach()[0].clone()},
                           phase=f"level {level_number}/{len(levels)} (1/{factor}), iteration {iteration + 1}",
                           final=final)
                previous_full = full
                index += 1
                if converged:
                    break
            correction = field.detach()

    @staticmethod
    def _prompt_points(prompts: Prompts | None, full_shape, level_shape):
        """Landmarks rescaled to a level's voxel grid, with the mm spacing of that grid."""
        if prompts is None or prompts.fixed_points is None:
            return None
        scale = torch.tensor([(l - 1) / max(f - 1, 1) for f, l in zip(full_shape, level_shape)])
        spacing = None
        if prompts.spacing is not None:
            spacing = torch.tensor(prompts.spacing, dtype=torch.float32) / scale
        return prompts.fixed_points * scale, prompts.moving_points * scale, spacing


def level_shape(full_shape: Sequence[int], factor: int, spacing: Sequence[float] | None) -> list[int]:
    """The grid of the pyramid level that downsamples by ``factor`` (never below 4 voxels a side): without a
    spacing, every axis by ``factor`` (factor 1: the image grid); with one, cubic voxels of ``factor`` times the
    finest voxel over the same field of view (a thick axis gets more voxels than it has). Both agree on
    isotropic grids."""
    if spacing is None:
        return [max(4, -(-int(n) // factor)) for n in full_shape]
    voxel_mm = factor * min(float(s) for s in spacing)
    return [max(4, n) for n in shape_for_cubic_voxels(full_shape, spacing, voxel_mm, round_up=True)]
