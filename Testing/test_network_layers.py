"""Shared network building blocks: the convolution every network is built from, and the U-Net's CPU layout."""
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


def test_unet_channels_last_layout_gives_the_same_outputs_and_hands_back_contiguous_tensors():
    from iterreg.networks.unet import RecurrentUNet, UNetConfig
    torch.manual_seed(0)
    config = UNetConfig(ndim=3, in_channels=2, out_channels=3, final_init_std=0.1, hidden_levels=(1,))
    default = RecurrentUNet(config).eval()
    fast = RecurrentUNet(config).eval()
    fast.load_state_dict(default.state_dict())
    assert fast.use_channels_last() is fast and fast.channels_last
    assert fast.head.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        expected, expected_hidden = default(x)
        out, hidden = fast(x)
        expected2, _ = default(x, expected_hidden)
        out2, _ = fast(x, hidden)  # the hidden state it handed back feeds the next call as usual
    for ours, reference in ((out, expected), (hidden[0], expected_hidden[0]), (out2, expected2)):
        assert ours.is_contiguous()  # callers may .view() what a network returns
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert fast.features.is_contiguous()
    assert not RecurrentUNet(UNetConfig(ndim=2)).use_channels_last().channels_last  # 2D: left as it is


def test_cpu_methods_run_their_3d_unets_channels_last():
    from iterreg.methods import get_method
    from iterreg.networks.unet import UNet
    from iterreg.resources import default_checkpoint
    for name in ("riir", "deqreg", "voxelmorph"):
        method = get_method(name).from_checkpoint(default_checkpoint(name, ndim=3), device="cpu")
        unets = [m for m in method.network.modules() if isinstance(m, UNet)]
        assert unets and all(m.channels_last for m in unets), name
