"""MRML nodes <-> arrays with their geometry. The only place that converts between Slicer's IJKToRAS and the
engine's ITK-style :class:`iterreg.geometry.Geometry` (conventions in Docs/conventions.md).

- Volumes: ``slicer.util.arrayFromVolume`` order ``[k, j, i]`` = the engine's array order.
- Grid transforms: a ``vtkOrientedGridTransform`` set as *TransformFromParent* whose grid is the fixed volume's
  (origin, spacing, direction in RAS) holding RAS mm vectors: a node under it displays
  ``moving(RASToIJK(x + u(x)))``, i.e. exactly the engine's ``warp`` (DESIGN.md §3).
"""
from __future__ import annotations

import numpy as np
import slicer
import vtk

from iterreg.geometry import LPS_TO_RAS_3D, Geometry

__all__ = ["volume_geometry", "volume_array", "set_volume_array", "set_grid_transform", "new_volume_like",
           "matrix_to_numpy", "numpy_to_matrix", "landmarks_ras"]

def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volume_geometry(node) -> Geometry:
    """The grid of a scalar volume node in *world* coordinates, as the engine sees it (ITK order, LPS).

    A linear parent transform is folded into the grid (the volume is registered where it is shown); a
    non-linear one is refused because no grid can represent it."""
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"volume '{node.GetName()}' has no image data; load or compute it first")
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    m = matrix_to_numpy(ijk_to_ras)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(f"volume '{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
                             "harden it (Data module: right-click > Harden transform) or remove it first")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        m = matrix_to_numpy(to_world) @ m
    spacing = np.linalg.norm(m[:3, :3], axis=0)  # = node.GetSpacing() unless a parent transform scales
    direction_lps = LPS_TO_RAS_3D @ m[:3, :3] / spacing[None, :]
    origin_lps = LPS_TO_RAS_3D @ m[:3, 3]
    size = tuple(int(n) for n in image.GetDimensions())
    return Geometry(size, tuple(spacing), tuple(origin_lps), tuple(direction_lps.ravel()))


def volume_array(node) -> np.ndarray:
    """A copy of the voxels, array order ``[k, j, i]`` (float32 for the worker)."""
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"volume '{node.GetName()}' has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components per "
                         "voxel; choose a scalar (grey-value) volume, e.g. extract one component first")
    return np.array(slicer.util.arrayFromVolume(node), dtype=np.float32)


def _ijk_to_ras(geometry: Geometry) -> np.ndarray:
    return geometry.ijk_to_ras_matrix()


def set_volume_array(node, array: np.ndarray, geometry: Geometry) -> None:
    """Put ``array`` (array order) on ``geometry`` into ``node`` (creating its image data if needed)."""
    node.SetIJKToRASMatrix(numpy_to_matrix(_ijk_to_ras(geometry)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))


def new_volume_like(scene, name: str, array: np.ndarray, geometry: Geometry, labelmap: bool = False):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    set_volume_array(node, array, geometry)
    node.CreateDefaultDisplayNodes()
    return node


def set_grid_transform(node, displacement_vox: np.ndarray, geometry: Geometry) -> None:
    """Show voxel displacement ``[3, k, j, i]`` (fixed grid) as ``node``'s FromParent grid, in place if the grid
    already matches (no new VTK objects per step, so views update cheaply)."""
    transform = node.GetTransformFromParent()
    grid = transform.GetDisplacementGrid() if isinstance(transform, slicer.vtkOrientedGridTransform) else None
    if grid is not None and tuple(grid.GetDimensions()) == tuple(geometry.size) and grid.GetScalarType() == vtk.VTK_FLOAT:
        geometry.displacement_voxels_to_ras(displacement_vox, out=slicer.util.arrayFromGridTransform(node))
        slicer.util.arrayFromGridTransformModified(node)
        return
    ijk_to_ras = _ijk_to_ras(geometry)
    image = vtk.vtkImageData()
    image.SetOrigin(*ijk_to_ras[:3, 3])
    image.SetSpacing(*geometry.spacing)
    image.SetDimensions(*geometry.size)
    image.AllocateScalars(vtk.VTK_FLOAT, 3)
    direction = np.eye(4)
    direction[:3, :3] = ijk_to_ras[:3, :3] / np.asarray(geometry.spacing)[None, :]
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(image)
    transform.SetGridDirectionMatrix(numpy_to_matrix(direction))
    transform.SetInterpolationModeToLinear()
    node.SetAndObserveTransformFromParent(transform)
    geometry.displacement_voxels_to_ras(displacement_vox, out=slicer.util.arrayFromGridTransform(node))
    slicer.util.arrayFromGridTransformModified(node)


def landmarks_ras(node) -> np.ndarray:
    """Control points of a markups node in RAS mm, ``[N, 3]`` (world coordinates: parent transforms applied)."""
    points = np.zeros((node.GetNumberOfControlPoints(), 3))
    for i in range(len(points)):
        node.GetNthControlPointPositionWorld(i, points[i])
    return points
