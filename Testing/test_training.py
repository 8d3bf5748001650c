"""The Training package: configs, the three dataset formats and their bad-input errors, training from the CLI,
exact resume after kill -9, two-rank DDP with torchrun on CPU, and checkpoints that load everywhere."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from iterreg import losses
from iterreg.errors import InputError
from iterreg.methods import get_method
from iterreg.spatial import warp

TINY = ["--set", "data.shape=[32,32,32]", "--set", "data.synthetic_subjects=4", "--set", "data.validation_pairs=1",
        "--set", "training.validate_every=2", "--set", "training.checkpoint_every=2", "--threads", "1", "--quiet"]


def train_cli(*args) -> int:
    from iterreg_train.cli import main
    return main(["train", "--method", "voxelmorph", "--data", "synthetic", *TINY, *args])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "vxm"
    assert train_cli("--out", str(out), "--iterations", "4") == 0
    return out


# --- configs -------------------------------------------------------------------------------------------------
def test_config_defaults_come_from_the_paper_and_overrides_nest():
    from iterreg_train.config import load_config
    config = load_config("voxelmorph", overrides=["optimizer.lr=0.001", "loss.window=5", "data.shape=[48,48,48]"])
    assert config["optimizer"]["lr"] == 0.001 and config["loss"]["window"] == 5
    assert config["loss"]["similarity"] == "lncc" and config["loss"]["regularization_weight"] == 1.0
    assert config["data"]["shape"] == [48, 48, 48]
    with pytest.raises(InputError, match="unknown config key 'loss.windw'"):
        load_config("voxelmorph", overrides=["loss.windw=5"])
    with pytest.raises(InputError, match="optimizer.lr must be > 0"):
        load_config("voxelmorph", overrides=["optimizer.lr=0"])
    with pytest.raises(InputError, match="no training config for method 'classical'"):
        load_config("classical")


# --- datasets ------------------------------------------------------------------------------------------------
def small_images(sample_pair, count: int) -> list[tuple[sitk.Image, sitk.Image]]:
    """Crops of the sample pair's images and labels: little 'subjects' for dataset tests."""
    images = []
    for k in range(count):
        source = sample_pair.fixed if k % 2 == 0 else sample_pair.moving
        labels = sample_pair.fixed_labels if k % 2 == 0 else sample_pair.moving_labels
        o = 16 + k
        images.append((source[o:o + 24, o:o + 24, 20:44], labels[o:o + 24, o:o + 24, 20:44]))
    return images


@pytest.fixture
def image_folder(tmp_path, sample_pair):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for k, (image, labels) in enumerate(small_images(sample_pair, 5)):
        sitk.WriteImage(image, str(tmp_path / "images" / f"s{k}.nii.gz"))
        sitk.WriteImage(labels, str(tmp_path / "labels" / f"s{k}.nii.gz"))
    return tmp_path


@pytest.fixture
def learn2reg(tmp_path, sample_pair):
    root = tmp_path / "L2R"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for k, (image, labels) in enumerate(small_images(sample_pair, 5)):
        sitk.WriteImage(image, str(root / "imagesTr" / f"TASK_{k:04d}_0000.nii.gz"))
        sitk.WriteImage(labels, str(root / "labelsTr" / f"TASK_{k:04d}_0000.nii.gz"))
        entries.append({"image": f"./imagesTr/TASK_{k:04d}_0000.nii.gz", "label": f"./labelsTr/TASK_{k:04d}_0000.nii.gz"})
    meta = {"name": "TASK", "training": entries, "pairings": "unpaired", "numTraining": 5,
            "registration_val": [{"fixed": "./imagesTr/TASK_0003_0000.nii.gz", "moving": "./imagesTr/TASK_0004_0000.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root / "dataset.json"


def test_synthetic_pairs_are_real_anatomy_on_the_training_grid():
    from iterreg_train.datasets import SyntheticSource
    source = SyntheticSource((32, 32, 32), subjects=3, validation_pairs=1)
    pair = source.train_pair(np.random.default_rng(0))
    assert pair.fixed.shape == pair.moving.shape == (1, 32, 32, 32) and 0 <= pair.fixed.min() < pair.fixed.max() <= 1
    assert set(torch.unique(pair.fixed_labels).tolist()) == {0, 1, 2, 3}
    validation = source.validation_pairs()[0]
    assert validation.fixed_points.shape == validation.moving_points.shape == (20, 3)
    with pytest.raises(InputError, match="generated on cubes"):
        SyntheticSource((32, 32, 48))


def test_synthetic_local_motion_pairs_differ_only_in_one_region():
    from iterreg_train.datasets import SyntheticSource
    source = SyntheticSource((48, 48), subjects=2, validation_pairs=1, region_mm=10.0)
    pair = source.train_pair(np.random.default_rng(0))
    changed = (pair.fixed - pair.moving).abs()[0] > 0.05
    assert pair.fixed.shape == (1, 48, 48) and 0 < changed.float().mean() < 0.1  # a local motion, not the slice
    validation = source.validation_pairs()[0]
    assert validation.fixed_points.shape[1] == 2 and len(validation.fixed_points) >= 3  # as many as the region holds
    assert validation.fixed_labels is None  # chosen on TRE: the labels' overlap barely changes
    assert source.summary()["region_mm"] == 10.0
    with pytest.raises(InputError, match="region_mm .* must be > 0"):
        SyntheticSource((48, 48), region_mm=0.0)


def test_synthetic_local_motion_in_3d_moves_one_region_of_the_volume():
    from iterreg_train.datasets import SyntheticSource
    source = SyntheticSource((32, 32, 32), subjects=2, validation_pairs=1, region_mm=12.0)
    pair = source.train_pair(np.random.default_rng(0))
    changed = (pair.fixed - pair.moving).abs()[0] > 0.05
    assert pair.fixed.shape == (1, 32, 32, 32) and 0 < changed.float().mean() < 0.1
    validation = source.validation_pairs()[0]
    assert validation.fixed_points.shape[1] == 3 and len(validation.fixed_points) >= 3
    assert source.summary()["pairs"] == "make_pair"
    with pytest.raises(InputError, match="magnitude_mm .* within 0-20 mm"):
        SyntheticSource((32, 32, 32), magnitude_mm=25.0, region_mm=12.0)


def test_a_folder_of_images_with_labels(image_folder):
    from iterreg_train.datasets import FolderSource
    source = FolderSource(image_folder, (16, 16, 16))
    pair = source.train_pair(np.random.default_rng(1))
    assert pair.fixed.shape == (1, 16, 16, 16) and pair.fixed_labels.shape == (1, 16, 16, 16)
    assert len(source.validation_pairs()) == 2 and source.summary()["images"] == 5


def test_a_folder_with_listed_pairs(image_folder):
    from iterreg_train.datasets import FolderSource
    (image_folder / "pairs.csv").write_text("fixed,moving,split\ns0.nii.gz,s1.nii.gz,train\ns2.nii.gz,s3.nii.gz,validation\n")
    source = FolderSource(image_folder, (16, 16, 16))
    assert source.train_pair(np.random.default_rng(0)).name == "s0.nii.gz <- s1.nii.gz"
    assert [p.name for p in source.validation_pairs()] == ["s2.nii.gz <- s3.nii.gz"]


@pytest.mark.parametrize("damage, expected", [
    ("no_images", "has no images/ folder"),
    ("one_image", "registration needs at least 2"),
    ("label_off_grid", "is not on the grid of its image"),
    ("missing_label", "label map '.*s1.nii.gz' does not exist"),
    ("pairs_without_validation", "the validation split is empty"),
    ("pairs_missing_file", "image '.*nope.nii.gz' does not exist"),
])
def test_folder_datasets_explain_what_is_wrong(image_folder, sample_pair, damage, expected):
    from iterreg_train.datasets import FolderSource
    if damage == "no_images":
        (image_folder / "images").rename(image_folder / "imgs")
    elif damage == "one_image":
        for p in list((image_folder / "images").iterdir())[1:]:
            p.unlink()
    elif damage == "label_off_grid":
        sitk.WriteImage(sample_pair.fixed_labels, str(image_folder / "labels" / "s1.nii.gz"))
    elif damage == "missing_label":
        (image_folder / "labels" / "s1.nii.gz").unlink()
    elif damage == "pairs_without_validation":
        (image_folder / "pairs.csv").write_text("fixed,moving,split\ns0.nii.gz,s1.nii.gz,train\n")
    elif damage == "pairs_missing_file":
        (image_folder / "pairs.csv").write_text("fixed,moving,split\ns0.nii.gz,nope.nii.gz,train\n")
    with pytest.raises(InputError, match=expected):
        source = FolderSource(image_folder, (16, 16, 16))
        rng = np.random.default_rng(0)
        for _ in range(12):  # random pairs: within a few draws every training subject is read
            source.train_pair(rng)


def test_a_learn2reg_dataset(learn2reg):
    from iterreg_train.datasets import Learn2RegSource
    source = Learn2RegSource(learn2reg, (16, 16, 16))
    pair = source.train_pair(np.random.default_rng(0))
    assert pair.fixed_labels is not None and pair.fixed.shape == (1, 16, 16, 16)
    assert "TASK_0003" not in pair.name and "TASK_0004" not in pair.name  # validation subjects stay out
    (validation,) = source.validation_pairs()
    assert validation.name == "TASK_0003_0000.nii.gz <- TASK_0004_0000.nii.gz"
    assert source.summary()["training_images"] == 3


def test_a_paired_learn2reg_dataset_uses_its_pairs(learn2reg):
    from iterreg_train.datasets import Learn2RegSource
    meta = json.loads(learn2reg.read_text())
    meta["pairings"] = "paired"
    meta["training_paired_images"] = [{"fixed": "./imagesTr/TASK_0000_0000.nii.gz",
                                       "moving": "./imagesTr/TASK_0001_0000.nii.gz"}]
    learn2reg.write_text(json.dumps(meta))
    source = Learn2RegSource(learn2reg, (16, 16, 16))
    assert source.train_pair(np.random.default_rng(5)).name == "TASK_0000_0000.nii.gz <- TASK_0001_0000.nii.gz"


@pytest.mark.parametrize("damage, expected", [
    ("missing_json", "does not exist"),
    ("bad_json", "is not valid JSON"),
    ("empty_validation", "empty validation split"),
    ("missing_image", "TASK_0002_0000.nii.gz' does not exist"),
    ("too_few_training", "has no training pairs"),
])
def test_learn2reg_datasets_explain_what_is_wrong(learn2reg, damage, expected):
    from iterreg_train.datasets import Learn2RegSource
    meta = json.loads(learn2reg.read_text())
    path = learn2reg
    if damage == "missing_json":
        path = learn2reg.with_name("nope.json")
    elif damage == "bad_json":
        learn2reg.write_text("{not json")
    elif damage == "empty_validation":
        meta["registration_val"] = []
    elif damage == "missing_image":
        (learn2reg.parent / "imagesTr" / "TASK_0002_0000.nii.gz").unlink()
    elif damage == "too_few_training":
        meta["training"] = meta["training"][3:]
    if damage not in ("missing_json", "bad_json"):
        learn2reg.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=expected):
        Learn2RegSource(path, (16, 16, 16))


# --- training, checkpoints, resume, DDP -------------------------------------------------------------------------
def test_training_from_the_cli_writes_checkpoints_logs_and_the_effective_config(tiny_run):
    from iterreg.checkpoints import read_checkpoint
    for name in ("config.yaml", "last_state.pt", "last.safetensors", "best.safetensors", "history.jsonl"):
        assert (tiny_run / name).is_file(), name
    weights, meta = read_checkpoint(tiny_run / "last.safetensors", "voxelmorph")
    assert meta["training"]["iteration"] == 4 and meta["data"]["kind"] == "synthetic"
    assert meta["architecture"]["encoder"] == [16, 32, 32, 32]
    assert meta["architecture"]["decoder"] == [32, 32, 32, 32, 32, 16, 16]
    assert "dice" in meta["metrics"] and meta["code_version"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tiny_run / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/step_loss/1", "validation/dice", "validation/tre_mm"} <= set(tags["scalars"])
    assert "validation/fixed_moving_warped_field" in tags["images"]


def test_cpu_training_runs_the_3d_unet_channels_last_and_saves_plain_checkpoints(tiny_run):
    from iterreg.checkpoints import read_checkpoint
    state = torch.load(tiny_run / "last_state.pt", weights_only=True)["model"]  # the weights as trained
    convs = [v for v in state.values() if v.dim() == 5]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last_3d) for v in convs)
    weights, _ = read_checkpoint(tiny_run / "last.safetensors", "voxelmorph")  # what the module loads
    assert all(v.is_contiguous() for v in weights.values())
    for key in state:
        assert torch.equal(state[key], weights[key]), key


def test_an_existing_run_is_not_overwritten_without_resume(tiny_run, capsys):
    assert train_cli("--out", str(tiny_run), "--iterations", "4") == 2
    assert "pass --resume" in capsys.readouterr().err


def test_resume_after_kill_9_reproduces_an_uninterrupted_run(tmp_path):
    command = [sys.executable, "-m", "iterreg_train", "train", "--method", "voxelmorph", "--data", "synthetic",
               *TINY, "--iterations", "12", "--set", "schedule.name=cosine",  # the bundled runs' schedule
               "--set", "schedule.warmup_iterations=2"]
    straight = tmp_path / "straight"
    subprocess.run([*command, "--out", str(straight)], check=True, timeout=300, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "last_state.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted_at = torch.load(killed / "last_state.pt", weights_only=True)["iteration"]
    assert interrupted_at < 12, "the run finished before it could be killed"
    subprocess.run([*command, "--out", str(killed), "--resume"], check=True, timeout=300, capture_output=True)

    from iterreg.checkpoints import read_checkpoint
    a, _ = read_checkpoint(straight / "last.safetensors")
    b, meta = read_checkpoint(killed / "last.safetensors")
    assert meta["training"]["iteration"] == 12
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_torchrun_see_different_data_and_agree_on_the_weights(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "iterreg_train", "train", "--method", "voxelmorph",
               "--data", "synthetic", *TINY, "--iterations", "4", "--out", str(out), "--device", "cpu",
               "--debug-ranks"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    reports = sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"rank"')),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world"] == 2 for r in reports)
    assert reports[0]["first_pairs"] != reports[1]["first_pairs"]  # each rank draws its own pairs
    assert reports[0]["checksum"] == pytest.approx(reports[1]["checksum"], rel=0, abs=1e-9)  # same weights
    assert len(list((out / "tensorboard").iterdir())) == 1  # only rank 0 writes


# --- the checkpoint everywhere ---------------------------------------------------------------------------------
def test_the_checkpoint_runs_in_the_cli(tiny_run, sample_dir, tmp_path):
    from iterreg.cli import main
    from iterreg.sample_data import PAIR_FILES
    code = main(["register", str(sample_dir / PAIR_FILES["fixed"]), str(sample_dir / PAIR_FILES["moving"]),
                 "--method", "voxelmorph", "--checkpoint", str(tiny_run / "best.safetensors"),
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0 and (tmp_path / "out" / "displacement.nii.gz").is_file()


def test_the_checkpoint_runs_in_the_worker(tiny_run, sample_pair, leak_check):
    from test_worker import request_from
    from iterreg.worker_client import WorkerClient
    client = WorkerClient(request_from(sample_pair, "voxelmorph", checkpoint=str(tiny_run / "best.safetensors")))
    leak_check(client)
    client.start().wait(timeout=120)
    assert client.state == "completed", client.failure
    assert client.result.displacement.shape == (3, 64, 64, 64) and client.steps_received == 1


def test_the_checkpoint_runs_in_the_module(tiny_run, sample_pair):
    import slicer_harness
    from iterreg_slicer.scene_registration import RunSettings, SceneRegistration
    scene = slicer_harness.new_scene()
    fixed = slicer_harness.add_volume(scene, "fixed", sample_pair.fixed)
    moving = slicer_harness.add_volume(scene, "moving", sample_pair.moving)
    run = SceneRegistration(scene, fixed, moving,
                            RunSettings(method="voxelmorph", checkpoint=str(tiny_run / "best.safetensors")))
    run.start().wait(timeout=120)
    assert run.state == "completed", run.message
    assert run.nodes["browser"].GetNumberOfItems() == 1 and "features" == run.channel_name


@pytest.mark.parametrize("damage, expected", [
    ("not_safetensors", "is not a readable .safetensors checkpoint"),
    ("other_method", "holds weights for method 'other'"),
    ("wrong_architecture", "does not match the voxelmorph architecture"),
])
def test_bad_checkpoints_are_refused_without_running_anything(tiny_run, tmp_path, damage, expected):
    from iterreg.checkpoints import read_checkpoint, save_checkpoint
    from iterreg.methods import get_method
    path = tmp_path / "bad.safetensors"
    weights, meta = read_checkpoint(tiny_run / "best.safetensors")
    if damage == "not_safetensors":
        path.write_bytes(b"\x80\x04 this is a pickle, not weights")
    elif damage == "other_method":
        save_checkpoint(path, weights, {**meta, "method": "other"})
    elif damage == "wrong_architecture":
        save_checkpoint(path, weights, {**meta, "architecture": {**meta["architecture"], "encoder": [8, 8, 8, 8]}})
    with pytest.raises(InputError, match=expected):
        get_method("voxelmorph").create(path)


def test_evaluate_prints_the_benchmark_table(tiny_run, capsys):
    from iterreg_train.cli import main
    assert main(["evaluate", "--checkpoint", str(tiny_run / "best.safetensors"), "--data", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert "identity" in out and "voxelmorph" in out and "Dice" in out and "TRE mm" in out


def test_the_bundled_checkpoint_beats_identity_on_the_sample_pair(sample_pair):
    """The demo checkpoint in Resources/Checkpoints is found by default and improves the bundled pair."""
    from iterreg.imaging import prepare_pair
    from iterreg.methods import get_method
    from iterreg.metrics import dice
    from iterreg.resources import default_checkpoint
    from iterreg.spatial import warp_labels

    assert default_checkpoint("voxelmorph") is not None
    method = get_method("voxelmorph").create()  # no checkpoint given: the bundled one
    prepared = prepare_pair(sample_pair.fixed, sample_pair.moving)
    (step,) = list(method.run(prepared.fixed, prepared.moving))
    fixed_labels = sitk.GetArrayFromImage(sample_pair.fixed_labels)
    moving_labels = torch.from_numpy(sitk.GetArrayFromImage(sample_pair.moving_labels).astype(np.int64))[None, None]
    before = dice(fixed_labels, moving_labels[0, 0].numpy())["mean"]
    after = dice(fixed_labels, warp_labels(moving_labels, step.displacement)[0, 0].numpy())["mean"]
    assert after > before + 0.02, (before, after)
    assert step.metrics["folding_percent"] < 0.5


def test_a_one_step_network_refuses_prompts_and_warm_starts_instead_of_ignoring_them(tiny_run):
    from iterreg.methods import Prompts, get_method
    method = get_method("voxelmorph").create(tiny_run / "best.safetensors")
    image = torch.rand(1, 1, 32, 32, 32)
    points = torch.tensor([[10.0, 10.0, 10.0]])
    with pytest.raises(InputError, match="cannot use landmark prompts"):
        next(method.run(image, image, prompts=Prompts(points, points)))
    with pytest.raises(InputError, match="cannot continue from a previous field"):
        next(method.run(image, image, init=torch.zeros(1, 3, 32, 32, 32)))


def test_fine_tuning_starts_from_the_given_checkpoint(tiny_run, tmp_path):
    from iterreg.checkpoints import read_checkpoint
    start, _ = read_checkpoint(tiny_run / "best.safetensors")
    out = tmp_path / "ft"
    assert train_cli("--out", str(out), "--iterations", "1", "--lr", "1e-12",
                     "--set", f"training.init_from={tiny_run / 'best.safetensors'}") == 0
    tuned, _ = read_checkpoint(out / "last.safetensors")
    for name, weight in start.items():
        torch.testing.assert_close(tuned[name], weight, rtol=0, atol=1e-6)


SHORT_RUN = {"riir": "architecture.steps=2", "deqreg": "architecture.max_iter=4", "iirp": "training.seed=0",
             "r2n2": "architecture.steps=3", "dio": "architecture.train_iterations=[3,3,3]"}


@pytest.mark.parametrize("method", sorted(SHORT_RUN))
def test_the_iterative_methods_train_from_the_cli_in_2d_deterministically(tmp_path, method):
    from iterreg.checkpoints import read_checkpoint
    from iterreg_train.cli import main
    weights = []
    for run in ("a", "b"):
        out = tmp_path / f"{method}_{run}"
        code = main(["train", "--method", method, "--data", "synthetic", "--out", str(out), "--iterations", "2",
                     "--set", "data.shape=[32,32]", "--set", "data.synthetic_subjects=4", "--set",
                     "data.validation_pairs=1", "--set", "training.validate_every=2", "--set",
                     SHORT_RUN[method],
                     "--threads", "1", "--quiet"])
        assert code == 0
        state, meta = read_checkpoint(out / "last.safetensors", method)
        weights.append(state)
    assert meta["ndim"] == 2 and meta["architecture"]["ndim"] == 2
    assert get_method(method).create(out / "best.safetensors", ndim=2) is not None
    for name in weights[0]:  # same seed, same machine: the same weights, bit for bit
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_training_with_amp_computes_the_convolutions_in_bfloat16_where_native(tmp_path, monkeypatch, capsys):
    import iterreg.networks.precision as precision
    from iterreg.checkpoints import read_checkpoint
    from iterreg.networks.unet import RecurrentUNet
    from iterreg_train.cli import main
    args = ["train", "--method", "riir", "--data", "synthetic", "--iterations", "2", "--set", "data.shape=[32,32]",
            "--set", "data.synthetic_subjects=4", "--set", "data.validation_pairs=1", "--set",
            "training.validate_every=2", "--set", "architecture.steps=2", "--set", "training.amp=true",
            "--threads", "1", "--quiet"]
    monkeypatch.setattr(precision, "bfloat16_is_native", lambda device: False)
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "training.amp (bfloat16 convolutions) is not native on this cpu" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()  # refused before anything is written

    monkeypatch.setattr(precision, "bfloat16_is_native", lambda device: True)  # as on an AVX512-BF16/AMX CPU
    seen = []
    original = RecurrentUNet.forward

    def recording(self, x, hidden=None):
        out, hidden = original(self, x, hidden)
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out, hidden
    monkeypatch.setattr(RecurrentUNet, "forward", recording)
    assert main([*args, "--out", str(tmp_path / "amp")]) == 0
    # every forward of the recurrent U-Net (2 iterations x 2 steps, then validation) computed in bfloat16 ...
    assert len(seen) >= 4 and all(autocast and dtype == torch.bfloat16 for autocast, dtype in seen)
    weights, _ = read_checkpoint(tmp_path / "amp" / "last.safetensors", "riir")
    # ... while the weights, the optimizer's and the checkpoint's, stay float32
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_a_diverging_run_stops_with_the_iteration_and_keeps_its_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import iterreg_train.trainer as trainer
    from iterreg.checkpoints import read_checkpoint
    from iterreg_train.cli import main
    real = trainer.registration_loss
    calls = []

    def nan_on_the_third_iteration(*args, **kwargs):
        calls.append(1)
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 3 else loss), parts
    monkeypatch.setattr(trainer, "registration_loss", nan_on_the_third_iteration)
    out = tmp_path / "run"
    code = main(["train", "--method", "voxelmorph", "--data", "synthetic", *TINY, "--out", str(out),
                 "--iterations", "4", "--set", "training.checkpoint_every=2", "--set", "training.validate_every=10"])
    assert code == 2
    message = capsys.readouterr().err
    assert "training diverged at iteration 3" in message and "last.safetensors is from iteration 2" in message
    weights, meta = read_checkpoint(out / "last.safetensors", "voxelmorph")
    assert meta["training"]["iteration"] == 2 and all(torch.isfinite(w).all() for w in weights.values())


def test_numbers_in_overrides_are_numbers_even_in_exponent_form():
    from iterreg_train.config import load_config
    config = load_config("riir", overrides=["optimizer.lr=1e-4", "training.init_from=runs/a.safetensors"])
    assert config["optimizer"]["lr"] == 1e-4 and config["training"]["init_from"] == "runs/a.safetensors"


def test_r2n2_regularizes_only_the_final_field_once_as_in_its_paper():
    from iterreg_train.trainer import registration_loss
    fixed = torch.rand(1, 1, 16, 16)
    moving = torch.rand(1, 1, 16, 16)
    rough = torch.randn(1, 2, 16, 16)
    config = {"similarity": "mse", "window": 9, "regularizer": "tv", "regularization_weight": 0.5}
    zero = torch.zeros_like(rough)
    every, _ = registration_loss(fixed, moving, [rough, zero], config, step_weights=[0.5, 0.5])
    last, _ = registration_loss(fixed, moving, [rough, zero], {**config, "regularize": "last"},
                                step_weights=[0.5, 0.5])
    similarity_only, _ = registration_loss(fixed, moving, [rough, zero], {**config, "regularization_weight": 0.0},
                                           step_weights=[0.5, 0.5])
    assert float(last) == pytest.approx(float(similarity_only), abs=1e-3)  # the rough field was not the last one
    # (abs: the TV of a zero field is sqrt(eps) per channel, not 0)
    assert float(every) > float(last)
    final_rough, _ = registration_loss(fixed, moving, [zero, rough], {**config, "regularize": "last"},
                                       step_weights=[0.5, 0.5])
    tv = float(losses.isotropic_tv(rough))
    mean_sim = 0.5 * (float(losses.mse(fixed, moving)) + float(losses.mse(fixed, warp(moving, rough))))
    assert float(final_rough) == pytest.approx(mean_sim + 0.5 * tv, rel=1e-5)


# --- moving images on a coarser grid (DIO's features_on_own_grid) ---------------------------------------------
def test_a_coarse_moving_copy_read_back_through_its_map_is_the_same_anatomy():
    from iterreg.spatial import sample_through_index_map
    from iterreg_train.coarse_moving import coarse_moving
    z, y, x = torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij")
    smooth = (torch.sin(z / 5) + torch.cos(y / 7) + 0.05 * x)[None, None]  # nearly linear at the slab scale
    own = coarse_moving(smooth, (1.0, 1.5, 1.5), (3.0, 2.0, 2.0))
    assert tuple(own.image.shape[2:]) == (8, 12, 12)  # 3x thicker slices, 2x coarser in-plane, same extent
    back = sample_through_index_map(own.image, torch.as_tensor(own.fixed_to_own_index), (24, 24, 24))
    inside = (slice(None), slice(None), slice(2, 20), slice(2, 20), slice(2, 20))  # last coarse voxel: edge
    assert float((back - smooth)[inside].abs().max()) < 0.1
    shifted = sample_through_index_map(own.image, torch.as_tensor(own.fixed_to_own_index) @
                                       torch.tensor([[1.0, 0, 0, 2], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                                                    dtype=torch.float64), (24, 24, 24))
    assert float((shifted - smooth)[inside].abs().max()) > 0.2  # a wrong map would be seen


def test_coarse_moving_pairs_are_drawn_as_configured_and_only_for_a_method_that_reads_them():
    from iterreg_train.coarse_moving import CoarseMovingSettings
    dio, vxm = get_method("dio"), get_method("voxelmorph")
    config = {"coarse_moving": {"probability": 1.0, "slice_factors": [3], "in_plane_factors": [2]}}
    settings = CoarseMovingSettings.from_config(config, dio)
    rng = np.random.default_rng(0)
    draws = {settings.draw(3, rng) for _ in range(30)}
    assert draws == {(3.0, 2.0, 2.0), (2.0, 3.0, 2.0), (2.0, 2.0, 3.0)}  # any axis may be the slice axis
    off = {"coarse_moving": {**config["coarse_moving"], "probability": 0.0}}
    assert CoarseMovingSettings.from_config(off, vxm) is None and CoarseMovingSettings.from_config({}, vxm) is None
    with pytest.raises(InputError, match="voxelmorph.*resamples"):
        CoarseMovingSettings.from_config(config, vxm)
    with pytest.raises(InputError, match="factors >= 1"):
        CoarseMovingSettings.from_config({"coarse_moving": {**config["coarse_moving"], "slice_factors": [0.5]}}, dio)


def test_dio_trains_on_coarse_moving_images_and_validates_on_both(tmp_path):
    from iterreg_train.cli import main
    out = tmp_path / "dio_coarse"
    code = main(["train", "--method", "dio", "--data", "synthetic", "--out", str(out), "--iterations", "2",
                 "--set", "data.shape=[32,32]", "--set", "data.synthetic_subjects=4", "--set", "data.validation_pairs=1",
                 "--set", "training.validate_every=2", "--set", "architecture.train_iterations=[3,3,3]",
                 "--set", "data.coarse_moving.probability=1.0", "--threads", "1", "--quiet"])
    assert code == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert {"dice", "coarse_dice", "coarse_tre_mm"} <= set(history[-1])


def test_dio_learns_from_features_extracted_on_the_moving_images_own_grid():
    from iterreg_train.coarse_moving import coarse_moving
    dio = get_method("dio")
    network = dio.build_network({**dio.default_architecture(2), "train_iterations": [3, 3, 3]})
    fixed, moving = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    own = coarse_moving(moving, (1.0, 1.0), (3.0, 1.0))
    on_own = dio.predict(network, fixed, moving, moving_own_grid=own)  # the optimum of every scale
    resampled = dio.predict(network, fixed, moving)
    assert not torch.allclose(on_own[-1], resampled[-1])  # the own grid's features were used
    sum(u.square().sum() for u in on_own).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters() if p.requires_grad)
