"""Physical-space conventions (iterreg.geometry) against SimpleITK, on oblique and anisotropic grids."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from iterreg.geometry import Geometry
from iterreg.imaging import prepare_pair
from iterreg.spatial import gaussian_smooth, resize_displacement, warp


def rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE_3D = Geometry((22, 18, 14), (0.8, 1.1, 2.5), (12.0, -30.0, 5.0), tuple(rotation(0.3, -0.2, 0.5).ravel()))
LEFT_HANDED_3D = Geometry((12, 14, 10), (1.0, 1.0, 3.0), (-5.0, 2.0, 1.0),
                          tuple((np.diag([1.0, -1.0, 1.0]) @ rotation(0.1, 0.2, 0.0)).ravel()))
OBLIQUE_2D = Geometry((30, 24), (0.7, 1.9), (3.0, -4.0), (np.cos(0.4), -np.sin(0.4), np.sin(0.4), np.cos(0.4)))


def random_image(geometry: Geometry, seed=0) -> sitk.Image:
    g = torch.Generator().manual_seed(seed)
    array = gaussian_smooth(torch.rand(1, 1, *geometry.array_shape, generator=g, dtype=torch.float64), 1.5)
    return geometry.apply_to(sitk.GetImageFromArray(array[0, 0].numpy()))


@pytest.mark.parametrize("geometry", [OBLIQUE_3D, LEFT_HANDED_3D, OBLIQUE_2D])
def test_voxel_to_lps_matches_simpleitk_and_round_trips(geometry):
    image = geometry.reference_image()
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (20, geometry.ndim)) * (np.array(geometry.array_shape) - 1)
    lps = geometry.array_index_to_lps(points)
    expected = [image.TransformContinuousIndexToPhysicalPoint(tuple(p[::-1])) for p in points]
    np.testing.assert_allclose(lps, expected, atol=1e-9)
    np.testing.assert_allclose(geometry.lps_to_array_index(lps), points, atol=1e-9)
    np.testing.assert_allclose(geometry.ras_to_array_index(geometry.array_index_to_ras(points)), points, atol=1e-9)


def test_ras_is_lps_with_x_and_y_negated():
    p = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(OBLIQUE_3D.array_index_to_ras(p), OBLIQUE_3D.array_index_to_lps(p) * [-1, -1, 1])
    ijk1 = np.array([3.0, 2.0, 1.0, 1.0])
    np.testing.assert_allclose((OBLIQUE_3D.ijk_to_ras_matrix() @ ijk1)[:3], OBLIQUE_3D.array_index_to_ras(p)[0])


@pytest.mark.parametrize("geometry", [OBLIQUE_3D, LEFT_HANDED_3D, OBLIQUE_2D])
def test_displacement_field_file_resamples_like_our_warp(geometry):
    """The ITK displacement field we write makes SimpleITK resample exactly what our warp computes."""
    moving = random_image(geometry, 1)
    g = torch.Generator().manual_seed(2)
    u = gaussian_smooth(torch.randn(1, geometry.ndim, *geometry.array_shape, generator=g, dtype=torch.float64), 3)
    u = u * (2.0 / u.abs().max())
    ours = warp(torch.from_numpy(sitk.GetArrayFromImage(moving))[None, None], u)[0, 0].numpy()

    field_image = geometry.displacement_to_sitk(u[0].numpy())
    transform = sitk.DisplacementFieldTransform(sitk.Image(field_image))
    reference = sitk.GetArrayFromImage(sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0))
    # Beyond the outermost voxel centres ITK and grid_sample treat the border differently (edge half-voxel):
    # compare wherever x + u(x) stays inside the image.
    points = np.indices(geometry.array_shape) + u[0].numpy()
    inside = np.all([(p >= 0) & (p <= n - 1) for p, n in zip(points, geometry.array_shape)], axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], reference[inside], atol=1e-6)

    back, back_geometry = Geometry.displacement_from_sitk(field_image)
    np.testing.assert_allclose(back, u[0].numpy(), atol=1e-9)
    assert back_geometry.same_grid(geometry)


def test_displacement_voxels_to_ras_and_back():
    u = np.random.default_rng(3).normal(size=(3, *OBLIQUE_3D.array_shape))
    ras = OBLIQUE_3D.displacement_voxels_to_ras(u)
    assert ras.shape == (*OBLIQUE_3D.array_shape, 3)
    np.testing.assert_allclose(OBLIQUE_3D.displacement_ras_to_voxels(ras), u, atol=1e-9)
    # One voxel along array axis 0 (= ITK k) is spacing_k mm along the third direction column.
    unit = np.zeros((3, *OBLIQUE_3D.array_shape))
    unit[0] = 1.0
    lps = OBLIQUE_3D.displacement_voxels_to_lps(unit)[0, 0, 0]
    np.testing.assert_allclose(lps, OBLIQUE_3D.direction_matrix[:, 2] * OBLIQUE_3D.spacing[2], atol=1e-12)


def test_prepare_pair_resamples_moving_onto_the_fixed_grid_in_physical_space():
    fixed = random_image(OBLIQUE_3D, 4)
    moving_geometry = Geometry((30, 30, 30), (1.0, 1.0, 1.0), (-5.0, -45.0, -20.0))
    moving = random_image(moving_geometry, 5)
    pair = prepare_pair(fixed, moving)
    expected = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0))
    np.testing.assert_allclose(pair.moving_raw_on_fixed, expected, atol=1e-5)
    assert pair.fixed.shape == (1, 1, *OBLIQUE_3D.array_shape)
    assert 0.0 <= float(pair.fixed.min()) and float(pair.fixed.max()) <= 1.0
    assert pair.notes  # the resampling is recorded


def test_scaled_geometry_agrees_with_resized_displacement_in_millimetres():
    """A field resized to a coarser grid describes the same physical displacement (align_corners)."""
    x = np.indices(OBLIQUE_3D.array_shape).astype(float)
    u = np.stack([0.02 * x[1], -0.03 * x[2], 0.05 * x[0]])  # linear, so resizing is exact
    coarse_shape = (7, 9, 11)
    coarse = OBLIQUE_3D.scaled_to_shape(coarse_shape)
    u_coarse = resize_displacement(torch.from_numpy(u)[None], coarse_shape)[0].numpy()
    mm_fine = OBLIQUE_3D.displacement_voxels_to_lps(u)[0, 0, 0]
    mm_coarse = coarse.displacement_voxels_to_lps(u_coarse)[0, 0, 0]
    np.testing.assert_allclose(mm_coarse, mm_fine, atol=1e-9)
    np.testing.assert_allclose(coarse.array_index_to_lps(np.array([[6.0, 8.0, 10.0]])),
                               OBLIQUE_3D.array_index_to_lps(np.array(OBLIQUE_3D.array_shape, float)[None] - 1),
                               atol=1e-9)


def test_ras_vectors_written_into_a_float32_buffer_match_the_lps_definition():
    direction = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]).ravel()
    geometry = Geometry((5, 4, 3), (1.2, 0.7, 2.0), (1.0, 2.0, 3.0), tuple(direction))
    u = np.random.default_rng(0).standard_normal((3, *geometry.array_shape))
    expected = geometry.displacement_voxels_to_lps(u) @ np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(geometry.displacement_voxels_to_ras(u), expected, atol=1e-12)
    buffer = np.empty((*geometry.array_shape, 3), np.float32)
    assert geometry.displacement_voxels_to_ras(u, out=buffer) is buffer
    np.testing.assert_allclose(buffer, expected, atol=1e-5)


def test_the_moving_image_on_its_own_grid_read_through_its_index_map_is_the_resampled_moving():
    """prepare_pair keeps a moving image on another grid as it is, with the map from fixed voxels to its voxels
    (for DIO's features on the moving grid); read through that map it is the moving image on the fixed grid."""
    from iterreg.spatial import sample_through_index_map
    fixed = random_image(OBLIQUE_3D, 4)
    moving_geometry = Geometry((24, 26, 9), (1.0, 1.2, 3.0), (-2.0, -40.0, -12.0),
                               tuple(rotation(0.05, 0.1, -0.2).ravel()))
    moving = random_image(moving_geometry, 5)
    pair = prepare_pair(fixed, moving)
    own = pair.moving_own_grid
    assert own.image.shape == (1, 1, *moving_geometry.array_shape)
    index_map = torch.as_tensor(own.fixed_to_own_index)
    raw = torch.from_numpy(sitk.GetArrayFromImage(moving))[None, None]  # raw: clipping is not linear
    carried = sample_through_index_map(raw, index_map, OBLIQUE_3D.array_shape)
    points = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in OBLIQUE_3D.array_shape],
                                        indexing="ij")).reshape(3, -1)
    mapped = index_map[:3, :3] @ points + index_map[:3, 3:]
    inside = ((mapped >= 0) & (mapped <= torch.tensor(moving_geometry.array_shape)[:, None] - 1)).all(0)
    assert int(inside.sum()) > 500  # the grids overlap enough for the comparison to mean something
    np.testing.assert_allclose(carried.flatten()[inside], pair.moving_raw_on_fixed.flatten()[inside], atol=1e-5)
    assert prepare_pair(fixed, random_image(OBLIQUE_3D, 6)).moving_own_grid is None  # one grid: nothing kept
