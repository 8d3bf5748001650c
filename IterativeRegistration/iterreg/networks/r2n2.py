"""R2N2, the recurrent registration neural network (Sandkühler et al., 2019), in 2D as in the paper and in 3D.

Registration is a sequence of local deformations (paper Eq. 7-9):
    f_0 = 0,   f_t = f_{t-1} + v_t * exp(-1/2 (x - c_t)^T Sigma_t^{-1} (x - c_t)),   Sigma_t = R_t diag(sigma_t^2) R_t^T,
with the position c_t, shape (widths sigma_t, rotation R_t) and weight v_t of step t predicted by a recurrent
network from [F, M o f_{t-1}, coordinates] (by default with M o f_{t-1} - F in place of M o f_{t-1}: same
information, better conditioned; ``difference_input``): a 7x7 stride-2 stem, three gated recurrent registration units
(GR2U: a stack of residual blocks, a convolutional GRU with a skip connection, a position network and a
stride-2 convolution) at 1/2, 1/4 and 1/8 resolution, and a parameter network.
- Position network (Eq. 14-17): per GR2U a spatial soft-argmax gives a position, and a second soft-max its
  confidence w = 2 - sum |p_l - p_r|; the position is the confidence-weighted mean over the three levels.
- Parameter network (Eq. 18): convolution, half the maps gated by a spatial soft-max of the other half,
  pooled to 1x1, a hidden layer, then sigma = sigmoid * sigma_max, v = tanh, rotation = sigmoid * pi.
Coordinates are normalised to [-1, 1] per array axis (:mod:`iterreg.spatial`'s convention), so sigma_max and v are fractions of the half-extent of the image, as in the paper; the
parameters describe the transform independently of the grid it is evaluated on (``gaussian_displacement``).

3D (beyond the paper): three widths, a rotation from three angles (sigmoid * pi each; R = R_0(a) R_1(b) R_2(c)
about the array axes), a 3-vector weight. Choices where the paper is silent are in Docs/methods.md.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .. import losses
from ..adam import Adam
from ..spatial import gaussian_smooth, normalised_grid, normalised_to_voxels, sample_at_voxels, warp
from .config import DictConfig
from .conv import conv
from .unet import ConvGRU

# candidate factors of the weight line search (R2N2Config.weight_search); 1 keeps the network's own step, so a step
# never lowers the MSE less than the network's would
WEIGHT_SEARCH_SCALES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
# Adam's step on the unbounded parameters when a Gaussian is refined (refine_gaussian): about a third of a voxel of
# a 64-voxel grid for the centre. Measured on held-out local-motion slices: 0.03 and 0.1 lowered the MSE further but
# made TRE worse (with folding), 0.005 was no better than 0.01 (Docs/benchmarks.md, r2n2-compactness-local)
REFINE_LEARNING_RATE = 0.01
SIGMA_FLOOR = 1e-4  # the narrowest width (normalised units): a Gaussian never collapses to zero width

__all__ = ["R2N2Config", "R2N2Network", "R2N2State", "gaussian_displacement", "gaussian_parameters"]


@dataclass(frozen=True)
class R2N2Config(DictConfig):
    ndim: int = 2
    channels: tuple = (16, 32, 32, 64)  # stem, then GR2U 1..3 (the public code's default is 32-64-128-256)
    residual_blocks: int = 3  # per GR2U (paper: three)
    parameter_hidden: int = 128  # hidden layer of the parameter network
    activation: str = "tanh"  # the paper's default activation; "leaky_relu" as in the public code
    sigma_max: float = 0.3  # widths are at most this fraction of the half-extent (paper: 0.3)
    steps: int = 25  # T in training (paper: 25)
    coordinates: bool = True  # coordinate channels (CoordConv), as in the paper
    # the second image channel is M o f - F instead of M o f: the same information (an invertible linear change
    # of the input), but a network seeing [F, M o f] did not find the small difference between two near-equal
    # images within thousands of iterations (Docs/methods.md, R2N2); seeing it directly, it learns to localise
    difference_input: bool = True
    instance_norm: bool = False  # instance normalisation after the convolutions (the public code's default)
    temperature: float = 0.0  # > 0: the position soft-max divides by a learned temperature starting here
    # the parameter network also reads the finest GR2U's features at the chosen centre (bilinear, differentiable
    # in the centre); the paper pools them with an attention of its own, so the weight need not describe the place
    # the Gaussian goes (Docs/methods.md, R2N2)
    center_features: bool = True
    # extra input channels: the MSE's gradient with respect to the displacement, smoothed by a Gaussian of half
    # sigma_max and scaled to a largest length of 1 (detached: data, as RIIR's similarity gradient). Where it is
    # longest a Gaussian of that width lowers the loss most, and it points the way the weight should (not in the
    # paper; Docs/methods.md, R2N2)
    gradient_input: bool = False
    # how the gradient input is scaled, per sample: "longest" to a longest vector of 1 (the bundled checkpoints), so
    # it says where and which way but not how far; "image" by the fixed image's mean squared gradient, so that it
    # approximates the displacement still to go, in voxels, and grows with the misalignment (Docs/methods.md, R2N2)
    gradient_scale: str = "longest"
    # each step's Gaussian weight is multiplied by the one of WEIGHT_SEARCH_SCALES that lowers the working grid's
    # MSE most (a line search; the scale is a constant for backprop). Not in the paper: the networks find where
    # and which way but not how far (Docs/benchmarks.md, r2n2-step-size), and the search supplies the size
    weight_search: bool = False
    working_scale: float = 1.0  # the network's grid relative to the image grid (methods/learned.py)

    def __post_init__(self):
        if len(self.channels) != 4:
            raise ValueError("channels needs 4 entries: the stem and three GR2Us")
        if self.activation not in ("tanh", "leaky_relu"):
            raise ValueError(f"activation must be tanh or leaky_relu, got '{self.activation}'")
        if self.gradient_scale not in ("longest", "image"):
            raise ValueError(f"gradient_scale must be 'longest' or 'image', got '{self.gradient_scale}'")
        if not 0 < self.sigma_max <= 2 or self.steps < 1 or not 0 < self.working_scale <= 1:
            raise ValueError("sigma_max must be in (0, 2], steps >= 1, working_scale in (0, 1]")

    @property
    def parameter_count(self) -> int:
        """Numbers describing one local deformation: position, widths, rotation angle(s), weight."""
        return 3 * self.ndim + rotation_angle_count(self.ndim)

    def step_weights(self, count: int) -> list[float]:
        return [1.0 / count] * count  # paper Eq. 6: the mean over steps


def rotation_angle_count(ndim: int) -> int:
    """Angles that describe a local deformation's rotation: one in 2D, three in 3D (about array axes 0, 1, 2)."""
    return 1 if ndim == 2 else 3


def rotation_matrix(angles: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B, ndim, ndim]`` rotation from ``[B, 1]`` (2D) or ``[B, 3]`` (3D: about array axes 0, 1, 2) angles."""
    if ndim == 2:
        c, s = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    matrices = []
    for k in range(3):
        c, s = torch.cos(angles[:, k]), torch.sin(angles[:, k])
        one, zero = torch.ones_like(c), torch.zeros_like(c)
        i, j = [a for a in range(3) if a != k]
        rows = [[None] * 3 for _ in range(3)]
        rows[k][k], rows[k][i], rows[k][j], rows[i][k], rows[j][k] = one, zero, zero, zero, zero
        rows[i][i], rows[i][j], rows[j][i], rows[j][j] = c, -s, s, c
        matrices.append(torch.stack([torch.stack(r, -1) for r in rows], -2))
    return matrices[0] @ matrices[1] @ matrices[2]


@dataclass
class LocalDeformation:
    """One step's Gaussian, in normalised coordinates (array-axis order), batch first."""
    center: torch.Tensor  # [B, ndim] in [-1, 1]
    sigma: torch.Tensor  # [B, ndim] widths (standard deviations along the rotated axes)
    angles: torch.Tensor  # [B, 1] (2D) or [B, 3] (3D), radians
    weight: torch.Tensor  # [B, ndim] in [-1, 1], displacement at the centre in normalised units


def _fields(g: LocalDeformation) -> list[torch.Tensor]:
    return [getattr(g, f.name) for f in dataclasses.fields(g)]


def gaussian_displacement(g: LocalDeformation, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The local deformation on a grid of ``shape``: (displacement in voxels ``[B, ndim, *shape]``,
    Gaussian profile ``[B, 1, *shape]``)."""
    nd = len(shape)
    grid = normalised_grid(shape, g.center.device, g.center.dtype)  # [1, nd, *shape]
    offset = grid - g.center.reshape(*g.center.shape, *([1] * nd))  # [B, nd, *shape]
    rotation = rotation_matrix(g.angles, nd)  # [B, nd, nd]
    local = torch.einsum("bji,bj...->bi...", rotation, offset)  # R^T d: coordinates along the Gaussian's axes
    profile = torch.exp(-0.5 * ((local / g.sigma.reshape(*g.sigma.shape, *([1] * nd))) ** 2).sum(1, keepdim=True))
    displacement = profile * normalised_to_voxels(g.weight, shape).reshape(*g.weight.shape, *([1] * nd))
    return displacement, profile


def features_at(features: torch.Tensor, center: torch.Tensor, shape: Sequence[int], stride: int) -> torch.Tensor:
    """``[B, C]`` features of a level that keeps every ``stride``-th pixel of a grid of ``shape``, read (bilinear,
    differentiable in ``center``) at the normalised positions ``center`` ``[B, ndim]`` of that grid."""
    nd = len(shape)
    pixel = normalised_to_voxels(center, shape, points=True) / stride  # level pixel j sits at pixel stride * j
    return sample_at_voxels(features, pixel.reshape(*pixel.shape, *([1] * nd))).flatten(1)


def _activation(name):
    return nn.Tanh() if name == "tanh" else nn.LeakyReLU(0.01)


def _norm(ndim, channels, enabled):
    return (nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d)(channels) if enabled else nn.Identity()


class ResidualBlock(nn.Module):
    def __init__(self, ndim, channels, activation, norm=False):
        super().__init__()
        self.body = nn.Sequential(conv(ndim, channels, channels), _norm(ndim, channels, norm), _activation(activation),
                                  conv(ndim, channels, channels), _norm(ndim, channels, norm))
        self.act = _activation(activation)

    def forward(self, x):
        return self.act(x + self.body(x))


def spatial_softmax(x: torch.Tensor) -> torch.Tensor:
    """Soft-max over all spatial positions of each channel: ``[B, C, *spatial]`` -> same shape, sums to 1."""
    flat = x.flatten(2)
    return torch.softmax(flat, dim=2).reshape(x.shape)


class PositionNetwork(nn.Module):
    """Eq. 14-17: soft-argmax position and its confidence from one resolution level."""

    def __init__(self, ndim, channels, temperature=0.0):
        super().__init__()
        # optional learned temperature (the public code has it, off by default): a uniform soft-max over
        # thousands of pixels passes each pixel ~1/N of the position's gradient; dividing by T < 1 sharpens it
        self.temperature = nn.Parameter(torch.tensor(float(temperature))) if temperature > 0 else None
        # no bias: a spatial soft-max ignores a constant, so a bias would be a parameter without a gradient
        self.position = conv(ndim, channels, 1, 1, bias=False)
        self.trust = conv(ndim, channels, 1, 1, bias=False)

    def forward(self, x, coordinates):
        logits = self.position(x)
        p_left = spatial_softmax(logits if self.temperature is None else logits / self.temperature.abs().clamp_min(1e-3))
        p_right = spatial_softmax(self.trust(x))
        position = (p_left * coordinates).flatten(2).sum(2)  # [B, ndim]
        confidence = 2.0 - (p_left - p_right).abs().flatten(1).sum(1, keepdim=True)  # [B, 1], in [0, 2]
        return position, confidence, p_left


class GR2U(nn.Module):
    """Gated recurrent registration unit: residual stack, ConvGRU with skip, position network, downsampling."""

    def __init__(self, ndim, cin, cout, blocks, activation, norm=False, temperature=0.0):
        super().__init__()
        self.residual = nn.Sequential(*[ResidualBlock(ndim, cin, activation, norm) for _ in range(blocks)])
        self.gru = ConvGRU(ndim, cin, cin)
        self.act = _activation(activation)
        self.position = PositionNetwork(ndim, cin, temperature)
        self.down = nn.Sequential(conv(ndim, cin, cout, stride=2), _norm(ndim, cout, norm), _activation(activation))

    def forward(self, x, hidden, coordinates):
        features = self.residual(x)
        hidden = self.gru(features, hidden)
        out = self.act(hidden + features)  # the skip connection around the C-GRU
        position, confidence, attention = self.position(out, coordinates)
        return self.down(out), hidden, position, confidence, attention, out


class ParameterNetwork(nn.Module):
    """Eq. 18: shape, rotation and weight of the next local deformation."""

    def __init__(self, ndim, channels, hidden, activation, sigma_max, local_channels=0):
        super().__init__()
        half = channels // 2
        self.ndim, self.half, self.sigma_max = ndim, half, sigma_max
        self.conv = conv(ndim, channels, channels)
        self.content = conv(ndim, half, half)
        self.act = _activation(activation)
        self.fc = nn.Sequential(nn.Linear(half + local_channels, hidden), _activation(activation),
                                nn.Linear(hidden, 2 * ndim + rotation_angle_count(ndim)))
        nn.init.zeros_(self.fc[-1].weight)  # the first local deformations are zero: training starts at identity
        nn.init.zeros_(self.fc[-1].bias)

    def forward(self, x, at_center=None):
        x = self.conv(x)
        content = self.content(self.act(x[:, :self.half]))
        attention = spatial_softmax(x[:, self.half:2 * self.half])
        pooled = self.act((content * attention).flatten(2).sum(2))
        c = self.fc(pooled if at_center is None else torch.cat([pooled, at_center], 1))
        return gaussian_parameters(c, self.ndim, self.sigma_max)


def gaussian_parameters(raw: torch.Tensor, ndim: int, sigma_max: float):
    """Eq. 18's output ranges from unbounded numbers ``[B, 2 ndim + angles]``: widths sigmoid * sigma_max,
    weight tanh, rotation sigmoid * pi. Returns (sigma, weight, angles)."""
    sigma = torch.sigmoid(raw[:, :ndim]) * sigma_max + SIGMA_FLOOR
    weight = torch.tanh(raw[:, ndim:2 * ndim])
    angles = torch.sigmoid(raw[:, 2 * ndim:]) * math.pi
    return sigma, weight, angles


@dataclass
class R2N2State:
    """One step on the network's grid."""
    displacement: torch.Tensor  # f_t, voxels of the working grid, [B, ndim, *working]
    local: torch.Tensor  # this step's local deformation (voxels)
    profile: torch.Tensor  # its Gaussian profile [B, 1, *working]
    gaussian: LocalDeformation
    confidences: torch.Tensor  # [B, 3]: the position network's confidence per level
    attention: list = None  # the position soft-max of each level, [B, 1, *level]
    moving_warped: torch.Tensor = None  # M o f_{t-1}, the image this step saw
    weight_scale: torch.Tensor = None  # [B]: the factor the weight line search chose (None: no search)


def downhill_mse_gradient(fixed: torch.Tensor, moving: torch.Tensor, u: torch.Tensor, width: float,
                          scale: str = "longest") -> torch.Tensor:
    """-grad_u of the MSE at ``u``, smoothed by a Gaussian of ``width`` (normalised units, as sigma_max); detached.
    To first order, a Gaussian of that width placed at x lowers the loss by this map's length there, so it says
    where the next Gaussian helps most and which way its weight should point.

    ``scale`` "longest": divided per sample so that its longest vector has length 1. "image": divided per sample by
    2 / N * mean |grad F|^2 / ndim, the factor between the map and the displacement still to go for a small
    shift of an image with F's gradients (Gauss-Newton with an averaged Hessian), so it reads as voxels and grows
    with the misalignment; the factor depends on F alone, not on how far apart the images are."""
    with torch.enable_grad():
        point = u.detach().requires_grad_(True)
        # border padding: with zeros, an image that is not zero at its edge gets a cliff there, whose slope
        # would make the edge look like the place where the loss falls fastest
        (gradient,) = torch.autograd.grad(losses.mse(fixed, warp(moving, point, padding_mode="border")), point)
    shape = fixed.shape[2:]
    nd = len(shape)
    voxels = normalised_to_voxels(torch.full((nd,), width), shape)  # per axis
    gradient = gaussian_smooth(gradient, voxels.tolist())
    if scale == "longest":
        # Tensor.norm kept (not the faster vector_length): their rounding differs, and over 25 steps that moved the
        # recorded 3D results by ~0.002 Dice
        divisor = gradient.norm(dim=1, keepdim=True).flatten(1).amax(1).clamp_min(1e-12)
    elif scale == "image":
        edges = sum(g.pow(2) for g in torch.gradient(fixed.detach(), dim=tuple(range(2, 2 + nd))))  # |grad F|^2
        divisor = (2.0 / fixed.numel()) * edges.flatten(1).mean(1) / nd  # losses.mse averages over every element
        divisor = divisor.clamp_min(1e-12 / fixed.numel())
    else:
        raise ValueError(f"scale must be 'longest' or 'image', got '{scale}'")
    return -gradient / divisor.reshape(-1, *([1] * (gradient.dim() - 1)))


def per_sample_mse(fixed: torch.Tensor, moving: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``[B]``: the MSE between ``fixed`` and ``moving`` warped by ``u``, per sample (R2N2's training similarity,
    zero padding as in training), for the test-time choices that must not mix the samples of a batch."""
    return (warp(moving, u) - fixed).pow(2).flatten(1).mean(1)


def best_weight_scale(fixed: torch.Tensor, moving: torch.Tensor, u: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Per sample, the factor of WEIGHT_SEARCH_SCALES by which adding ``local`` to ``u`` gives the lowest MSE
    between ``fixed`` and the warped ``moving`` (R2N2's training similarity); detached, ``[B]``. The search does
    not look at folding: a factor that folds would have to lower the MSE most, and the networks' broad Gaussians
    have not folded with it (Docs/benchmarks.md, r2n2-compactness*)."""
    with torch.no_grad():
        errors = torch.stack([per_sample_mse(fixed, moving, u + s * local) for s in WEIGHT_SEARCH_SCALES])
        return torch.tensor(WEIGHT_SEARCH_SCALES, dtype=u.dtype, device=u.device)[errors.argmin(0)]


def gaussian_raw(g: LocalDeformation, sigma_max: float) -> torch.Tensor:
    """The unbounded numbers ``[B, 3 ndim + angles]`` (centre, then :func:`gaussian_parameters`' order) that give
    ``g``: the inverse of :func:`gaussian_from_raw`, clamped just inside each range so every Gaussian has one."""
    def logit(x):
        x = x.clamp(1e-4, 1 - 1e-4)
        return torch.log(x) - torch.log1p(-x)
    return torch.cat([torch.atanh(g.center.clamp(-0.999, 0.999)), logit((g.sigma - SIGMA_FLOOR) / sigma_max),
                      torch.atanh(g.weight.clamp(-0.999, 0.999)), logit(g.angles / math.pi)], 1)


def gaussian_from_raw(raw: torch.Tensor, ndim: int, sigma_max: float) -> LocalDeformation:
    """A local deformation from unbounded numbers: the centre by tanh (inside the image), the rest as the
    parameter network's outputs (:func:`gaussian_parameters`)."""
    sigma, weight, angles = gaussian_parameters(raw[:, ndim:], ndim, sigma_max)
    return LocalDeformation(torch.tanh(raw[:, :ndim]), sigma, angles, weight)


def refine_gaussian(fixed: torch.Tensor, moving: torch.Tensor, u: torch.Tensor, g: LocalDeformation,
                    sigma_max: float, iterations: int) -> LocalDeformation:
    """``g`` with its centre, widths, rotation and weight refined by ``iterations`` Adam steps on the MSE between
    ``fixed`` and ``moving`` warped by ``u`` plus it (R2N2's training similarity), each sample on its own; detached.
    Keeps, per sample, the best Gaussian it has seen, the network's own included, so it never does worse."""
    nd, shape = u.shape[1], u.shape[2:]
    raw = gaussian_raw(g, sigma_max).detach().requires_grad_(True)
    best_raw, best = raw.detach().clone(), torch.full((u.shape[0],), math.inf, device=u.device)
    optimizer = Adam([raw], lr=REFINE_LEARNING_RATE)
    with torch.enable_grad():
        for k in range(iterations + 1):
            local, _ = gaussian_displacement(gaussian_from_raw(raw, nd, sigma_max), shape)
            errors = per_sample_mse(fixed, moving, u.detach() + local)
            with torch.no_grad():
                better = errors < best
                best = torch.minimum(best, errors)
                best_raw[better] = raw[better]
            if k == iterations:
                break
            optimizer.zero_grad()
            errors.sum().backward()  # a sum: each sample's parameters get their own sample's gradient
            optimizer.step()
    return gaussian_from_raw(best_raw, nd, sigma_max)


class R2N2Network(nn.Module):
    def __init__(self, config: R2N2Config):
        super().__init__()
        self.config = config
        nd, ch = config.ndim, config.channels
        cin = 2 + (nd if config.coordinates else 0) + (nd if config.gradient_input else 0)
        self.stem = nn.Sequential(conv(nd, cin, ch[0], kernel=7, stride=2), _norm(nd, ch[0], config.instance_norm),
                                  _activation(config.activation))
        self.units = nn.ModuleList(GR2U(nd, ch[k], ch[k + 1], config.residual_blocks, config.activation,
                                        config.instance_norm, config.temperature) for k in range(3))
        self.parameters_net = ParameterNetwork(nd, ch[3], config.parameter_hidden, config.activation,
                                               config.sigma_max, ch[0] if config.center_features else 0)

    def iterate(self, fixed: torch.Tensor, moving: torch.Tensor, steps: int,
                init: torch.Tensor | None = None, weight_search: bool | None = None,
                refine_iterations: int = 0) -> Iterator[R2N2State]:
        """Run ``steps`` steps on images on the working grid, yielding each as it is done. ``weight_search``:
        None uses the checkpoint's ``config.weight_search``. ``refine_iterations`` > 0 refines each step's Gaussian
        by that many Adam steps on the MSE (:func:`refine_gaussian`; after the weight search if both are on)."""
        search = self.config.weight_search if weight_search is None else weight_search
        shape = fixed.shape[2:]
        nd = self.config.ndim
        grid = normalised_grid(shape, fixed.device, fixed.dtype).expand(fixed.shape[0], -1, *shape)
        u = fixed.new_zeros((fixed.shape[0], nd, *shape)) if init is None else init
        hidden = [None, None, None]
        for _ in range(steps):
            warped = warp(moving, u)
            second = warped - fixed if self.config.difference_input else warped
            inputs = [fixed, second] + ([grid] if self.config.coordinates else [])
            if self.config.gradient_input:
                inputs.append(self.similarity_gradient(fixed, moving, u))
            x = self.stem(torch.cat(inputs, dim=1))
            positions, confidences, attentions = [], [], []
            for k, unit in enumerate(self.units):
                stride = 2 ** (k + 1)  # a stride-2 conv keeps pixel 2j of its input: level k+1 sees every 2^(k+1)th
                coordinates = grid[(slice(None), slice(None), *[slice(None, None, stride)] * nd)]
                x, hidden[k], position, confidence, attention, out = unit(x, hidden[k], coordinates)
                if k == 0:
                    finest = out
                attentions.append(attention)
                positions.append(position)
                confidences.append(confidence)
            weights = torch.cat(confidences, 1)  # [B, 3]
            center = (torch.stack(positions, 1) * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1e-6)
            at_center = features_at(finest, center, shape, stride=2) if self.config.center_features else None
            sigma, weight, angles = self.parameters_net(x, at_center)
            gaussian = LocalDeformation(center, sigma, angles, weight)
            local, profile = gaussian_displacement(gaussian, shape)
            scale = None
            if search:
                scale = best_weight_scale(fixed, moving, u, local)
                gaussian = LocalDeformation(center, sigma, angles, weight * scale[:, None])
                local = local * scale.reshape(-1, *([1] * (nd + 1)))
            if refine_iterations > 0:
                refined = refine_gaussian(fixed, moving, u, gaussian, self.config.sigma_max, refine_iterations)
                # the refined values, with the network's gradients (the refinement is a constant for backprop)
                gaussian = LocalDeformation(*(p + (r - p).detach() for p, r in
                                              zip(_fields(gaussian), _fields(refined))))
                local, profile = gaussian_displacement(gaussian, shape)
            u = u + local
            yield R2N2State(u, local, profile, gaussian, weights, attentions, warped, scale)

    def similarity_gradient(self, fixed: torch.Tensor, moving: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The network's gradient input: ``downhill_mse_gradient`` smoothed by half sigma_max."""
        return downhill_mse_gradient(fixed, moving, u, 0.5 * self.config.sigma_max, self.config.gradient_scale)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, steps: int | None = None) -> list[torch.Tensor]:
        """Training: every step's displacement on the working grid (the caller upsamples)."""
        return [state.displacement for state in self.iterate(fixed, moving, steps or self.config.steps)]
