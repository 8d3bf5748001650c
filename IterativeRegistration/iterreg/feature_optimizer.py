"""DIO's optimization layer: register feature images by iterative optimization of a dense field.

Coarse to fine over the feature scales (paper §3.3): at each scale the field is optimised by Adam on the mean
squared feature difference (the public code's ``l2`` feature loss), the gradient Gaussian-smoothed before the
Adam moments (``grad_sigma``), every update normalised so that no voxel moves more than ``learning_rate`` half
voxels of the scale per iteration (as the public solver does: the step size does not depend on the features'
magnitude), and the field Gaussian-smoothed after each update (``warp_sigma``). A scale ends when the
objective's relative decrease stayed below ``tolerance`` for ``patience`` iterations; its field, upsampled,
starts the next scale.

The representation is chosen per run, not per network (paper §4.4):
- ``freeform``: the displacement itself, updated additively;
- ``diffeomorphic``: the displacement, updated by composition with the (small, smoothed-gradient) update,
  ``u <- delta + u(x + delta)`` (the public code's compositive solver). Each update moves at most half a voxel,
  so the composition stays invertible in practice; it is not a guarantee on a discrete grid (measured: 0 %
  folding on the sample pairs, Docs/benchmarks.md);
- ``svf``: a stationary velocity field updated additively; the displacement is ``exp(v)`` by scaling and
  squaring.

Prompts (ours; the paper names them, the public code has none) join the objective at test time:
- landmark pairs: the squared distance in mm between each mapped fixed point ``x_f + u(x_f)`` and its moving
  partner. Its gradient lives on the 2^n voxels around each point, which Adam's per-voxel normalisation would
  turn into spikes (folding); so, as the feature gradient is smoothed by a Gaussian, the landmark term takes a
  kernel (Gauss-Newton in a Gaussian RKHS of ``radius_mm``) step: the smooth field that moves every prompted
  point by about half its residual, capped at ``max_prompt_step`` voxels. Opt-in, the pull's reach adapts to
  the prompts (:func:`prompt_reach_mm`, up to ``max_radius_mm``): wide where their residuals agree. Near a prompted
  point (a Gaussian of a quarter of ``radius_mm``, at least a voxel) the features' own step is scaled by
  ``1 - weight * kernel`` (``weight`` <= 1), so at weight 1 the prompts win where they are and the features rule
  away from them; residuals shrink by ~0.6 per iteration. A warm-started run with landmarks (a refinement) is
  local: the features act only within ``radius_mm`` of the points, so the previous result stays as it was away
  from the prompts; and it smooths each update instead of the accumulated correction, which would otherwise
  diffuse the pull far beyond its reach (:func:`_apply`).
- label maps: ``label_weight * (1 - mean soft Dice)`` of the warped moving labels, inside the Adam objective.

Training (paper §3.2, Jacobian-free backprop): the optimum is found without gradients, then ``jfb_steps``
differentiable update steps from the detached optimum carry the gradient to the features
(:func:`differentiable_steps`).

Everything is in voxels of each scale's grid (:mod:`iterreg.spatial`); points and spacings come in for the
image grid and are converted here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .spatial import compose, gaussian_smooth, identity_grid, integrate_velocity, rescale_spacing, \
    rescale_voxel_points, resize_displacement, resize_image, sample_displacement_at, vector_length, warp

__all__ = ["REPRESENTATIONS", "SolverSettings", "FieldPrompts", "SolverState", "optimise", "differentiable_steps",
           "combine", "to_displacement", "feature_loss", "prompt_reach_mm"]

REPRESENTATIONS = ("freeform", "diffeomorphic", "svf")
PULL_RIDGE = 0.25  # the landmark pull's ridge (kernel units): its interpolation's noise, also in prompt_reach_mm


@dataclass(frozen=True)
class SolverSettings:
    representation: str = "freeform"
    iterations: tuple = (200, 100, 50)  # per scale, coarse to fine (the public code's defaults)
    learning_rate: float = 1.0  # largest update per iteration, in half voxels of the scale's grid
    grad_sigma: float = 1.0  # voxels of the scale
    warp_sigma: float = 0.5
    tolerance: float = 1e-3  # relative decrease of the objective that counts as progress
    patience: int = 4  # iterations without progress that end a scale
    beta1: float = 0.9
    beta2: float = 0.99
    squarings: int = 6  # scaling and squaring of the svf representation
    max_prompt_step: float = 2.0  # voxels of the scale: cap of the landmark update per iteration

    def check(self) -> None:
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"unknown representation '{self.representation}'; choose {', '.join(REPRESENTATIONS)}")
        if not self.iterations or any(int(n) < 1 for n in self.iterations):
            raise ValueError(f"iterations must be >= 1 per scale, got {list(self.iterations)}")
        if self.learning_rate <= 0 or self.grad_sigma < 0 or self.warp_sigma < 0:
            raise ValueError("learning_rate must be > 0 and the smoothing sigmas >= 0")
        if self.tolerance < 0 or self.patience < 1:
            raise ValueError("tolerance must be >= 0 and patience >= 1")


@dataclass(frozen=True)
class FieldPrompts:
    """Test-time prompts on the image grid (the grid the scales' fields are resampled to at the end)."""
    fixed_points: torch.Tensor | None = None  # [N, ndim] array-order voxels of the image grid
    moving_points: torch.Tensor | None = None  # same grid: where each fixed point should map to
    spacing: Sequence[float] | None = None  # mm per array axis of the image grid
    weight: float = 1.0  # 0..1: how far the features yield to a landmark at its point
    radius_mm: float = 10.0  # reach of a landmark's pull (Gaussian sigma, mm); the DIO method passes its
    # prompt_radius_mm option (same default), so this only serves direct users of the layer
    max_radius_mm: float | None = None  # if larger than radius_mm, the reach adapts to the prompts'
    # residuals, between the two (:func:`prompt_reach_mm`); None keeps radius_mm
    fixed_labels: torch.Tensor | None = None  # [1, 1, *image grid] integer label maps
    moving_labels: torch.Tensor | None = None
    label_weight: float = 1.0

    @property
    def has_points(self) -> bool:
        return self.fixed_points is not None and len(self.fixed_points) > 0

    @property
    def has_labels(self) -> bool:
        return self.fixed_labels is not None and self.moving_labels is not None


@dataclass
class SolverState:
    """The field after one optimizer iteration at one scale. Losses are those of the field this iteration
    started from (the ones its update descended)."""
    scale: int
    scale_index: int
    iteration: int
    variable: torch.Tensor  # the optimised field at the scale (displacement, or velocity for svf)
    displacement: torch.Tensor  # total displacement on the scale's grid (warm-start base included)
    feature_loss: float
    prompt_distance_mm: float  # mean landmark distance (nan without landmarks)
    label_loss: float  # 1 - mean Dice of the labels (nan without labels)
    warped_features: torch.Tensor  # the moving features warped by the field (visualisation)
    last_at_scale: bool = False
    converged: bool = False
    prompt_reach_mm: float = math.nan  # the landmark pull's reach this run (nan without landmarks)


def to_displacement(variable: torch.Tensor, representation: str, squarings: int = 6) -> torch.Tensor:
    return integrate_velocity(variable, squarings) if representation == "svf" else variable


def combine(correction: torch.Tensor, base: torch.Tensor | None, representation: str) -> torch.Tensor:
    """The total displacement of a warm-started run: the base (previous result) and the correction found now.
    Free-form fields add; diffeomorphic ones compose (correction first, in fixed space), staying invertible."""
    if base is None:
        return correction
    return base + correction if representation == "freeform" else compose(base, correction)


def feature_loss(fixed_features: torch.Tensor, moving_features: torch.Tensor, displacement: torch.Tensor):
    """Mean squared difference of the fixed features and the moving features warped by ``displacement``."""
    warped = warp(moving_features, displacement)
    return torch.mean((warped - fixed_features) ** 2), warped


def _apply(variable: torch.Tensor, delta: torch.Tensor, settings: SolverSettings,
           landmark_refinement: bool = False) -> torch.Tensor:
    """One update of the optimised field: add (free-form, svf) or compose (diffeomorphic), then smooth the
    field (``warp_sigma``), as the public code does.

    A refinement with landmarks smooths each update instead of the correction it accumulates: smoothing the
    correction every iteration while the landmark pull keeps re-imposing it at the prompted points diffuses it
    like heat, far beyond the pull's reach (MNI152 <- Colin27, one prompt: a landmark 35 mm away moved from 0.5
    to 7 mm off)."""
    if landmark_refinement and settings.warp_sigma > 0:
        delta = gaussian_smooth(delta, settings.warp_sigma)
    variable = compose(variable, delta) if settings.representation == "diffeomorphic" else variable + delta
    return gaussian_smooth(variable, settings.warp_sigma) if settings.warp_sigma > 0 and not landmark_refinement \
        else variable


def _normalised(direction: torch.Tensor, learning_rate: float) -> torch.Tensor:
    """Scale each sample's update so its largest voxel moves ``learning_rate / 2`` voxels (never enlarge)."""
    longest = vector_length(direction).flatten(1).amax(1).clamp_min(1.0)
    return direction * (-0.5 * learning_rate / longest).view(-1, *[1] * (direction.dim() - 1))


def gaussian_process_log_likelihood(covariance: torch.Tensor, residuals: torch.Tensor) -> float:
    """Log-likelihood (up to a constant) of residuals ``[N, ndim]``, each component independent, under a zero-mean
    Gaussian process with covariance ``s^2 * covariance`` ``[N, N]``, the signal variance s^2 profiled out."""
    n, ndim = residuals.shape
    chol = torch.linalg.cholesky(covariance.double())
    explained = torch.cholesky_solve(residuals.double(), chol)
    signal = float((residuals.double() * explained).sum()) / (n * ndim)
    log_det = 2 * float(torch.log(torch.diagonal(chol)).sum())
    return -0.5 * n * ndim * math.log(max(signal, 1e-12)) - 0.5 * ndim * log_det


def prompt_reach_mm(points_mm: torch.Tensor, residuals_mm: torch.Tensor, shortest: float, longest: float,
                    ridge: float = PULL_RIDGE, evidence: float = 1.0) -> float:
    """How far the prompts' pull should reach: the Gaussian width (mm) under which the prompts' own residuals
    (``[N, ndim]``, at the field the run starts from) are most likely, as a Gaussian process with that kernel and
    the pull's ridge as noise (type-II maximum likelihood over a grid from ``shortest`` to ``longest``, each
    component independent, the signal variance profiled out). Residuals that agree between prompts (a region,
    or the whole image, off the same way) give a wide reach, so the points between the prompts move with them;
    residuals that disagree (local errors, an anatomical variant) keep it short, so nothing else moves. A wider
    reach must beat the shortest by ``evidence`` (log-likelihood, nats; 1 is Kass and Raftery's 'positive'):
    a few ~1 mm errors agree by chance often enough to gain a fraction of a nat (measured on DIO's results,
    Docs/methods.md), and spreading them would cost Dice. Fewer than 3 prompts cannot tell: ``shortest``."""
    n = len(residuals_mm)
    if n < 3 or longest <= shortest:
        return float(shortest)
    points, residuals = points_mm.double(), residuals_mm.double()
    d2 = ((points[None] - points[:, None]) ** 2).sum(-1)
    identity = torch.eye(n, dtype=torch.float64)
    best, best_reach, at_shortest = -math.inf, float(shortest), None
    reach = float(shortest)
    while reach <= longest * (1 + 1e-9):
        likelihood = gaussian_process_log_likelihood(torch.exp(-d2 / (2 * reach ** 2)) + ridge * identity,
                                                     residuals)
        at_shortest = likelihood if at_shortest is None else at_shortest
        if likelihood > best + 1e-9:
            best, best_reach = likelihood, reach
        reach *= math.sqrt(2)
    return best_reach if best >= at_shortest + evidence else float(shortest)


class _LandmarkPull:
    """The landmark term at one scale: its residuals, its kernel step, and where it outweighs the features.

    The step is regularised kernel (Gaussian RBF) interpolation of the residuals: coefficients
    ``c = (K_pp + 0.25 I)^-1 r``, so that the smooth field ``-eta * sum_j K(x - p_j) c_j`` moves each point by
    about ``-eta`` times its *own* residual even when points are closer than the radius (plain averaging would
    give every point the mean residual). The ridge term keeps close points from producing large, alternating
    coefficients that would swing the field far from the points (ill-conditioned Gaussian RBF)."""

    def __init__(self, prompts: FieldPrompts, image_shape, shape, device, max_step: float, local: bool = False,
                 pull_radius_mm: float | None = None):
        self.fixed = rescale_voxel_points(prompts.fixed_points.to(device, torch.float32), image_shape, shape)
        self.moving = rescale_voxel_points(prompts.moving_points.to(device, torch.float32), image_shape, shape)
        spacing = [1.0] * len(shape) if prompts.spacing is None else list(prompts.spacing)
        self.spacing = torch.tensor(rescale_spacing(spacing, image_shape, shape), device=device)
        self.eta = 0.5  # each iteration shrinks the residuals the features leave alone by ~0.6
        self.trust = min(1.0, max(0.0, prompts.weight))  # how far the features yield at a prompted point
        self.max_step = max_step
        coords = identity_grid(shape, device)[0].flatten(1).T  # [V, ndim] voxels
        # the pull interpolates the residuals over its (possibly adapted) reach; the features yield and, in a
        # refinement, work only within the short radius: re-optimising a converged result over a wide region
        # makes it worse (Docs/methods.md)
        sigma2 = 2.0 * (pull_radius_mm or prompts.radius_mm) ** 2
        d2 = (((coords[None] - self.fixed[:, None]) * self.spacing) ** 2).sum(-1)  # [N, V] mm^2
        self.kernel = torch.exp(-d2 / sigma2).reshape(len(self.fixed), *shape)
        self.reach = torch.exp(-d2 / (2.0 * prompts.radius_mm ** 2)).amax(0).reshape(1, 1, *shape)  # 1 at a point
        # where the points outweigh the features: a Gaussian of a quarter of the radius, but never narrower than
        # a voxel of this scale (else it would fall between the grid nodes around the point)
        inner2 = 2.0 * max(prompts.radius_mm / 4, float(self.spacing.max())) ** 2
        self.influence = torch.exp(-d2 / inner2).amax(0).reshape(1, 1, *shape)
        between = (((self.fixed[None] - self.fixed[:, None]) * self.spacing) ** 2).sum(-1)
        self.solve = torch.linalg.inv(torch.exp(-between / sigma2) + PULL_RIDGE * torch.eye(len(self.fixed),
                                                                                           device=device))
        self.local = local

    def residual(self, displacement: torch.Tensor) -> torch.Tensor:
        """``x_f + u(x_f) - x_m`` in voxels of the scale, ``[N, ndim]``."""
        return self.fixed + sample_displacement_at(displacement, self.fixed) - self.moving

    def distance_mm(self, displacement: torch.Tensor) -> float:
        return float((self.residual(displacement) * self.spacing).norm(dim=1).mean())

    def feature_share(self) -> torch.Tensor:
        """How much of the features' step each voxel takes. A local run (a refinement) changes the previous
        result only where the points reach; elsewhere it stays as it was."""
        share = 1.0 - self.trust * self.influence
        return share * self.reach if self.local else share

    def step(self, displacement: torch.Tensor) -> torch.Tensor:
        coefficients = self.solve @ self.residual(displacement)  # [N, ndim]
        delta = -self.eta * torch.einsum("n...,nc->c...", self.kernel, coefficients)[None]
        longest = float(vector_length(delta).max())
        return delta * (self.max_step / longest) if longest > self.max_step else delta


def _one_hot(labels: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    masks = torch.stack([(labels[:, 0] == v).float() for v in values], 1)
    return resize_image(masks, shape)


def _soft_dice_loss(fixed_masks: torch.Tensor, warped_masks: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(2, fixed_masks.dim()))
    overlap = 2 * (fixed_masks * warped_masks).sum(dims)
    total = fixed_masks.sum(dims) + warped_masks.sum(dims)
    return 1 - (overlap / total.clamp_min(1e-6)).mean()


def _starting_reach(prompts: FieldPrompts, base: torch.Tensor | None) -> float:
    """The pull's reach for this run, from the prompts' residuals at the field it starts from."""
    if prompts.max_radius_mm is None or prompts.max_radius_mm <= prompts.radius_mm:
        return prompts.radius_mm
    fixed = prompts.fixed_points.to(torch.float32)
    spacing = torch.tensor([1.0] * fixed.shape[1] if prompts.spacing is None else list(prompts.spacing))
    start = fixed if base is None else fixed + sample_displacement_at(base.detach().cpu().float(), fixed)
    residuals = (start - prompts.moving_points.to(torch.float32)) * spacing
    return prompt_reach_mm(fixed * spacing, residuals, prompts.radius_mm, prompts.max_radius_mm)


def optimise(fixed_features: list[torch.Tensor], moving_features: list[torch.Tensor], settings: SolverSettings,
             image_shape: Sequence[int], prompts: FieldPrompts | None = None,
             base: torch.Tensor | None = None, scales: Sequence[int] | None = None) -> Iterator[SolverState]:
    """Yield one :class:`SolverState` per iteration, coarse to fine. Feature lists are coarse to fine, one
    ``[B, C, *shape]`` per scale. ``base`` (``[B, ndim, *image_shape]`` voxels) warm-starts the run: the field
    optimised is then a correction on top of it (:func:`combine`)."""
    settings.check()
    if len(settings.iterations) != len(fixed_features):
        raise ValueError(f"{len(settings.iterations)} iteration counts for {len(fixed_features)} scales")
    image_shape = tuple(int(n) for n in image_shape)
    rep = settings.representation
    reach = _starting_reach(prompts, base) if prompts is not None and prompts.has_points else math.nan
    variable = moment1 = moment2 = None
    step_count = 0
    for k, (fixed_f, moving_f, count) in enumerate(zip(fixed_features, moving_features, settings.iterations)):
        shape = tuple(fixed_f.shape[2:])
        scale = int(scales[k]) if scales is not None else max(1, round(max(image_shape) / max(shape)))
        fixed_f, moving_f = fixed_f.detach(), moving_f.detach()
        if variable is None:
            variable = fixed_f.new_zeros(fixed_f.shape[0], len(shape), *shape)
            moment1, moment2 = torch.zeros_like(variable), torch.zeros_like(variable)
        else:  # the coarser optimum (and Adam's moments) start this scale
            variable = resize_displacement(variable, shape)
            moment1, moment2 = resize_image(moment1, shape), resize_image(moment2, shape)
        base_s = None if base is None else resize_displacement(base, shape)
        pull = None
        if prompts is not None and prompts.has_points:
            pull = _LandmarkPull(prompts, image_shape, shape, fixed_f.device, settings.max_prompt_step,
                                 local=base is not None, pull_radius_mm=reach)
        labels = None
        if prompts is not None and prompts.has_labels:
            values = torch.unique(prompts.fixed_labels)
            values = values[values != 0]
            labels = (_one_hot(prompts.fixed_labels.to(fixed_f.device), values, shape),
                      _one_hot(prompts.moving_labels.to(fixed_f.device), values, shape))
        previous_objective = previous_distance = math.inf
        stale = 0
        for iteration in range(1, int(count) + 1):
            with torch.enable_grad():
                field = variable.detach().requires_grad_(True)
                displacement = combine(to_displacement(field, rep, settings.squarings), base_s, rep)
                loss, warped = feature_loss(fixed_f, moving_f, displacement)
                objective = loss
                label_loss = math.nan
                if labels is not None:
                    term = _soft_dice_loss(labels[0], warp(labels[1], displacement))
                    objective = objective + prompts.label_weight * term
                    label_loss = float(term.detach())
                gradient, = torch.autograd.grad(objective, field)
            with torch.no_grad():
                displacement = displacement.detach()
                if settings.grad_sigma > 0:
                    gradient = gaussian_smooth(gradient, settings.grad_sigma)
                step_count += 1
                moment1.mul_(settings.beta1).add_(gradient, alpha=1 - settings.beta1)
                if base is None:  # plain Adam: its bias-corrected first steps move every voxel the full step
                    moment2.mul_(settings.beta2).addcmul_(gradient, gradient, value=1 - settings.beta2)
                    direction = (moment1 / (1 - settings.beta1 ** step_count)) / \
                        ((moment2 / (1 - settings.beta2 ** step_count)).sqrt() + 1e-8)
                else:  # a refinement starts gently from a converged field: no bias correction, so the steps
                    # ramp up (0.1, 0.19, ... of the full step) instead of jolting the whole field at once
                    if step_count == 1:
                        moment2.copy_(gradient * gradient)
                    else:
                        moment2.mul_(settings.beta2).addcmul_(gradient, gradient, value=1 - settings.beta2)
                    direction = moment1 / (moment2.sqrt() + 1e-8)
                delta = _normalised(direction, settings.learning_rate)
                distance = math.nan
                if pull is not None:
                    distance = pull.distance_mm(displacement)
                    delta = delta * pull.feature_share() + pull.step(displacement)
                variable = _apply(variable, delta, settings, landmark_refinement=base is not None and pull is not None)
                # progress = a relative decrease of at least ``tolerance`` since the previous iteration (the public
                # code's rule); with landmarks, getting closer counts too (the features may already be at rest)
                value = float(objective)
                progressed = value <= previous_objective * (1 - settings.tolerance) or \
                    (pull is not None and 0.01 < distance <= previous_distance * (1 - settings.tolerance))
                previous_objective, previous_distance = value, distance
                stale = 0 if progressed else stale + 1
                converged = stale >= settings.patience
                last = converged or iteration == int(count)
                total = combine(to_displacement(variable, rep, settings.squarings), base_s, rep)
            yield SolverState(scale, k, iteration, variable, total, float(loss.detach()), distance, label_loss,
                              warped.detach(), last_at_scale=last, converged=converged, prompt_reach_mm=reach)
            if converged:
                break


def differentiable_steps(fixed_features: torch.Tensor, moving_features: torch.Tensor, optimum: torch.Tensor,
                         settings: SolverSettings, steps: int = 3) -> torch.Tensor:
    """Jacobian-free backprop (paper §3.2): ``steps`` update steps from the detached optimum, differentiable
    with respect to the features (plain normalised gradient steps: the public code's 'sgd' phantom step).
    Returns the displacement at the features' scale."""
    rep = settings.representation
    if steps == 0 or not torch.is_grad_enabled():  # evaluation: the optimum is the answer
        return to_displacement(optimum.detach(), rep, settings.squarings)
    variable = optimum.detach().requires_grad_(True)
    for _ in range(steps):
        displacement = to_displacement(variable, rep, settings.squarings)
        loss, _ = feature_loss(fixed_features, moving_features, displacement)
        gradient, = torch.autograd.grad(loss, variable, create_graph=True)
        if settings.grad_sigma > 0:
            gradient = gaussian_smooth(gradient, settings.grad_sigma)
        longest = vector_length(gradient.detach()).flatten(1).amax(1).clamp_min(1e-12)
        delta = gradient * (-0.5 * settings.learning_rate / longest).view(-1, *[1] * (gradient.dim() - 1))
        variable = _apply(variable, delta, settings)
    return to_displacement(variable, rep, settings.squarings)
