"""Benchmark: a registration process with glibc's default allocator settings vs with freed memory kept.

``iterreg.devices.prepare_process`` (the CLI, the worker and the trainer call it) raises glibc's mmap and trim
thresholds so that the tensors a step frees are reused by the next step instead of being returned to the OS and
page-faulted in again. Each run is a fresh process (as every Slicer run's worker is): the method registers one
generated pair, the two settings alternating (``ITERREG_CPU_ALLOCATOR=default`` switches it off), ``--repeats``
times each. Reports the median run time per setting, their ratio, and each process's peak memory. Writes the
'cpu-allocator' section of Docs/benchmarks.md. Not a test: run it by hand.

    .venv/bin/python Testing/benchmark_cpu_allocator.py --size 128 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from datetime import date
from pathlib import Path

from benchmark_baselines import run_child
from benchmark_report import machine, markdown_table, write_section

SETTINGS = {"glibc default": {"ITERREG_CPU_ALLOCATOR": "default"}, "freed memory kept": {}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=201)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from iterreg.methods import ready_methods
    from iterreg.sample_data import make_pair, write_pair

    methods = [m for m in (args.methods or ready_methods(3)) if m != "identity"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pair_dir = write_pair(make_pair(args.size, seed=args.seed), Path(tmp) / "pair")
        for method in methods:
            runs = {name: [] for name in SETTINGS}
            for k in range(args.repeats):
                for name, env in SETTINGS.items():
                    result, peak = run_child(["--child", method, str(pair_dir), str(Path(tmp) / f"{method}_{k}")], env)
                    runs[name].append((result["runtime_s"], peak, result["dice_mean"]))
                    print(f"{method:10s} {name:18s} {result['runtime_s']:.2f} s peak {peak:.0f} MB "
                          f"Dice {result['dice_mean']:.4f}", flush=True)
            time = {name: statistics.median(r[0] for r in rs) for name, rs in runs.items()}
            peak = {name: statistics.median(r[1] for r in rs) for name, rs in runs.items()}
            same = len({round(r[2], 6) for rs in runs.values() for r in rs}) == 1
            default, kept = SETTINGS
            rows.append([method, f"{time[default]:.2f}", f"{time[kept]:.2f}", f"{time[default] / time[kept]:.2f}x",
                         f"{peak[default]:.0f}", f"{peak[kept]:.0f}", "yes" if same else "no"])
    table = markdown_table(["method", "s, glibc default", "s, freed memory kept", "speed-up", "peak MB, default",
                            "peak MB, kept", "same result"], rows)
    print(table)
    if not args.no_write:
        body = "\n".join([
            "## A registration process: glibc's default allocator vs freed memory kept",
            "",
            f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_cpu_allocator.py --size "
            f"{args.size} --repeats {args.repeats}`. One generated {args.size}^3 pair (seed {args.seed}); every run a "
            "fresh process (as the worker of every Slicer run is), registering with the bundled 3D checkpoint and "
            "default options on the CPU; the two settings alternate, medians of "
            f"{args.repeats}. 'Freed memory kept' is `iterreg.devices.prepare_process` (glibc's mmap and trim "
            "thresholds raised to 1 GiB; what the CLI, the worker and the trainer do); 'glibc default' is the same "
            "with `ITERREG_CPU_ALLOCATOR=default`. Time: the registration run; peak: the whole process. 'Same "
            "result': Dice identical in every run.",
            "",
            table,
        ])
        print(f"wrote {write_section('cpu-allocator', body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
