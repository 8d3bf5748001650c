"""The RIIR network (Zhang et al., "Recurrent Inference Image Registration", paper §2.3 and §3.4).

A recurrent inference machine for registration: one weight-shared cell ``g_theta`` is applied T times,
    {delta_t, h_{t+1}} = g_theta([u_t, grad_u L_inner(I_mov o phi_t, I_fix), I_mov o phi_t, I_fix], h_t),
    u_{t+1} = u_t + delta_t,   u_0 = 0 (phi_0 = identity),  h_1 = 0.
Choices where the paper is silent (Docs/methods.md):
- phi_t enters as the displacement u_t in voxels (phi = x + u; the identity part carries no information).
- The similarity gradient is of the voxel-*summed* inner loss, so its scale does not depend on image size,
  and it is a detached input by default (RIM treats it as data; ``differentiate_gradient`` backpropagates
  through it, which needs grid_sample's second derivative and about twice the memory).
- ConvGRUs (32 channels) sit after encoder levels 2 and 3 (1/4 and 1/8 resolution): "hidden states at
  downsampled resolution", cheap in memory; ``hidden_levels`` () / (2,) / (2, 3) is the paper's ablation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from .. import losses
from ..spatial import warp
from .config import DictConfig
from .unet import RecurrentUNet, UNetConfig, pad_to_multiple

__all__ = ["RIIRConfig", "RIIRNetwork", "RIIRState", "INNER_LOSSES"]

INNER_LOSSES = ("mse", "lncc", "nmi")


@dataclass(frozen=True)
class RIIRConfig(DictConfig):
    ndim: int = 3
    encoder: tuple = (16, 16, 32, 32, 32)  # the VoxelMorph-size U-Net of the paper's baselines
    decoder: tuple = (32, 32, 32, 32, 32, 16, 16)
    hidden_levels: tuple = (2, 3)
    hidden_channels: int = 32
    steps: int = 6  # T, the unrolled steps it is trained with
    step_weighting: str = "exponential"  # w_t = 10^((t-1)/(T-1)), or "uniform"
    inner_loss: str = "mse"  # mse | lncc (window inner_window) | nmi (inner_bins)
    inner_window: int = 5
    inner_bins: int = 32
    working_scale: float = 1.0  # the network's grid relative to the image grid (methods/learned.py)
    differentiate_gradient: bool = False

    def __post_init__(self):
        if self.inner_loss not in INNER_LOSSES:
            raise ValueError(f"inner_loss must be one of {INNER_LOSSES}, got '{self.inner_loss}'")
        if self.step_weighting not in ("exponential", "uniform"):
            raise ValueError(f"step_weighting must be exponential or uniform, got '{self.step_weighting}'")
        if self.steps < 1 or not 0 < self.working_scale <= 1:
            raise ValueError("steps must be >= 1 and working_scale in (0, 1]")

    def step_weights(self, count: int) -> list[float]:
        """Outer-loss weights of ``count`` steps, normalised to sum 1 (Adam does not care about the scale;
        gradient clipping does)."""
        if self.step_weighting == "uniform" or count == 1:
            raw = [1.0] * count
        else:
            raw = [10 ** (t / (count - 1)) for t in range(count)]
        return [w / sum(raw) for w in raw]


@dataclass
class RIIRState:
    """One RIIR step on the working grid: the new displacement, its update, the cell's memory and inputs."""
    displacement: torch.Tensor  # u_{t+1}, [B, ndim, *working]
    update: torch.Tensor  # delta_t
    hidden: list = field(default_factory=list)  # h_{t+1}, one [B, 32, *coarse] per hidden level
    inner_gradient: torch.Tensor | None = None  # grad_u L_inner at u_t
    inner_loss: float = 0.0  # L_inner at u_t


class RIIRNetwork(nn.Module):
    def __init__(self, config: RIIRConfig):
        super().__init__()
        self.config = config
        nd = config.ndim
        self.cell = RecurrentUNet(UNetConfig(ndim=nd, in_channels=2 * nd + 2, out_channels=nd,
                                             encoder=config.encoder, decoder=config.decoder,
                                             hidden_levels=config.hidden_levels,
                                             hidden_channels=config.hidden_channels))

    def inner_loss(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        c = self.config
        kwargs = {"lncc": {"window": c.inner_window}, "nmi": {"bins": c.inner_bins}}.get(c.inner_loss, {})
        return losses.similarity_loss(c.inner_loss, fixed, warped, **kwargs)

    def inner_gradient(self, fixed: torch.Tensor, moving: torch.Tensor, u: torch.Tensor):
        """grad_u of the voxel-summed inner loss at u (detached unless ``differentiate_gradient``)."""
        differentiate = self.config.differentiate_gradient and torch.is_grad_enabled()
        with torch.enable_grad():
            point = u if differentiate else u.detach().requires_grad_(True)
            loss = self.inner_loss(fixed, warp(moving, point))
            (gradient,) = torch.autograd.grad(loss * fixed[0, 0].numel() * fixed.shape[0], point,
                                              create_graph=differentiate)
        return gradient, float(loss.detach())

    def iterate(self, fixed: torch.Tensor, moving: torch.Tensor, steps: int,
                init: torch.Tensor | None = None) -> Iterator[RIIRState]:
        """Run ``steps`` RIIR steps on images already on the working grid, yielding each as it is done."""
        u = torch.zeros_like(fixed).repeat(1, self.config.ndim, *([1] * self.config.ndim)) if init is None else init
        hidden: list | None = None
        multiple = self.cell.config.multiple
        for _ in range(steps):
            gradient, inner = self.inner_gradient(fixed, moving, u)
            x, crop = pad_to_multiple(torch.cat([u, gradient, warp(moving, u), fixed], dim=1), multiple)
            out, hidden = self.cell(x, hidden)
            delta = out[crop]
            u = u + delta
            yield RIIRState(u, delta, hidden, gradient, inner)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, steps: int | None = None) -> list[torch.Tensor]:
        """Training: every step's displacement on the working grid (the caller upsamples)."""
        return [state.displacement for state in self.iterate(fixed, moving, steps or self.config.steps)]
