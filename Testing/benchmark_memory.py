"""Benchmark: peak memory against volume size, per method; the slopes behind the pre-flight memory check.

Each registration runs in its own child process (the CLI pipeline: read, prepare, register, evaluate, save),
at two sizes; the slope of the child's peak RSS between them is the method's bytes per fixed-grid voxel, the
number ``RegistrationMethod.memory_per_voxel`` must not undercut (``iterreg.memory_budget``). Prints a table and
writes the 'memory' section of Docs/benchmarks.md. Not a test: run it by hand.

    .venv/bin/python Testing/benchmark_memory.py --sizes 48 96
"""
from __future__ import annotations

import argparse
import tempfile
from datetime import date
from pathlib import Path

from benchmark_baselines import run_child
from benchmark_report import machine, markdown_table, write_section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=(48, 96))
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from iterreg.methods import get_method, ready_methods
    from iterreg.sample_data import make_pair, write_pair

    methods = args.methods or ready_methods(3)
    small, large = args.sizes
    peaks: dict[str, dict[int, float]] = {m: {} for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (small, large):
            pair_dir = write_pair(make_pair(size, seed=300), Path(tmp) / f"pair_{size}")
            for method in methods:
                _, peak = run_child(["--child", method, str(pair_dir), str(Path(tmp) / f"out_{size}_{method}")])
                peaks[method][size] = peak
                print(f"{method:10s} {size}^3 peak {peak:.0f} MB", flush=True)

    voxels = {s: float(s) ** 3 for s in (small, large)}
    rows = []
    for method in methods:
        slope = (peaks[method][large] - peaks[method][small]) * 2**20 / (voxels[large] - voxels[small])
        declared = get_method(method).memory_per_voxel
        verdict = "ok" if declared >= slope else "UNDERESTIMATES"
        at_256 = (peaks[method][small] + slope * (256**3 - voxels[small]) / 2**20) / 1024
        rows.append([method, f"{peaks[method][small]:.0f}", f"{peaks[method][large]:.0f}", f"{slope:.0f}",
                     f"{declared:.0f}", verdict, f"{at_256:.1f}"])
    header = ["method", f"peak MB {small}^3", f"peak MB {large}^3", "measured bytes/voxel",
              "declared bytes/voxel", "check", "predicted GB at 256^3"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_write:
        body = "\n".join([
            "## Memory against volume size (the pre-flight check's numbers)",
            "",
            f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_memory.py --sizes {small} "
            f"{large}`. One child process per registration through the CLI pipeline (read, prepare, register, "
            "evaluate, save), default steps, CPU. 'measured bytes/voxel' is the slope of the child's peak RSS "
            "between the two sizes; 'declared' is the method's `memory_per_voxel`, which `iterreg.memory_budget` "
            "multiplies by the fixed-grid voxels (x1.2 margin) and compares with the free memory before a run "
            "starts. 'predicted GB at 256^3' extrapolates the measured line (whole process).",
            "",
            table,
        ])
        print(f"wrote {write_section('memory', body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
