"""The opt-in polish of the network methods (``polish_iterations``): instance optimisation on the image grid.

Specification: without it a run is the network's alone; with k iterations the run is the network's steps and then
k steps of the classical optimizer's finest level on the image grid, started from the network's last field, with
indices that continue, phases that say so, and only the very last step final; the polish optimises the network's
own training similarity and lowers it; landmark prompts carry into it, so the prompted points stay where the
network's prompted run put them (a DIO refinement with landmarks through the real worker ends with the polish); it
is offered by RIIR, DEQReg, IIRP-Net, VoxelMorph and DIO (free-form only: the polish is a free-form correction),
refused by R2N2 (unknown option), refused out of range with the limit named, counted in the pre-flight memory
check, and chosen in the CLI as any other option.
"""
from __future__ import annotations

import json

import pytest
import torch

from iterreg import losses
from iterreg.errors import InputError
from iterreg.memory_budget import estimated_bytes
from iterreg.methods import get_method
from iterreg.methods.classical import ClassicalMethod
from iterreg.methods.polish import MAX_POLISH_ITERATIONS, POLISH_STEP_MM
from iterreg.spatial import warp

# (method, dimension of its bundled checkpoint used here (VoxelMorph has a 3D one only), the fewest steps it runs)
POLISHED_METHODS = [("voxelmorph", 3, 1), ("riir", 2, 2), ("deqreg", 2, 2), ("iirp", 2, 4), ("dio", 2, 6)]


def blobs(ndim: int):
    """A smooth blob and a shifted, narrower copy: something left for the polish after a few network steps."""
    shape = (64, 64) if ndim == 2 else (32, 32, 32)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    fixed = torch.exp(-sum((a / 0.5) ** 2 for a in axes))[None, None]
    moving = torch.exp(-sum((a / 0.4) ** 2 for a in axes))[None, None]
    shift = torch.zeros(1, len(shape), *shape)
    shift[:, 0] = 2.0
    return fixed, warp(moving, shift)


@pytest.mark.parametrize("method,ndim,steps", POLISHED_METHODS)
def test_without_polish_a_run_is_the_networks_alone(method, ndim, steps):
    instance = get_method(method).create(ndim=ndim)
    assert instance.options.polish_iterations == 0
    run = list(instance.run(*blobs(ndim), steps=steps))
    assert not any("polish" in s.phase for s in run)
    assert run[-1].final and not any(s.final for s in run[:-1])


@pytest.mark.parametrize("method,ndim,steps", POLISHED_METHODS)
def test_a_polished_run_continues_from_the_networks_field_on_the_image_grid(method, ndim, steps):
    fixed, moving = blobs(ndim)
    plain = list(get_method(method).create(ndim=ndim).run(fixed, moving, steps=steps))
    run = list(get_method(method).create(ndim=ndim, options={"polish_iterations": 3}).run(fixed, moving, steps=steps))
    network, polish = run[:len(plain)], run[len(plain):]
    assert len(polish) == 3
    assert [s.index for s in run] == list(range(len(run)))
    assert [s.phase for s in polish] == [f"polish on the image grid, iteration {k}/3" for k in (1, 2, 3)]
    assert polish[-1].final and not any(s.final for s in run[:-1])
    # the network's part is the plain run's, and the polish starts from its field: a small change, not a restart
    torch.testing.assert_close(network[-1].displacement, plain[-1].displacement)
    first_change = (polish[0].displacement - plain[-1].displacement).abs().amax()
    assert 0 < first_change <= 0.2 + 1e-4  # voxels: one Adam step of the classical optimizer (0.2, no spacing)
    assert polish[-1].displacement.shape == (1, ndim, *fixed.shape[2:])  # the image grid


def test_the_polish_steps_a_fixed_distance_in_mm_where_the_spacing_is_known():
    fixed, moving = blobs(2)
    riir = get_method("riir").create(ndim=2, options={"polish_iterations": 1})
    changes = {}
    for spacing in (1.0, 3.0, None):  # None: bare tensors, the classical optimizer's 0.2 voxels
        run = list(riir.run(fixed, moving, steps=2, spacing=None if spacing is None else (spacing, spacing)))
        changes[spacing] = float((run[-1].displacement - run[-2].displacement).abs().amax())
    # Adam's first step moves a voxel by at most its learning rate (then the field is smoothed)
    assert 0.5 * POLISH_STEP_MM / 1.0 < changes[1.0] <= POLISH_STEP_MM / 1.0 + 1e-4
    assert 0.5 * POLISH_STEP_MM / 3.0 < changes[3.0] <= POLISH_STEP_MM / 3.0 + 1e-4
    assert 0.1 < changes[None] <= 0.2 + 1e-4


def test_the_polish_lowers_the_networks_own_training_similarity():
    riir = get_method("riir").create(ndim=2, options={"polish_iterations": 5})
    fixed, moving = blobs(2)
    run = list(riir.run(fixed, moving, steps=2))
    def similarity(u):
        return float(losses.similarity_loss(riir.similarity, fixed, warp(moving, u), **riir.similarity_kwargs))
    assert similarity(run[-1].displacement) < similarity(run[-6].displacement)


def test_r2n2_does_not_offer_it():
    # R2N2's transform is its sum of Gaussians: a dense correction would leave its representation
    with pytest.raises(InputError, match="unknown option.*polish_iterations"):
        get_method("r2n2").create(ndim=2, options={"polish_iterations": 1})


@pytest.mark.parametrize("representation", ["diffeomorphic", "svf"])
def test_dio_polishes_only_its_free_form_representation(representation):
    # a free-form correction on top would void the diffeomorphic guarantee the user chose
    with pytest.raises(InputError, match=f"polish_iterations needs representation 'freeform'.*'{representation}'"):
        get_method("dio").create(ndim=2, options={"polish_iterations": 1, "representation": representation})
    get_method("dio").create(ndim=2, options={"polish_iterations": 0, "representation": representation})


def test_landmark_prompts_hold_the_prompted_points_during_the_polish():
    from iterreg.methods.base import Prompts
    from iterreg.methods.polish import polished

    fixed, moving = blobs(2)
    # a prompt the images disagree with (the blob's edge pulled 3 pixels off): DIO's prompted run follows it, and a
    # polish by the image term alone would pull the point back towards where the intensities match
    prompts = Prompts(fixed_points=torch.tensor([[32.0, 20.0]]), moving_points=torch.tensor([[35.0, 23.0]]),
                      spacing=(1.0, 1.0))
    dio = get_method("dio").create(ndim=2, options={"polish_iterations": 15})
    distances = {}
    for name, kept in (("kept", prompts), ("dropped", None)):
        steps = get_method("dio").create(ndim=2).run(fixed, moving, steps=60, prompts=prompts)
        run = list(polished(dio, steps, fixed, moving, None, kept))
        distances[name] = float(losses.landmark_distance(run[-1].displacement, prompts.fixed_points,
                                                         prompts.moving_points, prompts.spacing))
        distances["network"] = float(losses.landmark_distance(run[-16].displacement, prompts.fixed_points,
                                                              prompts.moving_points, prompts.spacing))
    assert distances["kept"] <= distances["network"] + 0.05
    assert distances["kept"] < distances["dropped"] - 0.1


@pytest.mark.parametrize("value", [-1, MAX_POLISH_ITERATIONS + 1])
def test_out_of_range_is_refused_with_the_limit(value):
    with pytest.raises(InputError, match=f"polish_iterations must be 0 to {MAX_POLISH_ITERATIONS}.*classical"):
        get_method("riir").create(ndim=2, options={"polish_iterations": value})


def test_the_memory_check_counts_the_polish():
    riir = get_method("riir")
    shape = (128, 128, 128)
    assert riir.peak_memory_per_voxel({}) == riir.memory_per_voxel
    polished = riir.peak_memory_per_voxel({"polish_iterations": 1})
    assert polished == max(riir.memory_per_voxel, ClassicalMethod.memory_per_voxel)
    assert estimated_bytes(polished, shape, shape) > estimated_bytes(riir.memory_per_voxel, shape, shape)


def test_the_cli_polishes_riir_on_the_bundled_pair_and_dice_rises(sample_dir, tmp_path, capsys):
    from iterreg.cli import main
    from iterreg.sample_data import PAIR_FILES

    f = lambda key: str(sample_dir / PAIR_FILES[key])
    summaries = {}
    for name, extra in (("plain", []), ("polished", ["--option", "polish_iterations=2"])):
        out = tmp_path / name
        assert main(["register", f("fixed"), f("moving"), "--method", "riir", "--device", "cpu", "--out", str(out),
                     "--fixed-labels", f("fixed_labels"), "--moving-labels", f("moving_labels"), *extra]) == 0
        summaries[name] = json.loads((out / "summary.json").read_text())
    plain, polished = summaries["plain"], summaries["polished"]
    assert polished["steps_run"] == plain["steps_run"] + 2
    assert polished["evaluation"]["after"]["dice_mean"] > plain["evaluation"]["after"]["dice_mean"]


def run_in_worker(pair, leak_check, method: str, **request):
    """One run of ``method`` on ``pair`` through the real worker process; it must complete."""
    import SimpleITK as sitk

    from iterreg.geometry import Geometry
    from iterreg.worker_client import RunRequest, WorkerClient

    steps = []
    client = WorkerClient(RunRequest(method, sitk.GetArrayFromImage(pair.fixed), Geometry.of(pair.fixed).to_dict(),
                                     sitk.GetArrayFromImage(pair.moving), Geometry.of(pair.moving).to_dict(),
                                     threads=2, **request), on_step=steps.append)
    leak_check(client)
    client.start()
    client.wait(timeout=180)
    assert client.state == "completed", client.failure
    return client, steps


def test_the_real_worker_streams_the_polish_and_announces_it_in_the_step_count(sample_pair, leak_check):
    client, steps = run_in_worker(sample_pair, leak_check, "riir", steps=3, options={"polish_iterations": 2})
    assert client.info["steps"] == 5  # the panel's "step k/N"
    assert [s.index for s in steps] == list(range(5))
    assert [s.final for s in steps] == [False] * 4 + [True]
    assert "polish" in client.history[-1]["phase"] and "polish" not in client.history[2]["phase"]


def test_a_dio_refinement_with_landmarks_ends_with_the_polish_in_the_real_worker(sample_pair, leak_check):
    from iterreg.geometry import Geometry
    from iterreg.spatial import sample_displacement_at

    def prompted_error_mm(displacement):
        geometry = Geometry.of(sample_pair.fixed)
        points = torch.tensor(geometry.ras_to_array_index(sample_pair.fixed_landmarks_ras[:5]), dtype=torch.float32)
        mapped = points + sample_displacement_at(torch.from_numpy(displacement)[None], points)
        ras = geometry.array_index_to_ras(mapped.numpy())
        return float(((ras - sample_pair.moving_landmarks_ras[:5]) ** 2).sum(1).mean() ** 0.5)

    first, _ = run_in_worker(sample_pair, leak_check, "dio")
    start = first.result.displacement
    refined, steps = run_in_worker(sample_pair, leak_check, "dio", init_displacement=start,
                                   options={"polish_iterations": 2},
                                   fixed_landmarks_ras=sample_pair.fixed_landmarks_ras[:5],
                                   moving_landmarks_ras=sample_pair.moving_landmarks_ras[:5])
    assert [h["phase"] for h in refined.history[-2:]] == [f"polish on the image grid, iteration {k}/2" for k in (1, 2)]
    assert steps[-1].final and not any(s.final for s in steps[:-1])
    assert prompted_error_mm(refined.result.displacement) < 0.5 * prompted_error_mm(start)
