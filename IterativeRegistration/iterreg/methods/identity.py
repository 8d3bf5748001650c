"""Identity: no deformation. The floor every method must beat, and the cheapest end-to-end check."""
from __future__ import annotations

from typing import Iterator

import torch

from .base import Prompts, RegistrationMethod, Step, standard_step_metrics
from ..spatial import warp


class IdentityMethod(RegistrationMethod):
    name = "identity"
    title = "Identity (no registration)"
    description = "Leaves the moving image where it is (after resampling onto the fixed grid)."
    default_steps = 1
    max_steps = 1
    memory_per_voxel = 300  # bytes per fixed-grid voxel, measured (Docs/benchmarks.md, 'memory')

    def run(self, fixed, moving, steps=None, prompts: Prompts | None = None,
            init: torch.Tensor | None = None) -> Iterator[Step]:
        self.check_inputs(fixed, moving, steps)
        nd = fixed.dim() - 2
        displacement = torch.zeros(1, nd, *fixed.shape[2:], device=fixed.device, dtype=fixed.dtype)
        if init is not None:
            displacement = init.to(displacement)
        warped = warp(moving, displacement)
        yield Step(0, displacement, warped, standard_step_metrics(fixed, warped, displacement, None),
                   phase="identity", final=True)
