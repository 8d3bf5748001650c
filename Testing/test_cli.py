"""The command line: outputs that ITK/Slicer read back, and one clear line (and no files) for bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from iterreg.cli import main
from iterreg.sample_data import PAIR_FILES

from conftest import write


@pytest.fixture(scope="module")
def registered(sample_dir, tmp_path_factory):
    """One real run of the installed console script on the bundled pair, labels + landmarks + pictures."""
    out = tmp_path_factory.mktemp("cli") / "result"
    f = lambda key: str(sample_dir / PAIR_FILES[key])
    cmd = [sys.executable, "-m", "iterreg.cli", "register", f("fixed"), f("moving"), "--method", "classical",
           "--steps", "60", "--device", "cpu", "--out", str(out), "--fixed-labels", f("fixed_labels"),
           "--moving-labels", f("moving_labels"), "--fixed-landmarks", f("fixed_landmarks"),
           "--moving-landmarks", f("moving_landmarks"), "--pictures"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_register_writes_every_output_and_reports_dice_and_tre(registered):
    out, proc = registered
    assert {p.name for p in out.iterdir()} == {"warped.nii.gz", "displacement.nii.gz", "warped_labels.nii.gz",
                                               "metrics.jsonl", "summary.json", "steps.png", "steps.gif"}
    assert "Dice (mean)" in proc.stdout and "TRE mm" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["evaluation"]["before"], summary["evaluation"]["after"]
    assert after["dice_mean"] > before["dice_mean"] and after["tre_mean_mm"] < before["tre_mean_mm"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == summary["steps_run"] and json.loads(lines[0])["step"] == 0


def test_displacement_file_round_trips_through_simpleitk_to_the_warped_volume(registered, sample_dir):
    out, _ = registered
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    fixed = sitk.ReadImage(str(sample_dir / PAIR_FILES["fixed"]))
    moving = sitk.Cast(sitk.ReadImage(str(sample_dir / PAIR_FILES["moving"])), sitk.sitkFloat32)
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetSize() == fixed.GetSize()
    assert np.allclose(field.GetDirection(), fixed.GetDirection()) and np.allclose(field.GetOrigin(),
                                                                                   fixed.GetOrigin())
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    itk_warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    # identical except where ITK and grid_sample treat the outer half voxel differently
    inner = (slice(2, -2),) * 3
    assert np.abs(ours[inner] - itk_warped[inner]).max() < 1e-2 * np.abs(ours).max()


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture()
def images(tmp_path, small_pair):
    fixed = write(small_pair.fixed, tmp_path / "fixed.nii.gz")
    moving = write(small_pair.moving, tmp_path / "moving.nrrd")
    return tmp_path, fixed, moving


def bad_image(tmp_path, kind, small_pair):
    if kind == "missing":
        return str(tmp_path / "nope.nii.gz")
    if kind == "garbage":
        path = tmp_path / "garbage.nii.gz"
        path.write_bytes(b"this is not an image")
        return str(path)
    array = sitk.GetArrayFromImage(small_pair.moving).astype(np.float32)
    if kind == "nan":
        array[3, 3, 3] = np.nan
    elif kind == "constant":
        array[:] = 5
    elif kind == "2d":
        image = sitk.GetImageFromArray(array[20])
        return write(image, tmp_path / "slice.nii.gz")
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(small_pair.moving)
    if kind == "far away":
        image.SetOrigin((5000.0, 5000.0, 5000.0))
    # .mha: ITK's NIfTI IO silently turns NaN into 0, MetaImage keeps it
    return write(image, tmp_path / f"{kind.replace(' ', '_')}.mha")


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"), ("garbage", "could not be read"), ("nan", "NaN or infinite"),
    ("constant", "constant"), ("2d", "3D but moving image is 2D"), ("far away", "do not overlap"),
])
def test_bad_moving_image_exits_2_with_one_line_and_writes_nothing(kind, message, images, small_pair, capsys):
    tmp_path, fixed, _ = images
    out = tmp_path / "out"
    code, err = run_cli(["register", fixed, bad_image(tmp_path, kind, small_pair), "--out", str(out),
                         "--quiet"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("iterreg: error:") and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--method", "nonsense"], "unknown method 'nonsense'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--steps", "0"], "1 to 5000 steps"),
    (["--option", "similarity=ssd"], "unknown similarity"),
    (["--fixed-labels", "x.nii.gz"], "both --fixed-labels and --moving-labels"),
])
def test_bad_options_exit_2_with_one_line_and_writes_nothing(args, message, images, capsys):
    tmp_path, fixed, moving = images
    out = tmp_path / "out"
    code, err = run_cli(["register", fixed, moving, "--out", str(out), "--quiet", *args], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without GPU")
def test_asking_for_a_gpu_that_is_not_there_says_so(images, capsys):
    tmp_path, fixed, moving = images
    code, err = run_cli(["register", fixed, moving, "--out", str(tmp_path / "o"), "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA GPU is available" in err[0] and "--device cpu" in err[0]


def test_outside_landmark_is_named(images, tmp_path, capsys, small_pair):
    _, fixed, moving = images
    from iterreg.landmarks import write_markups_json
    points = small_pair.fixed_landmarks_ras.copy()
    write_markups_json(tmp_path / "m.mrk.json", small_pair.moving_landmarks_ras)
    points[2] = [900.0, 0.0, 0.0]
    write_markups_json(tmp_path / "f.mrk.json", points, [f"L{i}" for i in range(len(points))])
    code, err = run_cli(["register", fixed, moving, "--out", str(tmp_path / "o"), "--fixed-landmarks",
                         str(tmp_path / "f.mrk.json"), "--moving-landmarks", str(tmp_path / "m.mrk.json")], capsys)
    assert code == 2 and "fixed landmark 'L2' lies outside the image" in err[0]


def test_existing_output_folder_keeps_unrelated_files_and_no_staging_folder_is_left(images, capsys):
    tmp_path, fixed, moving = images
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["register", fixed, moving, "--out", str(out), "--method", "identity", "--quiet"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and "warped.nii.gz" in names
    assert not [n for n in names if n.startswith(".")]


def test_the_methods_ready_for_3d_images_are_those_with_a_3d_checkpoint_or_none_needed():
    # what the demo (a 3D sample pair) and the 3D benchmarks run
    from iterreg.methods import ready_methods
    from iterreg.resources import default_checkpoint
    ready = ready_methods(3)
    assert {"identity", "classical", "voxelmorph", "riir", "deqreg", "iirp", "dio", "r2n2"} <= set(ready)
    assert default_checkpoint("voxelmorph", 3) is not None and default_checkpoint("voxelmorph", 2) is None
    assert "voxelmorph" not in ready_methods(2)  # its only bundled checkpoint is 3D


def test_methods_lists_identity_and_classical(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "identity" in listing and "classical" in listing


def test_a_saved_result_is_refined_with_landmark_prompts_from_the_command_line(registered, sample_dir, tmp_path,
                                                                              capsys):
    """--init continues an earlier run's displacement.nii.gz; with --prompt the landmarks pull it closer."""
    first, _ = registered
    f = lambda key: str(sample_dir / PAIR_FILES[key])  # noqa: E731
    start = json.loads((first / "summary.json").read_text())["evaluation"]["after"]["tre_mean_mm"]
    code = main(["register", f("fixed"), f("moving"), "--method", "classical", "--steps", "30", "--device", "cpu",
                 "--out", str(tmp_path / "refined"), "--fixed-landmarks", f("fixed_landmarks"),
                 "--moving-landmarks", f("moving_landmarks"), "--prompt", "--init",
                 str(first / "displacement.nii.gz"), "--quiet"])
    assert code == 0
    summary = json.loads((tmp_path / "refined" / "summary.json").read_text())["evaluation"]
    assert summary["start"]["tre_mean_mm"] == pytest.approx(start, abs=1e-3)  # it started where the run ended
    assert summary["after"]["tre_mean_mm"] < start
    assert "at the start field" in capsys.readouterr().out


def test_a_starting_field_on_another_grid_is_refused(images, tmp_path, capsys):
    _, fixed, moving = images
    wrong = sitk.Image([5, 5, 5], sitk.sitkVectorFloat32, 3)
    sitk.WriteImage(wrong, str(tmp_path / "field.nii.gz"))
    code, err = run_cli(["register", fixed, moving, "--out", str(tmp_path / "o"), "--init",
                         str(tmp_path / "field.nii.gz")], capsys)
    assert code == 2 and "not on the fixed image's grid" in err[0]
    assert not (tmp_path / "o").exists()
