"""IIRP-Net (Ma et al., CVPR 2025): RP-Net with iterative inference and IterStop, on the method interface.

Every estimator pass is one streamed step, coarse to fine: metrics ``level`` (4 = coarsest .. 1 = finest, the
paper's numbering), ``iteration`` (within the level), ``iterstop_ncc`` (global NCC of the full-resolution warped
image, IterStop's similarity), ``gain`` (its change by this pass), ``accepted`` (1, or 0 when the pass was
reverted and the level stopped) and the standard ones; channels ``residual_flow`` (the pass's residual flow at
the level's resolution) and ``warped_features`` (the moving features the estimator saw).
``steps`` caps the total passes over all levels; ``max_iterations`` caps each level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .base import Prompts, Step
from .learned import LearnedIterativeMethod, NetworkOptions, WorkingGridOptions
from .polish import PolishOptions
from ..errors import InputError
from ..metrics import global_ncc
from ..networks.iirp import LEVELS, IIRPConfig, RPNet, iterative_inference
from ..spatial import warp


@dataclass(frozen=True)
class IIRPOptions(WorkingGridOptions, PolishOptions, NetworkOptions):
    delta: float = 0.005  # IterStop: a further pass must raise the global NCC by at least this
    max_iterations: int = 10  # passes per level at most
    level_iterations: tuple = ()  # (a, b, c, d) coarse to fine: exactly these passes, IterStop off; (1,1,1,1) = RP-Net

    def check(self) -> None:
        super().check()
        if not 1 <= self.max_iterations <= 50:
            raise InputError(f"max_iterations must be 1 to 50, got {self.max_iterations}")
        if self.level_iterations and (len(self.level_iterations) != LEVELS
                                      or any(not 1 <= int(n) <= 50 for n in self.level_iterations)):
            raise InputError(f"level_iterations must be {LEVELS} counts of 1 to 50 (coarse to fine), "
                             f"got {list(self.level_iterations)}")


class IIRPMethod(LearnedIterativeMethod):
    name = "iirp"
    title = "IIRP-Net (iterative pyramid, IterStop)"
    description = ("A residual pyramid network whose flow estimators are re-applied at each level, coarse to "
                   "fine, until the image similarity stops improving (IterStop).")
    default_steps = 4 * 10
    max_steps = 200
    memory_per_voxel = 300  # bytes per fixed-grid voxel, measured (Docs/benchmarks.md, 'memory')
    needs_checkpoint = True
    Options = IIRPOptions
    network_class, config_class = RPNet, IIRPConfig

    def check_inputs(self, fixed, moving, steps):
        steps = super().check_inputs(fixed, moving, steps)
        if steps < LEVELS:
            raise InputError(f"iirp needs at least {LEVELS} steps (one pass per pyramid level), got {steps}")
        return steps

    def _level_limits(self) -> tuple[list[int], float | None]:
        """Passes allowed per level (index 0 = level 1) and the IterStop delta (None: fixed counts)."""
        if self.options.level_iterations:
            return [int(n) for n in reversed(self.options.level_iterations)], None
        return [self.options.max_iterations] * LEVELS, self.options.delta

    def network_steps(self, fixed, moving, steps=None, prompts: Prompts | None = None,
                      init: torch.Tensor | None = None, spacing: Sequence[float] | None = None) -> Iterator[Step]:
        steps = self.check_inputs(fixed, moving, steps)
        if init is not None:
            raise InputError("iirp runs its pyramid from the identity and cannot continue from a previous field")
        fixed, moving, grid, _ = self._prepare(fixed, moving, prompts, None, spacing)
        fixed_w, moving_w = grid.image_down(fixed), grid.image_down(moving)
        limits, delta = self._level_limits()
        if delta is None and sum(limits) > steps:
            raise InputError(f"level_iterations {list(self.options.level_iterations)} need {sum(limits)} steps; "
                             "allow that many steps")

        def judge(working_u: torch.Tensor) -> float:  # IterStop's similarity, on the full-resolution images
            return global_ncc(fixed, warp(moving, grid.displacement_up(working_u)))

        previous = None
        with torch.no_grad():
            passes = iterative_inference(self.network, fixed_w, moving_w, judge, limits, delta, budget=steps)
            for index, state in enumerate(passes):
                if state.accepted:
                    verdict = "kept" if state.iteration > 1 or delta is None else "RP-Net pass"
                else:
                    verdict = f"gain below {delta:g}: reverted, level done"
                phase = (f"level {state.level} ({LEVELS - state.level + 1}/{LEVELS}), "
                         f"iteration {state.iteration}: {verdict}")
                channels = {"residual_flow": state.residual[0], "warped_features": state.warped_features[0]}
                extra = {"level": float(state.level), "iteration": float(state.iteration),
                         "iterstop_ncc": state.similarity, "gain": state.gain, "accepted": float(state.accepted)}
                final = state.level == 1 and state.final_at_level
                yield self._step(index, fixed_w, moving_w, moving, grid, state.displacement, previous, channels,
                                 phase, final, extra)
                previous = state.displacement
