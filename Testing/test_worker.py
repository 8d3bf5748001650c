"""The background worker and its client, with real subprocesses.

Specification: every step arrives in order with the arrays an in-process run computes; cancel keeps what was
received; each failure mode (crash with and without a message, SIGKILL, hang, stray prints, protocol
garbage, bad jobs, out of memory, a worker that ignores cancel, a worker with a child) ends in a clear
failure, and afterwards no worker process, no process of its group, no shared-memory block and no job
folder remain.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from iterreg.geometry import Geometry
from iterreg.worker_client import RunRequest, WorkerClient, WorkerStartError
from iterreg.worker_protocol import RING_SLOTS, Job, slot_names, slot_size
from conftest import pid_exists

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir() or not Path("/dev/shm").is_dir(),
                                reason="process-table and shared-memory checks need Linux /proc and /dev/shm")

HERE = Path(__file__).resolve().parent
TEST_WORKER = [sys.executable, str(HERE / "worker_with_test_methods.py")]


# --- inputs --------------------------------------------------------------------------------------------------
def request_from(pair, method="classical", **kwargs) -> RunRequest:
    return RunRequest(method, sitk.GetArrayFromImage(pair.fixed), Geometry.of(pair.fixed).to_dict(),
                      sitk.GetArrayFromImage(pair.moving), Geometry.of(pair.moving).to_dict(), **kwargs)


@pytest.fixture(scope="module")
def tiny_pair(sample_pair):
    """The sample pair cut down to 24^3 (the scripted method needs no anatomy; speed matters)."""
    from iterreg.sample_data import SamplePair
    crop = lambda image: image[20:44, 20:44, 20:44]  # noqa: E731
    return SamplePair(crop(sample_pair.fixed), crop(sample_pair.moving), None, None, None, None, None)


def run_client(request, leak_check, timeout=120, **kwargs) -> tuple[WorkerClient, list]:
    steps = []
    client = WorkerClient(request, on_step=steps.append, **kwargs)
    leak_check(client)
    client.start()
    client.wait(timeout=timeout)
    return client, steps


def scripted(pair, leak_check, fault="none", fault_at=3, steps=8, delay_s=0.0, **kwargs):
    request = request_from(pair, "scripted", steps=steps, threads=1,
                           options={"fault": fault, "fault_at": fault_at, "delay_s": delay_s})
    return run_client(request, leak_check, command=TEST_WORKER, **kwargs)


# --- the real worker, the real method ------------------------------------------------------------------------
def in_process_steps(pair, steps: int):
    from iterreg.imaging import prepare_pair
    from iterreg.methods import get_method
    from iterreg.spatial import warp

    prepared = prepare_pair(pair.fixed, pair.moving)
    moving_raw = torch.from_numpy(prepared.moving_raw_on_fixed)[None, None]
    method = get_method("classical").create()
    return [(s.displacement[0].numpy(), warp(moving_raw, s.displacement)[0, 0].numpy())
            for s in method.run(prepared.fixed, prepared.moving, steps)]


def test_real_worker_streams_every_step_in_order_equal_to_an_in_process_run(sample_pair, leak_check):
    torch.set_num_threads(2)
    client, steps = run_client(request_from(sample_pair, steps=12, threads=2), leak_check)
    assert client.state == "completed", client.failure
    expected = in_process_steps(sample_pair, 12)
    assert [s.index for s in steps] == list(range(12))
    assert client.info["device"] == "cpu" and client.info["threads"] == 2
    for step, (displacement, warped) in zip(steps, expected):
        assert not step.dropped
        np.testing.assert_allclose(step.displacement, displacement, atol=1e-5)
        np.testing.assert_allclose(step.warped, warped, atol=1e-3)  # raw intensities, 0..255
        assert step.channels["gradient"].shape[0] == 3  # the optimiser's smoothed gradient
        assert step.t_received >= step.t_computed
    assert steps[-1].final and client.result.index == 11
    np.testing.assert_array_equal(client.result.displacement, steps[-1].displacement)
    assert [h["index"] for h in client.history] == list(range(12))


def test_cancel_mid_run_stops_the_worker_and_keeps_the_steps_received(sample_pair, leak_check):
    steps = []

    def on_step(step):
        steps.append(step)
        if len(steps) == 3:
            client.cancel()

    client = WorkerClient(request_from(sample_pair, steps=150, threads=2), on_step=on_step)
    leak_check(client)
    client.start().wait(timeout=120)
    assert client.state == "cancelled" and client.failure is None
    assert 3 <= len(steps) < 10  # the worker stops at the next step boundary
    assert [s.index for s in steps] == list(range(len(steps)))
    assert client.result is not None and client.result.index == steps[-1].index  # output = last computed step
    np.testing.assert_array_equal(client.result.displacement, steps[-1].displacement)


# --- failure modes -------------------------------------------------------------------------------------------
def test_a_method_that_raises_is_reported_with_its_traceback(tiny_pair, leak_check):
    client, steps = scripted(tiny_pair, leak_check, fault="raise", fault_at=3)
    assert client.state == "failed" and client.failure.kind == "internal"
    assert "simulated failure inside the method" in client.failure.message
    assert "Traceback" in client.failure.traceback and "_fault" in client.failure.traceback
    assert client.failure.exit_code == 1
    assert [s.index for s in steps] == [0, 1, 2]  # delivered steps are kept


@pytest.mark.parametrize("fault, signal_name", [("abort", "SIGABRT"), ("sigkill", "SIGKILL")])
def test_a_worker_that_dies_without_a_word_is_reported_as_crashed(tiny_pair, leak_check, fault, signal_name):
    client, steps = scripted(tiny_pair, leak_check, fault=fault, fault_at=2)
    assert client.state == "failed" and client.failure.kind == "crashed"
    assert signal_name in client.failure.message and "after 2 step(s)" in client.failure.message
    assert [s.index for s in steps] == [0, 1]


def test_a_worker_killed_from_outside_is_reported_and_cleaned_up(tiny_pair, leak_check):
    steps = []
    request = request_from(tiny_pair, "scripted", steps=1000, threads=1, options={"delay_s": 0.05})
    client = WorkerClient(request, on_step=steps.append, command=TEST_WORKER)
    leak_check(client)
    client.start()
    while len(steps) < 3 and client.poll():
        time.sleep(0.01)
    os.kill(client.pid, signal.SIGKILL)
    client.wait(timeout=30)
    assert client.state == "failed" and "SIGKILL" in client.failure.message
    assert len(steps) >= 3 and [s.index for s in steps] == list(range(len(steps)))


def test_a_hung_worker_times_out(tiny_pair, leak_check):
    t0 = time.monotonic()
    client, steps = scripted(tiny_pair, leak_check, fault="hang", fault_at=2, stall_timeout_s=1.5)
    assert client.state == "failed" and client.failure.kind == "timeout"
    assert "sent nothing for 1.5 s" in client.failure.message
    assert [s.index for s in steps] == [0, 1]
    assert time.monotonic() - t0 < 30


def test_stray_prints_from_a_method_go_to_the_log_not_the_protocol(tiny_pair, leak_check):
    client, steps = scripted(tiny_pair, leak_check, fault="print", fault_at=2, steps=5)
    assert client.state == "completed", client.failure
    assert len(steps) == 5
    log = "\n".join(client.log)
    assert "garbage printed by a library" in log and "raw bytes on file descriptor 1" in log


def test_garbage_on_the_protocol_channel_stops_the_worker(leak_check):
    fake = [sys.executable, "-c", "import time; print('hello, I am not a worker', flush=True); time.sleep(60)"]
    client = WorkerClient(request_from_arrays(), command=fake)
    leak_check(client)
    client.start().wait(timeout=30)
    assert client.state == "failed" and client.failure.kind == "protocol"
    assert "hello, I am not a worker" in client.failure.message


def request_from_arrays(method="classical", shape=(8, 8, 8), **kwargs) -> RunRequest:
    geometry = Geometry(tuple(reversed(shape)), (1.0,) * len(shape), (0.0,) * len(shape)).to_dict()
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    return RunRequest(method, image, geometry, image.copy(), geometry, **kwargs)


@pytest.mark.parametrize("request_kwargs, command, expected", [
    ({"method": "no_such_method"}, None, "unknown method 'no_such_method'"),
    ({"method": "scripted_learned"}, TEST_WORKER, "needs a checkpoint"),
    ({"method": "scripted_learned", "checkpoint": "/nonexistent/model.safetensors"}, TEST_WORKER,
     "checkpoint '/nonexistent/model.safetensors' does not exist"),
    ({"method": "scripted", "shape": (16, 16)}, TEST_WORKER, "supports 3D images, not 2D"),
    ({"method": "classical", "device": "cuda:7"}, None, "cuda:7"),
    ({"method": "classical", "options": {"similarity": "nope"}}, None, "unknown similarity 'nope'"),
    ({"method": "classical", "steps": 0}, None, "takes 1 to"),
])
def test_a_bad_job_is_refused_with_a_clear_input_error(leak_check, request_kwargs, command, expected):
    client = WorkerClient(request_from_arrays(**request_kwargs), command=command)
    leak_check(client)
    client.start().wait(timeout=60)
    assert client.state == "failed" and client.failure.kind == "input"
    assert expected in client.failure.message
    assert client.failure.exit_code == 2 and client.steps_received == 0


def test_inputs_that_cannot_be_sent_are_refused_before_any_process_starts(leak_check):
    request = request_from_arrays()
    request.fixed = request.fixed[None]  # 4D
    client = WorkerClient(request)
    from iterreg.errors import InputError
    with pytest.raises(InputError, match="2D or 3D numeric array"):
        client.start()
    assert client.pid is None


def test_a_missing_interpreter_is_a_start_error(leak_check):
    client = WorkerClient(request_from_arrays(), command=["/nonexistent/python", "-m", "iterreg.worker"])
    leak_check(client)
    with pytest.raises(WorkerStartError, match="could not start the worker"):
        client.start()
    assert client.state == "failed"


def test_out_of_memory_names_the_size_and_what_to_try(tiny_pair, leak_check):
    client, steps = scripted(tiny_pair, leak_check, fault="oom", fault_at=1)
    assert client.state == "failed" and client.failure.kind == "out_of_memory"
    message = client.failure.message
    assert "GPU memory" in message and "24x24x24" in message and "2.50 GiB" in message
    assert "CPU" in message and "lower resolution" in message
    assert client.failure.exit_code == 3 and len(steps) == 1


def test_a_diverged_step_fails_the_run_as_an_input_problem_and_is_never_streamed(tiny_pair, leak_check):
    client, steps = scripted(tiny_pair, leak_check, fault="diverge", fault_at=2)
    assert client.state == "failed" and client.failure.kind == "input"
    assert "diverged at step 3" in client.failure.message and "Run fewer steps" in client.failure.message
    assert len(steps) == 2 and client.result is None  # the NaN step never reached the client


def test_cancel_escalates_to_terminate_and_kill_when_the_worker_ignores_it(tiny_pair, leak_check):
    steps = []
    request = request_from(tiny_pair, "scripted", steps=50, threads=1, options={"fault": "ignore_cancel", "fault_at": 2})
    client = WorkerClient(request, on_step=steps.append, command=TEST_WORKER, cancel_grace_s=0.5, kill_grace_s=0.5)
    leak_check(client)
    client.start()
    while len(steps) < 2 and client.poll():
        time.sleep(0.01)
    time.sleep(0.5)  # the worker is now inside the step that ignores SIGTERM
    client.cancel()
    t0 = time.monotonic()
    client.wait(timeout=30)
    assert client.state == "cancelled" and time.monotonic() - t0 < 10
    log = "\n".join(client.log)
    assert "terminating it" in log and "killing it" in log
    assert [s.index for s in steps] == [0, 1]


def test_processes_started_by_the_worker_are_killed_with_it(tiny_pair, leak_check, tmp_path, monkeypatch):
    marker = tmp_path / "grandchild.pid"
    monkeypatch.setenv("ITERREG_TEST_GRANDCHILD_PID", str(marker))
    client, _ = scripted(tiny_pair, leak_check, fault="grandchild", fault_at=1, stall_timeout_s=3)
    assert client.state == "failed" and client.failure.kind == "timeout"
    grandchild = int(marker.read_text())
    deadline = time.monotonic() + 5
    while pid_exists(grandchild) and time.monotonic() < deadline:  # reaped by init after the kill
        time.sleep(0.05)
    assert not pid_exists(grandchild)


# --- flow control: a slow GUI never slows the worker, and never loses the result ----------------------------
def test_a_slow_reader_gets_every_metric_in_order_but_only_some_pictures(tiny_pair, leak_check):
    from worker_with_test_methods import expected_displacement

    steps = []
    request = request_from(tiny_pair, "scripted", steps=40, threads=1, options={"delay_s": 0.01})
    client = WorkerClient(request, on_step=steps.append, command=TEST_WORKER, max_pending_pictures=1)
    leak_check(client)
    client.start()
    while client.poll():
        time.sleep(0.3)  # a GUI busy elsewhere
    assert client.state == "completed"
    assert [s.index for s in steps] == list(range(40))
    dropped = [s for s in steps if s.dropped]
    assert dropped and all(s.arrays is None for s in dropped)
    for s in steps:
        if s.arrays is not None:
            np.testing.assert_allclose(s.displacement, expected_displacement(s.index, (24, 24, 24))[0], atol=1e-6)
    assert client.result.index == 39
    np.testing.assert_allclose(client.result.displacement, expected_displacement(39, (24, 24, 24))[0], atol=1e-6)


def test_the_worker_drops_pictures_instead_of_waiting_for_a_reader_that_never_releases(tiny_pair, tmp_path):
    import json
    """Drive the worker by hand: a ring of three slots that are never released."""
    from multiprocessing import shared_memory

    from iterreg.worker_protocol import save_array
    folder = tmp_path / "job"
    folder.mkdir(mode=0o700)
    fixed, moving = sitk.GetArrayFromImage(tiny_pair.fixed), sitk.GetArrayFromImage(tiny_pair.moving)
    save_array(folder, "fixed", fixed)
    save_array(folder, "moving", moving)
    names, size = slot_names(), slot_size(fixed.shape)
    blocks = [shared_memory.SharedMemory(name=n, create=True, size=size) for n in names]
    try:
        job = Job("scripted", str(folder), Geometry.of(tiny_pair.fixed).to_dict(),
                  Geometry.of(tiny_pair.moving).to_dict(), steps=10, threads=1, ring=names, slot_bytes=size)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "IterativeRegistration"),
                                                           os.environ.get("PYTHONPATH", "")])}
        worker = subprocess.Popen(TEST_WORKER, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, env=env)
        worker.stdin.write(job.to_json() + "\n")
        worker.stdin.flush()  # and keep stdin open: its end would mean "client gone, stop"
        stdout = worker.stdout.read()
        worker.stdin.close()
        returncode = worker.wait(timeout=60)
    finally:
        for block in blocks:
            block.close()
            block.unlink()
    events = [json.loads(line) for line in stdout.splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    assert returncode == 0 and [e["event"] for e in events][-1] == "done"
    assert [s["slot"] for s in steps[:RING_SLOTS]] == list(range(RING_SLOTS))
    assert all(s["dropped"] and s["slot"] is None for s in steps[RING_SLOTS:]) and len(steps) == 10
    result = next(e for e in events if e["event"] == "result")
    assert result["index"] == 9 and Path(result["files"]["displacement"]).is_file()


def test_zero_copy_views_are_valid_inside_the_callback_and_gone_after_it(tiny_pair, leak_check):
    from worker_with_test_methods import expected_displacement

    seen = {}

    def on_step(step):  # what the Slicer module does: copy into its own nodes while the view is valid
        if step.dropped:  # the ring was full: the worker sent metrics only
            return
        seen[step.index] = step.displacement.copy()
        assert "warped" not in step.arrays and "channel/hidden" in step.arrays

    request = request_from(tiny_pair, "scripted", steps=6, threads=1, arrays=("displacement",))
    steps = []
    client = WorkerClient(request, on_step=lambda s: (on_step(s), steps.append(s)), command=TEST_WORKER,
                          copy_arrays=False)
    leak_check(client)
    client.start().wait(timeout=60)
    assert client.state == "completed", client.failure
    assert all(s.arrays is None for s in steps)  # a kept message cannot silently change when its slot is reused
    assert len(steps) == 6 and seen  # steps that found the ring full came without arrays (see result)
    for index, displacement in seen.items():
        np.testing.assert_allclose(displacement, expected_displacement(index, (24, 24, 24))[0], atol=1e-6)
    assert set(client.result.arrays) == {"displacement", "warped", "jacobian_determinant"}  # always all three


def test_a_failing_step_handler_stops_the_run_and_is_not_called_again(tiny_pair, leak_check):
    calls = []

    def broken(step):
        calls.append(step.index)
        raise ValueError("bug in the handler")

    client = WorkerClient(request_from(tiny_pair, "scripted", steps=50, threads=1, options={"delay_s": 0.02}),
                          on_step=broken, command=TEST_WORKER)
    leak_check(client)
    client.start()
    with pytest.raises(ValueError, match="bug in the handler"):
        client.wait(timeout=60)
    assert calls == [0] and client.state == "failed" and client.failure.kind == "callback"
    assert "ValueError: bug in the handler" in client.failure.traceback


def test_unknown_per_step_arrays_are_refused(tiny_pair, leak_check):
    request = request_from(tiny_pair, "scripted", steps=2, arrays=("displacement", "jacobian"))
    client, _ = run_client(request, leak_check, command=TEST_WORKER)
    assert client.state == "failed" and "unknown per-step array(s) ['jacobian']" in client.failure.message


def test_channels_that_do_not_fit_the_slot_are_downsampled_and_the_user_is_told(tiny_pair, leak_check):
    request = request_from(tiny_pair, "scripted", steps=3, threads=1,
                           options={"hidden_maps": 8, "hidden_scale": 1}, channels={"hidden": "all"})
    steps = []
    client = WorkerClient(request, on_step=steps.append, command=TEST_WORKER, channel_budget_maps=2)
    leak_check(client)
    client.start().wait(timeout=60)
    assert client.state == "completed"
    hidden = steps[0].channels["hidden"]
    assert hidden.shape == (8, 12, 12, 12)  # 8 full-size maps do not fit a budget of 2: halved per axis
    np.testing.assert_allclose(hidden[5], 5.0)  # map 5 of step 0 holds the value 5 everywhere
    assert any("1/2 resolution" in line for line in client.log)


def test_channel_selection_sends_only_the_chosen_maps(tiny_pair, leak_check):
    request = request_from(tiny_pair, "scripted", steps=2, threads=1, options={"hidden_maps": 6},
                           channels={"hidden": [4, 1]})
    steps = []
    client = WorkerClient(request, on_step=steps.append, command=TEST_WORKER)
    leak_check(client)
    client.start().wait(timeout=60)
    hidden = steps[1].channels["hidden"]
    assert hidden.shape == (2, 12, 12, 12)
    assert hidden[0].mean() == pytest.approx(5.0) and hidden[1].mean() == pytest.approx(2.0)  # index + step


def landmark_error_mm(pair, displacement: np.ndarray) -> float:
    from iterreg.spatial import sample_displacement_at
    geometry = Geometry.of(pair.fixed)
    points = torch.tensor(geometry.ras_to_array_index(pair.fixed_landmarks_ras), dtype=torch.float32)
    mapped = points + sample_displacement_at(torch.from_numpy(displacement)[None], points)
    return float(np.linalg.norm(geometry.array_index_to_ras(mapped.numpy()) - pair.moving_landmarks_ras, axis=1).mean())


def test_landmark_prompts_pull_the_landmarks_together(sample_pair, leak_check):
    runs = {}
    for name, landmarks in (("plain", {}), ("prompted", {"fixed_landmarks_ras": sample_pair.fixed_landmarks_ras,
                                                         "moving_landmarks_ras": sample_pair.moving_landmarks_ras,
                                                         "prompt_weight": 20.0})):
        client, _ = run_client(request_from(sample_pair, steps=10, threads=2, **landmarks), leak_check)
        assert client.state == "completed", client.failure
        runs[name] = landmark_error_mm(sample_pair, client.result.displacement)
    assert runs["prompted"] < 0.8 * runs["plain"], runs


def test_a_warm_start_continues_from_the_given_field(sample_pair, leak_check):
    first, _ = run_client(request_from(sample_pair, steps=10, threads=2), leak_check)
    start = first.result.displacement
    client, steps = run_client(request_from(sample_pair, steps=3, threads=2, init_displacement=start), leak_check)
    assert client.state == "completed", client.failure
    assert steps[0].phase.startswith("level 1/1")  # refinement runs at full resolution only
    assert np.abs(steps[0].displacement - start).max() < 0.5 < np.abs(start).max()


def test_landmarks_outside_the_image_are_refused(sample_pair, leak_check):
    moving = sample_pair.moving_landmarks_ras.copy()
    moving[2] += 500.0
    client, _ = run_client(request_from(sample_pair, steps=3, fixed_landmarks_ras=sample_pair.fixed_landmarks_ras,
                                        moving_landmarks_ras=moving), leak_check)
    assert client.state == "failed" and client.failure.kind == "input"
    assert "moving landmark '3' lies outside the image" in client.failure.message


def test_a_warm_start_on_another_grid_is_refused(sample_pair, leak_check):
    client, _ = run_client(request_from(sample_pair, steps=3, init_displacement=np.zeros((3, 8, 8, 8), np.float32)),
                           leak_check)
    assert client.state == "failed" and client.failure.kind == "input"
    assert "starting displacement has shape (3, 8, 8, 8)" in client.failure.message
