"""The grids methods work on for a scan with thick slices.

Networks: cubic voxels in mm by default. Our networks learned on isotropic grids and their kernels count voxels, so
a thick-slice scan is brought to cubic working voxels; ``working_voxels=image`` keeps the image's voxel aspect,
the behaviour before. The classical optimizer: the scan's own grid by default; ``working_voxels=isotropic`` runs
every pyramid level on cubic voxels, the finest at the scan's finest voxel size. Docs/benchmarks.md,
'thick-slices', measures what each gains.
"""
import numpy as np
import pytest
import SimpleITK as sitk

from iterreg.errors import InputError
from iterreg.imaging import prepare_pair
from iterreg.methods import get_method
from iterreg.methods import learned
from iterreg.methods.classical import ClassicalMethod, level_shape
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


def test_the_classical_pyramid_is_the_same_on_isotropic_scans_under_both_rules():
    for shape in [(128, 128, 128), (61, 47, 33)]:
        for factor in (1, 2, 4):
            assert level_shape(shape, factor, (1.5,) * 3) == level_shape(shape, factor, None)


def test_the_classical_optimizer_on_cubic_voxels_works_on_the_finest_voxel_everywhere_and_answers_on_the_scan():
    pair = _thick_slice_pair()  # 11 slices of 3 mm, 32 x 32 pixels of 1 mm
    seen = []
    for voxels in ("image", "isotropic"):
        method = get_method("classical").create(options={"working_voxels": voxels, "levels": [2, 1],
                                                         "level_share": [0.5, 0.5]})
        original = method.level_shape
        method.level_shape = lambda *a: seen.append((voxels, tuple(original(*a)))) or seen[-1][1]
        steps = list(method.run_pair(pair, 4))
        assert tuple(steps[-1].displacement.shape) == (1, 3, 11, 32, 32)
    assert seen == [("image", (6, 16, 16)), ("image", (11, 32, 32)),
                    ("isotropic", (17, 16, 16)), ("isotropic", (33, 32, 32))]


def test_the_memory_check_counts_the_classical_optimizers_cubic_voxels(monkeypatch):
    from iterreg import memory_budget
    monkeypatch.setattr(memory_budget, "available_bytes", lambda device: None)  # the estimate, on any machine
    thick = ((128, 128, 26), (1.5, 1.5, 7.5))  # ITK order, as the headers give it
    assert ClassicalMethod.grid_voxels_per_image_voxel({}, *thick) == 1.0
    assert ClassicalMethod.grid_voxels_per_image_voxel({"working_voxels": "isotropic"}, *thick) == 5.0
    assert get_method("riir").grid_voxels_per_image_voxel({"working_voxels": "isotropic"}, *thick) == 1.0
    plain = memory_budget.check_memory(ClassicalMethod, thick[0], thick[0], "cpu", {}, thick[1])
    cubic = memory_budget.check_memory(ClassicalMethod, thick[0], thick[0], "cpu", {"working_voxels": "isotropic"},
                                       thick[1])
    assert cubic > 4 * plain
