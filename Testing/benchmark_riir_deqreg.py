"""Benchmarks for RIIR and DEQReg (issue 6): training memory vs steps, and convergence beyond the trained steps.

    .venv/bin/python Testing/benchmark_riir_deqreg.py memory        # peak training memory, one child per setting
    .venv/bin/python Testing/benchmark_riir_deqreg.py convergence   # Dice / folding vs inference steps
    .venv/bin/python Testing/benchmark_riir_deqreg.py working-grid  # trained vs finer working grid (64^3, 128^3)

Accuracy and speed against identity, classical, VoxelMorph and elastix at 128^3 come from
``Testing/benchmark_baselines.py --size 128`` (it runs every method with a bundled checkpoint).
Each prints a table and writes its section of Docs/benchmarks.md with the machine. Not a test.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np

from benchmark_report import machine, markdown_table, write_section

MEMORY_SETTINGS = [("riir", 4), ("riir", 6), ("riir", 12), ("deqreg", 12), ("deqreg", 48)]


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(method: str, steps: int, size: int) -> dict:
    """One training iteration (forward + backward) after a warm-up one; peak RSS above the RSS before it."""
    import time

    import torch

    from iterreg.methods import get_method
    from iterreg.sample_data import make_pair
    from iterreg.imaging import prepare_pair
    from iterreg_train.trainer import registration_loss

    torch.manual_seed(0)
    cls = get_method(method)
    # DEQReg with tolerance 0: every one of its T solver iterations runs (no early stop)
    setting = {"steps": steps} if method == "riir" else {"max_iter": steps, "tolerance": 0.0}
    network = cls.build_network({**cls.default_architecture(3), **setting, "working_scale": 1.0})
    torch.nn.init.normal_(next(m for m in network.modules() if hasattr(m, "head")).head.weight, std=1e-3)
    network.train()
    sample = make_pair(size, seed=200)
    prepared = prepare_pair(sample.fixed, sample.moving)
    loss_config = {"similarity": "lncc", "window": 5, "regularizer": "diffusion", "regularization_weight": 0.1}

    def iteration(fixed, moving) -> float:
        start = time.perf_counter()
        displacements = cls.predict(network, fixed, moving)
        loss, _ = registration_loss(fixed, moving, displacements, loss_config,
                                    step_weights=cls.step_weights(network, len(displacements)))
        network.zero_grad(set_to_none=True)
        loss.backward()
        return time.perf_counter() - start

    # Warm up on a tiny grid (lazy imports, kernels) so the measured iteration is the first at full size:
    # a full-size warm-up would leave freed heap behind that the measured one reuses unpredictably.
    iteration(prepared.fixed[..., :32, :32, :32].contiguous(), prepared.moving[..., :32, :32, :32].contiguous())
    network.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_mb("VmRSS")
    seconds = iteration(prepared.fixed, prepared.moving)
    return {"method": method, "steps": steps, "peak_mb": _status_mb("VmHWM") - before, "seconds": seconds}


def memory(args) -> str:
    rows, results = [], []
    for method, steps in MEMORY_SETTINGS:
        repeats = []
        for _ in range(2):
            out = subprocess.run([sys.executable, __file__, "memory-child", method, str(steps), str(args.size)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-2000:])
            repeats.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(repeats[-1], flush=True)
        results.append({"method": method, "steps": steps,
                        **{k: float(np.mean([r[k] for r in repeats])) for k in ("peak_mb", "seconds")}})
    base = {m: next(r for r in results if r["method"] == m) for m in ("riir", "deqreg")}
    for r in results:
        rows.append([r["method"], str(r["steps"]), f"{r['peak_mb']:.0f}",
                     f"{r['peak_mb'] / base[r['method']]['peak_mb']:.2f}"])
    table = markdown_table(["method", "training steps T", "peak MB above idle", "vs smallest T"], rows)
    return "\n".join([
        f"## RIIR vs DEQReg: training memory against steps ({args.size}^3, CPU)", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_riir_deqreg.py memory --size "
        f"{args.size}`. One training iteration (forward, loss over the returned states, backward) of the paper "
        f"architectures on the full {args.size}^3 grid (working_scale 1), batch 1, the first at that size (warm-up on "
        "32^3); "
        "peak resident memory of a fresh process above its resident memory just before the iteration "
        "(/proc VmHWM after resetting it); each setting twice in fresh processes, the mean reported. RIIR back-propagates through all T unrolled steps; DEQReg runs T solver "
        "iterations without a graph and back-propagates through the phantom-gradient steps only (K = 2 per "
        "sampled state, S = 3). No GPU was lent to this task, so there is no GPU column.", "", table])


def convergence_runs(args) -> dict:
    import torch

    from iterreg.imaging import prepare_pair
    from iterreg.methods import get_method
    from iterreg.metrics import dice
    from iterreg.sample_data import make_pair, make_slice_pair
    from iterreg.spatial import warp_labels
    import SimpleITK as sitk

    torch.set_num_threads(2)
    trained = {name: get_method(name).create(ndim=args.ndim).default_step_count for name in ("riir", "deqreg")}
    runs = {"riir": {"steps": 4 * trained["riir"], "options": {}},
            "deqreg": {"steps": 4 * trained["deqreg"], "options": {"tolerance": 0.0}}}
    curves: dict = {m: {"dice": [], "folding": [], "stopped": [], "stopped_dice": []} for m in runs}
    curves["trained"] = trained
    generate = make_pair if args.ndim == 3 else make_slice_pair
    for k in range(args.pairs):
        sample = generate(args.size, seed=args.first_seed + k)
        prepared = prepare_pair(sample.fixed, sample.moving)
        fixed_labels = sitk.GetArrayFromImage(sample.fixed_labels)
        moving_labels = torch.from_numpy(sitk.GetArrayFromImage(sample.moving_labels).astype(np.int64))[None, None]
        score = lambda u: dice(fixed_labels, warp_labels(moving_labels, u)[0, 0].numpy())["mean"]  # noqa: E731
        for name, run in runs.items():
            method = get_method(name).create(options=run["options"], ndim=args.ndim)
            d, f = [], []
            for step in method.run(prepared.fixed, prepared.moving, run["steps"]):
                d.append(score(step.displacement))
                f.append(step.metrics["folding_percent"])
            curves[name]["dice"].append(d)
            curves[name]["folding"].append(f)
            print(f"pair {args.first_seed + k} {name}: Dice {d[0]:.3f} -> {d[-1]:.3f} after {len(d)} steps",
                  flush=True)
        steps = list(get_method("deqreg").create(ndim=args.ndim).run(prepared.fixed, prepared.moving,
                                                                     runs["deqreg"]["steps"]))
        curves["deqreg"]["stopped"].append(len(steps))
        curves["deqreg"]["stopped_dice"].append(score(steps[-1].displacement))
        curves["peak_mm"] = sample.info["magnitude_mm"]  # the generator's, as the pairs were made
    return curves


def convergence(args) -> str:
    curves = convergence_runs(args)
    trained = curves["trained"]  # RIIR: the T its checkpoint was trained with; DEQReg: its 48 iterations
    marks = {name: sorted({1} | {round(f * t) for f in (1 / 12, 1 / 6, 1 / 4, 1 / 2, 3 / 4, 1, 1.5, 2, 3, 4)} - {0})
             for name, t in trained.items()}  # T = 6: 1, 2, 3, 4, 6, ... 24; T = 48: 1, 4, 8, 12, 24, ... 192
    rows = []
    for name in ("riir", "deqreg"):
        dice_curve = np.mean(curves[name]["dice"], axis=0)
        folding_curve = np.mean(curves[name]["folding"], axis=0)
        for t in marks[name]:
            note = "trained" if t == trained[name] else (f"{t / trained[name]:.0f}x trained"
                                                         if t > trained[name] and t % trained[name] == 0 else "")
            rows.append([name, str(t), f"{dice_curve[t - 1]:.3f}", f"{folding_curve[t - 1]:.3f}", note])
        best = int(np.argmax(dice_curve)) + 1
        rows.append([name, f"best: {best}", f"{dice_curve[best - 1]:.3f}", f"{folding_curve[best - 1]:.3f}", ""])
    stopped = curves["deqreg"]["stopped"]
    table = markdown_table(["method", "inference steps", "Dice", "folding %", ""], rows)
    what = (f"{args.size}^3", "3D checkpoints", "pairs") if args.ndim == 3 else \
        (f"{args.size}^2 axial slices", "2D checkpoints (DEQReg's runs with its recorded damping 0.5)", "slice pairs")
    return "\n".join([
        f"## RIIR vs DEQReg: convergence beyond the trained steps ({what[0]}, the DEQReg paper's Fig. 3)", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_riir_deqreg.py convergence --ndim "
        f"{args.ndim} --size {args.size} --pairs {args.pairs} --first-seed {args.first_seed}`. Bundled {what[1]}; "
        f"held-out generated {what[2]} (seeds {args.first_seed}-{args.first_seed + args.pairs - 1}, peak "
        f"{curves['peak_mm']:g} mm); mean over pairs. "
        f"RIIR runs 4x its {trained['riir']} trained steps; DEQReg 4x its {trained['deqreg']} trained iterations "
        "with the tolerance set to 0 so that it never stops early.", "", table, "",
        f"With its default tolerance (relative residual 1e-3) DEQReg stopped after {np.mean(stopped):.0f} "
        f"iterations on average (per pair: {', '.join(map(str, stopped))}), at Dice "
        f"{np.mean(curves['deqreg']['stopped_dice']):.3f}."])


def working_grid(args) -> str:
    """The learned methods iterate on a working grid (by default the size they were trained on). What do a
    coarser and a finer one (``working_size``) cost and give? Each input size is its own table."""
    import time

    import torch

    from benchmark_iirp_r2n2 import pairs
    from iterreg.methods import get_method
    torch.set_num_threads(2)
    tables = []
    for size in args.sizes:
        held_out = list(pairs(3, size, args.pairs, args.first_seed))
        list(get_method("riir").create().run(held_out[0][1].fixed, held_out[0][1].moving))  # warm-up, untimed
        rows = []
        for name in ("riir", "deqreg", "iirp"):
            trained = get_method(name).create().trained_working_size
            # another grid only where it differs from the default and is not finer than the input
            others = [w for w in args.working_sizes if w != min(trained, size) and w <= size]
            reference_time = None
            for working_size in (None, *others):
                method = get_method(name).create(options={} if working_size is None else {"working_size": working_size})
                scores = []
                for _, pair, evaluation, _ in held_out:
                    start = time.perf_counter()
                    steps = list(method.run(pair.fixed, pair.moving))
                    elapsed = time.perf_counter() - start
                    score = evaluation.score(steps[-1].displacement)
                    scores.append((score["dice_mean"], score["tre_mean_mm"], steps[-1].metrics["folding_percent"],
                                   elapsed))
                dice, tre, folding, seconds = np.mean(scores, axis=0)
                reference_time = reference_time or seconds
                grid = (f"{min(trained, size)} (trained, default)" if working_size is None
                        else f"{working_size} (option)")
                rows.append([name, grid, f"{dice:.3f}", f"{tre:.2f}", f"{folding:.3f}",
                             f"{seconds / reference_time:.2f}"])
                print(size, name, grid, rows[-1][2:], flush=True)
        tables += [f"### {size}^3 inputs", "",
                   markdown_table(["method", "working grid", "Dice", "TRE mm", "folding %", "time / default"], rows),
                   ""]
    sizes = " ".join(map(str, args.sizes))
    return "\n".join([
        "## Learned methods: the trained working grid vs a coarser or finer one", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_riir_deqreg.py working-grid --sizes "
        f"{sizes} --pairs {args.pairs} --working-sizes {' '.join(map(str, args.working_sizes))}`. Bundled 3D "
        f"checkpoints; held-out generated pairs (seeds {args.first_seed}-{args.first_seed + args.pairs - 1}); mean "
        "over pairs. By default each checkpoint iterates on the working grid it was trained on (its longest side "
        "is shown; never finer than the input); the option `working_size` runs the same checkpoint on another "
        "grid. Times are ratios to the same method's default in this run (CPU, 2 threads).", "", *tables])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "memory-child":
        print(json.dumps(memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", choices=["memory", "convergence", "working-grid"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--ndim", type=int, choices=[2, 3], default=3, help="convergence: 2D slices or 3D volumes")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="working-grid: input sizes")
    parser.add_argument("--working-sizes", type=int, nargs="+", default=[32, 128],
                        help="working-grid: the other grids to try (longest side)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    body = {"memory": memory, "convergence": convergence, "working-grid": working_grid}[args.benchmark](args)
    print(body)
    if not args.no_write:
        suffix = "-2d" if args.benchmark == "convergence" and args.ndim == 2 else ""
        print(f"wrote {write_section(f'riir-deqreg-{args.benchmark}{suffix}', body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
