"""The method interface, identity and the classical optimizer."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from iterreg.errors import InputError
from iterreg.geometry import Geometry
from iterreg.imaging import prepare_pair
from iterreg.methods import Prompts, available_methods, get_method
from iterreg.metrics import dice
from iterreg.spatial import sample_displacement_at, warp_labels


@pytest.fixture(scope="module")
def prepared(sample_pair):
    return prepare_pair(sample_pair.fixed, sample_pair.moving)


def evaluate(sample_pair, prepared, displacement):
    geometry = prepared.geometry
    labels_m = torch.from_numpy(sitk.GetArrayFromImage(sample_pair.moving_labels).astype(np.int64))[None, None]
    d = dice(sitk.GetArrayFromImage(sample_pair.fixed_labels), warp_labels(labels_m, displacement)[0, 0].numpy())
    fixed_vox = torch.tensor(geometry.ras_to_array_index(sample_pair.fixed_landmarks_ras), dtype=torch.float32)
    mapped = fixed_vox + sample_displacement_at(displacement, fixed_vox)
    tre = np.linalg.norm(geometry.array_index_to_ras(mapped.numpy()) - sample_pair.moving_landmarks_ras, axis=1)
    return d["mean"], float(tre.mean())


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_every_method_streams_well_formed_steps_in_order(name, small_pair, tmp_path):
    from iterreg.resources import default_checkpoint
    from test_riir_deqreg import checkpoint
    prepared = prepare_pair(small_pair.fixed, small_pair.moving)
    cls = get_method(name)
    path = None
    if cls.needs_checkpoint and default_checkpoint(name, 3) is None:  # no 3D one bundled (R2N2): a seeded untrained one
        path = checkpoint(tmp_path, name, 3)
    method = cls.create(path)
    steps = list(method.run(prepared.fixed, prepared.moving, steps=min(12, method.max_steps)))
    assert [s.index for s in steps] == list(range(len(steps)))
    assert steps[-1].final and not any(s.final for s in steps[:-1])
    for step in steps:
        assert step.displacement.shape == (1, 3, 48, 48, 48)
        assert step.warped.shape == prepared.fixed.shape
        assert {"similarity", "regularizer", "update_norm", "folding_percent"} <= set(step.metrics)
        assert all(np.isfinite(v) for v in step.metrics.values())


def test_the_divergence_check_reads_a_steps_bound_and_leaves_its_lazy_field_alone():
    """A method that iterates on a coarser grid gives each step a cheap bound of its field; a run is still
    stopped at the first non-finite or runaway step, and no step's full-resolution field is computed for it."""
    from types import SimpleNamespace
    from iterreg.methods.base import Step, finite_steps

    def never():
        raise AssertionError("the full-resolution field was computed")

    steps = [Step(0, never, never, {}, displacement_bound=(3.0, 40)),
             Step(1, never, never, {}, displacement_bound=(float("nan"), 40))]
    run = finite_steps(SimpleNamespace(name="riir"), iter(steps))
    assert next(run).index == 0
    with pytest.raises(InputError, match="diverged at step 2: its displacement is no longer finite"):
        next(run)
    runaway = Step(0, never, never, {}, displacement_bound=(81.0, 40))
    with pytest.raises(InputError, match="81 voxels along an axis, more than twice the image's 40"):
        next(finite_steps(SimpleNamespace(name="riir"), iter([runaway])))


def test_identity_leaves_the_moving_image_in_place(small_pair):
    prepared = prepare_pair(small_pair.fixed, small_pair.moving)
    (step,) = get_method("identity").create().run(prepared.fixed, prepared.moving)
    assert float(step.displacement.abs().max()) == 0.0
    torch.testing.assert_close(step.warped, prepared.moving)


def test_classical_beats_identity_on_the_sample_pair_in_dice_and_tre(sample_pair, prepared):
    dice_before, tre_before = evaluate(sample_pair, prepared, torch.zeros(1, 3, 64, 64, 64))
    steps = list(get_method("classical").create().run(prepared.fixed, prepared.moving))
    dice_after, tre_after = evaluate(sample_pair, prepared, steps[-1].displacement)
    assert dice_after > dice_before + 0.05, (dice_before, dice_after)
    assert tre_after < 0.6 * tre_before, (tre_before, tre_after)
    assert steps[-1].metrics["folding_percent"] < 0.1
    # the similarity improves over the run, and levels go coarse to fine
    assert steps[-1].metrics["similarity"] < steps[0].metrics["similarity"]
    assert [s.metrics["level"] for s in steps] == sorted(s.metrics["level"] for s in steps)
    assert "gradient" in steps[0].channels


def test_classical_stops_early_when_converged_and_can_be_cancelled(small_pair):
    prepared = prepare_pair(small_pair.fixed, small_pair.moving)
    method = get_method("classical").create(options={"tolerance": 0.5, "patience": 1})
    assert len(list(method.run(prepared.fixed, prepared.moving, steps=300))) < 30
    run = get_method("classical").create().run(prepared.fixed, prepared.moving, steps=100)
    first = [next(run) for _ in range(3)]
    run.close()  # cancelling between steps: the generator ends cleanly
    with pytest.raises(StopIteration):
        next(run)
    assert len(first) == 3


def test_landmark_prompts_pull_the_prompted_points_together(small_pair):
    prepared = prepare_pair(small_pair.fixed, small_pair.moving)
    geometry = prepared.geometry
    fixed_vox = torch.tensor(geometry.ras_to_array_index(small_pair.fixed_landmarks_ras), dtype=torch.float32)
    moving_vox = torch.tensor(geometry.ras_to_array_index(small_pair.moving_landmarks_ras), dtype=torch.float32)

    def distance(u):
        return float((fixed_vox + sample_displacement_at(u, fixed_vox) - moving_vox).norm(dim=1).mean())

    options = {"similarity": "mse", "regularization_weight": 0.1}
    plain = list(get_method("classical").create(options=options).run(prepared.fixed, prepared.moving, 60))
    prompts = Prompts(fixed_vox, moving_vox, weight=5.0, spacing=geometry.array_spacing)
    guided = list(get_method("classical").create(options=options).run(prepared.fixed, prepared.moving, 60,
                                                                        prompts=prompts))
    assert distance(guided[-1].displacement) < 0.7 * distance(plain[-1].displacement)


def test_warm_start_continues_from_the_given_field(small_pair):
    prepared = prepare_pair(small_pair.fixed, small_pair.moving)
    init = torch.from_numpy(small_pair.ground_truth)[None].float()
    (identity_step,) = get_method("identity").create().run(prepared.fixed, prepared.moving, init=init)
    torch.testing.assert_close(identity_step.displacement, init)
    warm = list(get_method("classical").create().run(prepared.fixed, prepared.moving, 20, init=init))
    cold = list(get_method("classical").create().run(prepared.fixed, prepared.moving, 20))
    # starting from the answer, the first step is already far better than a cold start's first one,
    # and the run stays closer to the answer than a cold run gets
    assert warm[0].metrics["similarity"] < cold[0].metrics["similarity"] - 0.05
    assert float((warm[-1].displacement - init).norm(dim=1).mean()) < float(
        (cold[-1].displacement - init).norm(dim=1).mean())


def test_bad_requests_give_clear_errors(small_pair):
    prepared = prepare_pair(small_pair.fixed, small_pair.moving)
    with pytest.raises(InputError, match="unknown method 'voxelmorphh'.*classical"):
        get_method("voxelmorphh")
    with pytest.raises(InputError, match="unknown option"):
        get_method("classical").create(options={"learning_rte": 1})
    with pytest.raises(InputError, match="similarity"):
        get_method("classical").create(options={"similarity": "ssd"})
    with pytest.raises(InputError, match="takes no checkpoint"):
        get_method("classical").create(checkpoint="weights.safetensors")
    with pytest.raises(InputError, match="1 to 5000 steps"):
        next(get_method("classical").create().run(prepared.fixed, prepared.moving, steps=0))
    with pytest.raises(InputError, match="one grid"):
        next(get_method("classical").create().run(prepared.fixed, prepared.moving[..., :-1]))


def test_classical_registers_2d_images():
    from iterreg.sample_data import make_slice_pair
    pair = make_slice_pair(size=64, seed=2, magnitude_mm=8)
    prepared = prepare_pair(pair.fixed, pair.moving)
    steps = list(get_method("classical").create().run(prepared.fixed, prepared.moving, 80))
    truth = torch.from_numpy(pair.ground_truth)[None]
    error_before = float(truth.norm(dim=1).mean())
    error_after = float((steps[-1].displacement - truth).norm(dim=1).mean())
    assert error_after < 0.6 * error_before


def test_a_learned_method_must_be_able_to_load_its_checkpoint():
    from iterreg.methods import RegistrationMethod
    with pytest.raises(TypeError, match="does not implement from_checkpoint"):
        class Forgetful(RegistrationMethod):  # noqa: F841
            name, title, default_steps, max_steps, needs_checkpoint = "forgetful", "x", 1, 1, True

            def run(self, fixed, moving, steps=None, prompts=None, init=None):
                yield from ()
