"""Sample data: real MNI anatomy deformed by known, reproducible, diffeomorphic fields."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from iterreg.geometry import Geometry
from iterreg.metrics import dice, folding_percent
from iterreg.sample_data import LABEL_NAMES, make_pair, make_series, make_slice_pair
from iterreg.spatial import sample_displacement_at, warp, warp_labels


def arr(image):
    return sitk.GetArrayFromImage(image).astype(np.float64)


def test_ground_truth_field_registers_moving_onto_fixed(small_pair):
    fixed = torch.from_numpy(arr(small_pair.fixed))[None, None]
    moving = torch.from_numpy(arr(small_pair.moving))[None, None]
    truth = torch.from_numpy(small_pair.ground_truth.astype(np.float64))[None]
    labels_f = sitk.GetArrayFromImage(small_pair.fixed_labels)
    labels_m = torch.from_numpy(sitk.GetArrayFromImage(small_pair.moving_labels).astype(np.int64))[None, None]
    before = dice(labels_f, labels_m[0, 0].numpy())["mean"]
    after = dice(labels_f, warp_labels(labels_m, truth)[0, 0].numpy())["mean"]
    assert after > before + 0.05 and after > 0.8


def test_ground_truth_magnitude_and_diffeomorphism(small_pair):
    spacing = small_pair.fixed.GetSpacing()[0]
    peak_mm = float(np.linalg.norm(small_pair.ground_truth, axis=0).max()) * spacing
    assert abs(peak_mm - 10.0) < 0.05
    assert folding_percent(torch.from_numpy(small_pair.ground_truth)[None]) == 0.0


def test_landmark_pairs_follow_the_ground_truth(small_pair):
    geometry = Geometry.of(small_pair.fixed)
    fixed_vox = torch.tensor(geometry.ras_to_array_index(small_pair.fixed_landmarks_ras), dtype=torch.float32)
    mapped = fixed_vox + sample_displacement_at(torch.from_numpy(small_pair.ground_truth)[None], fixed_vox)
    np.testing.assert_allclose(geometry.array_index_to_ras(mapped.numpy()), small_pair.moving_landmarks_ras,
                               atol=1e-4)
    assert len(small_pair.fixed_landmarks_ras) == 10
    assert geometry.contains_array_index(fixed_vox.numpy()).all()


def test_pairs_are_reproducible_per_seed_and_differ_between_seeds():
    a, b, c = make_pair(24, seed=7), make_pair(24, seed=7), make_pair(24, seed=8)
    np.testing.assert_array_equal(arr(a.moving), arr(b.moving))
    assert np.abs(arr(a.moving) - arr(c.moving)).max() > 10


def test_labels_are_background_csf_grey_and_white_matter(small_pair):
    assert set(np.unique(sitk.GetArrayFromImage(small_pair.fixed_labels))) == {0, *LABEL_NAMES}


def test_bundled_sample_pair_is_what_the_generator_makes(sample_pair):
    regenerated = make_pair(64, seed=0)
    np.testing.assert_allclose(arr(sample_pair.moving), arr(regenerated.moving), atol=1)
    np.testing.assert_allclose(sample_pair.fixed_landmarks_ras, regenerated.fixed_landmarks_ras, atol=1e-3)
    assert sample_pair.fixed.GetSize() == (64, 64, 64)


def test_slice_pairs_and_series_are_2d():
    pair = make_slice_pair(size=48, seed=1)
    assert pair.fixed.GetDimension() == 2 and pair.ground_truth.shape == (2, 48, 48)
    series = make_series(size=48, frames=8, seed=2)
    assert len(series["frames"]) == 8 and series["frames"][0].GetDimension() == 2
    # frame 0 is undeformed and frames move away from it and back (periodic motion)
    norms = [float(np.abs(u).max()) for u in series["ground_truth"]]
    assert norms[0] < 1e-6 and max(norms) > 1.0
    # the ground truth registers the peak frame (t = 2 of 8) back onto frame 0: its labels line up again
    labels0 = sitk.GetArrayFromImage(series["labels"][0])
    labels2 = torch.from_numpy(sitk.GetArrayFromImage(series["labels"][2]).astype(np.int64))[None, None]
    truth2 = torch.from_numpy(series["ground_truth"][2].astype(np.float64))[None]
    before = dice(labels0, labels2[0, 0].numpy())["mean"]
    after = dice(labels0, warp_labels(labels2, truth2)[0, 0].numpy())["mean"]
    assert after > before + 0.05


def test_a_local_motion_moves_one_region_and_its_landmarks_lie_there():
    pair = make_slice_pair(size=64, seed=3, magnitude_mm=6.0, region_mm=12.0)
    spacing = pair.fixed.GetSpacing()[0]
    truth_mm = np.linalg.norm(pair.ground_truth, axis=0) * spacing
    centre = np.array(pair.info["region_centre_index"])
    distance_mm = np.linalg.norm(np.indices(truth_mm.shape) - centre[:, None, None], axis=0) * spacing
    assert truth_mm.max() == pytest.approx(6.0, rel=0.02)
    assert truth_mm[distance_mm > 4 * 12.0].max() < 0.05  # still far away (the window is 12 mm wide)
    landmark_voxels = pair.geometry.ras_to_array_index(pair.fixed_landmarks_ras[:, :2])
    assert np.linalg.norm(landmark_voxels - centre, axis=1).max() * spacing < 1.2 * 12.0  # window > 0.5
    # the default pair is the global one, as before
    assert "region_mm" not in make_slice_pair(size=64, seed=3).info


def test_a_coarser_acquisition_keeps_its_origin_and_its_extent_to_a_whole_coarse_voxel(small_pair):
    from iterreg.sample_data import on_coarser_grid
    thick = on_coarser_grid(small_pair.moving, (1, 1, 3))
    assert thick.GetSpacing()[2] == pytest.approx(3 * small_pair.moving.GetSpacing()[2])
    assert thick.GetSize()[:2] == small_pair.moving.GetSize()[:2]
    assert thick.GetSize()[2] == round(small_pair.moving.GetSize()[2] / 3)
    assert thick.GetOrigin() == small_pair.moving.GetOrigin()
    labels = on_coarser_grid(small_pair.moving_labels, (2, 2, 3), labels=True)
    assert set(np.unique(sitk.GetArrayFromImage(labels))) <= set(np.unique(
        sitk.GetArrayFromImage(small_pair.moving_labels)))  # nearest neighbour: no new label values
    with pytest.raises(ValueError, match="factors >= 1"):
        on_coarser_grid(small_pair.moving, (1, 1, 0.5))


def test_the_bundled_afids_pair_into_32_named_landmarks_inside_the_mni_template():
    """The real-pair benchmark's landmarks (AFIDs, Resources/SampleData/afids): both files give the same 32
    anatomical points, paired by label, and the MNI152 ones lie inside the template's brain."""
    from iterreg.landmarks import pair_landmarks
    from iterreg.sample_data import mni_template
    from real_pair import FIXED_AFIDS, MOVING_AFIDS, read_afids
    fixed, fixed_labels, names = read_afids(FIXED_AFIDS)
    moving, moving_labels, moving_names = read_afids(MOVING_AFIDS)
    assert len(fixed) == len(moving) == 32 and names == moving_names and names[:2] == ["AC", "PC"]
    fixed_ras, moving_ras, _ = pair_landmarks((fixed, fixed_labels), (moving, moving_labels))
    assert 0 < float(np.linalg.norm(fixed_ras - moving_ras, axis=1).mean()) < 10  # two brains in one space
    t1, labels = mni_template(64)
    geometry = Geometry.of(t1)
    voxels = np.round(geometry.ras_to_array_index(fixed_ras)).astype(int)
    assert (sitk.GetArrayFromImage(labels)[tuple(voxels.T)] > 0).all()
