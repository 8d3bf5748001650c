"""Benchmark: time per 128^3 pair on a GPU for every ready 3D method, against the issues' GPU goals.

Not a test: run it by hand on a machine with a CUDA device (`bash scripts/benchmarks.sh gpu-times`). It
refuses to run without one (CPU times belong in the all-methods tables, as ratios to elastix); `--device cpu
--no-write` checks the script itself on any machine.

Per method and pair, after one warm-up run (CUDA kernels, cuDNN autotuning, allocator):
- 'run': the method's whole run as the worker does it (`run_pair`): every streamed step with its metrics,
  the displacement on the image grid;
- 'network': only the network, what the papers time: its forward pass on the method's working grid with its
  run's step count (VoxelMorph: its one pass), no gradients, plus bringing the final field to the image
  grid; methods without a network (classical) or whose forward is not their inference (IIRP: RP-Net without
  IterStop; DIO: the optimisation layer needs gradients) show '-';
- the median of `--repeats` timed repetitions, `torch.cuda.synchronize()` before each clock read;
- the peak GPU memory of the timed runs (`torch.cuda.max_memory_allocated`);
- Dice and TRE of the final field, so that a fast wrong answer cannot pass for a fast one;
- each method in float32 and, where the device computes bfloat16 natively and the method offers it, again with
  `precision=bfloat16` (the networks' convolutions in bfloat16, tensor cores on a GPU; Docs/methods.md);
- the methods that offer it also with `--polish` iterations of the classical optimizer on the image grid after
  the network ('run' only; the GPU goals are for the papers' methods alone).
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from datetime import date

import numpy as np

from benchmark_iirp_r2n2 import evaluation_for
from benchmark_report import machine, markdown_table, write_section

# seconds per 128^3 pair on one GPU, from the issues (6: RIIR, DEQReg; 7: IIRP-Net)
GOALS_S = {"riir": 0.10, "deqreg": 0.30, "iirp": 0.05}
# methods whose network forward alone (`network_only`) is their inference, so 'network' time means what the
# papers time; IIRP's forward is RP-Net without IterStop and DIO's needs its optimisation layer
NETWORK_IS_INFERENCE = ("riir", "deqreg", "r2n2", "voxelmorph")


def _synchronised_seconds(device, work) -> float:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def network_only(method, fixed, moving, steps: int):
    """The final field from the network alone, on the grid and with the step count of the method's own run
    (DEQReg's forward runs its solver to its own stopping rule)."""
    from iterreg.methods.learned import LearnedIterativeMethod, WorkingGrid
    if isinstance(method, LearnedIterativeMethod):
        grid = WorkingGrid.for_images(fixed, method.network.config.working_scale,
                                      method.options.working_size or method.trained_working_size)
        step_count = {"steps": steps} if "steps" in inspect.signature(method.network.forward).parameters else {}
        fields = method.network(grid.image_down(fixed), grid.image_down(moving), **step_count)
        return grid.displacement_up(fields[-1])
    return type(method).predict(method.network, fixed, moving)[-1]


def time_method(name: str, pairs: list, device, repeats: int, precision: str = "float32", polish: int = 0) -> dict:
    import torch

    from iterreg.methods import get_method
    options = {} if precision == "float32" else {"precision": precision}
    if polish:
        options["polish_iterations"] = polish
    method = get_method(name).create(device=device, ndim=3, options=options)
    run_s, network_s, dice, tre, peak_mb = [], [], [], [], []
    for sample, pair, evaluation in pairs:
        result = {}

        def run():
            steps = []
            for step in method.run_pair(pair):
                step.displacement  # noqa: B018 (computed on first access, as the worker does for each step it streams)
                steps.append(step)
            result["steps"] = steps

        def network():
            with torch.no_grad():
                fixed, moving = pair.fixed.to(device), pair.moving.to(device)
                result["network"] = network_only(method, fixed, moving, len(result["steps"]))

        run()  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run_s.append(statistics.median(_synchronised_seconds(device, run) for _ in range(repeats)))
        if device.type == "cuda":
            peak_mb.append(torch.cuda.max_memory_allocated(device) / 2 ** 20)
        score = evaluation.score(result["steps"][-1].displacement.cpu())
        dice.append(score["dice_mean"])
        tre.append(score["tre_mean_mm"])
        if name in NETWORK_IS_INFERENCE and not polish:
            network()  # warm-up
            network_s.append(statistics.median(_synchronised_seconds(device, network) for _ in range(repeats)))
            network_dice = evaluation.score(result["network"].cpu())["dice_mean"]
            if abs(network_dice - dice[-1]) > 0.01:  # timing something other than the method's inference
                raise RuntimeError(f"{name}: the network alone gives Dice {network_dice:.3f}, its run {dice[-1]:.3f}")
        print(f"{name:10s} {precision:8s} polish {polish} seed {sample.info['seed']}: run {run_s[-1]:.3f} s"
              + (f", network {network_s[-1]:.3f} s" if network_s else "")
              + f", Dice {dice[-1]:.3f}, TRE {tre[-1]:.2f} mm", flush=True)
    return {"run": float(np.mean(run_s)), "network": float(np.mean(network_s)) if network_s else None,
            "dice": float(np.mean(dice)), "tre": float(np.mean(tre)),
            "peak_mb": float(np.mean(peak_mb)) if peak_mb else None, "steps": len(result["steps"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=None, help="default: every ready 3D method")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only to check the script")
    parser.add_argument("--precisions", nargs="*", default=["float32", "bfloat16"],
                        help="bfloat16 is timed only where it is native and for methods that offer it")
    parser.add_argument("--polish", nargs="*", type=int, default=[0, 1],
                        help="polish_iterations to time for the methods that offer it (0: the network alone)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave Docs/benchmarks.md alone")
    args = parser.parse_args()

    import torch

    from iterreg.imaging import prepare_pair
    from iterreg.methods import get_method, ready_methods
    from iterreg.networks.precision import bfloat16_is_native
    from iterreg.sample_data import make_pair
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: this benchmark measures GPU times. Run it on a machine with a GPU; "
              "`--device cpu --no-write` only checks the script.", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.no_write:
        print("CPU times are not GPU times: with --device cpu, add --no-write", file=sys.stderr)
        return 2
    methods = args.methods or [m for m in ready_methods(3) if m != "identity"]
    pairs = []
    for k in range(args.pairs):
        sample = make_pair(args.size, seed=args.first_seed + k)
        pairs.append((sample, prepare_pair(sample.fixed, sample.moving), evaluation_for(sample)))
    precisions = [p for p in args.precisions if p == "float32" or bfloat16_is_native(device)]
    if precisions != args.precisions:
        print(f"bfloat16 is not native on {device}: timing float32 only", flush=True)
    offers = lambda name, option: option in get_method(name).Options.__dataclass_fields__
    results = {(name, p, k): time_method(name, pairs, device, args.repeats, p, k)
               for name in methods for p in precisions if p == "float32" or offers(name, "precision")
               for k in args.polish if k == 0 or offers(name, "polish_iterations")}

    rows = []
    for (name, precision, polish), r in results.items():
        goal = GOALS_S.get(name) if not polish else None  # the goals are the papers' methods alone
        timed = r["network"] if r["network"] is not None else r["run"]
        verdict = "-" if goal is None else f"<= {goal:.2f} s: {'met' if timed <= goal else 'not met'}"
        label = name + (f" + polish {polish}" if polish else "") + ("" if precision == "float32" else f" ({precision})")
        rows.append([label, f"{r['dice']:.3f}", f"{r['tre']:.2f}", str(r["steps"]), f"{r['run']:.3f}",
                     "-" if r["network"] is None else f"{r['network']:.3f}",
                     "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}", verdict])
    table = markdown_table(["method", "Dice", "TRE mm", "steps", "run s", "network s", "peak GPU MB",
                            "goal (network s, else run s)"], rows)
    print(table)
    if args.no_write:
        return 0
    body = "\n".join([
        f"## GPU time per {args.size}^3 pair (the issues' GPU goals)", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_gpu.py --size {args.size} "
        f"--pairs {args.pairs} --repeats {args.repeats}`. Held-out pairs (seeds {args.first_seed}-"
        f"{args.first_seed + args.pairs - 1}); means over pairs of the median of {args.repeats} repetitions after "
        "one warm-up run, each clock read after `torch.cuda.synchronize()`. 'run' is the method's whole run as "
        "the worker does it (every streamed step with its metrics, the field on the image grid); 'network' is "
        "the network's forward pass alone on the method's working grid (no gradients), what the papers time, "
        "for methods whose forward pass is their inference. Peak GPU memory over the timed runs. '(bfloat16)': "
        "the same with `--option precision=bfloat16` (the networks' convolutions in bfloat16); '+ polish k': with "
        "`--option polish_iterations=k` (k classical iterations on the image grid after the network; Docs/methods.md).",
        "",
        table])
    print(f"wrote {write_section('gpu-times', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
