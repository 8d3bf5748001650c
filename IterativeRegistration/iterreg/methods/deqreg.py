"""DEQReg: deep equilibrium registration (Zhang et al., MICCAI 2025) on the method interface.

Every solver evaluation is one streamed step: the current estimate ``g(u_k)``, the relative residual
(``residual`` metric, the DEQ's convergence measure) and as channels the residual map ``|f_theta|`` and the
update field ``f_theta``. The run ends at the relative-residual ``tolerance`` or after ``steps`` evaluations,
whichever comes first; ``steps`` may exceed the iterations it was trained with (the equilibrium is stable).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .base import Prompts, Step
from .learned import LearnedIterativeMethod, NetworkOptions, WorkingGridOptions
from .polish import PolishOptions
from ..errors import InputError
from ..networks.deqreg import SOLVERS, DEQRegConfig, DEQRegNetwork
from ..spatial import vector_length


@dataclass(frozen=True)
class DEQRegOptions(WorkingGridOptions, PolishOptions, NetworkOptions):
    tolerance: float = 1e-3  # relative residual |g(u) - u| / |g(u)| at which the solve stops (0: never early)
    solver: str = ""  # fixed_point_iter | anderson; "": the checkpoint's
    damping: float = 0.0  # (0, 1]: each iteration moves this far towards g(u) (1: the paper's plain
    # iteration); 0: the checkpoint's

    def check(self) -> None:
        super().check()
        if self.tolerance < 0:
            raise InputError(f"tolerance must be >= 0, got {self.tolerance}")
        if not 0 <= self.damping <= 1:
            raise InputError(f"damping must be in (0, 1] (0: the checkpoint's), got {self.damping}")
        if self.solver and self.solver not in SOLVERS:
            raise InputError(f"unknown solver '{self.solver}'; choose {' or '.join(SOLVERS)}")


class DEQRegMethod(LearnedIterativeMethod):
    name = "deqreg"
    title = "DEQReg (deep equilibrium)"
    description = ("A learned residual update iterated to its fixed point (torchdeq); stops when the update "
                   "vanishes, and stays stable beyond its training iterations.")
    default_steps = 48
    max_steps = 500
    memory_per_voxel = 300  # bytes per fixed-grid voxel, measured (Docs/benchmarks.md, 'memory')
    needs_checkpoint = True
    Options = DEQRegOptions
    network_class, config_class = DEQRegNetwork, DEQRegConfig

    # --- inference --------------------------------------------------------------------------------------------
    def network_steps(self, fixed, moving, steps=None, prompts: Prompts | None = None,
                      init: torch.Tensor | None = None, spacing: Sequence[float] | None = None) -> Iterator[Step]:
        steps = self.check_inputs(fixed, moving, steps)
        fixed, moving, grid, start = self._prepare(fixed, moving, prompts, init, spacing)
        config = self.network.config
        tolerance = self.options.tolerance
        previous = start
        fixed_w, moving_w = grid.image_down(fixed), grid.image_down(moving)
        states = self.network.iterate(fixed_w, moving_w, steps, tolerance, start, self.options.solver or None,
                                      self.options.damping or None)
        try:
            for state in states:
                converged = state.relative_residual < tolerance
                final = converged or state.iteration == steps
                channels = {"residual_map": vector_length(state.update[:1]), "update": state.update[0]}
                beyond = "" if state.iteration <= config.max_iter else f" (beyond the {config.max_iter} trained)"
                phase = (f"iteration {state.iteration}/{steps}{beyond}, residual {state.relative_residual:.1e}"
                         + (" - converged" if converged else ""))
                with torch.no_grad():
                    step = self._step(state.iteration - 1, fixed_w, moving_w, moving, grid, state.displacement,
                                      previous, channels, phase, final, {"residual": state.relative_residual})
                previous = state.displacement
                yield step
        finally:
            states.close()  # a cancelled run stops the solver thread now
