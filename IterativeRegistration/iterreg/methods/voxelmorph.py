"""VoxelMorph (Balakrishnan et al., IEEE TMI 2019): one U-Net pass predicts the displacement.

The common baseline of the five iterative papers: a single step, no iteration. Trained with
``Training/`` (similarity + lambda * diffusion); weights come from a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .base import Prompts, Step, standard_step_metrics
from .learned import NetworkMethod, NetworkOptions
from .polish import PolishOptions
from ..errors import InputError
from ..networks.unet import UNet, UNetConfig, pad_to_multiple
from ..spatial import warp


@dataclass(frozen=True)
class VoxelMorphOptions(PolishOptions, NetworkOptions):
    feature_maps: int = 4  # decoder feature maps exposed as the "features" channel


class VoxelMorphMethod(NetworkMethod):
    name = "voxelmorph"
    title = "VoxelMorph (one-step U-Net baseline)"
    description = "A single U-Net pass predicts the displacement; the baseline the iterative methods improve on."
    default_steps = 1
    max_steps = 1
    memory_per_voxel = 600  # bytes per fixed-grid voxel, measured (Docs/benchmarks.md, 'memory')
    needs_checkpoint = True
    Options = VoxelMorphOptions

    # --- training hooks (used by Training/) -------------------------------------------------------------------
    @staticmethod
    def build_network(architecture: dict) -> UNet:
        return UNet(UNetConfig.from_dict(architecture))

    @staticmethod
    def default_architecture(ndim: int) -> dict:
        return UNetConfig(ndim=ndim, in_channels=2, out_channels=ndim).to_dict()

    @staticmethod
    def predict(network: UNet, fixed: torch.Tensor, moving: torch.Tensor) -> list[torch.Tensor]:
        """The displacement of every step (one here), differentiable, for the training loss."""
        x, crop = pad_to_multiple(torch.cat([moving, fixed], dim=1), network.config.multiple)
        return [network(x)[crop]]

    # --- inference --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def network_steps(self, fixed, moving, steps=None, prompts: Prompts | None = None,
                      init: torch.Tensor | None = None, spacing: Sequence[float] | None = None) -> Iterator[Step]:
        self.check_inputs(fixed, moving, steps)
        if init is not None:  # a one-shot network cannot refine: report, do not silently ignore
            raise InputError("voxelmorph predicts in one step and cannot continue from a previous field")
        if prompts is not None:
            raise InputError("voxelmorph cannot use landmark prompts; register without prompts, or use a method "
                             "that takes them (classical)")
        fixed, moving = fixed.to(self.device), moving.to(self.device)
        displacement = self.predict(self.network, fixed, moving)[0]
        warped = warp(moving, displacement)
        metrics = standard_step_metrics(fixed, warped, displacement, None, self.similarity, self.similarity_kwargs)
        crop = tuple(slice(0, n) for n in fixed.shape[2:])
        features = self.network.features[0][(slice(0, self.options.feature_maps), *crop)]
        yield Step(0, displacement, warped, metrics, channels={"features": features}, phase="one U-Net pass",
                   final=True)
