"""Compute device choice: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
from __future__ import annotations

import os

import torch

from .errors import InputError

__all__ = ["resolve_device", "set_cpu_threads", "DEVICE_CHOICES", "is_out_of_memory", "describe_out_of_memory"]

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
