"""DIO (Jena et al., 2024): learned feature images registered by an optimization layer, promptable at test time.

The feature network (:mod:`iterreg.networks.dio`) sees each image alone; the optimization layer
(:mod:`iterreg.feature_optimizer`) registers the moving features to the fixed ones coarse to fine. Every
optimizer iteration is one streamed step: metrics ``scale`` (4, 2, 1: the feature scale of the working grid),
``iteration`` (within the scale), ``feature_loss``, ``prompt_distance_mm`` (mean distance of the prompted
landmark pairs, when given), ``prompt_reach_mm`` (how far their pull reaches in this run), ``label_loss``
(1 - Dice of the prompted labels, when given) and the standard ones;
channels ``fixed_features`` and ``warped_moving_features`` (the scale's feature images) and
``feature_difference`` (their squared difference summed over channels: where the optimizer still works).

Options chosen per run, on the same checkpoint (paper §4.4): ``representation`` free-form, diffeomorphic
(compositive) or svf (stationary velocity, scaling and squaring). A run given a starting field (``init``, a
refinement) optimises a correction on top of it at ``refine_scales`` only, so prompts refine the previous
result instead of starting again. ``features_on_own_grid``: a moving image acquired on another grid (size,
spacing, orientation) gets its features on that grid, carried onto the fixed grid in physical space, instead of
from its copy resampled onto the fixed grid. ``polish_iterations`` (opt-in, free-form only): the classical optimizer's
iterations on the image grid after the optimization layer, keeping the landmark prompts (polish.py).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch

from .base import Prompts, Step, standard_step_metrics, warp_later
from .learned import LearnedIterativeMethod, NetworkOptions, WorkingGrid, WorkingGridOptions, working_shape
from .polish import PolishOptions
from ..errors import InputError
from ..feature_optimizer import FieldPrompts, SolverSettings, combine, differentiable_steps, \
    optimise, to_displacement
from ..networks.dio import DIOConfig, FeatureNetwork
from ..spatial import grid_rescaling, largest_component, rescale_spacing, rescale_voxel_points, \
    rescale_voxel_vectors, resize_displacement, resize_image, sample_through_index_map, shape_for_voxel_size, \
    spatial_ndim, vector_length, warp


OWN_GRID_VOXELS = ("working", "acquired")  # see DIOOptions.own_grid_voxels


@dataclass(frozen=True)
class DIOOptions(WorkingGridOptions, PolishOptions, NetworkOptions):
    representation: str = "freeform"  # freeform | diffeomorphic | svf
    iterations: tuple = (200, 100, 50)  # per scale, coarse to fine (paper / public code)
    learning_rate: float = 1.0  # largest update per iteration, half voxels of the scale
    grad_sigma: float = 1.0
    warp_sigma: float = 0.5
    tolerance: float = 1e-3
    patience: int = 4
    prompt_weight: float = 1.0  # 0..1: how far the features yield to the landmarks at a prompted point
    prompt_radius_mm: float = 10.0  # how far a landmark's pull reaches (Gaussian sigma); 20 mm dragged landmarks
    # 35 mm from a large correction by ~4 mm on a real pair (Docs/benchmarks.md, real-pair)
    prompt_max_radius_mm: float | None = None  # opt-in: let the reach grow up to this (e.g. 40) when the prompts'
    # residuals agree (a region off the same way; feature_optimizer.prompt_reach_mm). Not the default: on the
    # real pair, prompt sets holding two agreeing outliers (DIO's 5 worst AFIDs) spread their correction over
    # the brain (Docs/methods.md)
    label_weight: float = 1.0  # weight of the label prompt (1 - Dice) next to the feature loss
    refine_scales: tuple = (2,)  # scales a warm-started run (a refinement) optimises: the prompts' pull is
    # smooth (prompt_radius_mm), so the half-resolution grid carries it at an eighth of the cost (3D)
    features_on_own_grid: bool = False  # a moving image on another grid: extract its features there and carry
    # them onto the fixed grid (paper §3.1: each image alone, so they may differ in size and spacing)
    own_grid_voxels: str = "working"  # working: first resample it, in its own frame and field of view, to the
    # voxel size of the fixed working grid (the paper's 'isotropic' setting: a CNN's kernels count voxels, not mm);
    # acquired: extract on the voxels as acquired (the paper's 'anisotropic' setting; worse with our checkpoints,
    # trained on isotropic grids: Docs/benchmarks.md, 'dio-robustness')

    def solver_settings(self, iterations: tuple | None = None) -> SolverSettings:
        """The optimization layer's settings these options ask for (``iterations`` replaces the per-scale counts)."""
        return SolverSettings(self.representation, tuple(iterations or self.iterations), self.learning_rate,
                              self.grad_sigma, self.warp_sigma, self.tolerance, self.patience)

    def check(self) -> None:
        super().check()
        try:  # the solver owns its own validation; here its message becomes the user's
            self.solver_settings().check()
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if self.prompt_weight < 0 or self.prompt_radius_mm <= 0 or self.label_weight < 0:
            raise InputError("prompt_weight and label_weight must be >= 0 and prompt_radius_mm > 0")
        if self.prompt_max_radius_mm is not None and (isinstance(self.prompt_max_radius_mm, bool) or
                                                      not isinstance(self.prompt_max_radius_mm, (int, float))):
            raise InputError(f"option prompt_max_radius_mm must be a number (mm), got {self.prompt_max_radius_mm!r}")
        if self.prompt_max_radius_mm is not None and self.prompt_max_radius_mm < self.prompt_radius_mm:
            raise InputError(f"prompt_max_radius_mm ({self.prompt_max_radius_mm:g}) must be at least "
                             f"prompt_radius_mm ({self.prompt_radius_mm:g}); leave it unset for a fixed reach")
        if not self.refine_scales:
            raise InputError("refine_scales needs at least one feature scale")
        if self.polish_iterations and self.representation != "freeform":
            # the polish optimises a free-form correction, which would void the diffeomorphic guarantee
            raise InputError(f"polish_iterations needs representation 'freeform' (the polish is a free-form "
                             f"correction); with '{self.representation}' set polish_iterations to 0")
        if self.own_grid_voxels not in OWN_GRID_VOXELS:
            raise InputError(f"own_grid_voxels must be {' or '.join(map(repr, OWN_GRID_VOXELS))}, "
                             f"got {self.own_grid_voxels!r}")


class DIOMethod(LearnedIterativeMethod):
    name = "dio"
    title = "DIO (learned features + optimization layer, promptable)"
    description = ("A network turns each image into feature images; an optimizer registers them coarse to fine. "
                   "Free-form or diffeomorphic at run time; landmark and label prompts refine the result.")
    default_steps = 350
    max_steps = 5000
    memory_per_voxel = 350  # bytes per fixed-grid voxel, measured (Docs/benchmarks.md, 'memory')
    needs_checkpoint = True
    Options = DIOOptions
    refines = True
    reads_moving_on_own_grid = True
    network_class, config_class = FeatureNetwork, DIOConfig

    @staticmethod
    def predict(network, fixed: torch.Tensor, moving: torch.Tensor, moving_own_grid=None,
                own_grid_voxels: str = "working") -> list[torch.Tensor]:
        """The optimum of every scale on the image grid, differentiable in the network's weights through
        Jacobian-free backprop (the optimum itself is found without gradients). With ``moving_own_grid`` the
        moving features come from that grid, as with the options ``features_on_own_grid`` and
        ``own_grid_voxels`` (training data ``data.coarse_moving``)."""
        config = network.config
        grid = WorkingGrid.for_images(fixed, config.working_scale)
        fixed_features = network(grid.image_down(fixed))
        if moving_own_grid is not None:
            moving_features = features_from_own_grid(network, moving_own_grid, grid, fixed_features, own_grid_voxels)
        else:
            moving_features = network(grid.image_down(moving))
        settings = SolverSettings(representation=config.train_representation,
                                  iterations=tuple(config.train_iterations))
        outputs = []
        for state in optimise(fixed_features, moving_features, settings, grid.shape, scales=config.scales):
            if state.last_at_scale:
                k = state.scale_index
                u = differentiable_steps(fixed_features[k], moving_features[k], state.variable, settings,
                                         config.jfb_steps)
                outputs.append(grid.displacement_up(resize_displacement(u, grid.shape)))
        return outputs

    # --- inference --------------------------------------------------------------------------------------------
    def _settings(self, scales: list[int], steps: int) -> tuple[SolverSettings, list[int]]:
        opts, all_scales = self.options, list(self.network.config.scales)
        if len(opts.iterations) != len(all_scales):
            raise InputError(f"iterations needs {len(all_scales)} counts (scales {all_scales}), "
                             f"got {list(opts.iterations)}")
        counts = [int(opts.iterations[all_scales.index(s)]) for s in scales]
        if sum(counts) > steps:  # the step budget caps the iterations, shared in proportion
            counts = [max(1, int(c * steps / sum(counts))) for c in counts]
        return opts.solver_settings(tuple(counts)), counts

    def _field_prompts(self, prompts: Prompts | None, fixed: torch.Tensor, grid: WorkingGrid) -> FieldPrompts | None:
        if prompts is None:
            return None
        points = {}
        if prompts.fixed_points is not None:
            fixed_points, moving_points = (torch.as_tensor(p, dtype=torch.float32) for p in
                                           (prompts.fixed_points, prompts.moving_points))
            nd = spatial_ndim(fixed)
            if fixed_points.shape != moving_points.shape or fixed_points.dim() != 2 or fixed_points.shape[1] != nd:
                raise InputError(f"landmark prompts must be two [N, {nd}] arrays of paired points, got "
                                 f"{list(fixed_points.shape)} and {list(moving_points.shape)}")
            if not (torch.isfinite(fixed_points).all() and torch.isfinite(moving_points).all()):
                raise InputError("a landmark prompt has a non-finite coordinate; remove or re-place that point")
            spacing = list(prompts.spacing) if prompts.spacing is not None else [1.0] * nd
            points = dict(fixed_points=rescale_voxel_points(fixed_points, grid.image_shape, grid.shape),
                          moving_points=rescale_voxel_points(moving_points, grid.image_shape, grid.shape),
                          spacing=rescale_spacing(spacing, grid.image_shape, grid.shape))
        labels = {}
        if prompts.fixed_labels is not None or prompts.moving_labels is not None:
            if prompts.fixed_labels is None or prompts.moving_labels is None:
                raise InputError("label prompts need both a fixed and a moving label map")
            labels = dict(fixed_labels=_nearest(prompts.fixed_labels, grid.shape),
                          moving_labels=_nearest(prompts.moving_labels, grid.shape),
                          label_weight=self.options.label_weight)
        return FieldPrompts(weight=prompts.weight * self.options.prompt_weight,
                            radius_mm=self.options.prompt_radius_mm,
                            max_radius_mm=self.options.prompt_max_radius_mm, **points, **labels)

    @staticmethod
    def _scales_that_fit(scales: list[int], shape) -> list[int]:
        """Drop the coarse scales at which a thin volume (a few thick slices) would have fewer than 3 voxels
        along an axis: there the field's smoothing and finite differences are undefined, and the finer scales
        still register it."""
        fitting = [s for s in scales if min(math.ceil(n / s) for n in shape) >= 3]
        if not fitting:
            raise InputError(f"the volume is too thin for DIO: its working grid {'x'.join(map(str, shape))} has "
                             f"fewer than 3 voxels along an axis even at scale 1/{min(scales)}; give at least "
                             "3 slices")
        return fitting

    def network_steps(self, fixed, moving, steps=None, prompts: Prompts | None = None,
                      init: torch.Tensor | None = None, spacing: Sequence[float] | None = None,
                      moving_own_grid=None) -> Iterator[Step]:
        """``moving_own_grid`` (:class:`iterreg.imaging.MovingOnOwnGrid`, optional): the moving image on the grid
        it was acquired on; with ``features_on_own_grid`` its features are extracted there."""
        steps = self.check_inputs(fixed, moving, steps)
        fixed, moving = fixed.to(self.device), moving.to(self.device)
        grid = self._working_grid(fixed, spacing)
        all_scales = list(self.network.config.scales)
        scales = all_scales
        base_image = base = None
        if init is not None:
            if tuple(init.shape) != (1, spatial_ndim(fixed), *fixed.shape[2:]):
                raise InputError(f"the starting displacement must be [1, {spatial_ndim(fixed)}, "
                                 f"{', '.join(map(str, fixed.shape[2:]))}], got {list(init.shape)}")
            unknown = [s for s in self.options.refine_scales if s not in all_scales]
            if unknown:
                raise InputError(f"refine_scales {list(self.options.refine_scales)} are not scales of this "
                                 f"checkpoint ({all_scales})")
            scales = [s for s in all_scales if s in self.options.refine_scales]
            base_image = init.to(self.device, torch.float32)
            base = grid.displacement_down(base_image)
        scales = self._scales_that_fit(scales, grid.shape)
        settings, _ = self._settings(scales, steps)
        field_prompts = self._field_prompts(prompts, fixed, grid)
        fixed_w, moving_w = grid.image_down(fixed), grid.image_down(moving)
        with torch.no_grad():
            fixed_features = self.network(fixed_w)
            if moving_own_grid is not None and self.options.features_on_own_grid:
                own = replace(moving_own_grid, image=moving_own_grid.image.to(self.device))
                moving_features = features_from_own_grid(self.network, own, grid, fixed_features,
                                                         self.options.own_grid_voxels)
            else:
                moving_features = self.network(moving_w)
        keep = [all_scales.index(s) for s in scales]
        fixed_features = [fixed_features[k] for k in keep]
        moving_features = [moving_features[k] for k in keep]
        rep = settings.representation
        previous, index = None, 0
        base_largest = 0.0 if base_image is None else largest_component(base_image)
        monitor = {}  # per scale: the images the step metrics are computed on (the scale's grid)
        states = optimise(fixed_features, moving_features, settings, grid.shape, field_prompts, base, scales)
        for state in states:
            with torch.no_grad():
                k = state.scale_index
                shape = tuple(state.displacement.shape[2:])
                if k not in monitor:
                    monitor[k] = (resize_image(fixed_w, shape), resize_image(moving_w, shape))
                    previous = None if previous is None else resize_displacement(previous, shape)
                fixed_s, moving_s = monitor[k]
                correction = to_displacement(state.variable, rep, settings.squarings)
                # The full-resolution field is computed only if it is read (a step streamed whole, the last),
                # from this iteration's correction (the optimizer makes a new variable each iteration); the
                # divergence check gets a bound: the correction's largest component, plus the base's.
                largest = largest_component(correction, grid.image_shape) + base_largest
                displacement = functools.cache(functools.partial(_full_field, grid, correction, base_image, rep))
                # Metrics on the scale's grid, where the optimizer works: hundreds of iterations are streamed,
                # and at the coarse scales these cost next to nothing (at 64^3 per step they cost as much as
                # the optimizer's own iteration).
                metrics = standard_step_metrics(fixed_s, warp(moving_s, state.displacement), state.displacement,
                                                None, self.similarity, self.similarity_kwargs)
                change = state.displacement if previous is None else state.displacement - previous
                metrics["update_norm"] = float(vector_length(rescale_voxel_vectors(change, shape, grid.image_shape))
                                               .max())
                metrics.update(scale=float(state.scale), iteration=float(state.iteration),
                               feature_loss=state.feature_loss)
                if field_prompts is not None and field_prompts.has_points:
                    metrics["prompt_distance_mm"] = state.prompt_distance_mm
                    metrics["prompt_reach_mm"] = state.prompt_reach_mm
                if field_prompts is not None and field_prompts.has_labels:
                    metrics["label_loss"] = state.label_loss
                difference = ((state.warped_features - fixed_features[k]) ** 2).sum(1)
                channels = {"fixed_features": fixed_features[k][0], "warped_moving_features": state.warped_features[0],
                            "feature_difference": difference}
                phase = (f"scale 1/{state.scale} ({k + 1}/{len(scales)}), iteration {state.iteration}"
                         + (": converged" if state.converged else ""))
                final = state.last_at_scale and k == len(scales) - 1
                step = Step(index, displacement, warp_later(moving, displacement), metrics, channels=channels,
                            phase=phase, final=final,
                            displacement_bound=(float(largest.amax()), max(grid.image_shape)))
            yield step
            previous, index = state.displacement, index + 1


def features_from_own_grid(network, moving_own_grid, grid: WorkingGrid, fixed_features,
                           voxels: str) -> list[torch.Tensor]:
    """The moving image's feature images computed on its own grid (paper §3.1), then read at the fixed feature
    grids' voxels. ``voxels``: ``acquired`` keeps its voxels (brought down by the fixed image's working scale);
    ``working`` first resamples it, on its own field of view and axes, to the fixed working grid's finest voxel
    size."""
    own = moving_own_grid.image
    own_shape = tuple(own.shape[2:])
    if voxels == "working":
        voxel_mm = min(rescale_spacing(moving_own_grid.fixed_spacing, grid.image_shape, grid.shape))
        feature_shape = shape_for_voxel_size(own_shape, moving_own_grid.spacing, voxel_mm)
    else:
        feature_shape = working_shape(own_shape, max(w / n for w, n in zip(grid.shape, grid.image_shape)))
    own_features = network(resize_image(own, feature_shape))
    fixed_to_own = torch.as_tensor(moving_own_grid.fixed_to_own_index, dtype=torch.float64)
    carried = []
    for fixed_k, own_k in zip(fixed_features, own_features):
        # fixed feature voxel -> fixed image voxel -> moving image voxel -> moving feature voxel
        index_map = (grid_rescaling(own_shape, own_k.shape[2:]) @ fixed_to_own
                     @ grid_rescaling(fixed_k.shape[2:], grid.image_shape))
        # border: a fixed voxel just past the moving grid's last voxel centre (its extent rounds down on a coarse
        # grid) keeps the edge's features rather than zeros, which the optimizer would read as an edge
        carried.append(sample_through_index_map(own_k, index_map, fixed_k.shape[2:], "border"))
    return carried


def _full_field(grid: WorkingGrid, correction, base_image, representation: str) -> torch.Tensor:
    """A step's displacement on the image grid: its correction upsampled, after the base of a warm start
    (kept at full resolution, so the previous result's detail stays)."""
    displacement = grid.displacement_up(resize_displacement(correction, grid.shape))
    return displacement if base_image is None else combine(displacement, base_image, representation)



def _nearest(labels: torch.Tensor, shape) -> torch.Tensor:
    """An integer label map on another grid of the same field of view (nearest neighbour)."""
    labels = torch.as_tensor(labels)
    if tuple(labels.shape[2:]) == tuple(shape):
        return labels
    mode = "nearest-exact"
    return torch.nn.functional.interpolate(labels.float(), size=tuple(shape), mode=mode).round().long()
