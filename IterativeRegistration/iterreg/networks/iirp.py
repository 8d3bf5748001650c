"""RP-Net and its iterative inference, IIRP-Net (Ma et al., "Iterative Inference Residual Pyramid Network").

RP-Net (paper §3.2): one weight-shared feature extractor gives features F^1..F^4 of each image (conv 3x3(x3)
+ LeakyReLU 0.1, average pooling between levels; F^1 at full resolution, F^4 at 1/8); one residual flow
estimator per level (conv, two ResBlocks, conv to q/2, conv to ndim; q = 32, 16 at the finest level) predicts a
residual flow from [F_f^i, F_m^i o phi]; flows are composed coarse to fine,
    phi^i = up(phi^{i+1}) o delta^i   (displacements: u = delta + up(u^{i+1})(x + delta)),
one pass per level in training (NCC window 9 + diffusion).

IIRP inference (paper §3.3, Algorithm 1): each level's estimator is applied again and again; after each pass
the similarity of the full-resolution moving image warped by the level's flow is compared with the previous
one, and the level stops (keeping the previous flow) when the gain falls below delta (IterStop). The judge of
that similarity is passed in by the caller, which owns the full-resolution images (``iterative_inference``).

Levels are numbered as in the paper: 4 = coarsest, 1 = full resolution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from ..spatial import compose, resize_displacement, warp
from .config import DictConfig
from .conv import conv
from .unet import pad_to_multiple

__all__ = ["IIRPConfig", "RPNet", "IIRPState", "iterative_inference", "LEVELS"]

LEVELS = 4


@dataclass(frozen=True)
class IIRPConfig(DictConfig):
    ndim: int = 3
    features: tuple = (8, 16, 32, 32)  # extractor channels, level 1 (full resolution) to level 4
    estimator_channels: tuple = (16, 32, 32, 32)  # q per level, level 1 to 4
    working_scale: float = 1.0  # the network's grid relative to the image grid (methods/learned.py)

    def __post_init__(self):
        if len(self.features) != LEVELS or len(self.estimator_channels) != LEVELS:
            raise ValueError(f"features and estimator_channels need {LEVELS} entries (levels 1 to {LEVELS})")
        if not 0 < self.working_scale <= 1:
            raise ValueError("working_scale must be in (0, 1]")

    @property
    def multiple(self) -> int:
        return 2 ** (LEVELS - 1)

    def step_weights(self, count: int) -> list[float]:
        return [1.0] * count  # one output: the final flow


class FeatureExtractor(nn.Module):
    def __init__(self, ndim: int, channels: Sequence[int]):
        super().__init__()
        widths = [1, *channels]
        self.blocks = nn.ModuleList(nn.Sequential(conv(ndim, a, b), nn.LeakyReLU(0.1))
                                    for a, b in zip(widths[:-1], widths[1:]))
        self.pool = nn.AvgPool2d(2) if ndim == 2 else nn.AvgPool3d(2)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Features of levels 1..4 (index 0 = full resolution)."""
        out = []
        x = image
        for k, block in enumerate(self.blocks):
            x = block(x if k == 0 else self.pool(x))
            out.append(x)
        return out


class ResBlock(nn.Module):
    def __init__(self, ndim, channels):
        super().__init__()
        self.conv = conv(ndim, channels, channels)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        return self.act(x + self.conv(x))


class ResidualFlowEstimator(nn.Module):
    """f_theta^i: [F_f, F_w] -> residual flow (voxels of its level)."""

    def __init__(self, ndim: int, feature_channels: int, q: int):
        super().__init__()
        self.body = nn.Sequential(conv(ndim, 2 * feature_channels, q), nn.LeakyReLU(0.1),
                                  ResBlock(ndim, q), ResBlock(ndim, q), conv(ndim, q, q // 2))
        self.head = conv(ndim, q // 2, ndim)
        nn.init.normal_(self.head.weight, 0.0, 1e-5)  # start near the identity, as VoxelMorph's flow layer
        nn.init.zeros_(self.head.bias)

    def forward(self, fixed_features, warped_features):
        return self.head(self.body(torch.cat([fixed_features, warped_features], dim=1)))


@dataclass
class IIRPState:
    """One estimator pass at one level."""
    level: int  # 4 (coarsest) .. 1 (full resolution)
    iteration: int  # 1-based pass count at this level
    displacement: torch.Tensor  # the flow kept after this pass (accepted or reverted), on the working grid
    residual: torch.Tensor  # delta^i of this pass
    warped_features: torch.Tensor  # F_m^i o phi (the estimator's moving input)
    similarity: float  # IterStop similarity of the flow kept after this pass (higher is better)
    gain: float  # similarity after the pass minus before it
    accepted: bool
    final_at_level: bool


class RPNet(nn.Module):
    def __init__(self, config: IIRPConfig):
        super().__init__()
        self.config = config
        self.extractor = FeatureExtractor(config.ndim, config.features)
        self.estimators = nn.ModuleList(ResidualFlowEstimator(config.ndim, c, q)
                                        for c, q in zip(config.features, config.estimator_channels))

    # building blocks of both the one-pass network and the iterative inference
    def pyramid(self, fixed: torch.Tensor, moving: torch.Tensor):
        """Pad both images to a multiple of 8 and extract both feature pyramids; returns (fixed, moving, crop)."""
        x, crop = pad_to_multiple(torch.cat([fixed, moving]), self.config.multiple)
        features = self.extractor(x)
        n = fixed.shape[0]
        return [f[:n] for f in features], [f[n:] for f in features], crop

    def estimate(self, level: int, fixed_features, moving_features, u):
        """One pass of f_theta^level: returns (composed flow, residual flow, warped moving features)."""
        warped = moving_features if u is None else warp(moving_features, u)
        delta = self.estimators[level - 1](fixed_features, warped)
        return (delta if u is None else compose(u, delta)), delta, warped

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> list[torch.Tensor]:
        """RP-Net, one pass per level (training): ``[u]`` on the input grid."""
        fixed_f, moving_f, crop = self.pyramid(fixed, moving)
        u = None
        for level in range(LEVELS, 0, -1):
            if u is not None:
                u = resize_displacement(u, fixed_f[level - 1].shape[2:])
            u, _, _ = self.estimate(level, fixed_f[level - 1], moving_f[level - 1], u)
        return [u[crop]]


def iterative_inference(network: RPNet, fixed: torch.Tensor, moving: torch.Tensor,
                        judge: Callable[[torch.Tensor], float], max_iterations: Sequence[int],
                        delta: float | None, budget: int | None = None) -> Iterator[IIRPState]:
    """IIRP-Net inference on images on the working grid, coarse to fine, one state per estimator pass.

    ``judge(u)`` scores a flow given on the working grid (the caller brings it to the full-resolution images):
    higher is better. At each level the first pass is always kept (it is RP-Net's own pass; the paper's counts
    (a, b, c, d) are >= 1); every further pass is kept only if it gains at least ``delta``, otherwise the level
    stops with the previous flow (Algorithm 1). ``delta=None`` disables IterStop: each level runs exactly
    ``max_iterations[level-1]`` passes (the paper's IIRP-Net-(a, b, c, d) without IterStop). ``budget`` caps the
    passes over all levels, always leaving one for each finer level.
    """
    fixed_f, moving_f, crop = network.pyramid(fixed, moving)
    padded = fixed_f[0].shape[2:]
    on_working = lambda v: resize_displacement(v, padded)[crop]  # noqa: E731  level flow -> working grid
    u = None
    score = judge(torch.zeros_like(fixed).repeat(1, network.config.ndim, *([1] * network.config.ndim)))
    for level in range(LEVELS, 0, -1):
        if u is not None:
            u = resize_displacement(u, fixed_f[level - 1].shape[2:])
        limit = max_iterations[level - 1]
        if budget is not None:
            limit = max(1, min(limit, budget - (level - 1)))
        for iteration in range(1, limit + 1):
            candidate, residual, warped = network.estimate(level, fixed_f[level - 1], moving_f[level - 1], u)
            new_score = judge(on_working(candidate))
            gain = new_score - score
            accepted = iteration == 1 or delta is None or gain >= delta
            if accepted:
                u, score = candidate, new_score
            last = not accepted or iteration == limit
            if budget is not None:
                budget -= 1
            yield IIRPState(level, iteration, on_working(u), residual, warped, score, gain, accepted, last)
            if last:
                break
