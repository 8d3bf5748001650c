"""Shared fixtures: the bundled sample pair and small generated pairs."""
import os
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def sample_dir():
    from iterreg.resources import sample_pair_dir
    return sample_pair_dir()


@pytest.fixture(scope="session")
def sample_pair(sample_dir):
    from iterreg.sample_data import read_pair
    return read_pair(sample_dir)


@pytest.fixture(scope="session")
def small_pair():
    """A 48^3 generated pair with its ground truth (fast enough for many tests)."""
    from iterreg.sample_data import make_pair
    return make_pair(size=48, seed=3, magnitude_mm=10.0, n_landmarks=10)


def write(image: sitk.Image, path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


# --- what "nothing left behind" means ------------------------------------------------------------------------
def shared_memory_blocks() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("irreg_")}


def process_group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _group_gone_within(pgid: int, seconds: float) -> bool:
    """A killed process takes a moment to exit on a loaded machine (e.g. the worker's resource tracker, which
    leaves when its parent has gone): "survived" means still there after ``seconds``."""
    deadline = time.monotonic() + seconds
    while process_group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def pid_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.fixture
def leak_check():
    """Collect clients; after the test each one has ended and left nothing behind."""
    before = shared_memory_blocks()
    clients = []
    yield clients.append
    for client in clients:
        client.close()
        assert not client.running
        if client.pid is not None:
            assert not pid_exists(client.pid), "worker process still exists (orphan or zombie)"
            assert _group_gone_within(client.pid, seconds=5.0), "a process started by the worker survived"
        if client.job_folder is not None:
            assert not client.job_folder.exists(), "job folder left behind"
    assert shared_memory_blocks() == before, "shared-memory blocks leaked"
