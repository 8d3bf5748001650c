"""Benchmark: how fast a step travels from the worker to the client, and what it costs the GUI thread.

Per step, with the worker's and the client's clocks (same machine):
- worker prep: method yielded the step -> arrays (displacement, raw-intensity warped moving image, channels)
  are in a shared-memory slot and the message is sent (includes warping the raw moving image);
- transport: message sent -> arrays copied into the client process by its reader thread;
- latency: method yielded -> arrays in the client (prep + transport), the goal's number;
- delivered: method yielded -> the GUI-thread callback got the step (adds the polling interval);
- client thread: time the polling thread spends in ``poll()`` per step (the GUI's cost; callbacks empty).
Scenarios: the scripted test method (no compute between steps except a 0.25 s sleep: pure transport), and
the real classical method at 64^3 (the worker computes all the time on the same cores).

    python Testing/benchmark_worker.py [--steps 30] [--no-write]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchmark_report import machine, markdown_table, write_section  # noqa: E402
from iterreg.geometry import Geometry  # noqa: E402
from iterreg.worker_client import RunRequest, WorkerClient  # noqa: E402

TEST_WORKER = [sys.executable, str(HERE / "worker_with_test_methods.py")]
POLL_INTERVAL_S = 0.02  # what the Slicer module's QTimer uses


def synthetic_pair(size: int) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(size)
    image = rng.random((size,) * 3).astype(np.float32)
    return image, Geometry((size,) * 3, (1.0,) * 3, (0.0,) * 3).to_dict()


def sample_pair_request(method: str, steps: int) -> RunRequest:
    import SimpleITK as sitk
    from iterreg.resources import sample_pair_dir
    from iterreg.sample_data import PAIR_FILES
    folder = sample_pair_dir()
    fixed = sitk.ReadImage(str(folder / PAIR_FILES["fixed"]))
    moving = sitk.ReadImage(str(folder / PAIR_FILES["moving"]))
    return RunRequest(method, sitk.GetArrayFromImage(fixed), Geometry.of(fixed).to_dict(),
                      sitk.GetArrayFromImage(moving), Geometry.of(moving).to_dict(), steps=steps)


def measure(request: RunRequest, command=None, copy_arrays=True) -> dict:
    steps, poll_times, sizes = [], [], []

    def on_step(step):
        steps.append(step)
        if step.arrays is not None:  # views are only valid here: note what arrived
            sizes.append(sum(a.nbytes for a in step.arrays.values()))

    client = WorkerClient(request, on_step=on_step, command=command, copy_arrays=copy_arrays)
    with client:
        client.start()
        while True:
            t0 = time.perf_counter()
            running = client.poll()
            poll_times.append(time.perf_counter() - t0)
            if not running:
                break
            time.sleep(POLL_INTERVAL_S)
    if client.state != "completed":
        raise RuntimeError(f"benchmark run failed: {client.failure}")
    with_arrays = [s for s in steps if not s.dropped]
    ms = lambda values: (1000 * statistics.median(values), 1000 * float(np.percentile(values, 95)))  # noqa: E731
    payload_mb = statistics.median(sizes) / 2**20
    return {
        "steps": len(steps), "dropped": len(steps) - len(with_arrays), "payload_mb": payload_mb,
        "prep": ms([s.t_sent - s.t_computed for s in with_arrays]),
        "transport": ms([s.t_received - s.t_sent for s in with_arrays]),
        "latency": ms([s.t_received - s.t_computed for s in with_arrays]),
        "delivered": ms([s.t_delivered - s.t_computed for s in with_arrays]),
        "client_ms_per_step": 1000 * sum(poll_times) / max(len(steps), 1),
        "max_poll_ms": 1000 * max(poll_times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    scenarios = []
    variants = [("copies", True, ("displacement", "warped")), ("views", False, ("displacement", "warped")),
                ("views, displacement only", False, ("displacement",))]
    for size in (64, 128):
        image, geometry = synthetic_pair(size)
        for label, copy, arrays in variants:
            request = RunRequest("scripted", image, geometry, image.copy(), geometry, steps=args.steps, threads=1,
                                 options={"delay_s": 0.25}, arrays=arrays)
            scenarios.append((f"scripted {size}^3, {label}", measure(request, TEST_WORKER, copy)))
    request = sample_pair_request("classical", args.steps)
    request.threads = 2
    scenarios.append(("classical 64^3 (worker computing), views", measure(request, copy_arrays=False)))

    header = ["scenario", "steps (dropped)", "MB/step", "worker prep ms", "transport ms", "latency ms",
              "delivered ms", "client thread ms/step", "longest poll ms"]
    fmt = lambda pair: f"{pair[0]:.1f} / {pair[1]:.1f}"  # noqa: E731
    rows = [[name, f"{r['steps']} ({r['dropped']})", f"{r['payload_mb']:.1f}", fmt(r["prep"]), fmt(r["transport"]),
             fmt(r["latency"]), fmt(r["delivered"]), f"{r['client_ms_per_step']:.2f}", f"{r['max_poll_ms']:.1f}"]
            for name, r in scenarios]
    table = markdown_table(header, rows)
    print(table)
    results = dict(scenarios)
    slicer = results["scripted 128^3, views, displacement only"]  # what the Slicer module requests per step
    full = results["scripted 128^3, views"]
    met = slicer["latency"][1] <= 50 and slicer["client_ms_per_step"] <= 20
    verdict = (
        f"Goal at 128^3: <= 50 ms latency and <= 20 ms client-thread time per step. As the Slicer module runs "
        f"(zero-copy views, displacement + channels per step; the slice views show the warp through the grid "
        f"transform, so no 3D warped volume is needed per step): {slicer['latency'][0]:.1f} ms median / "
        f"{slicer['latency'][1]:.1f} ms p95 latency and {slicer['client_ms_per_step']:.2f} ms client thread: "
        f"{'met' if met else 'NOT met'}. With the raw-intensity warped volume computed for every step too "
        f"(the CLI's and tests' default) latency is {full['latency'][0]:.1f} ms median: the 3D trilinear warp of "
        f"a 128^3 volume on this CPU costs that much by itself (not measured on a GPU: none was lent); copying arrays instead "
        f"of zero-copy views adds the page faults of fresh 34 MB buffers "
        f"({results['scripted 128^3, copies']['transport'][0]:.0f} ms median transport vs "
        f"{full['transport'][0]:.1f} ms).")
    print(verdict)
    if not args.no_write:
        body = "\n".join([
            "## Worker -> client step transfer",
            "",
            f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_worker.py --steps {args.steps}`.",
            "Per step, median / 95th percentile over the steps. *Worker prep*: method yielded the step -> "
            "displacement, raw-intensity warped image and channels copied into a shared-memory slot (includes "
            "the warp of the raw moving image). *Transport*: message sent -> arrays copied into the client by "
            "its reader thread. *Latency* = prep + transport (the goal's number). *Delivered*: -> the GUI-thread "
            f"callback (adds the {POLL_INTERVAL_S * 1000:.0f} ms polling interval). *Client thread*: time spent "
            "in `poll()` per step with an empty callback (the GUI's cost; updating MRML nodes is measured with "
            "the Slicer module).",
            "",
            table,
            "",
            verdict,
        ])
        print(f"wrote {write_section('worker', body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
