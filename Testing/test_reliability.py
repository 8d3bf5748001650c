"""Reliability: bad inputs and faults that all end well (Docs/reliability.md is the catalogue).

Specification: every case ends with one clear message that names the problem and what to do (or, where the
input is unusual but valid, with a correct result); nothing in the user's folders or scene is lost or
half-written; no process, shared-memory block or job folder is left behind. The cases here complement those
in test_cli, test_worker, test_slicer_logic, test_panel and test_training, which the catalogue also lists.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from iterreg.cli import main
from iterreg.errors import InputError
from iterreg.landmarks import write_markups_json

from conftest import write

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "Resources" / "Checkpoints"


def run_cli(args, capsys) -> tuple[int, list[str]]:
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture()
def images(tmp_path, small_pair):
    return tmp_path, write(small_pair.fixed, tmp_path / "fixed.nii.gz"), write(small_pair.moving, tmp_path / "m.nrrd")


def only_error_line(code: int, err: list[str], expected_code: int, *fragments: str) -> None:
    assert code == expected_code, err
    assert len(err) == 1 and err[0].startswith("iterreg: error:"), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


def no_leftovers(folder: Path) -> None:
    """No staging folder or temporary file anywhere below ``folder``."""
    hidden = [p for p in folder.rglob(".*")]
    assert not hidden, hidden


# --- images that are unusual but valid: a correct result ----------------------------------------------------
def rotated(image: sitk.Image, degrees: float, flip_axis: int | None = None, labels: bool = False) -> sitk.Image:
    """The same physical image on an oblique (and, with ``flip_axis``, left-handed) grid, large enough to hold
    all of it."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    rotation = rotation @ np.array([[1, 0, 0], [0, np.cos(angle / 2), -np.sin(angle / 2)],
                                    [0, np.sin(angle / 2), np.cos(angle / 2)]])
    if flip_axis is not None:
        rotation[:, flip_axis] *= -1
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    size = [int(n * 1.5) for n in image.GetSize()]
    spacing = np.array(image.GetSpacing())
    origin = np.array(centre) - rotation @ (spacing * (np.array(size) - 1) / 2)
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing(tuple(spacing))
    reference.SetDirection(tuple(rotation.ravel()))
    reference.SetOrigin(tuple(origin))
    if labels:
        return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def test_oblique_and_left_handed_grids_register_in_physical_space(small_pair, tmp_path):
    """Fixed on an oblique grid, moving on another oblique, left-handed one: the same anatomy, so before any
    deformation the moving image already lies on the fixed anatomy (identity); a registration then aligns the
    labels as well as on the original grids, and the written field resamples the moving image exactly into
    warped.nii.gz (what Slicer shows when the field is applied)."""
    fixed, moving = rotated(small_pair.fixed, 20.0), rotated(small_pair.fixed, -35.0, flip_axis=0)
    assert np.linalg.det(np.reshape(moving.GetDirection(), (3, 3))) < 0
    f, m = write(fixed, tmp_path / "fixed.nii.gz"), write(moving, tmp_path / "moving.nrrd")
    assert main(["register", f, m, "--out", str(tmp_path / "id"), "--method", "identity", "--quiet"]) == 0
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "id" / "warped.nii.gz")))
    reference = sitk.GetArrayFromImage(fixed)
    inner = (slice(12, -12),) * 3  # the corners of two rotated grids are empty in one of them
    assert np.abs(warped[inner] - reference[inner]).mean() < 0.05 * reference.max()

    # Landmarks are physical points: the same files serve both grids, and TRE before registration must not
    # depend on how the images are gridded. (The oblique run ends a little worse than the plain one, 1.5 vs
    # 1.05 mm TRE here: re-gridding the test images blurs them; with B-spline re-gridding it is 1.2 mm.)
    write_markups_json(tmp_path / "F.mrk.json", small_pair.fixed_landmarks_ras)
    write_markups_json(tmp_path / "M.mrk.json", small_pair.moving_landmarks_ras)

    def register(fixed_image, moving_image, out):
        f, m = write(fixed_image, tmp_path / f"{out}_f.nrrd"), write(moving_image, tmp_path / f"{out}_m.nrrd")
        assert main(["register", f, m, "--fixed-landmarks", str(tmp_path / "F.mrk.json"), "--moving-landmarks",
                     str(tmp_path / "M.mrk.json"), "--out", str(tmp_path / out), "--method", "classical",
                     "--steps", "40", "--quiet"]) == 0
        return json.loads((tmp_path / out / "summary.json").read_text())["evaluation"], m

    plain, _ = register(small_pair.fixed, small_pair.moving, "plain")
    oblique, moving_path = register(fixed, rotated(small_pair.moving, -35.0, flip_axis=0), "oblique")
    assert oblique["before"]["tre_mean_mm"] == pytest.approx(plain["before"]["tre_mean_mm"], rel=1e-6)
    assert oblique["after"]["tre_mean_mm"] < 0.5 * oblique["before"]["tre_mean_mm"]

    field = sitk.ReadImage(str(tmp_path / "oblique" / "displacement.nii.gz"))
    assert np.allclose(field.GetDirection(), fixed.GetDirection(), atol=1e-6)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    moving_image = sitk.Cast(sitk.ReadImage(moving_path), sitk.sitkFloat32)
    itk_warped = sitk.GetArrayFromImage(sitk.Resample(moving_image, fixed, transform, sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "oblique" / "warped.nii.gz")))
    np.testing.assert_allclose(ours, itk_warped, atol=1e-3 * np.abs(ours).max())


@pytest.mark.parametrize("method", ["classical", "riir", "iirp", "dio"])
def test_wildly_anisotropic_volumes_register(small_pair, tmp_path, method):
    """Five 30 mm slices of 1.5 mm pixels (a thick-slice clinical series) as the fixed image: every method
    runs on that grid, keeps its geometry, and improves the similarity to the moving image resampled there."""
    s = small_pair.fixed.GetSpacing()
    thick = sitk.Resample(small_pair.fixed, [96, 96, 5], sitk.Transform(), sitk.sitkLinear,
                          small_pair.fixed.GetOrigin(), (s[0] / 2, s[1] / 2, 30.0), small_pair.fixed.GetDirection())
    out = tmp_path / method
    assert main(["register", write(thick, tmp_path / "thick.nrrd"), write(small_pair.moving, tmp_path / "m.nrrd"),
                 "--out", str(out), "--method", method, "--quiet"]) == 0
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    assert field.GetSize() == (96, 96, 5) and np.allclose(field.GetSpacing(), (s[0] / 2, s[1] / 2, 30.0))
    assert np.isfinite(sitk.GetArrayFromImage(field)).all()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line["similarity"]) for line in lines)


@pytest.mark.parametrize("dtype, low, high", [(np.int16, -32768, 32767), (np.uint32, 0, 4_200_000_000),
                                              (np.int64, -2**62, 2**62)])
def test_integer_volumes_at_the_limits_of_their_type_register_without_overflow(small_pair, tmp_path, dtype, low,
                                                                              high):
    array = sitk.GetArrayFromImage(small_pair.moving).astype(np.float64)
    scaled = low + (array - array.min()) / (array.max() - array.min()) * (float(high) - float(low))
    image = sitk.GetImageFromArray(np.clip(scaled, low, high).astype(dtype))
    image.CopyInformation(small_pair.moving)
    out = tmp_path / "out"
    assert main(["register", write(small_pair.fixed, tmp_path / "f.nii.gz"), write(image, tmp_path / "m.nrrd"),
                 "--fixed-labels", write(small_pair.fixed_labels, tmp_path / "fl.nrrd"), "--moving-labels",
                 write(small_pair.moving_labels, tmp_path / "ml.nrrd"), "--out", str(out), "--method", "classical",
                 "--steps", "10", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    record = summary["intensity"]["moving"]
    assert low <= record["low"] < record["high"] <= high  # percentiles in the image's own units, no wrap-around
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert np.isfinite(warped).all() and warped.min() >= low - 1 and warped.max() <= high + 1
    assert summary["evaluation"]["after"]["dice_mean"] > summary["evaluation"]["before"]["dice_mean"]


# --- images that cannot be registered: one line, nothing written --------------------------------------------
def vector_image(small_pair):
    array = sitk.GetArrayFromImage(small_pair.moving)
    image = sitk.GetImageFromArray(np.stack([array, array, array], -1), isVector=True)
    image.CopyInformation(small_pair.moving)
    return image


def with_voxel(image: sitk.Image, value: float) -> sitk.Image:
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[5, 6, 7] = value
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


@pytest.mark.parametrize("make, fragments", [
    (lambda p: sitk.JoinSeries([p.moving, p.moving]), ["4D", "only 2D and 3D"]),
    (vector_image, ["3 components per voxel", "scalar image"]),
    (lambda p: sitk.Image([2, 2, 1], sitk.sitkFloat32), ["empty or tiny"]),
    (lambda p: sitk.Image([40, 40, 2], sitk.sitkFloat32) + 1.0, ["only 2 voxels along its K axis", "at least 3"]),
    (lambda p: with_voxel(p.moving, float("inf")), ["1 NaN or infinite voxels"]),
])
def test_volumes_that_cannot_be_registered_are_refused_in_one_line(images, small_pair, capsys, make, fragments):
    tmp_path, fixed, _ = images
    bad = write(make(small_pair), tmp_path / "bad.mha")
    out = tmp_path / "out"
    code, err = run_cli(["register", fixed, bad, "--out", str(out), "--quiet"], capsys)
    only_error_line(code, err, 2, *fragments)
    assert not out.exists()


def test_a_volume_too_large_for_memory_is_refused_from_its_header_before_any_pixel_is_read(images, capsys):
    """A header announcing 4000^3 voxels (256 GB of float32) over a tiny data file: the check uses the header
    alone, so it answers at once, with the size the run would need."""
    tmp_path, fixed, _ = images
    (tmp_path / "huge.raw").write_bytes(b"\0" * 64)
    (tmp_path / "huge.nhdr").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4000 4000 4000\n"
                                        "spacings: 0.1 0.1 0.1\nencoding: raw\nendian: little\n"
                                        "data file: huge.raw\n")
    out = tmp_path / "out"
    start = time.perf_counter()
    code, err = run_cli(["register", str(tmp_path / "huge.nhdr"), fixed, "--out", str(out), "--method", "dio",
                         "--quiet"], capsys)
    assert time.perf_counter() - start < 10
    only_error_line(code, err, 3, "4000x4000x4000", "'dio' needs about", "TB of CPU memory", "is available",
                    "nothing was started", "downsample")
    assert not out.exists()


def test_the_memory_check_compares_the_methods_measured_need_with_what_is_free(monkeypatch):
    from iterreg import memory_budget
    from iterreg.methods import get_method

    dio = get_method("dio")
    need = memory_budget.estimated_bytes(dio.memory_per_voxel, (128, 128, 128), (128, 128, 128))
    monkeypatch.setattr(memory_budget, "available_bytes", lambda device: need + 1)
    assert memory_budget.check_memory(dio, (128, 128, 128), (128, 128, 128), "cpu") == need
    monkeypatch.setattr(memory_budget, "available_bytes", lambda device: need - 1)
    with pytest.raises(memory_budget.NotEnoughMemory, match="128x128x128 fixed volume with 'dio' needs about"):
        memory_budget.check_memory(dio, (128, 128, 128), (128, 128, 128), "cpu")
    # the need grows with the voxels, and the ordering of the methods follows their measured slopes
    assert memory_budget.estimated_bytes(100.0, (64,) * 3, (64,) * 3) * 8 == pytest.approx(
        memory_budget.estimated_bytes(100.0, (128,) * 3, (128,) * 3), rel=1e-6)


# --- checkpoints ---------------------------------------------------------------------------------------------
class _Exploit:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["pickle_as_safetensors", "torch_save_pt"])
def test_a_tampered_checkpoint_with_code_in_it_never_runs_that_code(images, capsys, kind):
    tmp_path, fixed, moving = images
    marker = tmp_path / "code_ran"
    if kind == "pickle_as_safetensors":
        path = tmp_path / "model.safetensors"
        path.write_bytes(pickle.dumps(_Exploit(marker)))
    else:
        path = tmp_path / "model.pt"
        torch.save({"weights": _Exploit(marker)}, path)
    code, err = run_cli(["register", fixed, moving, "--out", str(tmp_path / "o"), "--method", "voxelmorph",
                         "--checkpoint", str(path), "--quiet"], capsys)
    only_error_line(code, err, 2, "is not a readable .safetensors checkpoint")
    assert not marker.exists(), "the checkpoint's code was executed"
    assert not (tmp_path / "o").exists()


def test_a_truncated_checkpoint_is_refused(images, capsys):
    tmp_path, fixed, moving = images
    whole = (CHECKPOINTS / "voxelmorph_mni64.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(whole[: len(whole) // 2])  # a download or copy that stopped half way
    code, err = run_cli(["register", fixed, moving, "--out", str(tmp_path / "o"), "--method", "voxelmorph",
                         "--checkpoint", str(path), "--quiet"], capsys)
    only_error_line(code, err, 2, "cut.safetensors", "is not a readable .safetensors checkpoint")


@pytest.mark.parametrize("method, checkpoint, fragment", [
    ("riir", "riir_mni128_2d.safetensors", "trained on 2D images; the inputs are 3D"),
    ("dio", "riir_mni64.safetensors", "holds weights for method 'riir', not 'dio'"),
])
def test_a_checkpoint_for_another_dimensionality_or_method_is_refused(images, capsys, method, checkpoint, fragment):
    tmp_path, fixed, moving = images
    code, err = run_cli(["register", fixed, moving, "--out", str(tmp_path / "o"), "--method", method,
                         "--checkpoint", str(CHECKPOINTS / checkpoint), "--quiet"], capsys)
    only_error_line(code, err, 2, fragment)


def test_a_method_bundled_only_for_3d_images_says_so_on_2d_images(tmp_path, small_pair, capsys):
    # VoxelMorph's only bundled checkpoint is 3D: on a 2D pair without --checkpoint the error names what it can
    # register
    middle = small_pair.fixed.GetSize()[2] // 2
    fixed = write(small_pair.fixed[:, :, middle], tmp_path / "fixed.nii.gz")  # SimpleITK: an index drops the axis
    moving = write(small_pair.moving[:, :, middle], tmp_path / "moving.nii.gz")
    code, err = run_cli(["register", fixed, moving, "--out", str(tmp_path / "o"), "--method", "voxelmorph",
                         "--quiet"], capsys)
    only_error_line(code, err, 2, "none is bundled for it for 2D images (the bundled one is for 3D images)")
    assert not (tmp_path / "o").exists()


# --- landmarks -----------------------------------------------------------------------------------------------
def landmark_files(tmp_path, small_pair, damage):
    fixed_points = small_pair.fixed_landmarks_ras.copy()
    moving_points = small_pair.moving_landmarks_ras.copy()
    labels = [f"L{i}" for i in range(len(fixed_points))]
    moving_labels = list(labels)
    if damage == "unpaired":
        moving_points, moving_labels = moving_points[:-2], moving_labels[:-2]
    elif damage == "duplicate":
        fixed_points[4], moving_points[4] = fixed_points[3], moving_points[3]
    elif damage == "non_finite":
        fixed_points[1, 2] = np.nan
    write_markups_json(tmp_path / "F.mrk.json", fixed_points, labels)
    write_markups_json(tmp_path / "M.mrk.json", moving_points, moving_labels)
    return str(tmp_path / "F.mrk.json"), str(tmp_path / "M.mrk.json")


@pytest.mark.parametrize("damage, fragments", [
    ("unpaired", ["10 fixed", "8 moving"]),
    ("duplicate", ["L4", "L3"]),
    ("non_finite", ["L1", "non-finite coordinate"]),
])
def test_landmarks_that_cannot_be_paired_are_named(images, small_pair, capsys, damage, fragments):
    tmp_path, fixed, moving = images
    f, m = landmark_files(tmp_path, small_pair, damage)
    code, err = run_cli(["register", fixed, moving, "--out", str(tmp_path / "o"), "--fixed-landmarks", f,
                         "--moving-landmarks", m, "--prompt", "--quiet"], capsys)
    only_error_line(code, err, 2, *fragments)
    assert not (tmp_path / "o").exists()


# --- saving: disk full, read-only folder, memory running out mid-run ----------------------------------------
def test_a_disk_that_fills_up_while_saving_leaves_the_output_folder_as_it_was(images, capsys, monkeypatch):
    tmp_path, fixed, moving = images
    out = tmp_path / "out"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"an earlier result the user keeps")
    import iterreg.imaging as imaging
    real_write = sitk.WriteImage
    calls = []

    def write_then_fail(image, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second file: half of it reaches the disk, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise RuntimeError(f"Could not write {path}\nNo space left on device")
        return real_write(image, path, *args, **kwargs)

    monkeypatch.setattr(imaging.sitk, "WriteImage", write_then_fail)
    code, err = run_cli(["register", fixed, moving, "--out", str(out), "--method", "identity", "--quiet"], capsys)
    only_error_line(code, err, 2, "could not write the results", "No space left on device",
                    "free some disk space")
    assert [p.name for p in out.iterdir()] == ["warped.nii.gz"]
    assert (out / "warped.nii.gz").read_bytes() == b"an earlier result the user keeps"
    no_leftovers(out)


def test_a_read_only_output_folder_is_refused_before_the_run(images, capsys, monkeypatch):
    """Simulated (tests may run as root, for whom chmod does not forbid writing): the folder refuses files."""
    tmp_path, fixed, moving = images
    import iterreg.pipeline as pipeline

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(pipeline.tempfile, "mkdtemp", read_only)
    out = tmp_path / "existing"
    out.mkdir()
    code, err = run_cli(["register", fixed, moving, "--out", str(out), "--method", "identity", "--quiet"], capsys)
    only_error_line(code, err, 2, "cannot write to output folder", "Read-only file system", "writable folder")
    assert out.is_dir() and not any(out.iterdir())


def test_an_output_path_that_is_a_file_is_refused(images, capsys):
    tmp_path, fixed, moving = images
    (tmp_path / "taken").write_text("a file the user keeps")
    code, err = run_cli(["register", fixed, moving, "--out", str(tmp_path / "taken"), "--quiet"], capsys)
    only_error_line(code, err, 2, "cannot write to output folder")
    assert (tmp_path / "taken").read_text() == "a file the user keeps"


def test_gpu_memory_running_out_mid_run_is_one_line_and_no_output(images, capsys, monkeypatch):
    tmp_path, fixed, moving = images
    from iterreg.methods.classical import ClassicalMethod

    def out_of_memory(self, *args, **kwargs):
        yield from ()
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.20 GiB (GPU 0; 7.8 GiB total)")

    monkeypatch.setattr(ClassicalMethod, "run", out_of_memory)
    out = tmp_path / "out"
    code, err = run_cli(["register", fixed, moving, "--out", str(out), "--quiet"], capsys)
    only_error_line(code, err, 3, "out of GPU memory", "3.20 GiB", "run on the CPU", "no partial output")
    assert not out.exists()


@pytest.mark.parametrize("value, symptom", [(float("nan"), "no longer finite"), (1e6, "more than twice the image")])
def test_a_run_that_diverges_stops_with_the_step_and_what_to_do_and_saves_nothing(images, capsys, monkeypatch,
                                                                                   value, symptom):
    """A learned update run past its training can diverge (a fine-tuned 2D DEQReg blew up on 3 of 8 held-out slices
    within 48 iterations, another reached NaN by 192); such a field must not be written."""
    tmp_path, fixed, moving = images
    from iterreg.methods.classical import ClassicalMethod
    original = ClassicalMethod.run

    def diverging(self, *args, **kwargs):
        for step in original(self, *args, **kwargs):
            if step.index == 2:
                step.displacement = torch.full_like(step.displacement, value)
            yield step

    monkeypatch.setattr(ClassicalMethod, "run", diverging)
    out = tmp_path / "out"
    code, err = run_cli(["register", fixed, moving, "--out", str(out), "--steps", "5", "--quiet"], capsys)
    only_error_line(code, err, 2, "diverged at step 3", symptom, "Run fewer steps", "nothing was saved")
    assert not out.exists()


# --- two runs at once -----------------------------------------------------------------------------------------
def test_two_command_line_runs_into_one_folder_at_once_both_finish_whole(images):
    tmp_path, fixed, moving = images
    out = tmp_path / "shared"
    command = [sys.executable, "-m", "iterreg.cli", "register", fixed, moving, "--out", str(out), "--quiet",
               "--method", "classical", "--steps", "15", "--threads", "1"]
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert 1 <= summary["steps_run"] <= 15 and summary["method"] == "classical"
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))  # whole: written by one run, renamed into place
    assert field.GetSize() == sitk.ReadImage(fixed).GetSize()
    no_leftovers(out)


def test_two_worker_runs_at_once_are_independent(small_pair, leak_check):
    from iterreg.geometry import Geometry
    from iterreg.worker_client import RunRequest, WorkerClient

    def request():
        return RunRequest("classical", sitk.GetArrayFromImage(small_pair.fixed), Geometry.of(small_pair.fixed).to_dict(),
                          sitk.GetArrayFromImage(small_pair.moving), Geometry.of(small_pair.moving).to_dict(),
                          steps=6, threads=1)

    clients = [WorkerClient(request()), WorkerClient(request())]
    for client in clients:
        leak_check(client)
        client.start()
    assert clients[0].job_folder != clients[1].job_folder and clients[0].pid != clients[1].pid
    for client in clients:
        assert client.wait(timeout=180) == "completed"
    np.testing.assert_allclose(clients[0].result.displacement, clients[1].result.displacement, atol=1e-5)


# --- cancelling at every phase of a worker run ----------------------------------------------------------------
def tiny_request(method="classical", **kwargs):
    from iterreg.geometry import Geometry
    from iterreg.worker_client import RunRequest

    shape = (24, 24, 24)
    geometry = Geometry(shape, (2.0,) * 3, (0.0,) * 3).to_dict()
    rng = np.random.default_rng(0)
    return RunRequest(method, rng.random(shape, np.float32), geometry, rng.random(shape, np.float32), geometry,
                      **{"steps": 200, "threads": 1, **kwargs})


def test_cancel_before_start_is_a_no_op_and_the_run_can_still_start(leak_check):
    from iterreg.worker_client import WorkerClient

    client = WorkerClient(tiny_request(steps=3))
    leak_check(client)
    client.cancel()
    assert client.state == "idle" and client.pid is None
    assert client.start().wait(timeout=120) == "completed"


def test_cancel_while_the_worker_is_still_starting_ends_cleanly_without_steps(leak_check):
    from iterreg.worker_client import WorkerClient

    steps = []
    client = WorkerClient(tiny_request(), on_step=steps.append)
    leak_check(client)
    client.start()
    assert client.state == "starting"
    client.cancel()  # the worker is still importing torch
    assert client.wait(timeout=120) == "cancelled"
    assert client.failure is None and client.steps_received <= 1


def test_cancel_twice_and_after_the_end_changes_nothing(leak_check):
    from iterreg.worker_client import WorkerClient

    steps = []

    def on_step(step):
        steps.append(step)
        if len(steps) == 2:
            client.cancel()
            client.cancel()

    client = WorkerClient(tiny_request(), on_step=on_step)
    leak_check(client)
    assert client.start().wait(timeout=120) == "cancelled"
    result = client.result
    client.cancel()
    assert client.state == "cancelled" and client.result is result and result is not None


def test_cancel_while_the_worker_saves_the_final_result_keeps_the_completed_result(leak_check):
    """The last step has arrived, so the worker is writing the result files when the cancel comes: the run is
    complete, and cancelling must not throw its result away."""
    from iterreg.worker_client import WorkerClient

    def on_step(step):
        if step.final:
            client.cancel()

    client = WorkerClient(tiny_request(steps=3), on_step=on_step)
    leak_check(client)
    assert client.start().wait(timeout=120) == "completed"
    assert client.result is not None and client.result.arrays["warped"].shape == (24, 24, 24)


def test_a_run_that_would_not_fit_in_memory_is_refused_by_the_worker_before_loading(leak_check, monkeypatch):
    """The worker checks memory itself (Slicer's volumes arrive as arrays): here with a declared need far above
    any machine's memory for a 24^3 grid."""
    from iterreg.worker_client import WorkerClient

    sys.path.insert(0, str(Path(__file__).parent))
    from test_worker import TEST_WORKER

    client = WorkerClient(tiny_request(method="scripted_hungry", steps=3), command=TEST_WORKER)
    leak_check(client)
    client.start().wait(timeout=120)
    assert client.state == "failed" and client.failure.kind == "out_of_memory"
    assert "needs about" in client.failure.message and "nothing was started" in client.failure.message
    assert client.steps_received == 0


# --- training killed while writing a checkpoint ---------------------------------------------------------------
KILL_DURING_SECOND_SAVE = """
import os, signal, sys
import safetensors.torch as st
real = st.save_file
calls = []
def save_then_die(tensors, path, metadata=None):
    if ".last.safetensors." in str(path):  # atomic_file's temporary for last.safetensors
        calls.append(path)
    if len(calls) == 2:  # the second save of last.safetensors
        with open(path, "wb") as handle:
            handle.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, metadata=metadata)
st.save_file = save_then_die
from iterreg_train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_training_killed_while_writing_a_checkpoint_keeps_the_previous_one_and_resumes(tmp_path):
    from iterreg.checkpoints import read_checkpoint

    out = tmp_path / "run"
    args = ["train", "--method", "voxelmorph", "--data", "synthetic", "--iterations", "6", "--out", str(out),
            "--set", "data.shape=[32,32,32]", "--set", "data.synthetic_subjects=4", "--set",
            "data.validation_pairs=1", "--set", "training.validate_every=2", "--set", "training.checkpoint_every=2",
            "--threads", "1", "--quiet"]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, *args], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    weights, meta = read_checkpoint(out / "last.safetensors")  # the previous checkpoint, whole
    assert meta["training"]["iteration"] == 2
    leftovers = [p.name for p in out.glob(".last.safetensors.*")]
    assert leftovers, "the kill should have left the half-written temporary file (the test's premise)"

    resumed = subprocess.run([sys.executable, "-m", "iterreg_train", *args, "--resume"], capture_output=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, meta = read_checkpoint(out / "last.safetensors")
    assert meta["training"]["iteration"] == 6
    assert not list(out.glob(".*.*")), "half-written temporaries from the killed run were left behind"


# --- the module's Logic on a real MRML scene ------------------------------------------------------------------
def scene_with(small_pair, moving_image=None):
    import slicer_harness  # puts the qt shim and the module folder on sys.path

    scene = slicer_harness.new_scene()
    fixed = slicer_harness.add_volume(scene, "fixed", small_pair.fixed)
    moving = slicer_harness.add_volume(scene, "moving", moving_image or small_pair.moving)
    return scene, fixed, moving


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_a_volume_with_nan_in_the_scene_fails_with_the_reason_and_leaves_the_scene_as_it_was(small_pair):
    from iterreg_slicer.scene_registration import COMPARISON_TABLE_NAME, RunSettings, SceneRegistration

    scene, fixed, moving = scene_with(small_pair, with_voxel(small_pair.moving, float("nan")))
    before = node_ids(scene)
    run = SceneRegistration(scene, fixed, moving, RunSettings(steps=3, threads=1))
    run.start().wait(timeout=120)
    assert run.state == "failed" and "1 NaN or infinite voxels" in run.message
    added = {scene.GetNodeByID(i).GetName() for i in node_ids(scene) - before}
    assert added == {COMPARISON_TABLE_NAME} and moving.GetParentTransformNode() is None


def test_a_vector_volume_is_explained_before_a_run_can_start(small_pair):
    from iterreg_slicer.scene_registration import SceneRegistration

    scene, fixed, _ = scene_with(small_pair)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
    import vtk
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 8)
    image.AllocateScalars(vtk.VTK_FLOAT, 3)
    vector.SetAndObserveImageData(image)
    problem = SceneRegistration.input_problem(fixed, vector)
    assert problem is not None and "moving" in problem and ("components" in problem or "vector" in problem)


def test_two_runs_started_at_once_in_one_scene_each_finish_with_their_own_nodes(small_pair):
    from iterreg_slicer.scene_registration import RunSettings, SceneRegistration

    scene, fixed, moving = scene_with(small_pair)
    runs = [SceneRegistration(scene, fixed, moving, RunSettings(steps=4, threads=1)) for _ in range(2)]
    for run in runs:
        run.start()
    deadline = time.monotonic() + 240
    while any(run.poll() for run in runs) and time.monotonic() < deadline:  # Slicer's timer pumps both
        time.sleep(0.01)
    assert [run.state for run in runs] == ["completed", "completed"], [run.message for run in runs]
    transforms = [run.nodes["transform"] for run in runs]
    assert transforms[0].GetID() != transforms[1].GetID()
    assert transforms[0].GetName() != transforms[1].GetName()
    assert all(run.nodes["browser"].GetNumberOfItems() == run.steps_done for run in runs)
    assert moving.GetParentTransformNode() is None  # the user's volume stays as it was


def test_cancel_while_the_worker_starts_leaves_no_half_made_outputs(small_pair):
    from iterreg_slicer.scene_registration import COMPARISON_TABLE_NAME, RunSettings, SceneRegistration

    scene, fixed, moving = scene_with(small_pair)
    before = node_ids(scene)
    run = SceneRegistration(scene, fixed, moving, RunSettings(steps=100, threads=1))
    run.start()
    run.cancel()
    run.wait(timeout=120)
    assert run.state == "cancelled" and not run.client.running
    assert run.steps_done <= 1  # the cancel reaches the worker before or right after its first step
    if run.steps_done == 0:  # nothing arrived: nothing of the run's may stay but its log row
        added = {scene.GetNodeByID(i).GetName() for i in node_ids(scene) - before}
        assert added <= {COMPARISON_TABLE_NAME}, added
    assert moving.GetParentTransformNode() is None


# --- the catalogue -------------------------------------------------------------------------------------------
def test_the_catalogue_names_only_tests_that_exist():
    """Docs/reliability.md lists each case with its test; a renamed or deleted test must not leave it lying."""
    import ast
    import re

    catalogue = (ROOT / "Docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(Testing/\w+\.py)::(\w+)`", catalogue))
    assert len(named) >= 40
    defined: dict[str, set[str]] = {}
    for file, test in sorted(named):
        if file not in defined:
            tree = ast.parse((ROOT / file).read_text())
            defined[file] = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert test in defined[file], f"Docs/reliability.md names {file}::{test}, which does not exist"
    here = {n for n in defined.get("Testing/test_reliability.py", set()) if n.startswith("test_")}
    listed = {test for file, test in named if file == "Testing/test_reliability.py"}
    assert here - listed <= {"test_the_catalogue_names_only_tests_that_exist"}, here - listed
