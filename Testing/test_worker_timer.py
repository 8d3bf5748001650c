"""The Qt side: a QTimer polls the client, steps arrive on the GUI thread, and the event loop never stalls."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent / "qt_shim"))

import qt  # noqa: E402  (the test shim standing in for Slicer's PythonQt)

from iterreg_slicer.worker_timer import WorkerTimer  # noqa: E402
from test_worker import TEST_WORKER, request_from  # noqa: E402
from iterreg.worker_client import WorkerClient  # noqa: E402


def test_a_timer_driven_run_delivers_steps_on_the_gui_thread_without_stalling_it(qtbot, sample_pair, leak_check):
    steps, threads = [], set()
    request = request_from(sample_pair, "scripted", steps=30, threads=1,
                           options={"delay_s": 0.02, "hidden_maps": 4})
    client = WorkerClient(request, on_step=lambda s: (steps.append(s), threads.add(threading.current_thread())),
                          command=TEST_WORKER)
    leak_check(client)

    ticks = []
    heartbeat = qt.QTimer()
    heartbeat.setInterval(5)
    heartbeat.timeout.connect(lambda: ticks.append(time.perf_counter()))
    heartbeat.start()
    runner = WorkerTimer(client, interval_ms=20)
    runner.start()
    qtbot.waitUntil(lambda: not runner.active, timeout=60000)
    heartbeat.stop()

    assert client.state == "completed", client.failure
    assert [s.index for s in steps] == list(range(30)) and threads == {threading.main_thread()}
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps) * 1000:.0f} ms"


def test_cancel_from_the_gui_stops_the_timer(qtbot, sample_pair, leak_check):
    request = request_from(sample_pair, "scripted", steps=1000, threads=1, options={"delay_s": 0.02})
    client = WorkerClient(request, command=TEST_WORKER)
    leak_check(client)
    runner = WorkerTimer(client)
    runner.start()
    qtbot.waitUntil(lambda: client.steps_received >= 3, timeout=60000)
    runner.cancel()
    qtbot.waitUntil(lambda: not runner.active, timeout=30000)
    assert client.state == "cancelled" and client.steps_received < 1000
