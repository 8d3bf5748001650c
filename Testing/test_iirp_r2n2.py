"""IIRP-Net and R2N2: the iterative pyramid and the sequence of local Gaussian deformations (issue 7).

Specification: RP-Net gives one displacement on the input grid in 2D and 3D and trains end to end; IIRP's
IterStop keeps the first pass at every level, keeps further passes while they gain at least delta, and on the
first pass that does not it stops the level with the previous flow; with one pass per level IIRP is RP-Net.
R2N2 adds exactly one rotated Gaussian per step, with its parameters in the paper's ranges, evaluated exactly
on the image grid; single-slice volumes register in 2D. Both stream their steps through the real worker.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iterreg.errors import InputError
from iterreg.methods import get_method
from iterreg.networks.iirp import IIRPConfig, RPNet, iterative_inference
from iterreg.networks.r2n2 import (WEIGHT_SEARCH_SCALES, LocalDeformation, R2N2Config, R2N2Network,
                                   best_weight_scale, downhill_mse_gradient, features_at, gaussian_displacement,
                                   gaussian_from_raw, gaussian_raw, refine_gaussian, rotation_matrix)
from iterreg.spatial import gaussian_smooth, normalised_grid, warp

from test_riir_deqreg import SHAPES, checkpoint, pair


# --- IIRP-Net -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
def test_rpnet_predicts_one_displacement_on_the_input_grid_and_trains_every_parameter(ndim):
    fixed, moving = pair(ndim)
    torch.manual_seed(0)
    network = RPNet(IIRPConfig(ndim=ndim))
    for estimator in network.estimators:  # trained-like heads, so every level's flow matters
        torch.nn.init.normal_(estimator.head.weight, std=1e-2)
    (u,) = get_method("iirp").predict(network, fixed, moving)
    assert u.shape == (1, ndim, *SHAPES[ndim])
    ((warp(moving, u) - fixed) ** 2).mean().backward()
    missing = [name for name, p in network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_the_rpnet_architecture_follows_the_paper():
    network = RPNet(IIRPConfig(ndim=3))
    widths = [block[0].out_channels for block in network.extractor.blocks]
    assert widths == [8, 16, 32, 32]
    assert [e.body[0].out_channels for e in network.estimators] == [16, 32, 32, 32]  # q, 16 at the finest
    assert all(sum(type(m).__name__ == "ResBlock" for m in e.body) == 2 for e in network.estimators)


class ScriptedJudge:
    """IterStop's similarity, scripted: returns the given scores in order (the first scores the identity)."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = 0

    def __call__(self, u):
        self.calls += 1
        return self.scores.pop(0)


def test_iterstop_keeps_passes_while_they_gain_delta_and_reverts_the_first_that_does_not():
    fixed, moving = pair(2)
    torch.manual_seed(0)
    network = RPNet(IIRPConfig(ndim=2))
    for estimator in network.estimators:
        torch.nn.init.normal_(estimator.head.weight, std=1e-2)
    # level 4: +0.10 (first pass, kept), +0.02 (kept), +0.001 (< delta: reverted, level stops)
    # level 3: -0.05 (first pass: kept even so), +0.004 (reverted); level 2: 1 pass kept then +0.0; level 1: max 3
    judge = ScriptedJudge([0.0, 0.10, 0.12, 0.121, 0.07, 0.074, 0.08, 0.08, 0.09, 0.10, 0.20])
    with torch.no_grad():
        states = list(iterative_inference(network, fixed, moving, judge, max_iterations=[3, 5, 5, 5], delta=0.005))
    assert [(s.level, s.iteration, s.accepted) for s in states] == [
        (4, 1, True), (4, 2, True), (4, 3, False), (3, 1, True), (3, 2, False), (2, 1, True), (2, 2, False),
        (1, 1, True), (1, 2, True), (1, 3, True)]
    assert judge.calls == 11 and not judge.scores
    torch.testing.assert_close(states[2].displacement, states[1].displacement, rtol=0, atol=0)  # reverted
    assert states[2].final_at_level and not states[1].final_at_level
    assert states[2].gain == pytest.approx(0.001) and states[2].similarity == pytest.approx(0.12)
    assert states[-1].final_at_level  # level 1 stopped at its maximum, 3 passes


def test_without_iterstop_each_level_runs_exactly_its_passes():
    fixed, moving = pair(2)
    network = RPNet(IIRPConfig(ndim=2))
    with torch.no_grad():
        states = list(iterative_inference(network, fixed, moving, lambda u: -float(u.abs().mean()),
                                          max_iterations=[1, 2, 3, 1], delta=None))
    counts = {level: sum(s.level == level for s in states) for level in (4, 3, 2, 1)}
    assert counts == {4: 1, 3: 3, 2: 2, 1: 1} and all(s.accepted for s in states)


def test_iirp_with_one_pass_per_level_is_rpnet(tmp_path):
    path = checkpoint(tmp_path, "iirp", 3)
    method = get_method("iirp").create(path, options={"level_iterations": [1, 1, 1, 1]})
    fixed, moving = pair(3)
    for estimator in method.network.estimators:
        torch.nn.init.normal_(estimator.head.weight, std=1e-2)
    steps = list(method.run(fixed, moving))
    assert len(steps) == 4 and steps[-1].final
    with torch.no_grad():
        (expected,) = get_method("iirp").predict(method.network, fixed, moving)
    torch.testing.assert_close(steps[-1].displacement, expected, rtol=1e-5, atol=1e-5)


def test_an_iirp_run_streams_level_iteration_gain_and_its_channels(tmp_path):
    method = get_method("iirp").create(checkpoint(tmp_path, "iirp", 2), options={"max_iterations": 3})
    fixed, moving = pair(2)
    steps = list(method.run(fixed, moving, steps=12))
    levels = [s.metrics["level"] for s in steps]
    assert levels == sorted(levels, reverse=True) and levels[0] == 4 and levels[-1] == 1
    assert steps[-1].final and not any(s.final for s in steps[:-1])
    assert all({"iteration", "gain", "iterstop_ncc", "accepted", "folding_percent", "similarity"} <= set(s.metrics)
               for s in steps)
    first = steps[0]
    assert first.channels["residual_flow"].shape[0] == 2 and first.channels["warped_features"].shape[0] == 32
    assert "level 4 (1/4), iteration 1" in first.phase


def test_the_step_budget_leaves_one_pass_for_every_finer_level(tmp_path):
    method = get_method("iirp").create(checkpoint(tmp_path, "iirp", 2), options={"delta": -1.0})  # never stops
    steps = list(method.run(*pair(2), steps=6))
    assert [int(s.metrics["level"]) for s in steps] == [4, 4, 4, 3, 2, 1]


def test_iirp_rejects_bad_options_and_too_few_steps(tmp_path):
    path = checkpoint(tmp_path, "iirp", 2)
    with pytest.raises(InputError, match="at least 4 steps"):
        next(get_method("iirp").create(path).run(*pair(2), steps=3))
    with pytest.raises(InputError, match="level_iterations must be 4 counts"):
        get_method("iirp").create(path, options={"level_iterations": [1, 2]})
    with pytest.raises(InputError, match="need 8 steps"):
        next(get_method("iirp").create(path, options={"level_iterations": [2, 2, 2, 2]}).run(*pair(2), steps=5))
    with pytest.raises(InputError, match="cannot continue"):
        next(get_method("iirp").create(path).run(*pair(2), init=torch.zeros(1, 2, *SHAPES[2])))


# --- R2N2 ---------------------------------------------------------------------------------------------------
def test_a_local_deformation_is_a_rotated_gaussian_with_its_weight_at_its_centre():
    shape = (41, 61)
    g = LocalDeformation(center=torch.tensor([[0.0, 0.5]]), sigma=torch.tensor([[0.3, 0.1]]),
                         angles=torch.tensor([[0.0]]), weight=torch.tensor([[0.5, -0.25]]))
    u, profile = gaussian_displacement(g, shape)
    peak = np.unravel_index(int(profile.argmax()), shape)
    assert peak == (20, 45)  # normalised (0, 0.5) on a 41 x 61 grid
    torch.testing.assert_close(u[0, :, 20, 45], torch.tensor([0.5 * 20, -0.25 * 30]))
    # wider along axis 0 than axis 1; turning it by 90 degrees swaps that
    along0, along1 = float(profile[0, 0, 26, 45]), float(profile[0, 0, 20, 51])
    assert along0 > along1
    turned = LocalDeformation(g.center, g.sigma, torch.tensor([[math.pi / 2]]), g.weight)
    _, profile_turned = gaussian_displacement(turned, shape)
    assert float(profile_turned[0, 0, 26, 45]) < float(profile_turned[0, 0, 20, 51])


def test_the_compactness_benchmarks_fitted_gaussians_follow_a_local_motion():
    """The benchmark's oracle (R2N2's representation without its network) must find a motion the representation
    can express, or its rows understate how compact the representation is. Generated local-motion pair 201 is
    the one where a fit that started too strong and stepped too far left every landmark where it was."""
    from benchmark_iirp_r2n2 import fit_gaussians, pairs, score

    (_, pair, evaluation, _), = pairs(2, 128, count=1, first_seed=201, region_mm=15)
    before = score(evaluation, torch.zeros(1, 2, 128, 128))["tre"]
    fitted = fit_gaussians(pair.fixed, pair.moving, count=8, sigma_max=0.3, tv_weight=5e-4)
    assert score(evaluation, fitted)["tre"] < 0.5 * before


def test_the_whole_slice_r2n2_checkpoint_is_the_2d_default_and_the_local_motion_one_is_offered_beside_it():
    from iterreg.resources import bundled_checkpoints, default_checkpoint
    assert default_checkpoint("r2n2", 2).name == "r2n2_mni128_2d.safetensors"
    assert "r2n2_mni128_2d_local.safetensors" in [p.name for p in bundled_checkpoints(2)["r2n2"]]


def test_3d_rotations_are_proper_rotations():
    angles = torch.rand(5, 3) * math.pi
    r = rotation_matrix(angles, 3)
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(3).expand(5, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_r2n2_parameters_stay_in_the_papers_ranges_and_each_step_adds_one_gaussian(ndim):
    fixed, moving = pair(ndim)
    torch.manual_seed(0)
    config = R2N2Config(ndim=ndim, channels=(8, 8, 8, 16))
    network = R2N2Network(config)
    torch.nn.init.normal_(network.parameters_net.fc[-1].weight, std=3.0)  # push the outputs to their limits
    with torch.no_grad():
        states = list(network.iterate(fixed, moving, 4))
    previous = torch.zeros_like(states[0].displacement)
    for s in states:
        g = s.gaussian
        assert g.sigma.shape == (1, ndim) and (g.sigma > 0).all() and (g.sigma <= config.sigma_max + 1e-3).all()
        assert (g.weight.abs() <= 1).all() and (g.center.abs() <= 1).all()
        assert g.angles.shape == (1, 1 if ndim == 2 else 3) and (g.angles >= 0).all() and (g.angles <= math.pi).all()
        assert ((s.confidences >= 0) & (s.confidences <= 2)).all()
        torch.testing.assert_close(s.displacement - previous, s.local)
        previous = s.displacement
    assert config.parameter_count == (7 if ndim == 2 else 12)


@pytest.mark.parametrize("center_features", [False, True])
def test_r2n2_starts_at_the_identity_and_then_trains_every_parameter(center_features):
    fixed, moving = pair(2)
    torch.manual_seed(0)
    network = R2N2Network(R2N2Config(ndim=2, channels=(8, 8, 8, 16), steps=3, center_features=center_features))
    assert all(float(u.detach().abs().max()) == 0 for u in network(fixed, moving))  # zero-initialised last layer
    torch.nn.init.normal_(network.parameters_net.fc[-1].weight, std=0.1)
    displacements = get_method("r2n2").predict(network, fixed, moving)
    assert len(displacements) == 3
    sum(((warp(moving, u) - fixed) ** 2).mean() for u in displacements).backward()
    missing = [name for name, p in network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("shape", [(20, 13), (12, 9, 16)])
def test_the_parameter_network_can_read_a_level_at_the_gaussian_centre_in_image_coordinates(shape):
    # a level kept every 2nd pixel of the image; its features here are the normalised image coordinates of those
    # pixels, so reading them at a centre must give the centre back, with a gradient to move the centre
    level_coordinates = normalised_grid(shape)[(slice(None), slice(None), *[slice(None, None, 2)] * len(shape))]
    center = torch.tensor([[0.3, -0.5, 0.1][:len(shape)], [-0.8, 0.6, -0.2][:len(shape)]], requires_grad=True)
    read = features_at(level_coordinates.expand(2, *level_coordinates.shape[1:]), center, shape, stride=2)
    torch.testing.assert_close(read, center.detach())  # (all these centres lie inside the kept pixels)
    read.sum().backward()
    assert center.grad.abs().min() > 0


@pytest.mark.parametrize("difference_input", [True, False])
def test_r2n2_sees_the_fixed_image_and_the_warped_moving_one_or_its_difference_from_the_fixed(difference_input):
    fixed, moving = pair(2)
    network = R2N2Network(R2N2Config(ndim=2, channels=(8, 8, 8, 16), difference_input=difference_input))
    seen = []
    network.stem.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        list(network.iterate(fixed, moving, 1))
    stem_input = seen[0]
    assert stem_input.shape[1] == 2 + 2  # two image channels and two coordinate channels
    torch.testing.assert_close(stem_input[:, :1], fixed)
    torch.testing.assert_close(stem_input[:, 1:2], moving - fixed if difference_input else moving)


def smooth_random_image(shape, seed=0):
    """A smooth random image in [0, 1]: gradients everywhere, no edge cliffs."""
    torch.manual_seed(seed)
    image = gaussian_smooth(torch.randn(1, 1, *shape), 2.0)
    return (image - image.min()) / (image.max() - image.min())


@pytest.mark.parametrize("ndim", [2, 3])
def test_with_gradient_input_r2n2_also_sees_where_and_which_way_the_mse_falls_fastest(ndim):
    # moving = fixed warped by one Gaussian displacement w centred at c: undoing it (u = -w near c) is downhill,
    # so the extra channels must be longest near c, of length 1 there, and point along -w
    shape = (40, 36) if ndim == 2 else (24, 20, 22)
    fixed = smooth_random_image(shape)
    center = torch.tensor([[0.35, -0.3, 0.2][:ndim]])
    weight = torch.tensor([[0.12, 0.08, -0.1][:ndim]])
    bump = LocalDeformation(center, torch.full((1, ndim), 0.2), torch.zeros(1, 1 if ndim == 2 else 3), weight)
    w = gaussian_displacement(bump, shape)[0]
    moving = warp(fixed, w, padding_mode="border")  # no cliff at the edge: only the bump differs
    network = R2N2Network(R2N2Config(ndim=ndim, channels=(8, 8, 8, 16), gradient_input=True))
    seen = []
    network.stem.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        list(network.iterate(fixed, moving, 1))
    assert seen[0].shape[1] == 2 + ndim + ndim  # images, coordinates, the gradient
    downhill = seen[0][:, 2 + ndim:]
    length = downhill.norm(dim=1)[0]
    assert float(length.max()) == pytest.approx(1.0)
    peak = np.unravel_index(int(length.flatten().argmax()), shape)
    peak_position = normalised_grid(shape)[(0, slice(None), *peak)]
    assert float((peak_position - center[0]).norm()) < 0.3  # within 1.5 widths of the deformation's centre (of 2)
    at_peak = downhill[(0, slice(None), *peak)]
    w_at_peak = w[(0, slice(None), *peak)]
    # (only the part of -w along the image's edges is seen: the aperture problem, so not exactly -w)
    assert float(torch.nn.functional.cosine_similarity(at_peak, -w_at_peak, dim=0)) > 0.5


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_image_scaled_gradient_input_reads_as_the_voxels_still_to_go_and_grows_with_the_shift(ndim):
    # "longest" says where and which way but not how far (its longest vector is always 1); "image" divides by a
    # constant of the fixed image only, so for a uniform shift of s voxels it is about s along the shift
    shape = (48, 44) if ndim == 2 else (32, 30, 28)
    fixed = smooth_random_image(shape)
    interior = (0, slice(None), *[slice(8, -8)] * ndim)  # away from the border, where the smoothing replicates
    along, longest = {}, {}
    for s in (0.25, 0.5, 1.0):
        shift = torch.zeros(1, ndim, *shape)
        shift[:, 0] = s
        moving = warp(fixed, -shift, padding_mode="border")  # moving(x) = fixed(x - s): u = +s along axis 0 undoes it
        still_to_go = downhill_mse_gradient(fixed, moving, torch.zeros_like(shift), 0.15, "image")[interior]
        along[s] = float(still_to_go[0].mean())
        # mostly along the shift (a random image's local anisotropy, the aperture problem, adds some across)
        assert float(still_to_go[1:].flatten(1).mean(1).abs().max()) < 0.35 * along[s]
        unit = downhill_mse_gradient(fixed, moving, torch.zeros_like(shift), 0.15, "longest")
        longest[s] = float(unit.norm(dim=1).max())
    assert along[0.5] / along[0.25] == pytest.approx(2.0, rel=0.15)
    assert along[1.0] / along[0.5] == pytest.approx(2.0, rel=0.15)
    assert 0.5 < along[1.0] < 1.5  # of the order of the shift: voxels (a Gauss-Newton step with an averaged Hessian)
    assert longest[0.25] == pytest.approx(1.0) and longest[1.0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gradient_scale"):
        R2N2Config(gradient_input=True, gradient_scale="max")


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_weight_search_picks_for_each_sample_the_factor_that_undoes_its_displacement(ndim):
    # moving = fixed warped by one Gaussian w; proposed steps that undo a half, a third and twice w need the
    # factors 2, 3 and 0.5, chosen per sample of a batch
    shape = (48, 44) if ndim == 2 else (28, 26, 24)
    fixed = smooth_random_image(shape)
    bump = LocalDeformation(torch.tensor([[0.1, -0.2, 0.15][:ndim]]), torch.full((1, ndim), 0.25),
                            torch.zeros(1, 1 if ndim == 2 else 3), torch.tensor([[0.06, -0.04, 0.05][:ndim]]))
    w = gaussian_displacement(bump, shape)[0]  # about 1.5 voxels at its centre
    moving = warp(fixed, w, padding_mode="border").expand(3, -1, *shape)
    proposed = torch.cat([-w / 2, -w / 3, -2 * w])
    chosen = best_weight_scale(fixed.expand(3, -1, *shape), moving, torch.zeros_like(proposed), proposed)
    assert chosen.tolist() == [2.0, 3.0, 0.5]


def test_with_the_weight_search_each_step_lowers_the_mse_at_least_as_much_as_the_networks_own_step():
    fixed, moving = pair(2)
    torch.manual_seed(0)
    network = R2N2Network(R2N2Config(ndim=2, channels=(8, 8, 8, 16), weight_search=True))
    torch.nn.init.normal_(network.parameters_net.fc[-1].weight, std=0.1)  # small steps: room to scale up
    mse = lambda u: float(((warp(moving, u) - fixed) ** 2).mean())  # noqa: E731
    with torch.no_grad():
        states = list(network.iterate(fixed, moving, 4))
    previous = torch.zeros_like(states[0].displacement)
    for s in states:
        assert float(s.weight_scale[0]) in WEIGHT_SEARCH_SCALES
        own_step = s.local / s.weight_scale.reshape(-1, 1, 1, 1)
        assert mse(s.displacement) <= mse(previous + own_step) + 1e-9
        torch.testing.assert_close(gaussian_displacement(s.gaussian, SHAPES[2])[0], s.local)  # the scaled weight
        previous = s.displacement
    assert any(float(s.weight_scale[0]) != 1 for s in states)
    with torch.no_grad():  # off for this call: the network's own steps
        assert all(s.weight_scale is None for s in network.iterate(fixed, moving, 2, weight_search=False))
    sum(((warp(moving, u) - fixed) ** 2).mean() for u in network(fixed, moving, 2)).backward()
    assert network.parameters_net.fc[-1].weight.grad.abs().sum() > 0  # the factor is a constant for backprop


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_gaussians_unbounded_parameters_give_back_the_same_gaussian(ndim):
    angles = torch.tensor([[0.7, 2.9]]).T if ndim == 2 else torch.tensor([[0.7, 2.0, 0.1], [2.9, 1.2, 3.0]])
    g = LocalDeformation(torch.tensor([[0.3, -0.8, 0.5], [-0.1, 0.0, 0.9]])[:, :ndim],
                         torch.tensor([[0.05, 0.2, 0.29], [0.12, 0.01, 0.15]])[:, :ndim], angles,
                         torch.tensor([[0.02, -0.3, 0.0], [-0.05, 0.1, 0.6]])[:, :ndim])
    back = gaussian_from_raw(gaussian_raw(g, 0.3), ndim, 0.3)
    for name in ("center", "sigma", "angles", "weight"):
        torch.testing.assert_close(getattr(back, name), getattr(g, name), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_refining_a_misplaced_gaussian_moves_it_towards_the_one_that_deformed_the_image(ndim):
    # moving = fixed warped by one Gaussian w; two proposals to undo it, one off-centre and half as strong, one
    # exact: the refinement brings the first closer to -w and lowers its MSE, and leaves the exact one as good
    shape = (48, 44) if ndim == 2 else (28, 26, 24)
    fixed = smooth_random_image(shape)
    centre, sigma = torch.tensor([[0.1, -0.2, 0.15][:ndim]]), torch.full((1, ndim), 0.25)
    angles, weight = torch.full((1, 1 if ndim == 2 else 3), 0.5), torch.tensor([[0.06, -0.04, 0.05][:ndim]])
    w = gaussian_displacement(LocalDeformation(centre, sigma, angles, weight), shape)[0]
    moving = warp(fixed, w, padding_mode="border").expand(2, -1, *shape)
    proposals = LocalDeformation(torch.cat([centre + 0.12, centre]), sigma.expand(2, -1), angles.expand(2, -1),
                                 torch.cat([-weight / 2, -weight]))
    u = torch.zeros(2, ndim, *shape)
    mse = lambda g: ((warp(moving, gaussian_displacement(g, shape)[0]) - fixed) ** 2).flatten(1).mean(1)  # noqa: E731
    refined = refine_gaussian(fixed.expand(2, -1, *shape), moving, u, proposals, 0.3, iterations=30)
    before, after = mse(proposals), mse(refined)
    assert after[0] < 0.5 * before[0] and after[1] <= before[1] + 1e-9  # each sample on its own; never worse
    error = lambda g: float((gaussian_displacement(g, shape)[0][0] + w[0]).norm(dim=0).max())  # noqa: E731
    assert error(refined) < 0.6 * error(proposals)
    assert float((refined.center[0] - centre[0]).norm()) < float((proposals.center[0] - centre[0]).norm())


def test_with_refinement_each_step_adds_the_refined_gaussian_and_the_network_still_trains():
    fixed, moving = pair(2)
    torch.manual_seed(0)
    network = R2N2Network(R2N2Config(ndim=2, channels=(8, 8, 8, 16)))
    torch.nn.init.normal_(network.parameters_net.fc[-1].weight, std=0.1)
    mse = lambda u: float(((warp(moving, u) - fixed) ** 2).mean())  # noqa: E731
    with torch.no_grad():
        plain = list(network.iterate(fixed, moving, 3))
        refined = list(network.iterate(fixed, moving, 3, refine_iterations=10))
    assert mse(refined[0].displacement) < mse(plain[0].displacement)  # the same first proposal, refined
    previous = torch.zeros_like(refined[0].displacement)
    for s in refined:
        torch.testing.assert_close(gaussian_displacement(s.gaussian, SHAPES[2])[0], s.local)  # what is streamed
        torch.testing.assert_close(s.displacement, previous + s.local)
        previous = s.displacement
    sum(((warp(moving, u) - fixed) ** 2).mean() for u in
        (s.displacement for s in network.iterate(fixed, moving, 2, refine_iterations=3))).backward()
    assert network.parameters_net.fc[-1].weight.grad.abs().sum() > 0  # the refinement is a constant for backprop


def r2n2_checkpoint(tmp_path, ndim):
    path = checkpoint(tmp_path, "r2n2", ndim, channels=[8, 8, 8, 16])
    method = get_method("r2n2").create(path)
    torch.manual_seed(1)
    torch.nn.init.normal_(method.network.parameters_net.fc[-1].weight, std=0.5)
    return method


def test_an_r2n2_run_reports_each_gaussian_and_its_field_is_exact_on_the_image_grid(tmp_path):
    method = r2n2_checkpoint(tmp_path, 2)
    fixed, moving = pair(2)
    steps = list(method.run(fixed, moving, steps=5))
    assert len(steps) == 5 and steps[-1].final
    keys = {"center_0", "center_1", "sigma_0", "sigma_1", "rotation", "weight_0", "weight_1", "confidence",
            "similarity", "folding_percent"}
    assert all(keys <= set(s.metrics) for s in steps)
    total = torch.zeros_like(steps[0].displacement)
    for s in steps:
        total += s.channels["local_deformation"][None]
        assert s.channels["gaussian"].shape == (1, *SHAPES[2]) and float(s.channels["gaussian"].max()) <= 1
        center = [s.metrics["center_0"], s.metrics["center_1"]]
        assert all(0 <= c <= n - 1 for c, n in zip(center, SHAPES[2]))
    torch.testing.assert_close(steps[-1].displacement, total, atol=1e-5, rtol=0)


def test_the_weight_search_is_an_option_of_an_r2n2_run_that_reports_the_factor_it_chose(tmp_path):
    method = r2n2_checkpoint(tmp_path, 2)
    fixed, moving = pair(2)
    plain = list(method.run(fixed, moving, steps=3))
    assert all("weight_scale" not in s.metrics for s in plain)  # the bundled checkpoints run without it
    method.options = type(method.options).from_dict({"weight_search": "true"})
    searched = list(method.run(fixed, moving, steps=3))
    assert all(s.metrics["weight_scale"] in WEIGHT_SEARCH_SCALES for s in searched)
    total = sum(s.channels["local_deformation"][None] for s in searched)
    torch.testing.assert_close(searched[-1].displacement, total, atol=1e-5, rtol=0)  # still exact on the image grid


def test_gaussian_refinement_is_an_option_of_an_r2n2_run_whose_field_stays_exact(tmp_path):
    method = r2n2_checkpoint(tmp_path, 2)
    fixed, moving = pair(2)
    plain = list(method.run(fixed, moving, steps=3))
    method.options = type(method.options).from_dict({"refine_iterations": "10"})
    refined = list(method.run(fixed, moving, steps=3))
    mse = lambda steps: float(((warp(moving, steps[-1].displacement) - fixed) ** 2).mean())  # noqa: E731
    assert mse(refined) < 0.8 * mse(plain)  # the refinement's objective, on the image grid
    assert any(refined[0].metrics[k] != plain[0].metrics[k] for k in ("center_0", "sigma_0", "weight_0"))
    total = sum(s.channels["local_deformation"][None] for s in refined)
    torch.testing.assert_close(refined[-1].displacement, total, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="refine_iterations"):
        type(method.options).from_dict({"refine_iterations": -1}).check()


def test_a_single_slice_volume_registers_with_a_2d_checkpoint(tmp_path):
    method = r2n2_checkpoint(tmp_path, 2)
    fixed, moving = pair(2)
    steps = list(method.run(fixed[:, :, None], moving[:, :, None], steps=3))
    u = steps[-1].displacement
    assert u.shape == (1, 3, 1, *SHAPES[2]) and float(u[:, 0].abs().max()) == 0
    expected = list(method.run(fixed, moving, steps=3))[-1].displacement
    torch.testing.assert_close(u[:, 1:, 0], expected)
    assert steps[-1].warped.shape == (1, 1, 1, *SHAPES[2])
    assert steps[-1].metrics["center_0"] == 0 and "center_2" in steps[-1].metrics  # renumbered to the volume axes


# --- both, through the real worker --------------------------------------------------------------------------
@pytest.mark.parametrize("method, channels", [("iirp", {"residual_flow", "warped_features"}),
                                              ("r2n2", {"local_deformation", "gaussian", "attention"})])
def test_a_checkpoint_round_trips_through_the_real_worker_which_streams_every_step(
        tmp_path, sample_pair, leak_check, method, channels):
    from test_worker import request_from, run_client
    from iterreg.imaging import prepare_pair
    architecture = {"channels": [8, 8, 8, 16]} if method == "r2n2" else {}
    path = checkpoint(tmp_path, method, 3, **architecture)
    request = request_from(sample_pair, method, checkpoint=path, steps=5, threads=2,
                           channels={name: "all" for name in channels}, options={"working_size": 32})
    client, steps = run_client(request, leak_check)
    assert client.state == "completed", client.failure
    assert [s.index for s in steps] == list(range(len(steps))) and 4 <= len(steps) <= 5
    assert set(steps[0].channels) == channels
    prepared = prepare_pair(sample_pair.fixed, sample_pair.moving)
    expected = list(get_method(method).create(path, options={"working_size": 32}).run(
        prepared.fixed, prepared.moving, steps=5))
    np.testing.assert_allclose(client.result.displacement, expected[-1].displacement[0].numpy(), atol=1e-4)


def test_the_slicer_module_marks_each_gaussian_centre_as_a_point_in_the_fixed_volume(tmp_path, sample_pair):
    import slicer_harness
    from iterreg.geometry import Geometry
    from iterreg_slicer.scene_registration import RunSettings, SceneRegistration
    scene = slicer_harness.new_scene()
    fixed = slicer_harness.add_volume(scene, "fixed", sample_pair.fixed)
    moving = slicer_harness.add_volume(scene, "moving", sample_pair.moving)
    path = checkpoint(tmp_path, "r2n2", 3, channels=[8, 8, 8, 16])
    run = SceneRegistration(scene, fixed, moving, RunSettings(method="r2n2", steps=4, checkpoint=path,
                                                              options={"working_size": 32}))
    run.start().wait(timeout=120)
    assert run.state == "completed", run.message
    centres = run.nodes["centres"]
    assert centres.GetNumberOfControlPoints() == 4
    assert [centres.GetNthControlPointLabel(i) for i in range(4)] == ["1", "2", "3", "4"]
    last = run.client.history[-1]
    geometry = Geometry.of(sample_pair.fixed)
    expected = geometry.array_index_to_ras(np.array([[last[f"center_{k}"] for k in range(3)]]))[0]
    np.testing.assert_allclose(centres.GetNthControlPointPositionWorld(3), expected, atol=1e-3)
    assert run.channel_name == "local_deformation"


def test_the_slicer_module_runs_iirp_and_plots_its_gain(tmp_path, sample_pair):
    import slicer_harness
    from iterreg_slicer.scene_registration import RunSettings, SceneRegistration
    scene = slicer_harness.new_scene()
    fixed = slicer_harness.add_volume(scene, "fixed", sample_pair.fixed)
    moving = slicer_harness.add_volume(scene, "moving", sample_pair.moving)
    run = SceneRegistration(scene, fixed, moving, RunSettings(method="iirp", steps=8,
                                                              checkpoint=checkpoint(tmp_path, "iirp", 3),
                                                              options={"working_size": 32}))
    run.start().wait(timeout=120)
    assert run.state == "completed", run.message
    assert "centres" not in run.nodes  # only methods with local deformations get points
    assert run.nodes["browser"].GetNumberOfItems() == run.steps_done >= 4
    assert run.channel_name == "residual_flow"
    table = run.nodes["table"].GetTable()
    columns = {table.GetColumnName(c) for c in range(table.GetNumberOfColumns())}
    assert {"gain", "level", "iterstop_ncc"} <= columns


def test_a_2d_plus_t_series_registers_frame_by_frame_to_the_chosen_frame(tmp_path):
    method = r2n2_checkpoint(tmp_path, 2)
    method = get_method("r2n2")(method.network, method.metadata,
                                get_method("r2n2").Options.from_dict({"frame_axis": 1, "fixed_frame": 2}))
    frames = [pair(2, seed)[s] for seed, s in ((0, 0), (1, 1), (2, 0), (3, 1))]  # alternating shifted frames
    series = torch.stack([f[0, 0] for f in frames], dim=0)[None, None].movedim(2, 3)  # frames along axis 1
    assert series.shape == (1, 1, SHAPES[2][0], 4, SHAPES[2][1])
    steps = list(method.run(series, series, steps=3))
    u = steps[-1].displacement
    assert u.shape == (1, 3, SHAPES[2][0], 4, SHAPES[2][1]) and float(u[:, 1].abs().max()) == 0
    for index in (0, 3):  # each frame alone, registered to frame 2, gives that frame's field
        alone = list(method.__class__(method.network, method.metadata).run(
            frames[2], frames[index], steps=3))[-1].displacement
        torch.testing.assert_close(u[0, [0, 2], :, index], alone[0], atol=1e-4, rtol=0)
    assert steps[0].channels["gaussian"].shape == (1, *series.shape[2:])
    with pytest.raises(InputError, match="fixed_frame 7 does not exist"):
        get_method("r2n2")(method.network, method.metadata,
                           get_method("r2n2").Options.from_dict({"frame_axis": 1, "fixed_frame": 7})).check_inputs(
            series, series, 3)


def test_the_slicer_module_registers_single_slice_volumes_with_a_2d_checkpoint(tmp_path, sample_pair):
    import SimpleITK as sitk
    import slicer_harness
    from iterreg_slicer.scene_registration import RunSettings, SceneRegistration
    scene = slicer_harness.new_scene()
    one_slice = lambda image: image[:, :, image.GetSize()[2] // 2:image.GetSize()[2] // 2 + 1]  # noqa: E731
    fixed = slicer_harness.add_volume(scene, "fixed slice", one_slice(sample_pair.fixed))
    moving = slicer_harness.add_volume(scene, "moving slice", one_slice(sample_pair.moving))
    assert SceneRegistration.input_problem(fixed, moving) is None  # one slice is a valid input
    thin = slicer_harness.add_volume(scene, "two slices", sample_pair.fixed[:, :, :2])
    assert "exactly one slice" in SceneRegistration.input_problem(thin, moving)
    path = checkpoint(tmp_path, "r2n2", 2, channels=[8, 8, 8, 16])
    run = SceneRegistration(scene, fixed, moving, RunSettings(method="r2n2", steps=3, checkpoint=path))
    run.start().wait(timeout=120)
    assert run.state == "completed", run.message
    assert run.nodes["centres"].GetNumberOfControlPoints() == 3
    assert run.nodes["channel"].GetImageData().GetDimensions()[2] == 1  # channel maps shown as one slice
