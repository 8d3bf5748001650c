"""DIO's feature networks (Jena et al., "Deep Implicit Optimization for Robust and Flexible Image Registration").

The network sees **one image at a time** (paper §3.1) and returns dense feature images at several scales,
coarse to fine (scales 4, 2, 1 by default). The optimization layer (:mod:`iterreg.feature_optimizer`) then
registers the moving features to the fixed ones; nothing here knows about the other image.

Four variants, as in the paper's §4.2:
- ``unet``: a U-Net; one 3x3 conv head per scale on the decoder path (features shared across scales).
- ``encoder``: "encoder-only" (the paper's UNet-E, its Fig. 9): an independent strided encoder per scale.
- ``kernel: large`` turns either into its large-kernel form (LKU / LKU-E, after LKU-Net): every encoder block
  sums a large (5^n) conv, a 3^n conv, a 1^n conv and the identity before its activation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import DictConfig
from .conv import conv
from .unet import pad_to_multiple

__all__ = ["DIOConfig", "FeatureNetwork"]


@dataclass(frozen=True)
class DIOConfig(DictConfig):
    ndim: int = 3
    variant: str = "unet"  # unet | encoder
    kernel: str = "standard"  # standard | large
    channels: tuple = (16, 32, 32, 64)  # encoder widths at 1, 1/2, 1/4, 1/8
    feature_channels: int = 16  # channels of each feature image (the public code's output_channels)
    scales: tuple = (4, 2, 1)  # feature scales, coarse to fine (powers of two)
    working_scale: float = 1.0  # the network's grid relative to the image grid (methods/learned.py)
    # How training runs the optimization layer (inference takes its settings from the method's options):
    train_iterations: tuple = (60, 40, 20)  # solver iterations per scale in training (paper: 200, 100, 50)
    train_representation: str = "freeform"
    jfb_steps: int = 3  # Jacobian-free backprop: differentiable update steps from the detached optimum

    def __post_init__(self):
        if self.variant not in ("unet", "encoder"):
            raise ValueError(f"variant must be 'unet' or 'encoder', got {self.variant!r}")
        if self.kernel not in ("standard", "large"):
            raise ValueError(f"kernel must be 'standard' or 'large', got {self.kernel!r}")
        if len(self.channels) != 4:
            raise ValueError("channels needs 4 encoder widths (1, 1/2, 1/4, 1/8)")
        if not self.scales or list(self.scales) != sorted(self.scales, reverse=True) or \
                any(s not in (1, 2, 4, 8) for s in self.scales):
            raise ValueError(f"scales must be decreasing powers of two among 8, 4, 2, 1, got {list(self.scales)}")
        if len(self.train_iterations) != len(self.scales):
            raise ValueError("train_iterations needs one count per scale")
        if not 0 < self.working_scale <= 1:
            raise ValueError("working_scale must be in (0, 1]")

    def step_weights(self, count: int) -> list[float]:
        return [1.0] * count  # the optimum of every scale is trained (the public code's default)


class LargeKernelBlock(nn.Module):
    """LKU-Net's block: large + small + pointwise convs + identity, summed, then the activation."""

    def __init__(self, ndim: int, channels: int, large: int = 5):
        super().__init__()
        self.large, self.small, self.point = (conv(ndim, channels, channels, k) for k in (large, 3, 1))

    def forward(self, x):
        return nn.functional.leaky_relu(self.large(x) + self.small(x) + self.point(x) + x, 0.2)


def _block(ndim, cin, cout, stride, large):
    """conv (strided when downsampling) + LeakyReLU, then a large-kernel block in the LK variants."""
    layers = [conv(ndim, cin, cout, 3, stride), nn.LeakyReLU(0.2)]
    if large:
        layers.append(LargeKernelBlock(ndim, cout))
    return nn.Sequential(*layers)


class _UNetFeatures(nn.Module):
    def __init__(self, config: DIOConfig):
        super().__init__()
        nd, c, large = config.ndim, config.channels, config.kernel == "large"
        self.encoder = nn.ModuleList([_block(nd, 1, c[0], 1, large)] +
                                     [_block(nd, c[i - 1], c[i], 2, large) for i in range(1, 4)])
        # decoder level l (1/2^l) for l = 2, 1, 0: upsample the coarser map, concatenate the skip, conv
        self.decoder = nn.ModuleDict()
        below = c[3]
        for level in (2, 1, 0):
            width = max(c[level], config.feature_channels)
            self.decoder[str(level)] = _block(nd, below + c[level], width, 1, False)
            below = width
        self.heads = nn.ModuleDict({str(s): conv(nd, self.decoder[str(int(math.log2(s)))][0].out_channels,
                                                  config.feature_channels) for s in config.scales if s <= 4})
        if 8 in config.scales:
            self.heads["8"] = conv(nd, c[3], config.feature_channels)
        self.mode = "bilinear" if nd == 2 else "trilinear"

    def forward(self, x) -> dict[int, torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        out = {8: self.heads["8"](x)} if "8" in self.heads else {}
        for level in (2, 1, 0):
            x = nn.functional.interpolate(x, size=skips[level].shape[2:], mode=self.mode, align_corners=False)
            x = self.decoder[str(level)](torch.cat([x, skips[level]], 1))
            if str(2 ** level) in self.heads:
                out[2 ** level] = self.heads[str(2 ** level)](x)
        return out


class _EncoderFeatures(nn.Module):
    """UNet-E / LKU-E: one independent encoder per scale (stride-2 blocks down to it, then a head)."""

    def __init__(self, config: DIOConfig):
        super().__init__()
        nd, c, large = config.ndim, config.channels, config.kernel == "large"
        self.encoders = nn.ModuleDict()
        for s in config.scales:
            depth = int(math.log2(s))
            layers = [_block(nd, 1, c[0], 1, large)]
            layers += [_block(nd, c[i - 1], c[i], 2, large) for i in range(1, depth + 1)]
            layers += [_block(nd, c[depth], c[depth], 1, large), conv(nd, c[depth], config.feature_channels)]
            self.encoders[str(s)] = nn.Sequential(*layers)

    def forward(self, x) -> dict[int, torch.Tensor]:
        return {int(s): encoder(x) for s, encoder in self.encoders.items()}


class FeatureNetwork(nn.Module):
    """image ``[B, 1, *spatial]`` -> feature images, coarse to fine: ``[B, C, *ceil(spatial / s)]`` per scale s."""

    def __init__(self, config: DIOConfig = DIOConfig()):
        super().__init__()
        self.config = config
        self.body = _UNetFeatures(config) if config.variant == "unet" else _EncoderFeatures(config)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        shape = image.shape[2:]
        padded, _ = pad_to_multiple(image, 8)
        maps = self.body(padded)
        return [maps[s][(slice(None), slice(None), *[slice(0, -(-n // s)) for n in shape])]
                for s in self.config.scales]
