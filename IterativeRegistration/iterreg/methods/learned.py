"""What the learned methods share: loading a network from a checkpoint, and the working grid.

The working grid is where a network iterates. On a GPU it is the image grid; on a 2-core CPU a
full-resolution 3D U-Net step costs seconds (DESIGN.md §8), so a network may be trained and run on a coarser
grid (``working_scale`` of the training grid, or a ``working_size`` chosen at inference) while every loss,
metric and result is computed on the full grid with the displacement upsampled, as IIRP-Net and LapIRN do.
Where the image's spacing is known, the working grid's voxels are cubes in mm whatever the image's voxels are: a
network's kernels count voxels, and ours learned on isotropic grids, so a thick-slice scan is brought to the
anatomy's proportions it learned (Docs/methods.md, "Working grid").
"""
from __future__ import annotations

import functools
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import torch

from .base import (WORKING_VOXELS, MethodOptions, Prompts, RegistrationMethod, Step, standard_step_metrics,
                   warp_later)
from .polish import polish_memory_per_voxel, polished
from ..checkpoints import read_checkpoint
from ..errors import InputError
from ..networks.precision import check_precision, compute_in_precision
from ..networks.unet import prefer_fast_cpu_layout
from ..spatial import (largest_component, resize_displacement, resize_image, rescale_voxel_vectors,
                       shape_for_cubic_voxels, spatial_ndim, vector_length, warp)

__all__ = ["load_network", "WorkingGrid", "working_shape", "NetworkOptions", "WorkingGridOptions", "NetworkMethod",
           "LearnedIterativeMethod"]


def load_network(method_cls, path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Build ``method_cls``'s network from the architecture a checkpoint declares and load its weights."""
    weights, metadata = read_checkpoint(path, method_cls.name)
    try:
        network = method_cls.build_network(metadata["architecture"])
        network.load_state_dict(weights, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"checkpoint '{path}' does not match the {method_cls.name} architecture it declares: "
                         f"{str(exc).splitlines()[0]}") from None
    return network, metadata


def working_shape(shape: Sequence[int], scale: float = 1.0, size: int = 0,
                  spacing: Sequence[float] | None = None) -> tuple[int, ...]:
    """The working grid for an image grid ``shape``: ``size`` > 0 sets its longest side; otherwise every side is
    scaled by ``scale``. Never below 8 voxels. With ``spacing`` (mm per array axis) and a ``size``, the voxels are
    cubes in mm: the longest side in mm gets ``size`` voxels, the others as many as their extent holds, so a
    thick-slice axis may get more voxels than the image has (never voxels finer than the image's finest).
    Without ``spacing`` the image's voxel aspect is kept and no side is finer than the image."""
    shape = tuple(int(n) for n in shape)
    if size > 0 and spacing is not None:
        voxel_mm = max(max(n * float(s) for n, s in zip(shape, spacing)) / size, min(float(s) for s in spacing))
        return tuple(max(8, n) for n in shape_for_cubic_voxels(shape, spacing, voxel_mm))
    factor = size / max(shape) if size > 0 else scale
    return tuple(min(n, max(8, round(n * factor))) for n in shape)


@dataclass(frozen=True)
class WorkingGrid:
    """Moves images down to the working grid and displacements (voxels) between it and the image grid."""
    image_shape: tuple[int, ...]
    shape: tuple[int, ...]

    @classmethod
    def for_images(cls, image: torch.Tensor, scale: float = 1.0, size: int = 0,
                   spacing: Sequence[float] | None = None) -> "WorkingGrid":
        image_shape = tuple(image.shape[2:])
        return cls(image_shape, working_shape(image_shape, scale, size, spacing))

    @property
    def is_identity(self) -> bool:
        return self.shape == self.image_shape

    def image_down(self, image: torch.Tensor) -> torch.Tensor:
        return resize_image(image, self.shape)

    def displacement_up(self, displacement: torch.Tensor) -> torch.Tensor:
        return resize_displacement(displacement, self.image_shape)

    def displacement_down(self, displacement: torch.Tensor) -> torch.Tensor:
        return resize_displacement(displacement, self.shape)

    def crop_coarse(self, tensor: torch.Tensor, level: int) -> torch.Tensor:
        """Drop the padding a U-Net added from a ``[C, *coarse]`` map of encoder ``level`` (1/2^level)."""
        return tensor[(slice(None), *[slice(0, -(-n // 2 ** level)) for n in self.shape])]


@dataclass(frozen=True)
class NetworkOptions(MethodOptions):
    # the convolutions' arithmetic: float32, or bfloat16 where the device has it natively (networks/precision.py)
    precision: str = "float32"

    def check(self) -> None:
        check_precision(self.precision)


@dataclass(frozen=True)
class WorkingGridOptions(MethodOptions):
    working_size: int = 0  # longest side of the network's grid; 0: the size it was trained at
    # isotropic: the network's grid has cubic voxels in mm (a thick-slice scan is seen in the proportions the
    # network learned); image: it keeps the image's voxel aspect (the behaviour before session 36, for a checkpoint
    # trained on anisotropic grids). Measured on thick slices: Docs/benchmarks.md, 'thick-slices'
    working_voxels: str = "isotropic"

    def check(self) -> None:
        super().check()  # cooperative: a method's options may combine this with NetworkOptions
        if self.working_size < 0 or 0 < self.working_size < 8:
            raise InputError(f"working_size must be 0 (the checkpoint's scale) or >= 8, got {self.working_size}")
        if self.working_voxels not in WORKING_VOXELS:
            raise InputError(f"working_voxels must be one of {list(WORKING_VOXELS)}, got '{self.working_voxels}'")

    def grid_spacing(self, spacing: Sequence[float] | None) -> Sequence[float] | None:
        """The spacing the working grid is chosen from: the image's, unless the image's voxel aspect is asked for."""
        return spacing if self.working_voxels == "isotropic" else None


class NetworkMethod(RegistrationMethod):
    """A method run by one network loaded from a checkpoint (VoxelMorph, RIIR, DEQReg, ...): loading, the loss the
    checkpoint was trained with (for the step metrics and the polish), the image-dimension check, and a run made
    of the network's steps followed by the opt-in polish on the image grid (``polish_iterations``, polish.py)."""

    def __init__(self, network, metadata: dict, options=None, device="cpu"):
        super().__init__(options, device)
        network = prefer_fast_cpu_layout(network.to(self.device).eval(), self.device)
        # R2N2 offers no choice (its options have no ``precision``): its Gaussians need float32 (Docs/methods.md)
        self.network = compute_in_precision(network, getattr(self.options, "precision", "float32"), self.device)
        self.metadata = metadata
        training = metadata.get("training", {})
        self.similarity = training.get("similarity", "lncc")
        self.similarity_kwargs = {"window": training.get("window", 5)} if self.similarity == "lncc" else {}

    @classmethod
    def from_checkpoint(cls, path, device="cpu", options=None):
        network, metadata = load_network(cls, path)
        return cls(network, metadata, cls.Options.from_dict(options), device)

    @classmethod
    def peak_memory_per_voxel(cls, options: dict | None) -> float:
        return max(cls.memory_per_voxel, polish_memory_per_voxel(options))

    def planned_steps(self, steps: int) -> int:
        return steps + getattr(self.options, "polish_iterations", 0)

    def run(self, fixed, moving, steps=None, prompts: Prompts | None = None, init: torch.Tensor | None = None,
            spacing: Sequence[float] | None = None, **inputs) -> Iterator[Step]:
        """``spacing``: mm per array axis of the fixed grid (``run_pair`` gives it), for the working grid's voxel
        shape and the polish's step in mm; without it (bare tensors) voxels count as cubes."""
        return polished(self, self.network_steps(fixed, moving, steps, prompts, init, spacing=spacing, **inputs),
                        fixed, moving, spacing, prompts)

    def pair_inputs(self, pair) -> dict:
        return {**super().pair_inputs(pair), "spacing": pair.geometry.array_spacing}

    @abstractmethod
    def network_steps(self, fixed, moving, steps=None, prompts: Prompts | None = None,
                      init: torch.Tensor | None = None, spacing: Sequence[float] | None = None) -> Iterator[Step]:
        """The network's own steps, as :meth:`RegistrationMethod.run` describes them (``spacing``: mm per array
        axis, or None)."""

    def check_inputs(self, fixed, moving, steps):
        steps = super().check_inputs(fixed, moving, steps)
        if spatial_ndim(fixed) == 3 and 1 in fixed.shape[2:] and self.network.config.ndim == 2:
            raise InputError(f"{self.name} cannot register a single-slice volume yet (r2n2 can); choose r2n2 or "
                             "classical, or a 3D volume")
        if spatial_ndim(fixed) != self.network.config.ndim:
            raise InputError(f"this {self.name} checkpoint was trained on {self.network.config.ndim}D images; the "
                             f"inputs are {spatial_ndim(fixed)}D: choose a {spatial_ndim(fixed)}D checkpoint")
        return steps


class LearnedIterativeMethod(NetworkMethod):
    """Shared by RIIR, DEQReg, IIRP-Net and R2N2: training hooks, working grid, warm start.
    A subclass names its network and config classes; the network's ``forward(fixed, moving)`` returns the
    working-grid displacements the training loss sums over, and its config has ``step_weights(count)``."""
    network_class: ClassVar[type]
    config_class: ClassVar[type]

    # --- training hooks (used by Training/) -------------------------------------------------------------------
    @classmethod
    def build_network(cls, architecture: dict) -> torch.nn.Module:
        return cls.network_class(cls.config_class.from_dict(architecture))

    @classmethod
    def default_architecture(cls, ndim: int) -> dict:
        return cls.config_class(ndim=ndim).to_dict()

    @classmethod
    def predict(cls, network, fixed: torch.Tensor, moving: torch.Tensor) -> list[torch.Tensor]:
        """The displacements the outer loss sums over (RIIR: every step; DEQReg: the sampled states in training,
        the solution in evaluation), upsampled to the image grid and differentiable."""
        grid = WorkingGrid.for_images(fixed, network.config.working_scale)
        fields = network(grid.image_down(fixed), grid.image_down(moving),
                         **cls.full_resolution_inputs(network, fixed, moving, grid))
        return [grid.displacement_up(u) for u in fields]

    @staticmethod
    def full_resolution_inputs(network, fixed, moving, grid: WorkingGrid) -> dict:
        """Extra keyword inputs a network takes from the images at full resolution (RIIR's ``detail``)."""
        return {}

    @staticmethod
    def step_weights(network, count: int) -> list[float]:
        return network.config.step_weights(count)

    # --- inference --------------------------------------------------------------------------------------------

    @property
    def trained_working_size(self) -> int:
        """The longest side of the grid the network iterated on in training (0 if the checkpoint does not say).
        By default inputs of any size are brought to it: the network sees anatomy at the scale it learned."""
        shape = self.metadata.get("preprocessing", {}).get("training_shape")
        return round(max(shape) * self.network.config.working_scale) if shape else 0

    def _prepare(self, fixed, moving, prompts, init, spacing=None):
        if prompts is not None:
            raise InputError(f"{self.name} cannot use landmark prompts; register without prompts, or use a method "
                             "that takes them (classical)")
        fixed, moving = fixed.to(self.device), moving.to(self.device)
        grid = self._working_grid(fixed, spacing)
        start = None
        if init is not None:
            if tuple(init.shape) != (1, spatial_ndim(fixed), *fixed.shape[2:]):
                raise InputError(f"the starting displacement must be [1, {spatial_ndim(fixed)}, "
                                 f"{', '.join(map(str, fixed.shape[2:]))}], got {list(init.shape)}")
            start = grid.displacement_down(init.to(self.device, torch.float32))
        return fixed, moving, grid, start

    def _working_grid(self, fixed: torch.Tensor, spacing: Sequence[float] | None) -> WorkingGrid:
        return WorkingGrid.for_images(fixed, self.network.config.working_scale,
                                      self.options.working_size or self.trained_working_size,
                                      self.options.grid_spacing(spacing))

    def _step(self, index, fixed_w, moving_w, moving, grid, working_u, previous_u, channels, phase, final,
              extra=None, displacement=None):
        """A Step on the image grid from the working-grid state. Its metrics are computed on the working grid,
        where the network iterates (cheap at any image size); ``update_norm`` is in image voxels (exact: the
        upsampling is linear, so the largest change sits on a working-grid node); the full-resolution warped
        image and the upsampled displacement are computed only if someone asks for them (a streamed step whose
        arrays are sent; the last one). ``displacement`` on the image grid may be given when the method has it
        exactly (R2N2's Gaussians); otherwise it is the upsampled working field."""
        bound = None
        if displacement is None:
            bound = (float(largest_component(working_u, grid.image_shape).amax()), max(grid.image_shape))
            displacement = functools.cache(lambda: grid.displacement_up(working_u))  # shared with ``warped``
        metrics = standard_step_metrics(fixed_w, warp(moving_w, working_u), working_u, None, self.similarity,
                                        self.similarity_kwargs)
        change = working_u if previous_u is None else working_u - previous_u
        change = rescale_voxel_vectors(change, grid.shape, grid.image_shape)
        metrics["update_norm"] = float(vector_length(change).max())
        metrics.update(extra or {})
        return Step(index, displacement, warp_later(moving, displacement), metrics, channels=channels,
                    phase=phase, final=final, displacement_bound=bound)
