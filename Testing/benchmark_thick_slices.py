"""Benchmark: a thick-slice FIXED scan (a clinical acquisition) against an isotropic moving one, every method, with
the networks' working grid in the image's voxel aspect (before session 36) and in cubic voxels (the default), and
the classical optimizer on the scan's grid (default) and on cubic voxels (opt-in).

Not a test: run by hand; prints a table and writes its section of Docs/benchmarks.md.

    .venv/bin/python Testing/benchmark_thick_slices.py --size 128 --pairs 3 --thickness 3 5
    .venv/bin/python Testing/benchmark_thick_slices.py --real --size 128 --thickness 3 5   # MNI152 <- Colin27
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import date

import numpy as np

from benchmark_dio import HEADER, _rows, full_score, timed_run
from benchmark_iirp_r2n2 import evaluation_for
from benchmark_report import machine, markdown_table, write_section

NETWORKS = ("voxelmorph", "riir", "deqreg", "iirp", "r2n2", "dio")
WORKING_GRID = {"image": "image's voxel aspect", "isotropic": "cubic voxels, default"}


def thick_fixed(sample, thickness: float):
    """The generated pair with its fixed image (and labels) re-acquired with ``thickness``-times thicker slices
    (the last ITK axis); the moving image's labels are brought onto that grid as the pipeline does (nearest)."""
    import SimpleITK as sitk

    from iterreg.sample_data import on_coarser_grid
    factors = (1.0, 1.0, float(thickness))
    fixed = on_coarser_grid(sample.fixed, factors)
    return replace(sample, fixed=fixed, fixed_labels=on_coarser_grid(sample.fixed_labels, factors, labels=True),
                   moving_labels=sitk.Resample(sample.moving_labels, fixed, sitk.Transform(),
                                               sitk.sitkNearestNeighbor, 0))


def methods():
    from iterreg.methods import get_method
    listed = [("identity", get_method("identity").create()), ("classical", get_method("classical").create()),
              ("classical (cubic voxels, opt-in)",
               get_method("classical").create(options={"working_voxels": "isotropic"}))]
    for name in NETWORKS:
        options = (("image", "isotropic") if "working_voxels" in get_method(name).Options.__dataclass_fields__
                   else (None,))
        for voxels in options:
            label = name if voxels is None else f"{name} ({WORKING_GRID[voxels]})"
            listed.append((label, get_method(name).create(ndim=3, options={} if voxels is None
                                                          else {"working_voxels": voxels})))
    return listed


def elastix_on(sample, evaluation) -> dict:
    """The itk-elastix baseline (benchmark_baselines' settings) on the pair as it is, scored like the others."""
    from benchmark_baselines import elastix_on_images
    u, runtime = elastix_on_images(sample.fixed, sample.moving)
    return {**full_score(evaluation, u), "time": runtime}


def run(args) -> str:
    import torch

    from benchmark_baselines import elastix_available

    from iterreg.imaging import prepare_pair
    from iterreg.sample_data import make_pair
    torch.set_num_threads(2)
    listed = methods()
    with_elastix = elastix_available()
    rows, grids = [], []
    for thickness in args.thickness:
        results = {name: [] for name, _ in listed}
        if with_elastix:
            results["itk-elastix"] = []
        for k in range(args.pairs):
            sample = thick_fixed(make_pair(args.size, seed=args.first_seed + k), thickness)
            evaluation = evaluation_for(sample)
            pair = prepare_pair(sample.fixed, sample.moving)
            for name, method in listed:
                steps, elapsed = timed_run(method, pair)
                results[name].append({**full_score(evaluation, steps[-1].displacement), "time": elapsed})
            if with_elastix:
                results["itk-elastix"].append(elastix_on(sample, evaluation))
            print(f"{thickness}x slices, pair {args.first_seed + k}: "
                  + ", ".join(f"{n} {r[-1]['dice']:.3f}" for n, r in results.items()), flush=True)
        grid = "x".join(map(str, sample.fixed.GetSize()))
        slices = f"{sample.fixed.GetSpacing()[2]:g} mm slices"
        grids.append(f"{slices}: {grid} voxels of {'x'.join(f'{s:g}' for s in sample.fixed.GetSpacing())} mm")
        for name, *cells in _rows(results, "classical"):
            rows.append([f"{name}, {slices}", *cells])
    seeds = f"{args.first_seed}-{args.first_seed + args.pairs - 1}"
    return "\n".join([
        "## A thick-slice fixed scan: every method, and the networks' working grid", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_thick_slices.py --size {args.size} "
        f"--pairs {args.pairs} --thickness {' '.join(f'{t:g}' for t in args.thickness)}`. Held-out {args.size}^3 "
        f"pairs (seeds {seeds}, 1.5 mm voxels); the FIXED image and its labels are re-acquired with thicker "
        "slices (`on_coarser_grid`: thick slices average their content), the moving stays isotropic, so every "
        "method registers on the thick grid (the pipeline resamples the moving image onto the fixed grid, "
        "DESIGN.md §3). Dice and HD95 on the thick grid (the moving labels brought onto it as the pipeline does), "
        "TRE at the 20 landmarks in mm. Every network is its bundled 3D checkpoint, trained on isotropic grids, "
        "run twice: on a working grid in the image's voxel aspect (`working_voxels image`, what every release "
        "before session 36 did) and in cubic voxels (`working_voxels isotropic`, now the default: the longest "
        "side in mm keeps the trained size, the thick axis gets as many voxels as its extent holds). VoxelMorph "
        "has no working grid (it runs on the image grid). The classical optimizer runs on the scan's grid by "
        "default; with `working_voxels isotropic` (opt-in) every pyramid level is on cubic voxels, the finest at "
        "the scan's finest voxel size (1.5 mm), and the result is resampled onto the scan's grid. itk-elastix: "
        "B-spline, 3 resolutions, 500 iterations, 10 mm final grid, as in `baselines-128`. Times are ratios to the classical optimizer in the same run "
        "(elastix's own runtime). On isotropic scans both rules give the same grid, so `baselines-128` is "
        f"unchanged. Fixed grids: {'; '.join(grids)}.", "",
        markdown_table(HEADER, rows)])


def run_real(args) -> str:
    """The real pair (MNI152 <- Colin27, 32 AFIDs) with the MNI152 re-acquired with thicker slices: AFID TRE."""
    import torch

    from benchmark_baselines import elastix_available, elastix_on_images
    from benchmark_real_pair import landmark_errors
    from iterreg.imaging import prepare_pair
    from iterreg.metrics import folding_percent
    from iterreg.sample_data import on_coarser_grid
    from real_pair import landmark_evaluation, mni_colin27_pair
    torch.set_num_threads(2)
    listed = methods()
    rows = []
    for thickness in args.thickness:
        real = mni_colin27_pair(args.size)
        real = replace(real, fixed=on_coarser_grid(real.fixed, (1.0, 1.0, float(thickness))))
        pair, evaluation = prepare_pair(real.fixed, real.moving), landmark_evaluation(real)
        results = {}
        for name, method in listed:
            steps, elapsed = timed_run(method, pair)
            u = steps[-1].displacement
            results[name] = (landmark_errors(evaluation, u), folding_percent(u), elapsed)
        if elastix_available():
            u, runtime = elastix_on_images(real.fixed, real.moving)
            results["itk-elastix"] = (landmark_errors(evaluation, u), folding_percent(u), runtime)
        slices = f"{real.fixed.GetSpacing()[2]:g} mm slices"
        reference = results["classical"][2]
        for name, (errors, folding, seconds) in results.items():
            rows.append([f"{name}, {slices}", f"{errors.mean():.2f}", f"{np.median(errors):.2f}",
                         f"{np.percentile(errors, 90):.1f}", f"{folding:.3f}", f"{seconds / reference:.2f}"])
        print(f"real pair, {slices}: " + ", ".join(f"{n} {r[0].mean():.2f}" for n, r in results.items()), flush=True)
    return "\n".join([
        "## A thick-slice fixed scan of real anatomy: MNI152 (thick slices) <- Colin27, 32 AFIDs", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_thick_slices.py --real --size "
        f"{args.size} --thickness {' '.join(f'{t:g}' for t in args.thickness)}`. The pair of `real-pair` (MNI152 "
        f"2009a on the {args.size}^3 grid of 1.5 mm, Colin27 on its own 1 mm grid; Docs/data.md) with the fixed "
        "MNI152 re-acquired with thicker slices (`on_coarser_grid`), scored by the TRE at the 32 AFIDs (mm), which no "
        "method sees. The same methods and options as `thick-slices`; times as ratios to the classical optimizer "
        "on the scan's grid in the same run (elastix: its own runtime). One pair: a check on real anatomy of what "
        "`thick-slices` measures on generated pairs, not a ranking.", "",
        markdown_table(["method", "TRE mean mm", "median", "90th pct", "folding %", "time / classical"], rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=200)
    parser.add_argument("--thickness", type=float, nargs="+", default=[3.0, 5.0],
                        help="slice thickness as a multiple of the 1.5 mm voxels")
    parser.add_argument("--real", action="store_true", help="the real pair (MNI152 <- Colin27) instead of the "
                        "generated pairs; writes the section 'thick-slices-real'")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    body = run_real(args) if args.real else run(args)
    print(body)
    if not args.no_write:
        print(f"wrote {write_section('thick-slices-real' if args.real else 'thick-slices', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
