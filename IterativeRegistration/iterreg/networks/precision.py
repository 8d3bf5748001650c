"""Inference arithmetic of a network: float32 (the default) or bfloat16 where the hardware has it natively.

Only the networks' convolutions run in bfloat16 (``torch.autocast``); everything a method computes from their
outputs (warps, losses, the optimiser, metrics) stays float32, because each wrapped block hands back float32.
Blocks are wrapped one by one, not the whole network, since a method may drive its network through a generator
(RIIR's ``iterate``, DEQReg's solver thread) and autocast is a per-thread switch that must not leak past a
``yield``. Emulated bfloat16 is slower than float32, so it is refused where it is not native.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import InputError

__all__ = ["PRECISIONS", "bfloat16_is_native", "check_precision", "compute_in_precision"]

PRECISIONS = ("float32", "bfloat16")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def bfloat16_is_native(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 convolutions in hardware (CPU: AVX512-BF16 or AMX through oneDNN;
    CUDA: compute capability 8.0 or newer)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def check_precision(precision: str, device: torch.device | str | None = None) -> None:
    """Raise :class:`InputError` for an unknown ``precision``, or (given ``device``) one not native there."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device is not None and precision == "bfloat16" and not bfloat16_is_native(device):
        what = "this GPU" if torch.device(device).type == "cuda" else "this CPU (it lacks AVX512-BF16 and AMX)"
        raise InputError(f"bfloat16 arithmetic is not native on {what}, where it would be slower than float32; "
                         "choose precision float32")


def _has_convolution(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _as_float32(value):
    """bfloat16 tensors in a block's output (a tensor, or tuples, lists or dicts of them) back to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype == torch.bfloat16 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_as_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_float32(v) for k, v in value.items()}
    return value


def _wrap(block: nn.Module, device_type: str) -> None:
    inner = block.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = inner(*args, **kwargs)
        return _as_float32(out)

    block.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's method


def compute_in_precision(network: nn.Module, precision: str, device: torch.device | str) -> nn.Module:
    """Make ``network``'s convolutional blocks compute in ``precision`` on ``device`` (checked first); float32
    leaves it untouched. The blocks are the outermost modules below the network that hold a convolution
    (inside ModuleList/ModuleDict containers, their elements)."""
    check_precision(precision, device)
    if precision == "float32":
        return network
    device_type = torch.device(device).type

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, _CONTAINERS):
                visit(child)
            elif _has_convolution(child):
                _wrap(child, device_type)

    visit(network)
    return network
