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
- ``detail_input`` (ours, off by default): on a working grid coarser than the image the cell also sees both
  images at twice the working grid's resolution, folded into 2^ndim channels each (:func:`detail_channels`);
  the moving ones are warped by the working field phase by phase, which costs one 8-channel warp on the
  working grid instead of a warp at full resolution. Appended last, so a checkpoint without them starts a
  fine-tune unchanged (their weights zero).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from .. import losses
from ..spatial import resize_image, warp
from .config import DictConfig
from .unet import RecurrentUNet, UNetConfig, pad_to_multiple

__all__ = ["RIIRConfig", "RIIRNetwork", "RIIRState", "INNER_LOSSES", "detail_channels"]

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
    detail_input: bool = False  # ours: the images' detail below the working grid as extra channels (see above)

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
        detail = 2 * 2 ** nd if config.detail_input else 0
        self.cell = RecurrentUNet(UNetConfig(ndim=nd, in_channels=2 * nd + 2 + detail, out_channels=nd,
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

    def iterate(self, fixed: torch.Tensor, moving: torch.Tensor, steps: int, init: torch.Tensor | None = None,
                detail: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[RIIRState]:
        """Run ``steps`` RIIR steps on images already on the working grid, yielding each as it is done.
        ``detail``: (fixed, moving) from :func:`detail_channels`, required with ``detail_input``."""
        if self.config.detail_input and detail is None:
            raise ValueError("this RIIR network was built with detail_input: pass the images' detail channels")
        u = torch.zeros_like(fixed).repeat(1, self.config.ndim, *([1] * self.config.ndim)) if init is None else init
        hidden: list | None = None
        multiple = self.cell.config.multiple
        for _ in range(steps):
            gradient, inner = self.inner_gradient(fixed, moving, u)
            inputs = [u, gradient, warp(moving, u), fixed]
            if self.config.detail_input:
                inputs += [detail[0], warp(detail[1], u)]
            x, crop = pad_to_multiple(torch.cat(inputs, dim=1), multiple)
            out, hidden = self.cell(x, hidden)
            delta = out[crop]
            u = u + delta
            yield RIIRState(u, delta, hidden, gradient, inner)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, steps: int | None = None,
                detail: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Training: every step's displacement on the working grid (the caller upsamples)."""
        return [state.displacement for state in self.iterate(fixed, moving, steps or self.config.steps,
                                                             detail=detail)]


def detail_channels(image: torch.Tensor, working_shape) -> torch.Tensor:
    """``image`` [B, 1, *spatial] resampled to twice ``working_shape`` and folded into 2^ndim channels on the
    working grid: channel k holds the voxels of sub-voxel phase k (a pixel unshuffle by 2). No resampling when
    the image grid is already twice the working grid (128^3 images, 64^3 working grid)."""
    nd = image.dim() - 2
    fine = tuple(2 * int(n) for n in working_shape)
    if tuple(image.shape[2:]) != fine:
        image = resize_image(image, fine)
    b = image.shape[0]
    split = image.reshape(b, *[v for n in working_shape for v in (int(n), 2)])  # [B, n0, 2, n1, 2, ...]
    phases = [2 + 2 * d for d in range(nd)]
    cells = [1 + 2 * d for d in range(nd)]
    return split.permute(0, *phases, *cells).reshape(b, 2 ** nd, *[int(n) for n in working_shape]).contiguous()
