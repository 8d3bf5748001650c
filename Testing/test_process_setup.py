"""The CPU set-up of a process that registers or trains (``iterreg.devices.prepare_process``).

Specification: the CLI, the worker and the trainer keep the memory of freed tensors for reuse, so a step that
allocates the tensors the last step freed does not page-fault them in from the OS again; a user's own glibc
malloc settings, or ``ITERREG_CPU_ALLOCATOR=default``, leave the allocator as it is; each entry point uses it.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PAGE_FAULTS_PER_STEP = """
import resource, sys, torch, torch.nn.functional as F
from iterreg.devices import prepare_process
if sys.argv[1] == "prepared":
    prepare_process(1)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x, w = torch.rand(1, 16, 64, 64, 64), torch.rand(16, 16, 3, 3, 3)

def step():  # what a U-Net level does: tensors of 16-32 MB made and freed
    y = F.leaky_relu(F.conv3d(x, w, padding=1), 0.2)
    return F.avg_pool3d(torch.cat([y, x], 1), 2).sum()

step()
before = faults()
for _ in range(5):
    step()
print((faults() - before) / 5)
"""

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="tunes glibc's allocator")


def faults_per_step(mode: str, **env) -> float:
    """In a fresh process, the page faults of one repeated step of U-Net-sized tensor work."""
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_STEP, mode], env={**os.environ, **env},
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return float(out)


@glibc_only
def test_a_prepared_process_reuses_freed_tensor_memory_instead_of_faulting_it_in_again():
    assert faults_per_step("default") > 5_000  # 16 MB is 4,096 pages of 4 KiB, faulted in again every step
    # usually 0-1; up to ~800 on a VM whose kernel reclaims idle pages itself (DAMON), still a tenth of 'default'
    assert faults_per_step("prepared") < 2_000
    assert faults_per_step("prepared", ITERREG_CPU_ALLOCATOR="default") > 5_000  # the opt-out


@glibc_only
@pytest.mark.parametrize("env", [{"ITERREG_CPU_ALLOCATOR": "default"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_the_users_own_allocator_settings_are_left_alone(env):
    from iterreg import devices
    old = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        assert devices.keep_freed_cpu_memory() is False
    finally:
        for name, value in old.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def test_every_process_that_registers_or_trains_is_prepared_and_slicers_own_is_not():
    root = Path(__file__).resolve().parents[1]
    for entry in ("IterativeRegistration/iterreg/cli.py", "IterativeRegistration/iterreg/worker.py",
                  "Training/iterreg_train/cli.py"):
        assert "prepare_process(" in (root / entry).read_text(), entry
    for gui in ("IterativeRegistration/IterativeRegistration.py", *map(str, (root / "IterativeRegistration" /
                                                                             "iterreg_slicer").glob("*.py"))):
        assert "prepare_process" not in (root / gui).read_text(), gui
