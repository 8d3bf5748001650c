"""RIIR and DEQReg: the recurrent-inference and deep-equilibrium methods (issue 6).

Specification: both networks work in 2D and 3D and train end to end (every parameter gets a gradient);
RIIR's hidden states evolve from step to step; DEQReg stops at its relative-residual tolerance and reports
the residual, its phantom-gradient training lowers the loss, and it can be stopped mid-solve; checkpoints
round-trip through the real worker, which streams every step with its channels; runs are deterministic
with a seed on CPU.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from iterreg.checkpoints import save_checkpoint
from iterreg.errors import InputError
from iterreg.methods import Prompts, get_method
from iterreg.methods.learned import load_network
from iterreg.networks.deqreg import DEQRegConfig, DEQRegNetwork, stream_solver
from iterreg.networks.riir import RIIRConfig, RIIRNetwork
from iterreg.spatial import warp

SHAPES = {2: (40, 36), 3: (24, 20, 28)}  # deliberately not multiples of the U-Net's 32


def pair(ndim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth blob image and a shifted copy: something to register."""
    generator = torch.Generator().manual_seed(seed)
    shape = SHAPES[ndim]
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    fixed = torch.exp(-sum((a / 0.5) ** 2 for a in axes))[None, None]
    fixed = fixed + 0.05 * torch.rand(fixed.shape, generator=generator)
    shift = torch.zeros(1, ndim, *shape)
    shift[:, 0] = 2.0
    return fixed, warp(fixed, shift)


def checkpoint(tmp_path, method: str, ndim: int, **architecture) -> str:
    """A checkpoint of a seeded, untrained network, written the way the trainer writes one."""
    cls = get_method(method)
    arch = {**cls.default_architecture(ndim), **architecture}
    torch.manual_seed(0)
    network = cls.build_network(arch)
    path = tmp_path / f"{method}_{ndim}d.safetensors"
    save_checkpoint(path, network.state_dict(), {"method": method, "architecture": arch, "ndim": ndim,
                                                 "training": {"similarity": "lncc", "window": 5}})
    return str(path)


# --- RIIR --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
def test_riir_predicts_one_displacement_per_step_in_2d_and_3d(ndim):
    fixed, moving = pair(ndim)
    network = RIIRNetwork(RIIRConfig(ndim=ndim, steps=3))
    displacements = get_method("riir").predict(network, fixed, moving)
    assert len(displacements) == 3
    assert all(u.shape == (1, ndim, *SHAPES[ndim]) for u in displacements)


def test_riir_training_reaches_every_parameter_including_both_convgrus():
    fixed, moving = pair(3)
    torch.manual_seed(0)
    network = RIIRNetwork(RIIRConfig(ndim=3, steps=3))
    torch.nn.init.normal_(network.cell.head.weight, std=1e-2)  # a trained-like head, so updates are not ~0
    displacements = get_method("riir").predict(network, fixed, moving)
    loss = sum(((warp(moving, u) - fixed) ** 2).mean() for u in displacements)
    loss.backward()
    missing = [name for name, p in network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert {"2", "3"} == set(network.cell.grus.keys())


def test_riir_hidden_states_evolve_and_each_step_sees_a_new_similarity_gradient():
    fixed, moving = pair(2)
    torch.manual_seed(0)
    network = RIIRNetwork(RIIRConfig(ndim=2, steps=4))
    torch.nn.init.normal_(network.cell.head.weight, std=1e-2)
    with torch.no_grad():
        states = list(network.iterate(fixed, moving, 4))
    for earlier, later in zip(states, states[1:]):
        assert len(later.hidden) == 2
        for h_a, h_b in zip(earlier.hidden, later.hidden):
            assert h_a.shape == h_b.shape and not torch.allclose(h_a, h_b)
        assert not torch.allclose(earlier.inner_gradient, later.inner_gradient)
        assert torch.allclose(later.displacement, earlier.displacement + later.update)


@pytest.mark.parametrize("levels, expected", [((), 0), ((2,), 1), ((2, 3), 2)])
def test_riir_hidden_levels_are_configurable_for_the_ablation(levels, expected):
    fixed, moving = pair(2)
    network = RIIRNetwork(RIIRConfig(ndim=2, hidden_levels=levels))
    with torch.no_grad():
        state = next(network.iterate(fixed, moving, 1))
    assert len(state.hidden) == expected


@pytest.mark.parametrize("inner", ["mse", "lncc", "nmi"])
def test_riir_inner_gradient_points_downhill_for_every_inner_loss(inner):
    """A small step against the given gradient lowers the inner loss: the cell is fed a true gradient."""
    fixed, moving = pair(2)
    network = RIIRNetwork(RIIRConfig(ndim=2, inner_loss=inner))
    u = torch.zeros(1, 2, *SHAPES[2])
    gradient, before = network.inner_gradient(fixed, moving, u)
    step = -0.5 * gradient / gradient.abs().max()
    after = float(network.inner_loss(fixed, warp(moving, step)))
    assert after < before


def test_riir_detail_channels_fold_each_sub_voxel_phase_into_a_channel():
    from iterreg.networks.riir import detail_channels
    image = torch.arange(2 * 4 * 6 * 8, dtype=torch.float32).reshape(2, 1, 4, 6, 8)
    detail = detail_channels(image, (2, 3, 4))
    assert detail.shape == (2, 8, 2, 3, 4)
    for p0, p1, p2 in np.ndindex(2, 2, 2):  # channel (p0, p1, p2) at (i, j, k) is voxel (2i+p0, 2j+p1, 2k+p2)
        torch.testing.assert_close(detail[:, 4 * p0 + 2 * p1 + p2], image[:, 0, p0::2, p1::2, p2::2])
    assert detail_channels(torch.rand(1, 1, 9, 7), (4, 4)).shape == (1, 4, 4, 4)  # resampled to 8x8 first


def test_riir_with_detail_input_starts_a_fine_tune_as_the_checkpoint_and_learns_from_the_detail(tmp_path):
    from iterreg_train.trainer import _load_initial_weights
    path = checkpoint(tmp_path, "riir", 2, working_scale=0.5, steps=2)
    cls = get_method("riir")
    plain, _ = load_network(cls, path)
    widened = cls.build_network({**cls.default_architecture(2), "working_scale": 0.5, "steps": 2,
                                 "detail_input": True})
    _load_initial_weights(widened, path, "riir")
    fixed, moving = pair(2)
    before = cls.predict(plain, fixed, moving)
    after = cls.predict(widened, fixed, moving)
    for a, b in zip(before, after):  # the new channels' weights start at zero: the same network
        torch.testing.assert_close(a, b)
    loss = sum(u.pow(2).mean() for u in cls.predict(widened, fixed, moving))
    loss.backward()
    # the first convolution takes u, gradient, warped, fixed (6 channels in 2D) and then 2 x 4 detail channels
    (first,) = [p for p in widened.parameters() if p.dim() == 4 and p.shape[1] == 6 + 8]
    assert float(first.grad[:, 6:].abs().sum()) > 0  # the detail channels' weights learn


def test_riir_exponential_step_weights_follow_the_paper():
    weights = RIIRConfig(steps=6).step_weights(6)
    raw = [10 ** ((t - 1) / 5) for t in range(1, 7)]
    np.testing.assert_allclose(weights, [w / sum(raw) for w in raw])
    assert RIIRConfig(step_weighting="uniform").step_weights(4) == [0.25] * 4


# --- DEQReg ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
def test_deqreg_training_returns_the_sampled_states_and_evaluation_the_solution(ndim):
    fixed, moving = pair(ndim)
    network = DEQRegNetwork(DEQRegConfig(ndim=ndim, max_iter=6, states=3))
    network.train()
    states = get_method("deqreg").predict(network, fixed, moving)
    assert len(states) == 3 and all(u.shape == (1, ndim, *SHAPES[ndim]) for u in states)
    network.eval()
    with torch.no_grad():
        (solution,) = get_method("deqreg").predict(network, fixed, moving)
    assert solution.shape == (1, ndim, *SHAPES[ndim])


def test_deqreg_phantom_gradients_reach_every_parameter():
    fixed, moving = pair(2)
    torch.manual_seed(0)
    network = DEQRegNetwork(DEQRegConfig(ndim=2, max_iter=6))
    torch.nn.init.normal_(network.update.head.weight, std=1e-2)
    network.train()
    states = get_method("deqreg").predict(network, fixed, moving)
    sum(((warp(moving, u) - fixed) ** 2).mean() for u in states).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())


def test_deqreg_phantom_gradient_training_reduces_the_loss_on_a_small_batch():
    from iterreg_train.trainer import registration_loss
    fixed, moving = pair(2)
    torch.manual_seed(0)
    network = DEQRegNetwork(DEQRegConfig(ndim=2, max_iter=8))
    network.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    config = {"similarity": "mse", "window": 5, "regularizer": "diffusion", "regularization_weight": 0.01}
    losses = []
    for _ in range(25):
        states = get_method("deqreg").predict(network, fixed, moving)
        loss, _ = registration_loss(fixed, moving, states, config, step_weights=network.config.step_weights(3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_deqreg_residual_weight_adds_the_vanishing_update_term_in_training_only():
    fixed, moving = pair(2)
    network = DEQRegNetwork(DEQRegConfig(ndim=2, max_iter=4, residual_weight=10.0))
    network.train()
    states = network(fixed, moving)
    expected = 10.0 * network.residual(fixed, moving, states[-1]).pow(2).mean()
    torch.testing.assert_close(network.auxiliary_loss, expected)
    assert network.auxiliary_loss.requires_grad
    network.eval()
    with torch.no_grad():
        network(fixed, moving)
    assert network.auxiliary_loss is None
    assert DEQRegNetwork(DEQRegConfig(ndim=2)).config.residual_weight == 0.0  # the paper has no such term


def test_deqreg_jacobian_weight_penalises_the_jacobian_of_the_map_at_the_solution():
    fixed, moving = pair(2)
    torch.manual_seed(0)
    network = DEQRegNetwork(DEQRegConfig(ndim=2, max_iter=4, jacobian_weight=1.0))
    network.train()
    network(fixed, moving)
    # g = u + f with f ~ 0 at initialisation: J_g ~ I, whose normalised |J|_F^2 is 1
    assert 0.9 < float(network.auxiliary_loss.detach()) < 1.1
    network.auxiliary_loss.backward()
    assert network.update.head.weight.grad.abs().sum() > 0


class Contraction:
    """Stands in for the learned update: f(u) = rate * (target - u), whose fixed point is ``target``."""

    def __init__(self, target, rate=0.5):
        self.target, self.rate = target, rate

    def __call__(self, fixed, moving, u):
        return self.rate * (self.target - u)


@pytest.mark.parametrize("solver", ["fixed_point_iter", "anderson"])
def test_deqreg_stops_at_its_tolerance_and_reports_the_residual(solver, monkeypatch):
    fixed, moving = pair(2)
    network = DEQRegNetwork(DEQRegConfig(ndim=2, solver=solver))
    target = torch.randn(1, 2, *SHAPES[2])
    monkeypatch.setattr(network, "residual", Contraction(target))
    states = list(network.iterate(fixed, moving, max_iter=100, tolerance=1e-4))
    residuals = [s.relative_residual for s in states]
    assert residuals[-1] < 1e-4 and all(r >= 1e-4 for r in residuals[:-1])
    assert len(states) < 100
    torch.testing.assert_close(states[-1].displacement, target, rtol=0, atol=1e-3)
    if solver == "fixed_point_iter":  # evaluation k: g = (1 - 0.5^k) target, residual 0.5^k / (1 - 0.5^k)
        assert len(states) == 14  # the first k with 0.5^k / (1 - 0.5^k) < 1e-4


def test_deqreg_damping_reaches_the_fixed_point_that_plain_iteration_overshoots(tmp_path, monkeypatch):
    fixed, moving = pair(2)
    network = DEQRegNetwork(DEQRegConfig(ndim=2))
    target = torch.randn(1, 2, *SHAPES[2])
    monkeypatch.setattr(network, "residual", Contraction(target, rate=2.5))  # g(u) - target = -1.5 (u - target)
    plain = list(network.iterate(fixed, moving, max_iter=20, tolerance=1e-4))
    damped = list(network.iterate(fixed, moving, max_iter=20, tolerance=1e-4, damping=0.5))  # factor -0.25
    assert len(plain) == 20 and float((plain[-1].displacement - target).abs().max()) > 100  # oscillates away
    assert len(damped) < 20
    torch.testing.assert_close(damped[-1].displacement, target, rtol=0, atol=1e-3)
    with pytest.raises(InputError, match="damping must be in"):
        get_method("deqreg").create(checkpoint(tmp_path, "deqreg", 2), options={"damping": 1.5})


def test_deqreg_run_reports_the_residual_and_its_channels_and_ends_converged(tmp_path, monkeypatch):
    fixed, moving = pair(2)
    method = get_method("deqreg").create(checkpoint(tmp_path, "deqreg", 2), options={"tolerance": 1e-3})
    monkeypatch.setattr(method.network, "residual", Contraction(torch.full((1, 2, *SHAPES[2]), 0.5)))
    steps = list(method.run(fixed, moving, steps=48))
    assert steps[-1].final and "converged" in steps[-1].phase and len(steps) < 48
    assert not any(s.final for s in steps[:-1])
    assert all("residual" in s.metrics for s in steps)
    assert set(steps[0].channels) == {"residual_map", "update"} and steps[0].channels["update"].shape[0] == 2


def test_closing_a_deqreg_run_mid_solve_stops_the_solver_thread(tmp_path):
    fixed, moving = pair(2)
    method = get_method("deqreg").create(checkpoint(tmp_path, "deqreg", 2), options={"tolerance": 0.0})
    before = {t.name for t in threading.enumerate()}
    run = method.run(fixed, moving, steps=100)
    for _ in range(3):
        next(run)
    assert any(t.name.startswith("torchdeq-") for t in threading.enumerate())
    run.close()
    assert {t.name for t in threading.enumerate()} <= before


def test_a_solver_error_reaches_the_consumer():
    def broken(z):
        raise RuntimeError("network failed")
    with pytest.raises(RuntimeError, match="network failed"):
        list(stream_solver("fixed_point_iter", broken, torch.zeros(3), max_iter=5))


# --- both, through the method interface and the worker -------------------------------------------------------
@pytest.mark.parametrize("method", ["riir", "deqreg"])
def test_learned_iterative_methods_refuse_prompts_and_the_wrong_dimension(tmp_path, method):
    instance = get_method(method).create(checkpoint(tmp_path, method, 2))
    fixed, moving = pair(2)
    points = torch.tensor([[5.0, 5.0]])
    with pytest.raises(InputError, match="cannot use landmark prompts"):
        next(instance.run(fixed, moving, prompts=Prompts(points, points)))
    with pytest.raises(InputError, match="trained on 2D images"):
        next(instance.run(*pair(3)))


def test_riir_runs_the_steps_its_checkpoint_was_trained_with_unless_told(tmp_path):
    # the paper unrolls the same T at inference as in training; DEQReg keeps its solver's budget
    for trained in (4, 9):
        instance = get_method("riir").create(checkpoint(tmp_path, "riir", 2, steps=trained))
        assert instance.default_step_count == trained
        assert len(list(instance.run(*pair(2)))) == trained
        assert len(list(instance.run(*pair(2), steps=2))) == 2
    deqreg = get_method("deqreg")
    assert deqreg.create(checkpoint(tmp_path, "deqreg", 2)).default_step_count == deqreg.default_steps


def test_the_worker_tells_the_panel_each_bundled_checkpoints_default_steps():
    from iterreg.resources import checkpoint_metadata
    from iterreg.worker import describe_methods
    described = {m["name"]: m for m in describe_methods()}
    riir = described["riir"]
    assert riir["checkpoint_default_steps"] == {
        path: checkpoint_metadata(path)["architecture"]["steps"] for path in riir["bundled_checkpoints"]}
    assert riir["default_steps"] == riir["checkpoint_default_steps"][riir["bundled_checkpoints"][0]]
    assert set(described["deqreg"]["checkpoint_default_steps"].values()) == {get_method("deqreg").default_steps}


@pytest.mark.parametrize("method", ["riir", "deqreg"])
def test_a_warm_start_continues_from_the_given_field(tmp_path, method):
    instance = get_method(method).create(checkpoint(tmp_path, method, 2))
    fixed, moving = pair(2)
    init = torch.zeros(1, 2, *SHAPES[2])
    init[:, 0] = 1.5
    first = next(instance.run(fixed, moving, steps=1, init=init))
    assert abs(float(first.displacement[:, 0].mean()) - 1.5) < 0.1  # an untrained network barely moves it


@pytest.mark.parametrize("method", ["riir", "deqreg"])
def test_a_step_upsamples_its_working_field_only_when_read(tmp_path, method, monkeypatch):
    """On a coarser working grid most streamed steps are never shown whole (a busy client gets their metrics
    only; the command line keeps the last), so a step upsamples its field on first access, once for both the
    field and the warped image; the divergence check uses a bound from the working field instead."""
    from iterreg.methods.base import finite_steps
    from iterreg.methods.learned import WorkingGrid
    upsampled = []
    original = WorkingGrid.displacement_up
    monkeypatch.setattr(WorkingGrid, "displacement_up", lambda self, u: upsampled.append(1) or original(self, u))
    options = {"working_size": 12, **({"tolerance": 0.0} if method == "deqreg" else {})}  # all 3 steps
    instance = get_method(method).create(checkpoint(tmp_path, method, 3), options=options)
    fixed, moving = pair(3)
    steps = list(finite_steps(instance, instance.run(fixed, moving, steps=3)))
    assert len(steps) == 3 and upsampled == []
    for step in steps:
        field = step.displacement
        assert field.shape == (1, 3, *SHAPES[3])
        largest = float(field.abs().amax())
        assert largest <= step.displacement_bound[0] <= 1.5 * largest and step.displacement_bound[1] == 28
        torch.testing.assert_close(step.warped, warp(moving, field))
    assert len(upsampled) == 3


@pytest.mark.parametrize("method", ["riir", "deqreg"])
def test_inference_is_deterministic_on_cpu(tmp_path, method):
    path = checkpoint(tmp_path, method, 3)
    fixed, moving = pair(3)
    runs = [[s.displacement for s in get_method(method).create(path).run(fixed, moving, steps=3)]
            for _ in range(2)]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method, channels", [("riir", {"h1", "h2", "inner_gradient"}),
                                              ("deqreg", {"residual_map", "update"})])
def test_a_checkpoint_round_trips_through_the_real_worker_which_streams_every_step(
        tmp_path, sample_pair, leak_check, method, channels):
    from test_worker import request_from, run_client
    from iterreg.imaging import prepare_pair
    path = checkpoint(tmp_path, method, 3)
    request = request_from(sample_pair, method, checkpoint=path, steps=4, threads=2, channels={
        name: "all" for name in channels}, options={"working_size": 32})
    client, steps = run_client(request, leak_check)
    assert client.state == "completed", client.failure
    assert [s.index for s in steps] == list(range(len(steps))) and 1 <= len(steps) <= 4
    assert set(steps[0].channels) == channels
    if method == "riir":
        assert steps[0].channels["h1"].shape[0] == 32  # every channel of the hidden state
    prepared = prepare_pair(sample_pair.fixed, sample_pair.moving)
    expected = list(get_method(method).create(path, options={"working_size": 32}).run(
        prepared.fixed, prepared.moving, steps=4))
    np.testing.assert_allclose(client.result.displacement, expected[-1].displacement[0].numpy(), atol=1e-4)


@pytest.mark.parametrize("method, first_channel", [("riir", "h1"), ("deqreg", "residual_map")])
def test_the_slicer_module_runs_both_and_shows_their_own_channels(tmp_path, sample_pair, method, first_channel):
    import slicer_harness
    from iterreg_slicer.scene_registration import RunSettings, SceneRegistration
    scene = slicer_harness.new_scene()
    fixed = slicer_harness.add_volume(scene, "fixed", sample_pair.fixed)
    moving = slicer_harness.add_volume(scene, "moving", sample_pair.moving)
    run = SceneRegistration(scene, fixed, moving, RunSettings(method=method, steps=3,
                                                              checkpoint=checkpoint(tmp_path, method, 3)))
    run.start().wait(timeout=120)
    assert run.state == "completed", run.message
    assert run.nodes["browser"].GetNumberOfItems() == 3
    assert run.channel_name == first_channel
