"""Compute device choice (``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``) and the CPU
set-up of a process that registers or trains (:func:`prepare_process`)."""
from __future__ import annotations

import ctypes
import os
import sys

import torch

from .errors import InputError

__all__ = ["resolve_device", "set_cpu_threads", "prepare_process", "keep_freed_cpu_memory", "DEVICE_CHOICES",
           "is_out_of_memory", "describe_out_of_memory"]

ALLOCATOR_OPT_OUT = "ITERREG_CPU_ALLOCATOR"  # "default": leave the C allocator as it is
_GLIBC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEEP_BELOW = 1 << 30  # bytes: blocks smaller than this are kept for reuse, not handed back to the OS

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"device '{name}' was requested but no CUDA GPU is available to PyTorch "
                             f"{torch.__version__}; use --device cpu (or auto)")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device '{name}' does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
        return device
    raise InputError(f"unknown device '{name}'; choose auto, cpu, cuda or cuda:N")


def set_cpu_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads (default: all cores this process may use)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    count = available if not threads else int(threads)
    if count < 1:
        raise InputError(f"thread count must be >= 1, got {threads}")
    torch.set_num_threads(count)
    return count


def keep_freed_cpu_memory() -> bool:
    """Let this process reuse the memory of freed tensors instead of returning it to the OS at once (glibc).

    glibc's malloc maps large blocks (from 128 KiB, a threshold that rises only as blocks are freed) straight
    from the OS and unmaps them when freed, and it trims freed heap memory too; a registration allocates and
    frees tensors of tens of MB at every step, so each step page-faults them in anew. Raising the two thresholds
    keeps that memory in the process (PyTorch's CPU tuning guide gets the same from jemalloc or tcmalloc; this
    needs no extra library). Measured (Docs/benchmarks.md, `cpu-allocator`): a fresh process, 128^3 pair,
    1.08x (DIO) to 1.41x (VoxelMorph) faster, RIIR 1.33x; peak memory within 2 % (VoxelMorph +11 %). Not on other C libraries, not when the
    user set glibc's malloc variables or ``ITERREG_CPU_ALLOCATOR=default``. Returns whether it was applied."""
    if not sys.platform.startswith("linux") or os.environ.get(ALLOCATOR_OPT_OUT, "").lower() == "default":
        return False
    if any(name in os.environ for name in _GLIBC_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user's own allocator settings win
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW) == 1


def prepare_process(threads: int | None) -> int:
    """The CPU set-up of a process that registers or trains (the CLI, the worker, the trainer): freed memory
    kept for reuse, and ``threads`` CPU threads. Returns the thread count. Never called in Slicer's own process."""
    keep_freed_cpu_memory()
    return set_cpu_threads(threads)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM (its own class) or a CPU allocation failure (a RuntimeError from the allocator)."""
    oom_class = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if oom_class and isinstance(exc, oom_class):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text
        or "DefaultCPUAllocator" in text)


def describe_out_of_memory(exc: BaseException, size, device: str, method: str) -> str:
    """One sentence: what ran out, on what problem size, how much was asked for, and what to try."""
    import re

    text = str(exc)
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B)", text) or re.search(r"allocate (\d+) bytes", text)
    amount = ""
    if asked:
        value = asked.group(1)
        amount = f" (it tried to allocate {value}{' bytes' if value.isdigit() else ''})"
    on_gpu = "cuda" in text.lower() or "gpu" in text.lower() or str(device).startswith("cuda")
    grid = "x".join(str(s) for s in size) if size else "this"
    if on_gpu and torch.cuda.is_available():
        torch.cuda.empty_cache()
    where = "GPU" if on_gpu else "CPU"
    advice = "run on the CPU (device cpu) or " if on_gpu else ""
    return (f"out of {where} memory while registering the {grid} volume pair with '{method}'{amount}; "
            f"{advice}downsample the volumes to a lower resolution, or show fewer channel maps")
