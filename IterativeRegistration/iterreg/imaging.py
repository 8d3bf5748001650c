"""Images in and out: reading, validation, resampling onto the fixed grid, intensity preprocessing.

Everything a method sees goes through :func:`prepare_pair`: the moving image resampled onto the fixed grid
in physical space (SimpleITK, honouring origin, spacing and direction) and both intensities clipped to their
(1, 99) percentiles and scaled to [0, 1] (DESIGN.md §3). The record of what was done travels with the pair.
A moving image on another grid is also kept as acquired (``MovingOnOwnGrid``), for a method that reads it
there (DIO's ``features_on_own_grid``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .atomic import atomic_file
from .errors import InputError
from .geometry import Geometry

__all__ = ["read_image", "read_image_header", "read_image_size", "write_image_atomic", "validate_image",
           "validate_pair_overlap", "resample_onto", "normalise_intensity", "MovingOnOwnGrid", "RegistrationPair",
           "prepare_pair", "resample_through_field", "check_label_geometry"]

READABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _readable_path(path: str | os.PathLike, role: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{role} '{p}' does not exist")
    if p.is_dir():
        raise InputError(f"{role} '{p}' is a folder; give an image file (.nii.gz, .nrrd, .mha)")
    if not os.access(p, os.R_OK):
        raise InputError(f"{role} '{p}' is not readable (check its permissions)")
    return p


def _unreadable(p: Path, role: str, exc: RuntimeError) -> InputError:
    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
    return InputError(f"{role} '{p}' could not be read as an image ({first.strip()}); "
                      f"supported: {', '.join(READABLE_SUFFIXES)}")


def read_image(path: str | os.PathLike, role: str) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA image, or raise :class:`InputError` naming ``role`` and the problem."""
    p = _readable_path(path, role)
    try:
        return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise _unreadable(p, role, exc) from None


def read_image_header(path: str | os.PathLike, role: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The voxel counts and spacing (ITK order) from the file's header alone (no pixel data is read), e.g. to
    check memory first."""
    p = _readable_path(path, role)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(p, role, exc) from None
    return tuple(int(s) for s in reader.GetSize()), tuple(float(s) for s in reader.GetSpacing())


def read_image_size(path: str | os.PathLike, role: str) -> tuple[int, ...]:
    """The voxel counts from the file's header alone (no pixel data is read)."""
    return read_image_header(path, role)[0]


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write an image so that readers never see half a file."""
    with atomic_file(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)


def validate_image(image: sitk.Image, role: str) -> None:
    """Reject images a registration cannot use: wrong dimensionality, vectors, empty, non-finite, constant."""
    if image.GetDimension() not in (2, 3):
        raise InputError(f"{role} is {image.GetDimension()}D; only 2D and 3D images can be registered")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{role} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a vector or "
                         "colour image); give a scalar image, e.g. one channel or one time point")
    size = image.GetSize()
    if min(size) < 1 or int(np.prod(size)) < 8:
        raise InputError(f"{role} is empty or tiny ({'x'.join(map(str, size))} voxels)")
    if any(n == 2 for n in size):  # 1 is a 2D image (one slice); differences and smoothing need 3 or more
        axis = "IJK"[size.index(2)]
        raise InputError(f"{role} has only 2 voxels along its {axis} axis ({'x'.join(map(str, size))}); "
                         "registration needs at least 3 (or exactly 1 for a single 2D slice): use more slices")
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputError(f"{role} contains {bad} NaN or infinite voxels; fix or mask them before registering")
    if float(array.max()) == float(array.min()):
        raise InputError(f"{role} is constant (every voxel is {float(array.min()):g}); nothing to register")


def validate_pair_overlap(fixed: sitk.Image, moving: sitk.Image, min_fraction: float = 0.01) -> float:
    """Fraction of the fixed grid's voxels that fall inside the moving image's extent; error if ~none."""
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(f"fixed image is {fixed.GetDimension()}D but moving image is {moving.GetDimension()}D; "
                         "both must have the same dimensionality")
    fixed_geom, moving_geom = Geometry.of(fixed), Geometry.of(moving)
    # Sample the fixed grid coarsely (<= ~32^3 points) and map into moving index space.
    axes = [np.linspace(0, n - 1, num=min(n, 32)) for n in fixed_geom.array_shape]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, fixed_geom.ndim)
    inside = moving_geom.contains_array_index(moving_geom.lps_to_array_index(fixed_geom.array_index_to_lps(pts)))
    fraction = float(inside.mean())
    if fraction < min_fraction:
        raise InputError(
            "fixed and moving images do not overlap in physical space "
            f"({fraction * 100:.1f}% of the fixed image lies inside the moving one); "
            "align them first (e.g. a rigid or centre-of-mass initialisation) or check their origins")
    return fraction


def resample_onto(image: sitk.Image, reference: Geometry, interpolator=sitk.sitkLinear,
                  default_value: float = 0.0) -> sitk.Image:
    """Resample ``image`` onto the grid of ``reference`` through physical space (identity transform)."""
    return sitk.Resample(image, reference.reference_image(), sitk.Transform(), interpolator, default_value,
                         image.GetPixelID())


@dataclass(frozen=True)
class IntensityRecord:
    """What was done to the intensities: clip to [low, high] then map linearly to [0, 1]."""
    low: float
    high: float
    percentiles: tuple[float, float] = (1.0, 99.0)


def normalise_intensity(array: np.ndarray, percentiles=(1.0, 99.0)) -> tuple[np.ndarray, IntensityRecord]:
    low, high = (float(v) for v in np.percentile(array, percentiles))
    if high <= low:  # e.g. mostly-background images: fall back to the full range
        low, high = float(array.min()), float(array.max())
    scaled = (np.clip(array, low, high) - low) / (high - low)
    return scaled.astype(np.float32), IntensityRecord(low, high, tuple(percentiles))


@dataclass
class MovingOnOwnGrid:
    """The moving image on the grid it was acquired on, for a method that extracts its features there (DIO: fixed
    and moving may differ in size and voxel spacing) instead of on the resampled copy."""
    image: torch.Tensor  # [1, 1, *its array shape], intensities scaled with the pair's moving record
    fixed_to_own_index: np.ndarray  # homogeneous: fixed-grid voxel (array order) -> voxel of this grid
    spacing: tuple[float, ...]  # mm per array axis of this grid
    fixed_spacing: tuple[float, ...]  # mm per array axis of the fixed grid

    def to(self, device) -> "MovingOnOwnGrid":
        self.image = self.image.to(device)
        return self


@dataclass
class RegistrationPair:
    """A fixed/moving pair ready for a method: tensors ``[1, 1, *spatial]`` on the fixed grid, in [0, 1]."""
    fixed: torch.Tensor
    moving: torch.Tensor
    geometry: Geometry
    moving_raw_on_fixed: np.ndarray  # original moving intensities resampled onto the fixed grid
    fixed_intensity: IntensityRecord
    moving_intensity: IntensityRecord
    overlap_fraction: float = 1.0
    notes: list[str] = field(default_factory=list)
    moving_image: sitk.Image | None = None  # the original, for resampling the result in one interpolation
    moving_own_grid: MovingOnOwnGrid | None = None  # set when the moving image is on another grid

    @property
    def ndim(self) -> int:
        return self.geometry.ndim

    def to(self, device) -> "RegistrationPair":
        self.fixed = self.fixed.to(device)
        self.moving = self.moving.to(device)
        if self.moving_own_grid is not None:
            self.moving_own_grid.to(device)
        return self


def resample_through_field(moving: sitk.Image, displacement: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The original moving image resampled once through ``displacement`` (voxels, ``[ndim, *array_shape]`` on
    ``geometry``): what ITK or Slicer give when the written field is applied. Resampling the moving image onto
    the fixed grid and then warping it there would interpolate twice, visibly blurring oblique or
    differently-gridded inputs."""
    field_image = sitk.Cast(geometry.displacement_to_sitk(displacement), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field_image)
    warped = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), geometry.reference_image(), transform,
                           sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(warped)


def prepare_pair(fixed: sitk.Image, moving: sitk.Image) -> RegistrationPair:
    """Validate both images, resample moving onto the fixed grid, normalise intensities."""
    validate_image(fixed, "fixed image")
    validate_image(moving, "moving image")
    overlap = validate_pair_overlap(fixed, moving)
    geometry = Geometry.of(fixed)
    fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
    moving_on_fixed = resample_onto(sitk.Cast(moving, sitk.sitkFloat32), geometry)
    fixed_arr = sitk.GetArrayFromImage(fixed_f)
    moving_arr = sitk.GetArrayFromImage(moving_on_fixed)
    fixed_norm, fixed_rec = normalise_intensity(fixed_arr)
    moving_norm, moving_rec = normalise_intensity(moving_arr)
    notes, own_grid = [], None
    if not Geometry.of(moving).same_grid(geometry):
        notes.append("moving image resampled onto the fixed grid (linear, physical space)")
        own = sitk.GetArrayFromImage(sitk.Cast(moving, sitk.sitkFloat32))
        own = (np.clip(own, moving_rec.low, moving_rec.high) - moving_rec.low) / (moving_rec.high - moving_rec.low)
        own_grid = MovingOnOwnGrid(torch.from_numpy(own.astype(np.float32))[None, None],
                                   geometry.array_index_map_to(Geometry.of(moving)),
                                   Geometry.of(moving).array_spacing, geometry.array_spacing)
    return RegistrationPair(
        fixed=torch.from_numpy(fixed_norm)[None, None],
        moving=torch.from_numpy(moving_norm)[None, None],
        geometry=geometry, moving_raw_on_fixed=moving_arr, fixed_intensity=fixed_rec,
        moving_intensity=moving_rec, overlap_fraction=overlap, notes=notes, moving_image=moving,
        moving_own_grid=own_grid)


def check_label_geometry(labels: sitk.Image, image: sitk.Image, role: str) -> None:
    """A label map must be a scalar integer image on its image's grid."""
    if labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{role} must be a scalar label map")
    if labels.GetDimension() != image.GetDimension() or not Geometry.of(labels).same_grid(Geometry.of(image)):
        raise InputError(f"{role} is not on the grid of its image (size {labels.GetSize()} vs {image.GetSize()}, "
                         "or different origin/spacing/direction); resample it onto the image first")
    arr = sitk.GetArrayViewFromImage(labels)
    if not np.all(np.isfinite(arr)) or not np.all(np.equal(np.mod(arr, 1), 0)):
        raise InputError(f"{role} must hold integer labels")
