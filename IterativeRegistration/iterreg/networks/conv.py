"""The one convolution constructor every network uses: ``conv(ndim, cin, cout, kernel, stride)``.

Why a 3D subclass: on CPU, PyTorch picks its oneDNN (mkldnn) kernels for a float32 conv3d only when the
batch is > 1 or ``N*C*D*H > 20480`` (a heuristic in ATen's ConvUtils meant for small 2D inputs); otherwise it
falls back to ``slow_conv3d`` (unfold + matmul), whose backward is ~5x slower than oneDNN on a batch of
two. Our 3D networks run at batch 1 on small working grids (16 channels at 32^3 is 16384), exactly there.
:class:`Conv3d` pads such a batch with a zero sample so oneDNN is chosen, and drops it again: the result
and the gradients are those of the same convolution (the zero sample adds nothing to the weight or bias
gradients, since its output is discarded), only computed by the faster kernel. Parameters keep the names
of ``nn.Conv3d``, so checkpoints are unaffected.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["conv", "Conv3d"]

_ONEDNN_MIN_ELEMENTS = 20480  # ATen ConvParams::use_mkldnn: batch*channels*depth*height above this


def _falls_back_to_slow_kernel(module: nn.Conv3d, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5 and x.shape[0] == 1
            and module.groups == 1 and module.kernel_size[-2:] != (1, 1)
            and x.shape[1] * x.shape[2] * x.shape[3] <= _ONEDNN_MIN_ELEMENTS
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that reaches PyTorch's fast CPU kernel at batch 1 too (module docstring)."""

    def _conv_forward(self, x, weight, bias):
        if _falls_back_to_slow_kernel(self, x):
            return super()._conv_forward(torch.cat([x, torch.zeros_like(x)]), weight, bias)[:1]
        return super()._conv_forward(x, weight, bias)


def conv(ndim: int, cin: int, cout: int, kernel: int = 3, stride: int = 1, bias: bool = True) -> nn.Module:
    """A 2D or 3D convolution with 'same' padding (``kernel // 2``)."""
    if ndim not in (2, 3):
        raise ValueError(f"networks are 2D or 3D, got ndim={ndim}")
    cls = nn.Conv2d if ndim == 2 else Conv3d
    return cls(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias)
