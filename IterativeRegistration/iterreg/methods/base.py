"""The method interface every registration method implements (DESIGN.md §2).

A method is built once (from a checkpoint or defaults) and then ``run`` yields one :class:`Step` per
iteration *as it is computed*. Consumers (CLI, worker, tests) only ever see this interface; stopping
iteration early (``generator.close()``) is how a run is cancelled between steps.
"""
from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch

from .. import losses
from ..errors import InputError
from ..metrics import folding_percent
from ..spatial import resize_displacement, resize_image, spatial_ndim, vector_length, warp

__all__ = ["Step", "Prompts", "RegistrationMethod", "MethodOptions", "WORKING_VOXELS", "standard_step_metrics",
           "warp_later", "MonitorGrid"]


class _ComputedOnAccess:
    """A dataclass field that may be given as a zero-argument function: called on first access, then kept.
    Lets a method hand out its full-resolution warped image without paying for it when nobody looks."""

    def __set_name__(self, owner, name):
        self.private = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            raise AttributeError(self.private[1:])  # tells @dataclass the field has no default
        value = getattr(obj, self.private)
        if callable(value):
            value = value()
            setattr(obj, self.private, value)
        return value

    def __set__(self, obj, value):
        setattr(obj, self.private, value)


@dataclass
class Step:
    """One iteration of a method.

    - ``displacement``: ``[1, ndim, *spatial]`` voxels on the fixed grid (see :mod:`iterreg.spatial`). A method
      may pass a zero-argument function instead (computed on first access), e.g. a working-grid field's
      upsampling, which a run that streams only some steps (a busy client, the CLI) then skips.
    - ``warped``: ``[1, 1, *spatial]`` normalised moving image warped by ``displacement`` (a function too, as
      ``displacement``).
    - ``displacement_bound``: ``(an upper bound of |displacement| in voxels along any axis, the fixed grid's
      longest side)``, which a method with a lazy ``displacement`` knows cheaply; :func:`finite_steps` checks
      it instead of computing the field.
    - ``metrics``: scalars; every method reports ``similarity`` (its loss, lower is better), ``regularizer``,
      ``update_norm`` (max |change of u| in voxels since the previous step) and ``folding_percent``.
    - ``channels``: named visualisation tensors ``[C, *spatial]`` (any resolution), e.g. hidden states.
    - ``phase``: human-readable position, e.g. ``"level 2/3, iteration 14"``.
    """
    index: int
    displacement: torch.Tensor = _ComputedOnAccess()
    warped: torch.Tensor = _ComputedOnAccess()
    metrics: dict[str, float]
    channels: dict[str, torch.Tensor] = field(default_factory=dict)
    phase: str = ""
    final: bool = False
    displacement_bound: tuple[float, int] | None = None


def warp_later(moving: torch.Tensor, displacement):
    """A Step's ``warped`` as a function: ``moving`` warped by its field, which may itself still be the function
    that computes it (then computed once, shared by both)."""
    return lambda: warp(moving, displacement() if callable(displacement) else displacement)


@dataclass(frozen=True)
class Prompts:
    """Test-time guidance: paired landmarks (array-order voxel coordinates on the fixed grid) and labels."""
    fixed_points: torch.Tensor | None = None  # [N, ndim]
    moving_points: torch.Tensor | None = None  # [N, ndim]
    fixed_labels: torch.Tensor | None = None  # [1, 1, *spatial] integer
    moving_labels: torch.Tensor | None = None
    weight: float = 1.0
    spacing: tuple[float, ...] | None = None  # mm per array axis, for distances in mm


# The voxel shape of the grids a method works on (option ``working_voxels``): cubes in mm, or the image's own
WORKING_VOXELS = ("isotropic", "image")


@dataclass(frozen=True)
class MethodOptions:
    """Base for each method's options; subclasses add fields with defaults and validate in ``check``."""

    def check(self) -> None:
        """Raise :class:`InputError` for out-of-range values."""

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "MethodOptions":
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(unknown)}; this method accepts: "
                             f"{', '.join(sorted(known)) or 'none'}")
        coerced = {}
        for name, value in values.items():
            default = known[name].default  # every option has a default; its type says how to coerce
            if isinstance(default, tuple) and isinstance(value, (list, tuple)):
                value = tuple(value)
            elif isinstance(default, bool):
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            elif isinstance(default, (int, float)) and not isinstance(value, bool):
                try:
                    value = type(default)(value)
                except (TypeError, ValueError):
                    raise InputError(f"option {name} must be a number, got {value!r}") from None
            coerced[name] = value
        options = cls(**coerced)
        options.check()
        return options


class RegistrationMethod(ABC):
    """Base class. Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str]
    title: ClassVar[str]
    description: ClassVar[str] = ""
    default_steps: ClassVar[int]
    max_steps: ClassVar[int]
    supported_ndims: ClassVar[tuple[int, ...]] = (2, 3)
    needs_checkpoint: ClassVar[bool] = False
    refines: ClassVar[bool] = False  # continues from a given field (init) with landmark prompts: "Refine"
    # reads the moving image on its own grid when it differs from the fixed one (run's ``moving_own_grid``)
    reads_moving_on_own_grid: ClassVar[bool] = False
    # Peak bytes a run adds per fixed-grid voxel (measured: Testing/benchmark_memory.py); the pre-flight memory
    # check (iterreg.memory_budget) uses it. Conservative for a method that has not been measured yet.
    memory_per_voxel: ClassVar[float] = 2000.0
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    @classmethod
    def peak_memory_per_voxel(cls, options: dict | None) -> float:
        """``memory_per_voxel`` of a run with ``options`` (a network method's polish adds the classical
        optimizer's work on the image grid)."""
        return cls.memory_per_voxel

    @classmethod
    def grid_voxels_per_image_voxel(cls, options: dict | None, shape: Sequence[int],
                                    spacing: Sequence[float] | None) -> float:
        """How many voxels the grid a run with ``options`` works on has per voxel of a fixed image of ``shape`` and
        ``spacing`` (the same axis order), for the memory estimate: 1 unless a method works on another grid (the
        classical optimizer's opt-in cubic voxels)."""
        return 1.0

    @classmethod
    def checkpoint_default_steps(cls, metadata: dict) -> int:
        """How many steps a run with the checkpoint described by ``metadata`` takes unless told: the class's
        ``default_steps``, or what the checkpoint decides for methods whose paper ties the two (RIIR)."""
        return cls.default_steps

    @property
    def default_step_count(self) -> int:
        """The steps a run takes unless told (this instance's checkpoint may decide)."""
        return self.checkpoint_default_steps(getattr(self, "metadata", {}))

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A learned method that cannot load weights is a programming error: say so when the class is defined.
        if cls.__dict__.get("needs_checkpoint", False) and cls.from_checkpoint.__func__ is \
                RegistrationMethod.from_checkpoint.__func__:
            raise TypeError(f"{cls.__name__} sets needs_checkpoint but does not implement from_checkpoint")

    def __init__(self, options: MethodOptions | None = None, device: str | torch.device = "cpu"):
        self.options = options if options is not None else self.Options()
        self.device = torch.device(device)

    @classmethod
    def create(cls, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
               options: dict[str, Any] | None = None, ndim: int | None = None) -> "RegistrationMethod":
        """Build the method; learned methods load ``checkpoint`` (classical ones refuse one), or without one
        the bundled checkpoint for ``ndim``-D images."""
        if not cls.needs_checkpoint:
            if checkpoint is not None:
                raise InputError(f"method '{cls.name}' is not learned and takes no checkpoint; drop the checkpoint")
            return cls(cls.Options.from_dict(options), device)
        if checkpoint is None:
            from ..resources import default_checkpoint
            checkpoint = default_checkpoint(cls.name, ndim)  # the bundled demo checkpoint, when there is one
        if checkpoint is None:
            for_images = f" for {ndim}D images" if ndim else ""
            other = {2: 3, 3: 2}.get(ndim)
            if other and default_checkpoint(cls.name, other) is not None:  # e.g. VoxelMorph: 3D only
                for_images += (f" (the bundled one is for {other}D images"
                               + ("; single-slice volumes and 2D+t series are 2D" if other == 2 else "") + ")")
            raise InputError(f"method '{cls.name}' is learned and needs a checkpoint (.safetensors): none is "
                             f"bundled for it{for_images}; train one with the Training package (iterreg-train)")
        path = Path(checkpoint)
        if not path.is_file():
            raise InputError(f"checkpoint '{path}' does not exist; choose an existing .safetensors file")
        return cls.from_checkpoint(path, device, options)

    @classmethod
    def from_checkpoint(cls, path: Path, device: str | torch.device = "cpu",
                        options: dict[str, Any] | None = None) -> "RegistrationMethod":
        """Learned methods: load weights and their metadata from an existing checkpoint file (every class with
        ``needs_checkpoint`` overrides this; ``__init_subclass__`` enforces it)."""
        raise TypeError(f"method '{cls.name}' takes no checkpoint")

    def check_inputs(self, fixed: torch.Tensor, moving: torch.Tensor, steps: int | None) -> int:
        """Validate tensors and the step count; returns the step count to use."""
        nd = spatial_ndim(fixed)
        if fixed.shape != moving.shape:
            raise InputError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must be on one grid; "
                             "resample the moving image onto the fixed grid first")
        if nd not in self.supported_ndims:
            raise InputError(f"method '{self.name}' supports {' and '.join(f'{d}D' for d in self.supported_ndims)} "
                             f"images, not {nd}D")
        steps = self.default_step_count if steps is None else int(steps)
        if not 1 <= steps <= self.max_steps:
            raise InputError(f"method '{self.name}' takes 1 to {self.max_steps} steps, got {steps}")
        return steps

    def planned_steps(self, steps: int) -> int:
        """How many steps a run of ``steps`` yields at most (for progress: a method may stop earlier)."""
        return steps

    @abstractmethod
    def run(self, fixed: torch.Tensor, moving: torch.Tensor, steps: int | None = None,
            prompts: Prompts | None = None, init: torch.Tensor | None = None) -> Iterator[Step]:
        """Yield one :class:`Step` per iteration; the last one has ``final=True``."""

    def run_pair(self, pair, steps: int | None = None, prompts: Prompts | None = None,
                 init: torch.Tensor | None = None) -> Iterator[Step]:
        """:meth:`run` on a prepared :class:`iterreg.imaging.RegistrationPair` on this method's device; a method
        that ``reads_moving_on_own_grid`` also gets the moving image on its own grid when that differs."""
        return self.run(pair.fixed.to(self.device), pair.moving.to(self.device), steps, prompts,
                        None if init is None else init.to(self.device), **self.pair_inputs(pair))

    def pair_inputs(self, pair) -> dict:
        """Keyword inputs :meth:`run` takes from a prepared pair beyond its arrays: the moving image on its own
        grid for a method that ``reads_moving_on_own_grid`` (when that grid differs)."""
        if self.reads_moving_on_own_grid and pair.moving_own_grid is not None:
            return {"moving_own_grid": pair.moving_own_grid.to(self.device)}
        return {}


MONITOR_VOXELS = 64 ** 3  # per-step metrics are computed on a grid of at most this many voxels


@torch.no_grad()
def standard_step_metrics(fixed: torch.Tensor, warped: torch.Tensor, displacement: torch.Tensor,
                          previous: torch.Tensor | None, similarity: str = "lncc",
                          similarity_kwargs: dict | None = None, regularizer: str = "diffusion") -> dict[str, float]:
    """The four metrics every step reports, on one grid per run so steps are comparable.

    They feed the live convergence plot, so they must cost little next to a step: above 64^3 voxels the
    similarity, regularizer and folding are computed on the images and field area-downsampled to 64^3 voxels
    (at 128^3 the full-resolution LNCC and Jacobian took ~1 s per step on 2 cores, more than a network step).
    ``update_norm`` stays at full resolution (cheap). The result's own evaluation (Dice, folding, ...) is
    always computed on the full grid by the pipeline.
    """
    change = displacement if previous is None else displacement - previous
    update_norm = float(vector_length(change).max())
    fixed, warped, displacement = _monitor_grid(fixed, warped, displacement)
    return {
        "similarity": float(losses.similarity_loss(similarity, fixed, warped, **(similarity_kwargs or {}))),
        "regularizer": float(losses.regularizer_loss(regularizer, displacement)),
        "update_norm": update_norm,
        "folding_percent": folding_percent(displacement),
    }


def monitor_shape(shape) -> tuple[int, ...]:
    """The grid per-step metrics are computed on for images of ``shape``: at most ``MONITOR_VOXELS`` voxels."""
    shape = tuple(int(n) for n in shape)
    voxels = math.prod(shape)
    if voxels <= MONITOR_VOXELS:
        return shape
    factor = (MONITOR_VOXELS / voxels) ** (1 / len(shape))
    return tuple(max(8, round(n * factor)) for n in shape)


def _monitor_grid(fixed, warped, displacement):
    small = monitor_shape(fixed.shape[2:])
    if small == tuple(fixed.shape[2:]):
        return fixed, warped, displacement
    return resize_image(fixed, small), resize_image(warped, small), resize_displacement(displacement, small)


class MonitorGrid:
    """The standard step metrics of a full-resolution field without warping at full resolution: the images are
    brought to the monitor grid once per run and warped there by the field brought down (as a working-grid
    method's metrics are computed on its working grid). ``update_norm`` stays exact, at full resolution."""

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor):
        self.shape = monitor_shape(fixed.shape[2:])
        self.fixed, self.moving = resize_image(fixed, self.shape), resize_image(moving, self.shape)

    @torch.no_grad()
    def metrics(self, displacement, previous, similarity: str, similarity_kwargs: dict | None = None,
                regularizer: str = "diffusion") -> dict[str, float]:
        small = resize_displacement(displacement, self.shape)
        metrics = standard_step_metrics(self.fixed, warp(self.moving, small), small, None, similarity,
                                        similarity_kwargs, regularizer)
        change = displacement if previous is None else displacement - previous
        metrics["update_norm"] = float(vector_length(change).max())
        return metrics


def finite_steps(method: "RegistrationMethod", steps: Iterator[Step]) -> Iterator[Step]:
    """Pass a run's steps on, but end it with a clear error at the first diverged displacement: non-finite, or
    moving some voxel by more than twice the image's extent (no registration does that). A learned update run
    past what it was trained for can diverge (measured: a fine-tuned 2D DEQReg, Docs/training.md), and such a
    field must never reach the scene or disk."""
    for step in steps:
        if step.displacement_bound is not None:  # the method's cheap bound: the field itself may never be needed
            largest, extent = float(step.displacement_bound[0]), int(step.displacement_bound[1])
        else:
            # one reduction per step (NaN and Inf propagate through amax): ~1.5 ms at 128^3, where
            # isfinite().all() took 16 ms, a cost every streamed step would pay
            u = step.displacement
            largest, extent = float(u.abs().amax()), max(u.shape[2:])
        if not math.isfinite(largest):
            problem = "its displacement is no longer finite (NaN or Inf)"
        else:
            problem = (f"it moves a voxel by {largest:.3g} voxels along an axis, more than twice the image's {extent}"
                       if largest > 2 * extent else None)
        if problem:
            raise InputError(f"the {method.name} run diverged at step {step.index + 1}: {problem}. Run fewer steps, "
                             "or use another checkpoint; nothing was saved")
        yield step
