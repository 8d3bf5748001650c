"""Benchmark: the networks' convolutions in float32 vs bfloat16 (the ``precision`` option), same pairs, same run.

Every method that offers the option registers held-out generated pairs with its bundled 3D checkpoint twice per
pair, float32 and bfloat16 alternating, after one warm-up registration of each; reports the mean Dice and TRE of
each arithmetic and the ratio of their median run times. Only meaningful where bfloat16 is native (CPU: AVX512-BF16
or AMX; CUDA: compute capability 8+): elsewhere the option is refused, and so is this script. Writes the
'precision' section of Docs/benchmarks.md. Not a test: run it by hand.

    .venv/bin/python Testing/benchmark_precision.py --size 128 --pairs 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

from benchmark_report import machine, markdown_table, write_section

PRECISIONS = ("float32", "bfloat16")


def register(method: str, pair_dir: Path, precision: str, device: str) -> tuple[float, float, float]:
    """(Dice, TRE mm, run time s) of one registration through the CLI's pipeline."""
    from iterreg.pipeline import RegistrationRequest, register_files
    from iterreg.sample_data import PAIR_FILES

    f = lambda key: str(pair_dir / PAIR_FILES[key])
    with tempfile.TemporaryDirectory() as out:
        result = register_files(RegistrationRequest(
            fixed=f("fixed"), moving=f("moving"), out=out, method=method, device=device,
            options={"precision": precision}, fixed_labels=f("fixed_labels"), moving_labels=f("moving_labels"),
            fixed_landmarks=f("fixed_landmarks"), moving_landmarks=f("moving_landmarks")))
    after = result.evaluation["after"]
    return after["dice_mean"], after["tre_mean_mm"], result.runtime_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=["voxelmorph", "riir", "deqreg", "iirp", "dio"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from iterreg.devices import prepare_process
    from iterreg.networks.precision import bfloat16_is_native
    from iterreg.sample_data import make_pair, write_pair

    if not bfloat16_is_native(args.device):
        print(f"bfloat16 is not native on {args.device} here; run this where it is (see the docstring)",
              file=sys.stderr)
        return 2
    prepare_process(args.threads)
    seeds = list(range(args.first_seed, args.first_seed + args.pairs))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = [write_pair(make_pair(args.size, seed=s), Path(tmp) / f"pair_{s}", include_ground_truth=False)
                 for s in seeds]
        for method in args.methods:
            for precision in PRECISIONS:  # warm-up: first-run costs (loading, allocator) count for neither
                register(method, pairs[0], precision, args.device)
            scores = {p: [] for p in PRECISIONS}
            for pair_dir in pairs:
                for precision in PRECISIONS:
                    scores[precision].append(register(method, pair_dir, precision, args.device))
                    dice, tre, seconds = scores[precision][-1]
                    print(f"{method:10s} {pair_dir.name} {precision:8s} Dice {dice:.4f} TRE {tre:.3f} {seconds:.2f} s",
                          flush=True)
            mean = {p: [statistics.fmean(r[k] for r in scores[p]) for k in (0, 1)] for p in PRECISIONS}
            time = {p: statistics.median(r[2] for r in scores[p]) for p in PRECISIONS}
            rows.append([method, f"{mean['float32'][0]:.3f}", f"{mean['bfloat16'][0]:.3f}",
                         f"{mean['float32'][1]:.2f}", f"{mean['bfloat16'][1]:.2f}",
                         f"{time['float32'] / time['bfloat16']:.2f}x"])
    table = markdown_table(["method", "Dice, float32", "Dice, bfloat16", "TRE mm, float32", "TRE mm, bfloat16",
                            "bfloat16 speed-up"], rows)
    print(table)
    if not args.no_write:
        body = "\n".join([
            "## The networks' arithmetic: float32 vs bfloat16 (`precision`)",
            "",
            f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_precision.py --size {args.size} "
            f"--pairs {args.pairs}`. Held-out generated {args.size}^3 pairs (seeds {seeds[0]}-{seeds[-1]}), each "
            f"registered by every method that offers the option with its bundled 3D checkpoint, default options, "
            f"on {args.device} with {args.threads} threads, float32 and bfloat16 alternating after one warm-up of "
            "each. Dice and TRE: means over the pairs; speed-up: the ratio of the median run times. bfloat16 "
            "applies to the networks' convolutions only (iterreg/networks/precision.py); R2N2 does not offer it.",
            "",
            table,
        ])
        print(f"wrote {write_section('precision', body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
