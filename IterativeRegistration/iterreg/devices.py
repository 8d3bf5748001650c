"""Compute device choice: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
from __future__ import annotations

import os

import torch

from .errors import InputError

__all__ = ["resolve_device", "set_cpu_threads", "DEVICE_CHOICES"]

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
