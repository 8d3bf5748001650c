"""Voxel-space conventions (iterreg.spatial) against independent references: scipy and analytic fields."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from iterreg.spatial import (compose, gaussian_smooth, identity_grid, integrate_velocity, invert_displacement,
                             jacobian_determinant, jacobian_matrix, largest_component, resize_displacement,
                             sample_displacement_at, warp, warp_labels)


def smooth_field(shape, magnitude, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, len(shape), *shape, generator=g, dtype=torch.float64)
    u = gaussian_smooth(u, max(shape) / 6)
    return u * (magnitude / u.abs().max())


def smooth_image(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return gaussian_smooth(torch.rand(1, 1, *shape, generator=g, dtype=torch.float64), 1.5)


def interior(a, margin):
    return a[tuple(slice(margin, n - margin) for n in a.shape)]


@pytest.mark.parametrize("shape", [(20, 24, 18), (32, 28)])
def test_warp_samples_moving_at_x_plus_u_like_scipy_map_coordinates(shape):
    image = smooth_image(shape)
    u = smooth_field(shape, 3.0)
    ours = warp(image, u)[0, 0].numpy()
    coords = (identity_grid(shape, dtype=torch.float64) + u)[0].numpy()
    # grid-constant: interpolate with zeros beyond the edge, which is grid_sample's padding_mode="zeros"
    reference = ndimage.map_coordinates(image[0, 0].numpy(), coords, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(ours, reference, atol=1e-10)


def test_warp_by_an_affine_field_matches_scipy_affine_transform_on_an_anisotropic_grid():
    shape = (16, 30, 22)
    image = smooth_image(shape)
    a = np.array([[0.05, 0.02, 0.0], [-0.03, 0.04, 0.01], [0.0, 0.02, -0.06]])
    b = np.array([0.7, -1.2, 0.4])
    x = identity_grid(shape, dtype=torch.float64)[0].numpy()
    u = np.einsum("ij,j...->i...", a, x) + b.reshape(3, 1, 1, 1)
    ours = warp(image, torch.from_numpy(u)[None])[0, 0].numpy()
    reference = ndimage.affine_transform(image[0, 0].numpy(), np.eye(3) + a, offset=b, order=1,
                                         mode="grid-constant")
    np.testing.assert_allclose(ours, reference, atol=1e-10)


def test_warp_labels_keeps_integer_labels():
    labels = torch.zeros(1, 1, 10, 10, 10, dtype=torch.int64)
    labels[..., 2:6, 3:7, 4:8] = 7
    out = warp_labels(labels, smooth_field((10, 10, 10), 1.5).float())
    assert out.dtype == torch.int64
    assert set(out.unique().tolist()) <= {0, 7}


def test_compose_equals_warping_twice():
    shape = (24, 20, 22)
    image = gaussian_smooth(smooth_image(shape), 2.0)
    image = image / image.max()
    outer, inner = smooth_field(shape, 2.0, 3), smooth_field(shape, 2.0, 4)
    twice = warp(warp(image, outer, padding_mode="border"), inner, padding_mode="border")
    once = warp(image, compose(outer, inner), padding_mode="border")
    # The two differ by one extra interpolation; compare away from the border.
    np.testing.assert_allclose(interior(twice[0, 0].numpy(), 4), interior(once[0, 0].numpy(), 4), atol=3e-3)


def test_compose_of_translations_adds_them():
    a = torch.full((1, 2, 8, 9), 0.0, dtype=torch.float64)
    a[:, 0], a[:, 1] = 1.5, -0.5
    b = torch.zeros_like(a)
    b[:, 0], b[:, 1] = -0.25, 2.0
    np.testing.assert_allclose(compose(a, b).numpy(), (a + b).numpy(), atol=1e-12)


def test_resize_displacement_rescales_an_affine_field_exactly():
    a = np.array([[0.1, 0.0, 0.02], [0.03, -0.05, 0.0], [0.0, 0.04, 0.08]])
    b = np.array([1.0, -2.0, 0.5])
    coarse_shape, fine_shape = (9, 11, 7), (17, 21, 13)
    # The same physical field expressed on each grid: x_fine = s * x_coarse with s = (n_f - 1) / (n_c - 1).
    s = np.array([(f - 1) / (c - 1) for f, c in zip(fine_shape, coarse_shape)])
    xc = identity_grid(coarse_shape, dtype=torch.float64)[0].numpy()
    u_coarse = np.einsum("ij,j...->i...", a, xc) + b.reshape(3, 1, 1, 1)
    xf = identity_grid(fine_shape, dtype=torch.float64)[0].numpy() / s.reshape(3, 1, 1, 1)
    u_fine_expected = (np.einsum("ij,j...->i...", a, xf) + b.reshape(3, 1, 1, 1)) * s.reshape(3, 1, 1, 1)
    u_fine = resize_displacement(torch.from_numpy(u_coarse)[None], fine_shape)[0].numpy()
    np.testing.assert_allclose(u_fine, u_fine_expected, atol=1e-10)


def test_largest_component_bounds_a_resized_field_without_resizing_it():
    u = torch.randn(1, 3, 9, 11, 7) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1, 1)
    fine = resize_displacement(u, (17, 21, 13))  # every coarse node is a fine node here: the bound is reached
    torch.testing.assert_close(largest_component(u, (17, 21, 13)), fine.abs().amax(dim=(0, 2, 3, 4)))
    odd = resize_displacement(u, (12, 16, 10))  # nodes between fine voxels: still an upper bound
    assert (odd.abs().amax(dim=(0, 2, 3, 4)) <= largest_component(u, (12, 16, 10)) + 1e-6).all()
    u[0, 1, 4, 5, 3] = float("nan")
    assert torch.isnan(largest_component(u, (17, 21, 13))[1])  # a diverged field is never bounded


def test_jacobian_determinant_of_an_affine_field_is_det_of_identity_plus_a():
    a = np.array([[0.2, 0.1, 0.0], [-0.1, -0.3, 0.05], [0.0, 0.1, 0.4]])
    x = identity_grid((8, 9, 10), dtype=torch.float64)[0].numpy()
    u = np.einsum("ij,j...->i...", a, x)
    det = jacobian_determinant(torch.from_numpy(u)[None])
    np.testing.assert_allclose(det.numpy(), np.linalg.det(np.eye(3) + a), rtol=1e-10)


@pytest.mark.parametrize("shape", [(12, 9), (10, 7, 8), (1, 9, 11)])
def test_jacobian_determinant_is_the_determinant_of_the_jacobian_matrix(shape):
    u = torch.randn(2, len(shape), *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    matrix = jacobian_matrix(u)
    assert matrix.shape == (2, *shape, len(shape), len(shape))
    torch.testing.assert_close(jacobian_determinant(u), torch.linalg.det(matrix))


def test_jacobian_determinant_is_negative_where_the_field_folds():
    u = torch.zeros(1, 2, 20, 20, dtype=torch.float64)
    u[0, 0, 8:12, :] = torch.tensor([0.0, 3.0, -3.0, 0.0]).view(4, 1)  # rows swap places: a fold
    assert (jacobian_determinant(u) <= 0).any()


def test_scaling_and_squaring_gives_an_invertible_map():
    v = smooth_field((24, 24, 24), 3.0, 5)
    forward, backward = integrate_velocity(v), integrate_velocity(-v)
    roundtrip = compose(forward, backward)
    assert float(interior(roundtrip[0].abs().amax(0).numpy(), 4).max()) < 0.05
    assert float(jacobian_determinant(forward).min()) > 0


def test_invert_displacement_recovers_the_inverse_of_a_smooth_field():
    u = integrate_velocity(smooth_field((24, 24), 2.5, 6))
    inverse = invert_displacement(u)
    assert float(interior(compose(u, inverse)[0].abs().amax(0).numpy(), 3).max()) < 0.02


def test_gaussian_smooth_matches_scipy_with_nearest_padding_and_keeps_constants():
    image = torch.rand(1, 1, 15, 16, 17, dtype=torch.float64)
    ours = gaussian_smooth(image, 1.3)[0, 0].numpy()
    reference = ndimage.gaussian_filter(image[0, 0].numpy(), 1.3, mode="nearest", truncate=4.0)
    np.testing.assert_allclose(interior(ours, 5), interior(reference, 5), atol=2e-3)
    const = torch.full((1, 3, 8, 8, 8), 2.5, dtype=torch.float64)
    np.testing.assert_allclose(gaussian_smooth(const, 2.0).numpy(), 2.5, atol=1e-12)


def test_sample_displacement_at_interpolates_linearly_between_voxels():
    u = identity_grid((6, 7), dtype=torch.float64) * 0.5  # u(x) = x / 2, linear: interpolation is exact
    points = torch.tensor([[1.25, 3.5], [4.0, 0.75]], dtype=torch.float64)
    np.testing.assert_allclose(sample_displacement_at(u, points).numpy(), points.numpy() * 0.5, atol=1e-12)


def test_update_norm_of_a_coarse_step_is_in_image_voxels():
    """A learned method iterating on a coarse grid reports its per-step change in voxels of the image grid:
    one working voxel of a 17-voxel grid spans two voxels of a 33-voxel grid."""
    from iterreg.spatial import rescale_voxel_vectors
    coarse = torch.zeros(1, 2, 17, 17)
    coarse[:, 1] = 1.0
    fine = rescale_voxel_vectors(coarse, (17, 17), (33, 33))
    assert torch.allclose(fine[:, 1], torch.full((1, 17, 17), 2.0)) and fine[:, 0].abs().max() == 0
    torch.testing.assert_close(fine, resize_displacement(coarse, (33, 33))[..., ::2, ::2])


def test_normalised_coordinates_put_minus_one_and_one_on_the_corner_voxel_centres():
    from iterreg.spatial import identity_grid, normalised_grid, normalised_to_voxels
    shape = (5, 9, 1)
    grid = normalised_grid(shape)
    assert float(grid[0, 0, 0, 0, 0]) == -1 and float(grid[0, 0, -1, 0, 0]) == 1 and float(grid[0, 2].abs().max()) == 0
    voxels = normalised_to_voxels(grid[0].movedim(0, -1), shape, points=True).movedim(-1, 0)[None]
    torch.testing.assert_close(voxels, identity_grid(shape))
    # a vector of 2 (corner to corner) spans n - 1 voxels
    torch.testing.assert_close(normalised_to_voxels(torch.tensor([2.0, 2.0, 2.0]), shape), torch.tensor([4.0, 8.0, 0.0]))


def test_the_grid_for_a_voxel_size_is_the_inverse_of_rescaling_the_spacing():
    from iterreg.spatial import rescale_spacing, shape_for_voxel_size
    shape, spacing = (21, 64, 64), (3.0, 1.0, 1.0)  # thick slices over 60 x 63 x 63 mm
    fine = shape_for_voxel_size(shape, spacing, 1.0)
    assert fine == (61, 64, 64)
    assert rescale_spacing(spacing, shape, fine) == [1.0, 1.0, 1.0]
    assert shape_for_voxel_size(shape, spacing, 2.0) == (31, 33, 33)  # nearest whole number of voxels
    assert shape_for_voxel_size((3, 3), (1.0, 1.0), 10.0) == (2, 2)  # never fewer than two voxels
