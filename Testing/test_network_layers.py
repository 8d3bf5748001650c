"""Shared network building blocks: the convolution every network is built from."""
import pytest
import torch
import torch.nn as nn

from iterreg.networks.conv import Conv3d, conv


@pytest.mark.parametrize("shape, kernel, stride", [
    ((1, 16, 16, 16, 16), 3, 1),   # small batch-1 input: PyTorch would take its slow CPU kernel
    ((1, 3, 12, 10, 8), 3, 2),     # strided, non-cubic
    ((1, 4, 8, 8, 8), 1, 1),       # 1x1x1: left to PyTorch's own choice
    ((2, 16, 16, 16, 16), 3, 1),   # batch > 1: already fast, untouched
])
def test_conv3d_gives_the_output_and_gradients_of_nn_conv3d(shape, kernel, stride):
    torch.manual_seed(0)
    reference = nn.Conv3d(shape[1], 5, kernel, stride=stride, padding=kernel // 2)
    ours = Conv3d(shape[1], 5, kernel, stride=stride, padding=kernel // 2)
    ours.load_state_dict(reference.state_dict())  # same parameter names: checkpoints load unchanged
    x = torch.randn(shape)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_ours = reference(x_ref), ours(x_ours)
    assert out_ours.shape == out_ref.shape
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-4, atol=1e-5)
    weights = torch.randn_like(out_ref)
    (out_ref * weights).sum().backward()
    (out_ours * weights).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)


def test_conv_builds_same_padded_2d_and_3d_layers_and_rejects_other_dimensions():
    assert conv(2, 3, 4)(torch.zeros(1, 3, 9, 7)).shape == (1, 4, 9, 7)
    assert conv(3, 3, 4, kernel=5)(torch.zeros(1, 3, 9, 7, 5)).shape == (1, 4, 9, 7, 5)
    assert conv(3, 3, 4, stride=2)(torch.zeros(1, 3, 8, 8, 8)).shape == (1, 4, 4, 4, 4)
    assert conv(2, 3, 4, bias=False).bias is None
    with pytest.raises(ValueError, match="2D or 3D"):
        conv(1, 3, 4)
