"""Losses and metrics on small cases whose values are known by hand."""
import math

import numpy as np
import pytest
import torch

from iterreg import losses, metrics
from iterreg.spatial import gaussian_smooth, identity_grid


def linear_field(shape, matrix):
    """u_c(x) = sum_d matrix[c][d] * x_d: constant derivatives, so finite differences are exact."""
    x = identity_grid(shape, dtype=torch.float64)
    return torch.einsum("cd,bd...->bc...", torch.as_tensor(matrix, dtype=torch.float64), x)


def textured(shape=(16, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return gaussian_smooth(torch.rand(1, 1, *shape, generator=g, dtype=torch.float64), 1.0)


def test_mse_is_the_mean_squared_difference():
    a = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    b = torch.tensor([[[[1.0, 1.0], [0.0, 3.0]]]])
    assert float(losses.mse(a, b)) == pytest.approx((1 + 0 + 4 + 0) / 4)


def test_lncc_is_minus_one_for_any_positive_linear_intensity_change_and_near_zero_for_noise():
    image = textured()
    assert float(losses.lncc_loss(image, 3 * image + 0.5, window=5)) == pytest.approx(-1.0, abs=1e-3)
    # Two independent zero-mean noise images: the squared correlation of 125 samples is about 1/125.
    # (Zero-mean, because MONAI zero-pads at the border, where windows of positive images share the zeros.)
    noise_a = torch.randn(image.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    noise_b = torch.randn(image.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert -0.03 < float(losses.lncc_loss(noise_a, noise_b, window=5)) <= 0
    with pytest.raises(ValueError, match="odd"):
        losses.lncc_loss(image, image, window=4)


def test_nmi_is_two_for_identical_images_and_about_one_for_independent_ones():
    image = torch.rand(1, 1, 40, 40, 40, generator=torch.Generator().manual_seed(1))
    other = torch.rand(1, 1, 40, 40, 40, generator=torch.Generator().manual_seed(2))
    same = -float(losses.nmi_loss(image, image, bins=16))
    independent = -float(losses.nmi_loss(image, other, bins=16))
    slightly_noisy = -float(losses.nmi_loss(image, (image + 0.05 * other).clamp(0, 1), bins=16))
    # Parzen smoothing spreads each value over neighbouring bins, so identical images score under 2.
    assert 1.4 < same <= 2.0
    assert 1.0 <= independent < 1.05
    assert independent < slightly_noisy < same
    # NMI is invariant to an intensity inversion (a different contrast), unlike MSE.
    assert -float(losses.nmi_loss(image, 1 - image, bins=16)) == pytest.approx(same, rel=1e-3)


def test_diffusion_of_a_linear_field_is_the_mean_squared_gradient():
    u = linear_field((8, 8, 8), [[2, 0, 0], [0, 0, 0], [0, 0, 0]])  # du0/dx0 = 2
    assert float(losses.diffusion(u)) == pytest.approx(4 / 3)  # mean over the three components


def test_curvature_of_a_quadratic_field_is_the_squared_laplacian():
    x = identity_grid((9, 9, 9), dtype=torch.float64)
    u = torch.zeros(1, 3, 9, 9, 9, dtype=torch.float64)
    u[:, 0] = x[:, 0] ** 2  # Laplacian 2
    assert float(losses.curvature(u)) == pytest.approx(4 / 3)
    assert float(losses.curvature(linear_field((9, 9, 9), np.eye(3)))) == pytest.approx(0.0, abs=1e-20)


def test_linear_elastic_energy_of_shear_and_dilation():
    s, e, lam, mu = 0.2, 0.1, 2.0, 0.5
    shear = linear_field((6, 6, 6), [[0, s, 0], [0, 0, 0], [0, 0, 0]])  # eps_01 = eps_10 = s/2, trace 0
    assert float(losses.linear_elastic(shear, lam, mu)) == pytest.approx(mu * 2 * (s / 2) ** 2)
    dilation = linear_field((6, 6, 6), np.eye(3) * e)  # eps = e I
    assert float(losses.linear_elastic(dilation, lam, mu)) == pytest.approx(mu * 3 * e ** 2 + lam / 2 * (3 * e) ** 2)
    # A rigid rotation (antisymmetric gradient) costs nothing.
    assert float(losses.linear_elastic(linear_field((6, 6, 6), [[0, s, 0], [-s, 0, 0], [0, 0, 0]]), lam, mu)) \
        == pytest.approx(0.0, abs=1e-12)


def test_isotropic_tv_of_a_linear_field_is_the_gradient_norm():
    u = linear_field((7, 7), [[3, 4], [0, 0]])
    assert float(losses.isotropic_tv(u)) == pytest.approx(5.0, abs=1e-3)  # + sqrt(eps) of the flat component


def test_landmark_distance_under_a_translation_in_millimetres():
    u = torch.zeros(1, 3, 10, 10, 10, dtype=torch.float64)
    u[:, 0] = 1.0  # one voxel along array axis 0
    fixed = torch.tensor([[2.0, 3.0, 4.0], [5.0, 5.0, 5.0]])
    moving = torch.tensor([[3.0, 3.0, 4.0], [5.0, 5.0, 7.0]])
    spacing = (2.5, 1.0, 1.0)
    # first pair lands exactly; second is off by 1 voxel along axis 0 (2.5 mm) and 2 along axis 2 (2 mm)
    expected = (0 + math.hypot(2.5, 2.0)) / 2
    assert float(losses.landmark_distance(u, fixed, moving, spacing)) == pytest.approx(expected, rel=1e-5)


def test_similarity_and_regularizer_lookups_name_the_choices():
    with pytest.raises(ValueError, match="lncc"):
        losses.similarity_loss("ssd", textured(), textured())
    with pytest.raises(ValueError, match="diffusion"):
        losses.regularizer_loss("smooth", torch.zeros(1, 3, 4, 4, 4))


def test_dice_per_label_and_mean_by_hand():
    a = np.zeros((4, 4), int)
    b = np.zeros((4, 4), int)
    a[0, :] = 1   # 4 voxels
    b[0, :2] = 1  # 2 voxels, both overlap: dice = 2*2/(4+2)
    a[3, 3] = 2
    b[3, 3] = 2   # perfect
    result = metrics.dice(a, b)
    assert result["per_label"][1] == pytest.approx(4 / 6)
    assert result["per_label"][2] == pytest.approx(1.0)
    assert result["mean"] == pytest.approx((4 / 6 + 1) / 2)


def test_hd95_of_a_shifted_cube_is_the_shift_in_millimetres():
    a = np.zeros((20, 20, 20), int)
    b = np.zeros_like(a)
    a[5:15, 5:15, 5:15] = 1
    b[5:15, 5:15, 7:17] = 1  # shifted 2 voxels along axis 2
    result = metrics.hd95(a, b, spacing=(1.0, 1.0, 1.5))
    assert result["per_label"][1] == pytest.approx(3.0)  # 2 voxels * 1.5 mm


def test_tre_is_the_mean_euclidean_distance():
    result = metrics.tre(np.array([[0, 0, 0], [1, 1, 1.0]]), np.array([[3, 4, 0], [1, 1, 1.0]]))
    assert result["mean"] == pytest.approx(2.5)
    assert result["max"] == pytest.approx(5.0)


def test_field_regularity_of_affine_and_folding_fields():
    affine = linear_field((8, 8, 8), [[0.1, 0, 0], [0, 0.2, 0], [0, 0, -0.1]])
    reg = metrics.field_regularity(affine)
    assert reg["folding_percent"] == 0.0
    assert reg["std_log_jacobian"] == pytest.approx(0.0, abs=1e-6)
    assert reg["mean_grad_jacobian"] == pytest.approx(0.0, abs=1e-9)
    assert reg["min_jacobian"] == pytest.approx(1.1 * 1.2 * 0.9)
    folding = linear_field((8, 8, 8), [[-2.0, 0, 0], [0, 0, 0], [0, 0, 0]])  # det = -1 everywhere
    assert metrics.folding_percent(folding) == pytest.approx(100.0)


def test_our_adam_takes_torch_optim_adams_steps():
    # iterreg.adam exists only to avoid torch.optim's 0.8 s import of torch._dynamo; its numbers must be Adam's
    from iterreg.adam import Adam

    torch.manual_seed(0)
    target = torch.randn(3, 16, 16)
    ours, theirs = torch.zeros(3, 16, 16, requires_grad=True), torch.zeros(3, 16, 16, requires_grad=True)
    optimisers = Adam([ours], lr=0.2), torch.optim.Adam([theirs], lr=0.2)
    for _ in range(6):
        for tensor, optimiser in zip((ours, theirs), optimisers):
            optimiser.zero_grad()
            ((tensor - target) ** 3).abs().sum().backward()
            optimiser.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours - torch.zeros_like(ours)).abs().amax() > 0.5  # it moved
