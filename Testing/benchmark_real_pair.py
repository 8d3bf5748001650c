"""Benchmark: a real inter-subject pair with anatomical landmarks (MNI152 <- Colin27, 32 AFIDs; real_pair.py).
Not a test: run by hand; prints its tables and writes the 'real-pair' section of Docs/benchmarks.md.

    .venv/bin/python Testing/benchmark_real_pair.py            # every ready method, then DIO's prompts
    .venv/bin/python Testing/benchmark_real_pair.py --colin27 PATH/ch2bet.nii.gz

Part 1: TRE at the 32 AFIDs after each method (no label maps on Colin27, so no Dice), time as a ratio to
itk-elastix's in the same run. Part 2: DIO refined with k AFIDs as prompts, TRE at the others (held out):
random prompts (the prompts' own value) and the k worst landmarks first (a clinician prompts where it is off).
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import date

import numpy as np

from benchmark_dio import _residual_correlation, landmark_residuals, timed_run
from benchmark_report import machine, markdown_table, write_section
from real_pair import landmark_evaluation, mni_colin27_pair

METHODS = ("identity", "classical", "voxelmorph", "riir", "deqreg", "iirp", "r2n2", "dio",
           "riir:polish_iterations=1", "riir:polish_iterations=2", "deqreg:polish_iterations=1",
           "dio:polish_iterations=2")  # the opt-in polish


def landmark_errors(evaluation, u) -> np.ndarray:
    """Per-landmark TRE (mm) of a displacement on the fixed grid."""
    return np.linalg.norm(landmark_residuals(evaluation, u), axis=1)


def run_methods(real, pair, evaluation) -> tuple[list[list[str]], dict]:
    from benchmark_baselines import elastix_available, elastix_on_images, parse_method_spec, row_label
    from iterreg.methods import get_method
    from iterreg.metrics import folding_percent
    from iterreg.resources import default_checkpoint
    results, fields = {}, {}
    for spec in METHODS:
        method_name, options = parse_method_spec(spec)
        if method_name not in ("identity", "classical") and default_checkpoint(method_name, 3) is None:
            continue
        name = row_label(spec)
        method = get_method(method_name).create(ndim=3, options=options)
        list(method.run_pair(pair, None))  # warm-up: first runs pay allocations and imports
        start = time.perf_counter()
        u = list(method.run_pair(pair, None))[-1].displacement
        results[name] = (landmark_errors(evaluation, u), folding_percent(u), time.perf_counter() - start)
        fields[name] = u
        print(f"{name}: TRE {results[name][0].mean():.2f} mm, {results[name][2]:.1f} s", flush=True)
    if elastix_available():
        u, runtime = elastix_on_images(real.fixed, real.moving)  # the moving in the frame real_pair chose
        results["elastix"] = (landmark_errors(evaluation, u), folding_percent(u), runtime)
        print(f"elastix: TRE {results['elastix'][0].mean():.2f} mm, {runtime:.1f} s", flush=True)
    reference = results["elastix"][2] if "elastix" in results else None
    rows = []
    for name, (errors, folding, seconds) in results.items():
        rows.append([name, f"{errors.mean():.2f}", f"{np.median(errors):.2f}", f"{np.percentile(errors, 90):.1f}",
                     f"{errors.max():.1f}", f"{folding:.3f}",
                     f"{seconds / reference:.2f}" if reference else f"{seconds:.1f} s"])
    return rows, fields


def prompt_rows(pair, evaluation, start, draws: int, seed: int = 0):
    """DIO refinements of ``start`` with k AFIDs as prompts; scores at the rest."""
    from iterreg.methods import Prompts, get_method
    from iterreg.metrics import folding_percent
    method = get_method("dio").create(ndim=3)
    before = landmark_errors(evaluation, start)
    n = len(before)

    def refine(chosen):
        prompts = Prompts(evaluation.fixed_points[chosen], evaluation.moving_points[chosen],
                          spacing=pair.geometry.array_spacing)
        timed_run(method, pair, None, prompts=prompts, init=start)  # warm-up, as in dio-prompts
        steps, seconds = timed_run(method, pair, None, prompts=prompts, init=start)  # every step's field, as there
        u = steps[-1].displacement
        return landmark_errors(evaluation, u), folding_percent(u), seconds

    rng = np.random.default_rng(seed)
    protocols = [("random", k, [sorted(rng.choice(n, size=k, replace=False).tolist()) for _ in range(draws)])
                 for k in (1, 3, 5, 10)]
    worst = np.argsort(-before).tolist()
    protocols += [("worst first", k, [sorted(worst[:k])]) for k in (1, 3, 5)]
    rows = []
    for protocol, k, subsets in protocols:
        r = []
        for chosen in subsets:
            held = [i for i in range(n) if i not in chosen]
            after, folding, seconds = refine(chosen)
            r.append((before[held].mean(), after[held].mean(), before[chosen].mean(), after[chosen].mean(),
                      float((after[held] - before[held]).max()), folding, seconds))
        r = np.array(r)
        drop = 1 - r[:, 1] / r[:, 0]
        rows.append([protocol, str(k), str(len(subsets)), f"{r[:, 0].mean():.2f} -> {r[:, 1].mean():.2f}",
                     f"{100 * drop.mean():.0f} %" + (f" ({100 * drop.min():.0f} to {100 * drop.max():.0f})"
                                                     if len(subsets) > 1 else ""),
                     f"{r[:, 2].mean():.2f} -> {r[:, 3].mean():.2f}", f"{r[:, 4].max():+.1f}",
                     f"{r[:, 5].mean():.3f}", f"{r[:, 6].mean():.2f}"])
        print(rows[-1], flush=True)
    return rows


def residual_agreement(evaluation, u) -> list[list[str]]:
    """Mean cosine between two landmarks' residual vectors, by their distance: can prompts predict others?"""
    bins = _residual_correlation(evaluation, u, bins=((0, 20), (20, 40), (40, 1000)))
    return [[label, str(count), f"{np.mean(values):.2f}"] for label, (count, values) in bins.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128, help="the fixed grid (the MNI template), n^3")
    parser.add_argument("--colin27", default=None, help="mricron-data's ch2bet.nii.gz (default: found or fetched)")
    parser.add_argument("--draws", type=int, default=10, help="random prompt sets per prompt count")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import torch

    from iterreg.imaging import prepare_pair
    torch.set_num_threads(args.threads)
    real = mni_colin27_pair(args.size, args.colin27)
    pair = prepare_pair(real.fixed, real.moving)
    evaluation = landmark_evaluation(real)
    method_rows, fields = run_methods(real, pair, evaluation)
    dio = fields["dio"]
    residual = landmark_residuals(evaluation, dio)
    shared = residual.mean(0)
    prompts = prompt_rows(pair, evaluation, dio, args.draws)
    spacing = pair.geometry.array_spacing[0]
    body = "\n".join([
        "## A real inter-subject pair: MNI152 <- Colin27 at 32 anatomical landmarks (AFIDs)", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_real_pair.py`. Fixed: the MNI152 "
        f"2009a T1 (nilearn) on the {args.size}^3 grid of the generated pairs ({spacing:.2f} mm); moving: Colin27 "
        "(`ch2bet`, Debian mricron-data, MNI's frame) on its own 1 mm grid, moved onto the fixed grid by each "
        "method's usual preparation (DIO may read it on its own grid). Landmarks: the 32 AFIDs of each template "
        "(`Resources/SampleData/afids`, CC-BY-4.0), which no method sees. Not generated from the template: the "
        "anatomy differs (a different brain, its ventricles, sulci and intensities). Every method runs with its "
        "bundled 3D checkpoint and defaults, CPU, "
        f"{args.threads} threads, after one warm-up run; time as a ratio to itk-elastix's in the same run "
        "(B-spline, 3 resolutions, as in the all-methods tables).", "",
        markdown_table(["method", "TRE mean mm", "median", "90th pct", "max", "folding %", "time / elastix"],
                       method_rows), "",
        f"DIO's residuals (mapped AFID minus Colin27's) share a common part: their mean vector is "
        f"({shared[0]:+.2f}, {shared[1]:+.2f}, {shared[2]:+.2f}) mm RAS; mean cosine between two landmarks' "
        "residuals by their distance:", "",
        markdown_table(["distance mm", "landmark pairs", "mean cosine"], residual_agreement(evaluation, dio)), "",
        "### DIO refined with AFIDs as prompts", "",
        f"DIO's result refined (`init`) with k of the 32 AFIDs as landmark prompts (default options), scored at "
        f"the other 32 - k (held out). 'random': {args.draws} random sets of k (seed 0), means over sets (range of "
        "the drop in brackets); 'worst first': the k landmarks DIO got most wrong, as a clinician would prompt "
        "where the overlay is off. 'Worst held-out change' is the largest increase of one held-out landmark's error "
        "(collateral damage). Time: the refinement run, after a warm-up run, every step's full-resolution "
        "field computed as for a panel that shows each step (as in `dio-prompts`).", "",
        markdown_table(["prompts", "k", "sets", "held-out TRE mm", "held-out drop", "prompted TRE mm",
                        "worst held-out change mm", "folding %", "time s"], prompts)])
    print(body)
    if not args.no_write:
        print(f"wrote {write_section('real-pair', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
