"""DIO: learned features registered by an optimization layer, with landmark and label prompts (issue 8).

Specification: the feature network sees one image at a time and gives feature images at scales 4, 2, 1 in 2D
and 3D (U-Net, encoder-only and large-kernel variants); the optimization layer recovers a known displacement
of feature images; the representation (free-form, diffeomorphic, svf) is chosen per run on one checkpoint;
training reaches every weight through Jacobian-free backprop; landmark prompts pull the prompted points
together step by step; a warm-started run continues from the given field; bad prompts are refused with the
point named; runs stream through the real worker.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from iterreg.errors import InputError
from iterreg.feature_optimizer import FieldPrompts, SolverSettings, optimise, prompt_reach_mm
from iterreg.methods import Prompts, get_method
from iterreg.metrics import folding_percent
from iterreg.networks.dio import DIOConfig, FeatureNetwork
from iterreg.spatial import gaussian_smooth, invert_displacement, resize_displacement, resize_image, warp

from test_riir_deqreg import SHAPES, checkpoint, pair


def smooth_features(shape, channels=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return gaussian_smooth(torch.rand(1, channels, *shape, generator=generator), 2.0)


def pyramid(image, scales=(4, 2, 1)):
    shape = image.shape[2:]
    return [resize_image(image, [-(-n // s) for n in shape]) for s in scales]


def known_shift(shape):
    """A smooth displacement of about two voxels, and feature images related by it."""
    truth = torch.zeros(1, len(shape), *shape)
    truth[:, 0], truth[:, 1] = 2.0, -1.5
    truth = gaussian_smooth(truth, 5.0)
    fixed = smooth_features(shape)
    moving = warp(fixed, invert_displacement(truth))  # moving(x + truth(x)) = fixed(x)
    return fixed, moving, truth


# --- the feature network -------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("variant, kernel", [("unet", "standard"), ("encoder", "standard"), ("unet", "large")])
def test_the_feature_network_gives_feature_images_at_every_scale_of_one_image(ndim, variant, kernel):
    shape = SHAPES[ndim]
    network = FeatureNetwork(DIOConfig(ndim=ndim, variant=variant, kernel=kernel, feature_channels=6))
    maps = network(torch.rand(1, 1, *shape))
    assert [tuple(m.shape) for m in maps] == [(1, 6, *[-(-n // s) for n in shape]) for s in (4, 2, 1)]
    other = network(torch.rand(1, 1, *[n + 5 for n in shape]))  # each image alone: any size works
    assert other[-1].shape[2:] == tuple(n + 5 for n in shape)


def test_training_reaches_every_weight_through_the_optimum_by_jacobian_free_backprop():
    fixed, moving = pair(2)
    torch.manual_seed(0)
    network = FeatureNetwork(DIOConfig(ndim=2, channels=(8, 8, 8, 8), feature_channels=4,
                                       train_iterations=(5, 5, 5), jfb_steps=2))
    displacements = get_method("dio").predict(network, fixed, moving)
    assert len(displacements) == 3 and all(u.shape == (1, 2, *SHAPES[2]) for u in displacements)
    sum(((warp(moving, u) - fixed) ** 2).mean() for u in displacements).backward()
    missing = [name for name, p in network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# --- the optimization layer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("representation", ["freeform", "diffeomorphic", "svf"])
def test_the_optimizer_recovers_a_known_displacement_of_feature_images(representation):
    fixed, moving, truth = known_shift((64, 64))
    states = list(optimise(pyramid(fixed), pyramid(moving), SolverSettings(representation=representation),
                           (64, 64)))
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    error = (states[-1].displacement - truth)[inner].norm(dim=1).mean()
    assert float(error) < 0.4 < float(truth[inner].norm(dim=1).mean()) / 5  # from ~2.5 voxels to < 0.4
    assert [s.scale for s in states][0] == 4 and states[-1].scale == 1
    first = [s.feature_loss for s in states if s.scale_index == 0]
    assert first[-1] < 0.2 * first[0]  # the objective really went down


def test_a_scale_stops_when_its_objective_stops_decreasing():
    fixed, moving, _ = known_shift((32, 32))
    settings = SolverSettings(iterations=(400, 400, 400), tolerance=1e-2, patience=3)
    states = list(optimise(pyramid(fixed), pyramid(moving), settings, (32, 32)))
    ends = [s for s in states if s.last_at_scale]
    assert len(ends) == 3 and all(s.converged and s.iteration < 400 for s in ends)


@pytest.mark.parametrize("representation", ["diffeomorphic", "svf"])
def test_the_diffeomorphic_representations_do_not_fold(representation):
    fixed, moving, _ = known_shift((64, 64))
    moving = moving * (1 + 0.5 * smooth_features((64, 64), channels=1, seed=5))  # features that disagree
    final = list(optimise(pyramid(fixed), pyramid(moving), SolverSettings(representation=representation),
                          (64, 64)))[-1]
    assert folding_percent(final.displacement) == 0


def test_a_landmark_prompt_pulls_its_points_together_step_by_step():
    shape = (40, 40)
    flat = [torch.zeros(1, 2, *[-(-n // s) for n in shape]) for s in (4, 2, 1)]  # features carry no signal
    fixed_points = torch.tensor([[12.0, 14.0], [28.0, 25.0]])
    moving_points = fixed_points + torch.tensor([[3.0, -2.0], [-2.5, 1.5]])
    prompts = FieldPrompts(fixed_points, moving_points, spacing=(1.0, 1.0), weight=1.0, radius_mm=6.0)
    states = list(optimise(flat, flat, SolverSettings(iterations=(30, 30, 30), tolerance=0), shape, prompts))
    distances = [s.prompt_distance_mm for s in states]
    assert distances[0] == pytest.approx(float((moving_points - fixed_points).norm(dim=1).mean()), rel=1e-4)
    for k in range(3):  # monotonically closer at each scale; upsampling the field between scales may move the
        at_scale = [s.prompt_distance_mm for s in states if s.scale_index == k]  # points by hundredths
        assert all(b <= a + 1e-4 for a, b in zip(at_scale, at_scale[1:]))
    assert max(b - a for a, b in zip(distances, distances[1:])) < 0.05
    u = states[-1].displacement
    from iterreg.spatial import sample_displacement_at
    assert float((fixed_points + sample_displacement_at(u, fixed_points) - moving_points).norm(dim=1).max()) < 0.1
    assert folding_percent(u) == 0


def test_a_label_prompt_enters_the_objective():
    shape = (32, 32)
    flat = [torch.zeros(1, 2, *[-(-n // s) for n in shape]) for s in (4, 2, 1)]
    fixed_labels = torch.zeros(1, 1, *shape, dtype=torch.long)
    fixed_labels[:, :, 10:20, 10:20] = 1
    moving_labels = torch.roll(fixed_labels, shifts=3, dims=3)
    prompts = FieldPrompts(fixed_labels=fixed_labels, moving_labels=moving_labels)
    states = list(optimise(flat, flat, SolverSettings(iterations=(20, 20, 20)), shape, prompts))
    assert states[-1].label_loss < 0.5 * states[0].label_loss
    assert float(states[-1].displacement[:, 1, 12:18, 12:18].mean()) == pytest.approx(3.0, abs=0.7)


def test_a_warm_started_run_continues_from_the_given_field():
    fixed, moving, truth = known_shift((32, 32))
    states = list(optimise(pyramid(fixed)[1:], pyramid(moving)[1:], SolverSettings(iterations=(3, 3)), (32, 32),
                           base=truth))
    first = states[0].displacement
    torch.testing.assert_close(first, resize_displacement(truth, first.shape[2:]), atol=0.55, rtol=0)  # one step
    assert float(states[0].variable.abs().max()) <= 0.5 + 1e-6  # the correction moved at most half a voxel


def test_a_refinement_changes_the_field_only_within_the_prompts_reach():
    """A large correction at one prompted point must not creep across the image: the refinement smooths each
    update, not the correction it accumulates (which, re-imposed at the point every iteration, would diffuse)."""
    shape = (64, 64)
    flat = [torch.zeros(1, 2, *[-(-n // s) for n in shape]) for s in (2, 1)]  # features carry no signal
    point = torch.tensor([[32.0, 32.0]])
    prompts = FieldPrompts(point, point + torch.tensor([[6.0, 0.0]]), spacing=(1.0, 1.0), radius_mm=4.0)
    base = torch.zeros(1, 2, *shape)
    states = list(optimise(flat, flat, SolverSettings(iterations=(60, 60), tolerance=0), shape, prompts, base=base))
    correction = (states[-1].displacement - base).norm(dim=1)[0]
    assert float(correction[32, 32]) == pytest.approx(6.0, abs=0.3)  # the prompted point moved
    distance = (torch.stack(torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")) - 32).norm(dim=0)
    assert float(correction[distance > 16].max()) < 0.05  # four radii away: untouched


def test_prompts_whose_residuals_agree_reach_further_than_prompts_whose_residuals_disagree():
    """The reach adapts to the prompts: a region off the same way (residuals that agree) moves as a whole; local
    errors that disagree (or too few prompts to tell) keep the short reach, so nothing else moves."""
    points = torch.tensor([[0.0, 0.0], [20.0, 5.0], [5.0, 25.0], [30.0, 30.0], [15.0, 15.0]])
    same_way = torch.tensor([[2.0, -1.0]]).repeat(5, 1) + 0.1 * torch.randn(5, 2, generator=torch.Generator()
                                                                          .manual_seed(0))
    every_way = torch.tensor([[2.0, 0.0], [-2.0, 0.5], [0.0, 2.0], [0.5, -2.0], [-1.5, -1.5]])
    assert prompt_reach_mm(points, same_way, 10.0, 40.0) == pytest.approx(40.0)
    assert prompt_reach_mm(points, every_way, 10.0, 40.0) == pytest.approx(10.0)
    assert prompt_reach_mm(points[:2], same_way[:2], 10.0, 40.0) == 10.0  # two prompts cannot tell
    assert prompt_reach_mm(points, same_way, 10.0, 10.0) == 10.0  # a fixed reach stays fixed


def test_a_refinement_with_agreeing_prompts_moves_the_points_between_them():
    """Three prompts off by the same vector: a point between them, never prompted, follows them when the reach
    may adapt, and stays nearly where it was with the fixed short reach."""
    shape = (64, 64)
    flat = [torch.zeros(1, 2, *[-(-n // s) for n in shape]) for s in (2, 1)]
    fixed_points = torch.tensor([[20.0, 20.0], [20.0, 44.0], [44.0, 32.0]])
    shift = torch.tensor([[3.0, 0.0]])
    base = torch.zeros(1, 2, *shape)
    between = torch.tensor([[28.0, 32.0]])
    from iterreg.spatial import sample_displacement_at
    moved = {}
    for longest in (4.0, 32.0):
        prompts = FieldPrompts(fixed_points, fixed_points + shift, spacing=(1.0, 1.0), radius_mm=4.0,
                               max_radius_mm=longest)
        states = list(optimise(flat, flat, SolverSettings(iterations=(60, 60), tolerance=0), shape, prompts,
                               base=base))
        assert states[-1].prompt_distance_mm < 0.3
        moved[longest] = float(sample_displacement_at(states[-1].displacement, between)[0, 0])
        assert states[-1].prompt_reach_mm == pytest.approx(longest)  # agreeing prompts take the widest reach
    assert moved[4.0] < 0.5 and moved[32.0] > 2.0


# --- the method ----------------------------------------------------------------------------------------------
@pytest.fixture
def dio(tmp_path):
    path = checkpoint(tmp_path, "dio", 2, channels=[8, 8, 8, 8], feature_channels=4)
    return path


def test_one_checkpoint_runs_free_form_and_diffeomorphic_without_retraining(dio):
    fixed, moving = pair(2)
    results = {}
    for representation in ("freeform", "diffeomorphic", "svf"):
        method = get_method("dio").create(dio, options={"representation": representation,
                                                        "iterations": [20, 20, 10]})
        steps = list(method.run(fixed, moving))
        assert steps[-1].final and all(not s.final for s in steps[:-1])
        before, after = (float(((warp(moving, u) - fixed) ** 2).mean()) for u in (0 * steps[0].displacement,
                                                                                  steps[-1].displacement))
        assert after < before
        assert {"scale", "iteration", "feature_loss", "folding_percent"} <= set(steps[0].metrics)
        assert set(steps[0].channels) == {"fixed_features", "warped_moving_features", "feature_difference"}
        results[representation] = steps[-1].displacement
    assert not torch.allclose(results["freeform"], results["diffeomorphic"])


@pytest.mark.parametrize("representation", ["freeform", "svf"])
def test_a_step_computes_its_full_resolution_field_only_when_read_and_as_it_was_at_that_step(
        dio, representation, monkeypatch):
    """DIO streams hundreds of optimizer iterations, most never shown whole (a busy client gets their metrics only;
    the command line keeps the last): a step upsamples its field when it is read, and still gives the field of
    its own iteration however late it is read, also on a warm start; the divergence check uses a bound that
    needs no full-resolution field."""
    from iterreg.methods.base import finite_steps
    from iterreg.methods.learned import WorkingGrid
    fixed, moving = pair(2)
    method = get_method("dio").create(dio, options={"representation": representation, "iterations": [6, 6, 6],
                                                    "working_size": 24})
    first = list(method.run(fixed, moving))[-1].displacement
    upsampled = []
    original = WorkingGrid.displacement_up
    monkeypatch.setattr(WorkingGrid, "displacement_up", lambda self, u: upsampled.append(1) or original(self, u))
    for init in (None, first):
        eager = [step.displacement.clone() for step in method.run(fixed, moving, init=init)]
        upsampled.clear()
        steps = list(finite_steps(method, method.run(fixed, moving, init=init)))
        assert len(steps) == len(eager) > 3 and upsampled == []
        for step, field in zip(steps, eager):
            torch.testing.assert_close(step.displacement, field)
            assert float(field.abs().amax()) <= step.displacement_bound[0] + 1e-5
            torch.testing.assert_close(step.warped, warp(moving, field))
        assert len(upsampled) == len(steps)


def test_the_method_refines_a_previous_result_with_landmark_prompts(dio):
    fixed, moving = pair(2)
    method = get_method("dio").create(dio, options={"iterations": [20, 20, 10], "prompt_radius_mm": 5.0})
    first = list(method.run(fixed, moving))[-1].displacement
    fixed_points = torch.tensor([[10.0, 10.0], [25.0, 20.0], [30.0, 8.0]])
    moving_points = fixed_points + torch.tensor([[2.0, 1.0], [-1.5, 2.0], [1.0, -2.0]])
    prompts = Prompts(fixed_points, moving_points, spacing=(1.0, 1.0))
    refined = list(method.run(fixed, moving, prompts=prompts, init=first))
    assert refined[0].metrics["scale"] == 2  # refinement works at refine_scales only
    distances = [s.metrics["prompt_distance_mm"] for s in refined]
    assert distances[-1] < 0.3 * distances[0]
    assert refined[-1].metrics["prompt_reach_mm"] == 5.0  # the reach is fixed unless prompt_max_radius_mm is set
    assert float((refined[0].displacement - first).abs().mean()) < 0.3 < float(first.abs().mean())  # from there


def test_features_of_a_moving_image_on_its_own_grid_are_carried_onto_the_fixed_grid(dio):
    """Paper §3.1: each image's features alone, so the moving image may stay on the grid it was acquired on."""
    from iterreg.imaging import MovingOnOwnGrid
    fixed, moving = pair(2)
    options = {"iterations": [10, 10, 5]}
    plain = list(get_method("dio").create(dio, options=options).run(fixed, moving))[-1].displacement
    on_own = get_method("dio").create(dio, options={**options, "features_on_own_grid": True,
                                                    "own_grid_voxels": "acquired"})
    same_grid = MovingOnOwnGrid(moving, np.eye(3), (1.0, 1.0), (1.0, 1.0))  # the fixed grid: carrying changes nothing
    carried = list(on_own.run(fixed, moving, moving_own_grid=same_grid))[-1].displacement
    torch.testing.assert_close(carried, plain, atol=1e-4, rtol=0)
    # acquired 2x coarser along x:
    every_other_column = MovingOnOwnGrid(moving[..., ::2], np.diag([1.0, 0.5, 1.0]), (1.0, 2.0), (1.0, 1.0))
    coarse = list(on_own.run(fixed, moving, moving_own_grid=every_other_column))[-1].displacement
    assert torch.isfinite(coarse).all() and not torch.allclose(coarse, plain, atol=1e-3)
    default = get_method("dio").create(dio, options=options)  # off by default: the resampled copy is used
    torch.testing.assert_close(list(default.run(fixed, moving, moving_own_grid=every_other_column))[-1]
                               .displacement, plain)


def test_a_prepared_pair_hands_dio_the_moving_image_on_its_own_grid(dio):
    import SimpleITK as sitk

    from iterreg.imaging import prepare_pair
    fixed, moving = pair(2)
    fixed_image = sitk.GetImageFromArray(fixed[0, 0].numpy())
    coarse = sitk.GetImageFromArray(moving[0, 0, :, ::2].numpy())  # every other column: acquired 2x coarser
    coarse.SetSpacing((2.0, 1.0))
    prepared = prepare_pair(fixed_image, coarse)
    options = {"iterations": [10, 10, 5]}
    resampled = list(get_method("dio").create(dio, options=options).run_pair(prepared))[-1].displacement
    own = get_method("dio").create(dio, options={**options, "features_on_own_grid": True,
                                                 "own_grid_voxels": "acquired"})
    on_own_grid = list(own.run_pair(prepared))[-1].displacement
    assert not torch.allclose(on_own_grid, resampled, atol=1e-3)
    expected = own.run(prepared.fixed, prepared.moving, moving_own_grid=prepared.moving_own_grid)
    torch.testing.assert_close(on_own_grid, list(expected)[-1].displacement)


def test_a_coarse_moving_image_is_seen_on_its_own_grid_at_the_working_voxel_size(dio):
    """A CNN's kernels count voxels, not mm: resampled in its own frame to the fixed working grid's voxel size (the
    default), a 2x coarser moving image registers nearly as its copy resampled onto the fixed grid does; its voxels
    as acquired show the network another scale."""
    import SimpleITK as sitk

    from iterreg.imaging import prepare_pair
    fixed, moving = pair(2)
    coarse = sitk.GetImageFromArray(moving[0, 0, :, ::2].numpy())
    coarse.SetSpacing((2.0, 1.0))
    prepared = prepare_pair(sitk.GetImageFromArray(fixed[0, 0].numpy()), coarse)

    def result(**options):
        method = get_method("dio").create(dio, options={"iterations": [10, 10, 5], **options})
        return list(method.run_pair(prepared))[-1].displacement

    resampled = result()
    working = result(features_on_own_grid=True)
    acquired = result(features_on_own_grid=True, own_grid_voxels="acquired")
    assert float((working - resampled).abs().mean()) < 0.5 * float((acquired - resampled).abs().mean())


@pytest.mark.parametrize("fixed_points, moving_points, message", [
    ([[10.0, 10.0]], [[10.0, float("nan")]], "non-finite"),
    ([[10.0, 10.0], [12.0, 12.0]], [[10.0, 10.0]], "paired points"),
])
def test_bad_prompts_are_refused_with_a_clear_message(dio, fixed_points, moving_points, message):
    fixed, moving = pair(2)
    method = get_method("dio").create(dio)
    prompts = Prompts(torch.tensor(fixed_points), torch.tensor(moving_points))
    with pytest.raises(InputError, match=message):
        next(method.run(fixed, moving, prompts=prompts))


def test_bad_options_are_refused(dio):
    with pytest.raises(InputError, match="unknown representation"):
        get_method("dio").create(dio, options={"representation": "bspline"})
    with pytest.raises(InputError, match="own_grid_voxels must be 'working' or 'acquired'"):
        get_method("dio").create(dio, options={"own_grid_voxels": "isotropic"})
    with pytest.raises(InputError, match=r"prompt_max_radius_mm \(5\) must be at least prompt_radius_mm \(10\)"):
        get_method("dio").create(dio, options={"prompt_max_radius_mm": 5.0})
    with pytest.raises(InputError, match="prompt_max_radius_mm must be a number"):
        get_method("dio").create(dio, options={"prompt_max_radius_mm": "wide"})
    fixed, moving = pair(2)
    with pytest.raises(InputError, match="refine_scales"):
        next(get_method("dio").create(dio, options={"refine_scales": [3]}).run(
            fixed, moving, init=torch.zeros(1, 2, *SHAPES[2])))


# --- landmarks from the scene: pairing and checks name the point ----------------------------------------------
def test_landmark_checks_name_the_point():
    from iterreg.landmarks import check_landmark_pairs
    fixed = np.array([[0.0, 0, 0], [5, 5, 5], [9, 9, 9]])
    with pytest.raises(InputError, match="'B'.*non-finite"):
        check_landmark_pairs(fixed, np.array([[0.0, 0, 0], [np.inf, 1, 1], [1, 1, 1]]), ["A", "B", "C"])
    with pytest.raises(InputError, match="'C' duplicates.*'A'"):
        check_landmark_pairs(np.array([[0.0, 0, 0], [5, 5, 5], [0, 0, 0]]),
                             np.array([[1.0, 1, 1], [6, 6, 6], [1, 1, 1]]), ["A", "B", "C"])
    with pytest.raises(InputError, match="'C'.*also.*'A'"):  # one fixed point, two different partners
        check_landmark_pairs(np.array([[0.0, 0, 0], [5, 5, 5], [0, 0, 0]]),
                             np.array([[1.0, 1, 1], [6, 6, 6], [2, 2, 2]]), ["A", "B", "C"])


# --- through the real worker ---------------------------------------------------------------------------------
def test_a_dio_run_with_prompts_streams_every_step_through_the_real_worker(tmp_path, sample_pair, leak_check):
    from test_worker import request_from, run_client
    path = checkpoint(tmp_path, "dio", 3, channels=[8, 8, 8, 8], feature_channels=4)
    request = request_from(sample_pair, "dio", checkpoint=path, steps=12, threads=2,
                           options={"working_size": 32, "iterations": [4, 4, 4]})
    request.fixed_landmarks_ras = sample_pair.fixed_landmarks_ras[:5]
    request.moving_landmarks_ras = sample_pair.moving_landmarks_ras[:5]
    client, steps = run_client(request, leak_check)
    assert client.state == "completed", client.failure
    assert [s.index for s in steps] == list(range(len(steps))) and len(steps) <= 12
    assert "prompt_distance_mm" in steps[-1].metrics
    assert steps[-1].metrics["prompt_distance_mm"] < steps[0].metrics["prompt_distance_mm"]


# --- the scene side: pairing by label, what a refinement needs ------------------------------------------------
def test_scene_landmarks_pair_by_label_when_both_lists_share_their_labels(sample_pair):
    import slicer_harness
    from iterreg_slicer.scene_registration import RunSettings, SceneRegistration
    scene = slicer_harness.new_scene()
    fixed = slicer_harness.add_volume(scene, "fixed", sample_pair.fixed)
    moving = slicer_harness.add_volume(scene, "moving", sample_pair.moving)
    f = slicer_harness.add_landmarks(scene, "F", sample_pair.fixed_landmarks_ras[:3])
    m = slicer_harness.add_landmarks(scene, "M", sample_pair.moving_landmarks_ras[[2, 0, 1]])
    for node, labels in ((f, ["a", "b", "c"]), (m, ["c", "a", "b"])):
        for i, label in enumerate(labels):
            node.SetNthControlPointLabel(i, label)
    run = SceneRegistration(scene, fixed, moving, RunSettings(method="classical"), f, m)
    fixed_ras, moving_ras, labels = run.paired_landmarks()
    assert labels == ["a", "b", "c"]
    np.testing.assert_allclose(moving_ras, sample_pair.moving_landmarks_ras[:3])
    m.SetNthControlPointLabel(0, "a")  # labels no longer match as sets: pairing falls back to order
    assert run.paired_landmarks()[2] == ["a", "b", "c"]


def test_a_refinement_needs_a_finished_run_and_landmarks(sample_pair):
    import slicer_harness
    from iterreg_slicer.scene_registration import RunSettings, SceneRegistration
    scene = slicer_harness.new_scene()
    fixed = slicer_harness.add_volume(scene, "fixed", sample_pair.fixed)
    moving = slicer_harness.add_volume(scene, "moving", sample_pair.moving)
    unfinished = SceneRegistration(scene, fixed, moving, RunSettings(method="classical"))
    with pytest.raises(ValueError, match="no result yet"):
        SceneRegistration(scene, fixed, moving, RunSettings(method="classical"), refine=unfinished).start()
    unfinished.geometry, unfinished.result_displacement = None, np.zeros((3, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="fixed volume changed"):
        SceneRegistration(scene, fixed, moving, RunSettings(method="classical"), refine=unfinished).start()
    with pytest.raises(ValueError, match="Only a refinement can be undone"):
        unfinished.undo()
