"""Property-based checks of the spatial conventions (hypothesis): they hold for any geometry and any smooth field,
not only for the examples the other tests pick.

Specification: voxel <-> RAS mapping round-trips and agrees with SimpleITK for random spacings, origins and
(oblique, left-handed) directions; a resampled grid keeps every physical position; warping by u and then by the
inverse of u gives the image back; composing three smooth fields is associative within interpolation error.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iterreg.geometry import Geometry
from iterreg.spatial import compose, gaussian_smooth, invert_displacement, rescale_voxel_points, warp

# derandomize: CI draws the same examples on every run, so a failure is a regression, never the luck of the draw
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def geometries(draw):
    """A 3D grid with any spacing, origin and orientation, right- or left-handed."""
    size = tuple(draw(st.integers(2, 40)) for _ in range(3))
    spacing = tuple(draw(st.floats(0.2, 5.0)) for _ in range(3))
    origin = tuple(draw(st.floats(-300.0, 300.0)) for _ in range(3))
    seed = draw(st.integers(0, 2**31 - 1))
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    if draw(st.booleans()):
        rotation[:, 0] *= -1  # a left-handed grid (a flipped axis), as some scanners write
    return Geometry(size, spacing, origin, tuple(rotation.ravel()))


def smooth_field(seed: int, magnitude: float, sigma: float, shape=(24, 24, 24)) -> torch.Tensor:
    """A random smooth displacement (voxels) whose largest component is ``magnitude``."""
    generator = torch.Generator().manual_seed(seed)
    field = gaussian_smooth(torch.randn(1, 3, *shape, generator=generator), sigma)
    return field * (magnitude / field.abs().max())


INTERIOR = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))  # away from border effects


@SETTINGS
@given(geometry=geometries(), fraction=st.lists(st.floats(0, 1), min_size=3, max_size=3))
def test_voxel_and_ras_round_trip_and_agree_with_simpleitk(geometry, fraction):
    index = np.array([[f * (n - 1) for f, n in zip(fraction, geometry.array_shape)]])  # array order
    ras = geometry.array_index_to_ras(index)
    np.testing.assert_allclose(geometry.ras_to_array_index(ras), index, atol=1e-6)
    image = geometry.reference_image()
    lps = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index[0][::-1]])  # ITK order
    np.testing.assert_allclose(ras[0], [-lps[0], -lps[1], lps[2]], atol=1e-6)


@SETTINGS
@given(geometry=geometries(), fraction=st.lists(st.floats(0, 1), min_size=3, max_size=3),
       new=st.lists(st.integers(2, 30), min_size=3, max_size=3))
def test_a_resampled_grid_keeps_every_physical_position(geometry, fraction, new):
    index = torch.tensor([[f * (n - 1) for f, n in zip(fraction, geometry.array_shape)]], dtype=torch.float64)
    coarse = geometry.scaled_to_shape(new)
    moved = rescale_voxel_points(index, geometry.array_shape, coarse.array_shape)
    np.testing.assert_allclose(coarse.array_index_to_ras(moved.numpy()), geometry.array_index_to_ras(index.numpy()),
                               atol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_warping_by_a_field_and_then_by_its_inverse_gives_the_image_back(seed):
    u = smooth_field(seed, magnitude=3.0, sigma=3.0)
    inverse = invert_displacement(u)
    # x -> x + u(x) followed by its inverse is the identity, far better than the first-order guess -u
    error = float(compose(inverse, u)[INTERIOR].abs().mean())
    assert error < 0.01 and error < 0.6 * float(compose(-u, u)[INTERIOR].abs().mean())
    # On a smooth image the round trip is then exact up to two linear interpolations: < 2 % of the contrast
    # (measured <= 0.9 % over 100 seeds)
    image = gaussian_smooth(torch.rand(1, 1, 24, 24, 24, generator=torch.Generator().manual_seed(seed + 1)), 3.0)
    contrast = float(image.max() - image.min())
    round_trip = warp(warp(image, inverse), u)
    assert float((round_trip - image)[INTERIOR].abs().max()) < 0.02 * contrast


@SETTINGS
@given(seeds=st.tuples(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 10_000)))
def test_composition_is_associative_within_interpolation_error(seeds):
    a, b, c = (smooth_field(s, magnitude=2.0, sigma=2.5) for s in seeds)
    # (a o b) o c = a o (b o c) to a few thousandths of a voxel; the wrong order, (b o a) o c, is ~0.01 off
    assert float((compose(compose(a, b), c) - compose(a, compose(b, c)))[INTERIOR].abs().mean()) < 0.005
