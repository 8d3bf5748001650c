"""Is there enough memory for this registration? Answered before any work starts, from the image sizes alone.

A run's peak memory grows linearly with the number of fixed-grid voxels; each method states its slope
(``RegistrationMethod.memory_per_voxel``, bytes, measured by ``Testing/benchmark_memory.py`` as the increase
of a child process's peak RSS between two sizes). Without this check a volume that does not fit fails minutes
later deep inside a method, or the operating system kills Slicer's worker without a word; with it the user
reads how much the run needs, how much there is, and what to do.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["NotEnoughMemory", "available_bytes", "estimated_bytes", "check_memory", "format_bytes"]

# The estimate is a measured slope; keep a margin for what it does not see (allocator fragmentation, a larger
# channel selection, another process growing meanwhile).
SAFETY_FACTOR = 1.2
# Reading, casting and resampling the moving image: about three float32 copies of it (counted in
# imaging.prepare_pair, not measured), rounded up. The methods' measured slopes were taken with moving and
# fixed of one size, so they already include this once: for a moving image on its own grid it errs high.
MOVING_BYTES_PER_VOXEL = 16


class NotEnoughMemory(MemoryError):
    """The run would not fit in memory; the message says how much it needs, how much is free, and what to do."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def available_bytes(device) -> int | None:
    """Memory this process could still allocate on ``device``: free GPU memory for CUDA, the operating system's
    'available' figure (free + reclaimable cache) for the CPU; None when it cannot be known (e.g. MPS)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        import psutil  # cross-platform (Linux, macOS, Windows): Slicer runs on all three

        return int(psutil.virtual_memory().available)
    return None


def estimated_bytes(memory_per_voxel: float, fixed_shape: Sequence[int], moving_shape: Sequence[int]) -> int:
    """Peak memory a run adds to its process: the method's work on the fixed grid plus preparing the moving."""
    fixed_voxels = float(np.prod([int(s) for s in fixed_shape]))
    moving_voxels = float(np.prod([int(s) for s in moving_shape]))
    return int(SAFETY_FACTOR * (memory_per_voxel * fixed_voxels + MOVING_BYTES_PER_VOXEL * moving_voxels))


def check_memory(method_cls, fixed_shape: Sequence[int], moving_shape: Sequence[int], device,
                 options: dict | None = None, fixed_spacing: Sequence[float] | None = None) -> int:
    """Raise :class:`NotEnoughMemory` when the run (with ``options``) would not fit on ``device``; return the
    estimate (bytes). ``fixed_spacing`` (the order of ``fixed_shape``) lets a method that works on a grid of its
    own (the classical optimizer's cubic voxels) scale its slope to that grid."""
    per_voxel = (method_cls.peak_memory_per_voxel(options)
                 * method_cls.grid_voxels_per_image_voxel(options, fixed_shape, fixed_spacing))
    need = estimated_bytes(per_voxel, fixed_shape, moving_shape)
    free = available_bytes(device)
    if free is not None and need > free:
        import torch

        grid = "x".join(str(int(s)) for s in fixed_shape)
        on_gpu = torch.device(device).type == "cuda"
        where = "GPU" if on_gpu else "CPU"
        advice = ("run it on the CPU, or " if on_gpu else
                  "use a GPU with enough memory, close other programs, or ")
        raise NotEnoughMemory(
            f"registering the {grid} fixed volume with '{method_cls.name}' needs about {format_bytes(need)} of "
            f"{where} memory but only {format_bytes(free)} is available; nothing was started. To fit, {advice}"
            f"crop or downsample the volumes (e.g. Slicer's Crop Volume with 'isotropic spacing' and a larger "
            f"spacing scale), or choose a method that needs less (see Docs/benchmarks.md, 'memory')")
    return need
