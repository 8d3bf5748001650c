"""The VoxelMorph-style U-Net (Balakrishnan et al. 2019), the backbone the five papers compare against.

Encoder: strided 3x3(x3) convolutions (LeakyReLU 0.2), one per level; decoder: convolution, upsample x2,
concatenate the skip of the same resolution; after the last upsampling the remaining decoder features run at
full resolution; a final convolution (initialised near zero, as in VoxelMorph) gives ``out_channels``.
Default widths are VoxelMorph-2: encoder 16-32-32-32, decoder 32-32-32-32-32-16-16.

:class:`RecurrentUNet` adds convolutional GRUs (Shi et al. 2015) after chosen encoder levels, the hidden
memory of RIIR's recurrent cell: the GRU's new state replaces the encoder features of its level, so it feeds
both the deeper levels and the skip connection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DictConfig
from .conv import conv

__all__ = ["UNet", "UNetConfig", "RecurrentUNet", "ConvGRU", "pad_to_multiple", "prefer_fast_cpu_layout"]


@dataclass(frozen=True)
class UNetConfig(DictConfig):
    ndim: int = 3
    in_channels: int = 2
    out_channels: int = 3
    encoder: tuple = (16, 32, 32, 32)
    decoder: tuple = (32, 32, 32, 32, 32, 16, 16)
    final_init_std: float = 1e-5
    hidden_levels: tuple = ()  # RecurrentUNet: encoder levels (1 = half resolution) that carry a ConvGRU
    hidden_channels: int = 32

    @property
    def multiple(self) -> int:
        """Spatial sizes must be multiples of this (one halving per encoder level)."""
        return 2 ** len(self.encoder)


def _conv(ndim: int, cin: int, cout: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(conv(ndim, cin, cout, 3, stride=stride), nn.LeakyReLU(0.2))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        c = config
        if len(c.decoder) < len(c.encoder):
            raise ValueError("the decoder needs at least one convolution per encoder level")
        if any(not 1 <= level <= len(c.encoder) for level in c.hidden_levels):
            raise ValueError(f"hidden_levels {c.hidden_levels} must be encoder levels 1..{len(c.encoder)}")
        self.config = c
        self.encoder = nn.ModuleList()
        self.grus = nn.ModuleDict()
        cin = c.in_channels
        skips = [c.in_channels]
        for level, width in enumerate(c.encoder, start=1):
            self.encoder.append(_conv(c.ndim, cin, width, stride=2))
            if level in c.hidden_levels:
                self.grus[str(level)] = ConvGRU(c.ndim, width, c.hidden_channels)
                width = c.hidden_channels
            cin = width
            skips.append(width)
        skips.pop()  # the deepest level has no skip
        self.decoder = nn.ModuleList()
        for width in c.decoder[:len(c.encoder)]:
            self.decoder.append(_conv(c.ndim, cin, width))
            cin = width + skips.pop()
        self.extra = nn.ModuleList()
        for width in c.decoder[len(c.encoder):]:
            self.extra.append(_conv(c.ndim, cin, width))
            cin = width
        self.head = conv(c.ndim, cin, c.out_channels, 3)
        nn.init.normal_(self.head.weight, 0.0, c.final_init_std)
        nn.init.zeros_(self.head.bias)
        self.features: torch.Tensor | None = None  # last full-resolution features (a visualisation channel)
        self.channels_last = False

    def use_channels_last(self) -> "UNet":
        """Keep 3D activations and weights channels-last: oneDNN's CPU 3D convolutions are faster that way
        (`cpu-layout` in Docs/benchmarks.md: 1.2-2.1x at inference). Outputs stay contiguous. No-op in 2D."""
        if self.config.ndim == 3:
            self.to(memory_format=torch.channels_last_3d)
            self.channels_last = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)[0]

    def _run(self, x: torch.Tensor, hidden: list | None) -> tuple[torch.Tensor, list]:
        shape = x.shape[2:]
        if any(n % self.config.multiple for n in shape):
            raise ValueError(f"U-Net input {tuple(shape)} must be a multiple of {self.config.multiple} per axis; "
                             "pad it first (see pad_to_multiple)")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        skips = [x]
        new_hidden = []
        for level, block in enumerate(self.encoder, start=1):
            x = block(x)
            if str(level) in self.grus:
                previous = hidden[len(new_hidden)] if hidden else None
                x = self.grus[str(level)](x, previous)
                new_hidden.append(x)
            skips.append(x)
        skips.pop()
        mode = "bilinear" if self.config.ndim == 2 else "trilinear"
        for block in self.decoder:
            x = block(x)
            x = F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)
            x = torch.cat([x, skips.pop()], dim=1)
        for block in self.extra:
            x = block(x)
        self.features = x.detach().contiguous()
        return self.head(x).contiguous(), [h.contiguous() for h in new_hidden]


class ConvGRU(nn.Module):
    """Convolutional GRU cell: gates and candidate from 3x3(x3) convolutions of [input, state]."""

    def __init__(self, ndim: int, in_channels: int, hidden_channels: int):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.gates = conv(ndim, in_channels + hidden_channels, 2 * hidden_channels, 3)
        self.candidate = conv(ndim, in_channels + hidden_channels, hidden_channels, 3)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        if h is None:  # h_1 = 0 (RIIR Eq. 11)
            h = x.new_zeros((x.shape[0], self.hidden_channels, *x.shape[2:]))
        update, reset = torch.sigmoid(self.gates(torch.cat([x, h], dim=1))).chunk(2, dim=1)
        candidate = torch.tanh(self.candidate(torch.cat([x, reset * h], dim=1)))
        return (1 - update) * h + update * candidate


class RecurrentUNet(UNet):
    """U-Net whose ``hidden_levels`` carry ConvGRU memory from one call to the next (none: a plain U-Net
    with the recurrent call signature, RIIR's no-hidden-state ablation)."""

    def forward(self, x: torch.Tensor, hidden: list | None = None) -> tuple[torch.Tensor, list]:
        """Returns the output and the new hidden states (one per hidden level, coarse last)."""
        return self._run(x, hidden)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes at their end to multiples of ``multiple``; returns the crop back."""
    shape = x.shape[2:]
    target = [-(-n // multiple) * multiple for n in shape]
    pad = []
    for n, t in reversed(list(zip(shape, target))):
        pad += [0, t - n]
    crop = (slice(None), slice(None), *[slice(0, n) for n in shape])
    return (F.pad(x, pad) if any(pad) else x), crop


def prefer_fast_cpu_layout(network: nn.Module, device: torch.device) -> nn.Module:
    """On the CPU, run every U-Net inside ``network`` channels-last (see :meth:`UNet.use_channels_last`); one
    place for the choice, used by inference and training alike. GPUs keep the default layout until measured."""
    if torch.device(device).type == "cpu":
        for module in network.modules():
            if isinstance(module, UNet):
                module.use_channels_last()
    return network
