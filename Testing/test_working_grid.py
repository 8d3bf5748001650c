"""The working grid a network iterates on: cubic voxels in mm, whatever the scan's voxels are.

Our networks learned on isotropic grids and their kernels count voxels, so a thick-slice scan is brought to
cubic working voxels (Docs/benchmarks.md, 'thick-slices', measures what that gains); ``working_voxels=image``
keeps the image's voxel aspect, the behaviour before.
"""
import numpy as np
import pytest
import SimpleITK as sitk

from iterreg.errors import InputError
from iterreg.imaging import prepare_pair
from iterreg.methods import get_method
from iterreg.methods import learned
from iterreg.methods.learned import working_shape
from iterreg.spatial import rescale_spacing

WORKING_GRID_METHODS = ["riir", "deqreg", "iirp", "r2n2", "dio"]


@pytest.mark.parametrize("shape", [(128, 128, 128), (160, 192, 128), (64, 48, 40), (30, 30, 30)])
def test_isotropic_scans_get_the_same_working_grid_as_before(shape):
    for size in (16, 32, 64):
        assert working_shape(shape, size=size, spacing=(1.5,) * 3) == working_shape(shape, size=size)


def test_a_thick_slice_scan_gets_cubic_working_voxels_and_more_working_slices_than_it_has():
    shape, spacing = (43, 128, 128), (4.5, 1.5, 1.5)  # 1.5 mm pixels, 4.5 mm slices
    grid = working_shape(shape, size=64, spacing=spacing)
    assert grid == (64, 64, 64)
    voxels = rescale_spacing(spacing, shape, grid)
    assert max(voxels) / min(voxels) < 1.02
    assert working_shape(shape, size=64) == (22, 64, 64)  # the image's voxel aspect: 8.8 mm working slices


def test_the_working_grid_is_never_finer_than_the_scans_finest_voxels():
    assert working_shape((40, 40, 40), size=64, spacing=(2.0, 2.0, 2.0)) == (40, 40, 40)
    thin = working_shape((12, 48, 48), size=64, spacing=(3.0, 1.0, 1.0))
    assert thin == (36, 48, 48)  # 12 slices of 3 mm: 36 mm in 1 mm working voxels


def _thick_slice_pair():
    rng = np.random.default_rng(0)
    images = []
    for shift in (0, 2):
        array = np.zeros((11, 32, 32), np.float32)  # array order: slices, rows, columns
        array[2:9, 8 + shift:24 + shift, 6:22] = 1.0
        array += 0.05 * rng.standard_normal(array.shape).astype(np.float32)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 3.0))  # ITK order: 1 mm pixels, 3 mm slices
        images.append(image)
    return prepare_pair(*images)


@pytest.mark.parametrize("method", WORKING_GRID_METHODS)
@pytest.mark.parametrize("voxels, expected", [("isotropic", (32, 31, 31)), ("image", (11, 32, 32))])
def test_every_network_method_iterates_on_the_working_grid_the_option_asks_for(method, voxels, expected,
                                                                             monkeypatch):
    grids = []
    original = learned.working_shape
    monkeypatch.setattr(learned, "working_shape", lambda *a, **k: grids.append(original(*a, **k)) or grids[-1])
    instance = get_method(method).create(ndim=3, options={"working_size": 32, "working_voxels": voxels})
    steps = list(instance.run_pair(_thick_slice_pair(), 4))  # IIRP-Net: one pass per pyramid level
    assert grids == [expected]
    assert tuple(steps[-1].displacement.shape) == (1, 3, 11, 32, 32)  # results stay on the scan's grid


def test_an_unknown_working_voxel_rule_is_refused_with_the_choices():
    with pytest.raises(InputError, match="working_voxels must be one of .*isotropic.*image"):
        get_method("riir").create(ndim=3, options={"working_voxels": "cubic"})


def test_r2n2_refuses_a_working_grid_too_small_for_its_deepest_level_and_runs_on_the_smallest_it_can():
    pair = _thick_slice_pair()
    with pytest.raises(InputError, match=r"working grid 16x16x16 is too small for r2n2.*working_size to at least 32"):
        list(get_method("r2n2").create(ndim=3, options={"working_size": 16}).run_pair(pair, 1))
    steps = list(get_method("r2n2").create(ndim=3, options={"working_size": 18}).run_pair(pair, 1))
    assert tuple(steps[-1].displacement.shape) == (1, 3, 11, 32, 32)
