"""RIIR: Recurrent Inference Image Registration (Zhang et al., MedIA 2025) on the method interface.

Each step runs the recurrent cell once (:mod:`iterreg.networks.riir`) and is streamed with its metrics and
the cell's memory: ``h1``/``h2`` (every channel of each ConvGRU state) and ``inner_gradient`` (the
similarity gradient the cell was given). It can run past the steps it was trained with; the hidden state
and field simply continue (the DEQReg paper's Fig. 3 shows what happens then; Docs/benchmarks.md measures it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .base import Prompts, Step
from .learned import LearnedIterativeMethod, NetworkOptions, WorkingGrid, WorkingGridOptions
from .polish import PolishOptions
from ..networks.riir import RIIRConfig, RIIRNetwork, detail_channels


@dataclass(frozen=True)
class RIIROptions(WorkingGridOptions, PolishOptions, NetworkOptions):
    pass


class RIIRMethod(LearnedIterativeMethod):
    name = "riir"
    title = "RIIR (recurrent inference machine)"
    description = ("A recurrent cell with ConvGRU memory learns the update rule; each step sees the similarity "
                   "gradient, the warped image and its own hidden state.")
    default_steps = 6
    max_steps = 100
    memory_per_voxel = 300  # bytes per fixed-grid voxel, measured (Docs/benchmarks.md, 'memory')
    needs_checkpoint = True
    Options = RIIROptions
    network_class, config_class = RIIRNetwork, RIIRConfig

    @classmethod
    def checkpoint_default_steps(cls, metadata: dict) -> int:
        # the paper unrolls at inference the T steps it trained with (its Sec. 2.3): so does a checkpoint of ours
        return int((metadata.get("architecture") or {}).get("steps", cls.default_steps))

    @staticmethod
    def full_resolution_inputs(network, fixed, moving, grid: WorkingGrid) -> dict:
        """The images' detail channels if the network takes them (``detail_input``)."""
        if not network.config.detail_input:
            return {}
        return {"detail": (detail_channels(fixed, grid.shape), detail_channels(moving, grid.shape))}

    # --- inference --------------------------------------------------------------------------------------------
    def network_steps(self, fixed, moving, steps=None, prompts: Prompts | None = None,
                      init: torch.Tensor | None = None, spacing: Sequence[float] | None = None) -> Iterator[Step]:
        steps = self.check_inputs(fixed, moving, steps)
        fixed, moving, grid, start = self._prepare(fixed, moving, prompts, init, spacing)
        trained = self.network.config.steps
        previous = start
        fixed_w, moving_w = grid.image_down(fixed), grid.image_down(moving)
        with torch.no_grad():
            extra = self.full_resolution_inputs(self.network, fixed, moving, grid)
            for t, state in enumerate(self.network.iterate(fixed_w, moving_w, steps, start, **extra)):
                channels = {f"h{k + 1}": grid.crop_coarse(h[0], level)
                            for k, (h, level) in enumerate(zip(state.hidden, self.network.config.hidden_levels))}
                channels["inner_gradient"] = state.inner_gradient[0]
                beyond = "" if t < trained else f" (beyond the {trained} trained)"
                yield self._step(t, fixed_w, moving_w, moving, grid, state.displacement, previous, channels,
                                 f"step {t + 1}/{steps}{beyond}", t == steps - 1, {"inner_loss": state.inner_loss})
                previous = state.displacement
