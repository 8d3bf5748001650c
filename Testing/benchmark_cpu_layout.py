"""Benchmark: the 3D U-Net methods on the CPU with the default memory layout vs channels-last.

For each 3D U-Net method (VoxelMorph, RIIR, DEQReg; the bundled checkpoint's architecture) on one generated
pair: the network's forward pass as inference runs it (eval mode, no gradients) and one training iteration as
``iterreg-train`` runs it (forward, the method's training loss, backward, Adam step), each timed ``--repeats``
times per layout, the layouts alternating in one process so both see the same machine. Reports medians and the
default / channels-last ratio; ``iterreg.networks.unet.prefer_fast_cpu_layout`` is what inference and training
use. Writes the 'cpu-layout' section of Docs/benchmarks.md. Not a test: run it by hand.

    .venv/bin/python Testing/benchmark_cpu_layout.py --size 128 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import numpy as np
import SimpleITK as sitk
import torch

from benchmark_report import machine, markdown_table, write_section

METHODS = ("voxelmorph", "riir", "deqreg")
LAYOUTS = ("default", "channels-last")


def _unit_image(image: sitk.Image) -> torch.Tensor:
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    voxels = (voxels - voxels.min()) / max(float(voxels.max() - voxels.min()), 1e-6)
    return torch.from_numpy(voxels)[None, None]


def _networks(method: str):
    """Two identical copies of the bundled checkpoint's network (one per layout) and its training loss config."""
    from iterreg.methods import get_method
    from iterreg.methods.learned import load_network
    from iterreg.networks.unet import prefer_fast_cpu_layout
    from iterreg.resources import default_checkpoint
    from iterreg_train.config import load_config
    cls = get_method(method)
    path = default_checkpoint(method, ndim=3)
    copies = {}
    for layout in LAYOUTS:
        network, metadata = load_network(cls, path)
        if layout == "channels-last":
            prefer_fast_cpu_layout(network, torch.device("cpu"))
        copies[layout] = (network, torch.optim.Adam(network.parameters(), lr=1e-6))
    recorded = metadata.get("training", {}).get("config", {}).get("loss")  # the recipe it was trained with
    return cls, copies, recorded or load_config(method)["loss"]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(method: str, fixed: torch.Tensor, moving: torch.Tensor, repeats: int) -> dict:
    from iterreg_train.trainer import _method_step_weights, registration_loss
    cls, copies, loss_config = _networks(method)

    def infer(layout):
        network, _ = copies[layout]
        network.eval()
        with torch.no_grad():
            cls.predict(network, fixed, moving)

    def train_iteration(layout):
        network, optimizer = copies[layout]
        network.train()
        displacements = cls.predict(network, fixed, moving)
        weights = loss_config.get("step_weights") or _method_step_weights(cls, network, len(displacements))
        loss, _ = registration_loss(fixed, moving, displacements, loss_config, None, None, weights)
        if getattr(network, "auxiliary_loss", None) is not None:
            loss = loss + network.auxiliary_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times = {(kind, layout): [] for kind in ("inference", "training") for layout in LAYOUTS}
    for kind, fn in (("inference", infer), ("training", train_iteration)):
        for layout in LAYOUTS:  # warm-up: oneDNN builds its kernels on the first call of each shape
            fn(layout)
        for _ in range(repeats):
            for layout in LAYOUTS:
                times[kind, layout].append(_time(lambda: fn(layout)))
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from iterreg.sample_data import make_pair
    torch.set_num_threads(args.threads)
    pair = make_pair(args.size, seed=200)
    fixed, moving = _unit_image(pair.fixed), _unit_image(pair.moving)
    rows = []
    for method in args.methods:
        t = measure(method, fixed, moving, args.repeats)
        for kind in ("inference", "training"):
            default, fast = t[kind, "default"], t[kind, "channels-last"]
            rows.append([method, kind, f"{default:.2f}", f"{fast:.2f}", f"{default / fast:.2f}"])
            print(f"{method:10s} {kind:9s} default {default:.2f} s  channels-last {fast:.2f} s  "
                  f"ratio {default / fast:.2f}", flush=True)
    table = markdown_table(["method", "what", "default s", "channels-last s", "default / channels-last"], rows)
    print(table)
    if not args.no_write:
        body = (f"## 3D U-Nets on the CPU: default memory layout vs channels-last\n\n"
                f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_cpu_layout.py --size "
                f"{args.size} --repeats {args.repeats}`. One generated {args.size}^3 pair (seed 200), the bundled "
                f"3D checkpoints' networks, {args.threads} threads; medians of {args.repeats} timings per layout, "
                "the layouts alternating in one process. *Inference*: the network's forward pass in eval mode "
                "without gradients (the steps' streamed outputs not included); *training*: one `iterreg-train` "
                "iteration (forward, the training loss, backward, Adam). Seconds are this machine's; compare the "
                "ratios. Inference and training on the CPU use channels-last (`prefer_fast_cpu_layout`).\n\n"
                + table + "\n")
        print(f"wrote {write_section('cpu-layout', body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
