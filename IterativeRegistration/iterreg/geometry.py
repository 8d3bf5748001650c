"""Physical space: the one place that owns voxel <-> millimetre <-> RAS/LPS conventions.

- Arrays are in SimpleITK's ``GetArrayFromImage`` order: ``[k, j, i]`` (3D) / ``[j, i]`` (2D), i.e. array
  axis 0 is the *last* ITK index. Voxel displacements from :mod:`iterreg.spatial` use this array order.
- ITK physical points are **LPS** mm: ``p = origin + direction @ (spacing * ijk)`` with ``ijk`` in ITK index
  order. Slicer shows **RAS** mm: ``ras = diag(-1, -1, 1) @ lps``.
- An ITK displacement field (file on disk) holds, at each fixed voxel, the LPS vector ``T(p) - p`` of the
  *resampling* transform (fixed -> moving). Our voxel field ``u`` maps to it by ``direction @ (spacing * u_ijk)``.
- Slicer's grid transform is set as TransformFromParent with the same vectors in RAS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = ["Geometry", "LPS_TO_RAS_3D"]

LPS_TO_RAS_3D = np.diag([-1.0, -1.0, 1.0])


def _lps_ras_flip(ndim: int) -> np.ndarray:
    # In 2D ITK images, x and y are still L and P: both flip to R and A.
    return np.diag([-1.0, -1.0, 1.0][:ndim])


@dataclass(frozen=True)
class Geometry:
    """Grid of an image in ITK terms (index order i, j, k; LPS mm)."""

    size: tuple[int, ...]  # ITK order (i, j[, k])
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...] = field(default=())  # row-major ndim x ndim, columns = axis directions

    def __post_init__(self):
        nd = len(self.size)
        if nd not in (2, 3):
            raise ValueError(f"only 2D and 3D grids are supported, got {nd}D")
        if not self.direction:
            object.__setattr__(self, "direction", tuple(np.eye(nd).ravel()))
        if len(self.spacing) != nd or len(self.origin) != nd or len(self.direction) != nd * nd:
            raise ValueError("size, spacing, origin and direction must have matching dimensionality")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"voxel spacing must be positive, got {self.spacing}")
        if abs(np.linalg.det(self.direction_matrix)) < 1e-6:
            raise ValueError("direction matrix is singular")

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def to_dict(self) -> dict:
        """JSON-friendly form (used to hand grids to the worker process)."""
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict) -> "Geometry":
        try:
            return cls(tuple(int(v) for v in data["size"]), tuple(float(v) for v in data["spacing"]),
                       tuple(float(v) for v in data["origin"]), tuple(float(v) for v in data.get("direction", ())))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a geometry needs size, spacing, origin (and direction): {exc}") from None

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference_image(self, pixel=sitk.sitkFloat32) -> sitk.Image:
        return self.apply_to(sitk.Image(list(self.size), pixel))

    # --- basic properties -----------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def image_ndim(self) -> int:
        """Dimensions the image really extends in: a single-slice 3D volume is a 2D image (for choosing a
        2D or 3D checkpoint)."""
        return sum(1 for n in self.size if n > 1) if self.ndim == 3 and 1 in self.size else self.ndim

    @property
    def array_shape(self) -> tuple[int, ...]:
        """Shape of the numpy/torch array (array order = reversed ITK order)."""
        return tuple(reversed(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        nd = len(self.size)
        return np.asarray(self.direction, dtype=float).reshape(nd, nd)

    @property
    def array_spacing(self) -> tuple[float, ...]:
        """Spacing per array axis (reversed ITK order)."""
        return tuple(reversed(self.spacing))

    def index_to_lps_matrix(self) -> np.ndarray:
        """Homogeneous matrix mapping ITK index (i, j, k, 1) to LPS mm."""
        nd = self.ndim
        m = np.eye(nd + 1)
        m[:nd, :nd] = self.direction_matrix @ np.diag(self.spacing)
        m[:nd, nd] = self.origin
        return m

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """Slicer's IJKToRAS (3D volumes): ITK index -> RAS mm."""
        flip = np.eye(self.ndim + 1)
        flip[:self.ndim, :self.ndim] = _lps_ras_flip(self.ndim)
        return flip @ self.index_to_lps_matrix()

    def array_index_map_to(self, other: "Geometry") -> np.ndarray:
        """Homogeneous ``[ndim + 1, ndim + 1]`` matrix taking array-order voxel positions (k, j, i) of this grid to
        the array-order voxel positions of the same physical points on ``other``'s grid."""
        nd = self.ndim
        reverse = np.eye(nd + 1)
        reverse[:nd, :nd] = np.eye(nd)[::-1]  # array order <-> ITK index order (its own inverse)
        itk = np.linalg.solve(other.index_to_lps_matrix(), self.index_to_lps_matrix())
        return reverse @ itk @ reverse

    # --- points -------------------------------------------------------------------------------------
    def array_index_to_lps(self, points: np.ndarray) -> np.ndarray:
        """``[N, ndim]`` array-order voxel coordinates (k, j, i) -> LPS mm."""
        ijk = np.asarray(points, dtype=float)[:, ::-1]
        return ijk @ (self.direction_matrix @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def lps_to_array_index(self, points: np.ndarray) -> np.ndarray:
        """LPS mm ``[N, ndim]`` -> continuous array-order voxel coordinates (k, j, i)."""
        a = self.direction_matrix @ np.diag(self.spacing)
        ijk = np.linalg.solve(a, (np.asarray(points, dtype=float) - np.asarray(self.origin)).T).T
        return np.ascontiguousarray(ijk[:, ::-1])

    def array_index_to_ras(self, points: np.ndarray) -> np.ndarray:
        return self.array_index_to_lps(points) @ _lps_ras_flip(self.ndim)

    def ras_to_array_index(self, points: np.ndarray) -> np.ndarray:
        return self.lps_to_array_index(np.asarray(points, dtype=float) @ _lps_ras_flip(self.ndim))

    def contains_array_index(self, points: np.ndarray, margin: float = 0.5) -> np.ndarray:
        """Whether array-order voxel points lie inside the grid (voxel corners, +- ``margin``)."""
        pts = np.asarray(points, dtype=float)
        upper = np.asarray(self.array_shape, dtype=float) - 1 + margin
        return np.all((pts >= -margin) & (pts <= upper), axis=1)

    def physical_corners_lps(self) -> np.ndarray:
        """LPS coordinates of the outer corners of the grid (voxel edges, not centres)."""
        nd = self.ndim
        corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in self.array_shape], indexing="ij"))
        return self.array_index_to_lps(corners.reshape(nd, -1).T)

    # --- displacement fields ---------------------------------------------------------------------------
    def displacement_voxels_to_lps(self, displacement: np.ndarray) -> np.ndarray:
        """Voxel field ``[ndim, *array_shape]`` (array order) -> LPS mm vectors ``[*array_shape, ndim]``."""
        u = np.asarray(displacement, dtype=np.float64)
        u_ijk = np.moveaxis(u[::-1], 0, -1)  # channels to ITK order (i, j, k), last axis
        return u_ijk @ (self.direction_matrix @ np.diag(self.spacing)).T

    def displacement_lps_to_voxels(self, vectors: np.ndarray) -> np.ndarray:
        """LPS mm vectors ``[*array_shape, ndim]`` -> voxel field ``[ndim, *array_shape]`` (array order)."""
        a_inv = np.linalg.inv(self.direction_matrix @ np.diag(self.spacing))
        u_ijk = np.asarray(vectors, dtype=np.float64) @ a_inv.T
        return np.moveaxis(u_ijk, -1, 0)[::-1].copy()

    def array_axes_to_ras(self) -> np.ndarray:
        """``[ndim, ndim]`` matrix whose column ``a`` is the RAS mm step of one voxel along array axis ``a``."""
        return (_lps_ras_flip(self.ndim) @ self.direction_matrix @ np.diag(self.spacing))[:, ::-1]

    def displacement_voxels_to_ras(self, displacement: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Voxel field -> RAS mm vectors ``[*array_shape, ndim]`` (what Slicer's grid transform holds).

        ``out`` (e.g. a grid transform's own float32 memory) receives the vectors without a temporary of its
        size: one matrix product on the ``[ndim, N]`` field, then one interleaving copy."""
        u = np.asarray(displacement)
        dtype = out.dtype if out is not None else np.float64
        vectors = (self.array_axes_to_ras().astype(dtype) @ u.reshape(u.shape[0], -1).astype(dtype, copy=False)).T
        if out is None:
            return vectors.reshape(*u.shape[1:], u.shape[0])
        out.reshape(-1, u.shape[0])[...] = vectors
        return out

    def displacement_ras_to_voxels(self, vectors: np.ndarray) -> np.ndarray:
        return self.displacement_lps_to_voxels(np.asarray(vectors, dtype=np.float64) @ _lps_ras_flip(self.ndim))

    def displacement_to_sitk(self, displacement: np.ndarray) -> sitk.Image:
        """Voxel field -> ITK displacement field image (LPS mm, float64 vectors, fixed geometry)."""
        if tuple(np.shape(displacement)[1:]) != self.array_shape:
            raise ValueError(f"displacement shape {np.shape(displacement)} does not match grid {self.array_shape}")
        field_image = sitk.GetImageFromArray(self.displacement_voxels_to_lps(displacement), isVector=True)
        return self.apply_to(field_image)

    @staticmethod
    def displacement_from_sitk(field_image: sitk.Image) -> tuple[np.ndarray, "Geometry"]:
        """ITK displacement field image -> (voxel field in array order, its geometry)."""
        geometry = Geometry.of(field_image)
        if field_image.GetNumberOfComponentsPerPixel() != geometry.ndim:
            raise ValueError(
                f"a {geometry.ndim}D displacement field needs {geometry.ndim} components per voxel, "
                f"this one has {field_image.GetNumberOfComponentsPerPixel()}")
        vectors = sitk.GetArrayFromImage(field_image)
        return geometry.displacement_lps_to_voxels(vectors), geometry

    def same_grid(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (self.size == other.size
                and np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol * max(1.0, max(map(abs, self.spacing))))
                and np.allclose(self.direction, other.direction, atol=tol))

    def scaled_to_shape(self, array_shape: Sequence[int]) -> "Geometry":
        """Grid with ``array_shape`` voxels over the same field of view (corner voxel centres kept).

        Matches :func:`iterreg.spatial.resize_displacement` (align_corners=True).
        """
        from .spatial import rescale_spacing  # the one rule for resampled grids (a one-voxel axis keeps its size)
        size = tuple(int(n) for n in reversed(tuple(array_shape)))
        return Geometry(size, tuple(rescale_spacing(self.spacing, self.size, size)), self.origin, self.direction)
