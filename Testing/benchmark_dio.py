"""Benchmarks for DIO (issue 8). Not tests: run by hand; each prints a table and writes its section of
Docs/benchmarks.md with the machine it ran on.

    .venv/bin/python Testing/benchmark_dio.py accuracy     # DIO (3 representations) vs classical vs VoxelMorph
    .venv/bin/python Testing/benchmark_dio.py robustness   # moving images on another grid (thick slices, size)
    .venv/bin/python Testing/benchmark_dio.py prompts      # landmark refinement at 128^3: TRE vs prompts, time
    .venv/bin/python Testing/benchmark_dio.py smoothing    # Table 2 with and without the field smoothing

Held-out generated pairs (seeds from 200; training used 10000+ and validation 100+).
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import date

import numpy as np

from benchmark_iirp_r2n2 import evaluation_for
from benchmark_report import machine, markdown_table, write_section

REPRESENTATIONS = ("freeform", "diffeomorphic", "svf")


def full_score(evaluation, u) -> dict:
    from iterreg.metrics import field_regularity, folding_percent
    s = evaluation.score(u)
    return {"dice": s["dice_mean"], "hd95": s["hd95_mean_mm"], "tre": s["tre_mean_mm"],
            "folding": folding_percent(u), "std_log_j": field_regularity(u)["std_log_jacobian"]}


def timed_run(method, pair, steps=None, **kwargs):
    """A run's steps and seconds, each step's full-resolution field computed as the worker computes it for
    every step it streams to a panel that keeps up (the clinician's wait; a step's field is otherwise lazy)."""
    start = time.perf_counter()
    result = []
    for step in method.run_pair(pair, steps, **kwargs):
        step.displacement  # noqa: B018 (computed on first access)
        result.append(step)
    return result, time.perf_counter() - start


def _methods(ndim: int, args):
    from iterreg.methods import get_method
    from iterreg.resources import default_checkpoint
    dio_checkpoint = args.checkpoint if ndim == 3 and args.checkpoint else default_checkpoint("dio", ndim)
    methods = [("identity", get_method("identity").create(), None), ("classical", get_method("classical").create(), None)]
    if default_checkpoint("voxelmorph", ndim):
        methods.append(("VoxelMorph", get_method("voxelmorph").create(ndim=ndim), None))
    for representation in REPRESENTATIONS:
        methods.append((f"DIO {representation}",
                        get_method("dio").create(dio_checkpoint, options={"representation": representation}), None))
    return methods


def _rows(results: dict, reference: str) -> list[list[str]]:
    ref_time = np.mean([r["time"] for r in results[reference]])
    rows = []
    for name, rs in results.items():
        mean = lambda key: float(np.mean([r[key] for r in rs]))  # noqa: E731
        rows.append([name, f"{mean('dice'):.3f}", f"{mean('hd95'):.2f}", f"{mean('tre'):.2f}",
                     f"{mean('folding'):.3f}", f"{mean('std_log_j'):.3f}", f"{mean('time') / ref_time:.2f}"])
    return rows


HEADER = ["method", "Dice", "HD95 mm", "TRE mm", "folding %", "std log J", "time / classical"]


# --- accuracy -----------------------------------------------------------------------------------------------
def _held_out_section(methods, ndim: int, size: int, count: int, first_seed: int, reference: str,
                      header: list[str], shown: str = "dice", warm_up: bool = False) -> list[str]:
    """Run every (name, method) on the same held-out pairs; a markdown sub-section with the mean scores, times
    as ratios to ``reference``. ``warm_up``: one untimed run first (torch's one-time set-up)."""
    from benchmark_iirp_r2n2 import pairs
    results = {name: [] for name, _ in methods}
    for k, (seed, pair, evaluation, _) in enumerate(pairs(ndim, size, count, first_seed)):
        if warm_up and k == 0:
            timed_run(methods[0][1], pair)
        for name, method in methods:
            steps, elapsed = timed_run(method, pair)
            results[name].append({**full_score(evaluation, steps[-1].displacement), "time": elapsed})
        print(f"{ndim}D pair {seed}: " + ", ".join(f"{n} {shown} {r[-1][shown]:.3f}" for n, r in results.items()),
              flush=True)
    grid = f"{size}^3" if ndim == 3 else f"{size}^2 axial slices"
    return [f"### {ndim}D, {grid}, {count} held-out pairs (seeds {first_seed}-{first_seed + count - 1})", "",
            markdown_table(header, _rows(results, reference)), ""]


def accuracy(args) -> str:
    import torch
    torch.set_num_threads(2)
    sections = []
    for ndim, size, count in ((3, args.size, args.pairs), (2, 128, args.pairs_2d)):
        methods = [(name, method) for name, method, _ in _methods(ndim, args)]
        sections += _held_out_section(methods, ndim, size, count, args.first_seed, "classical", HEADER)
    return "\n".join([
        "## DIO: learned features + optimization layer vs the classical optimizer and VoxelMorph", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_dio.py accuracy`. DIO: the bundled "
        "checkpoints (`dio_mni64`, `dio_mni128_2d`), default options (scales 4, 2, 1; at most 200/100/50 "
        "iterations); the three rows are one checkpoint with the transform representation switched at run time "
        "(the paper's Table 2). Classical: multi-scale Adam on image intensities (LNCC), 150 steps. Times are "
        "ratios to the classical optimizer in the same run (CPU, 2 threads).", "", *sections])


# --- the paper's Table 2 with and without the field smoothing ---------------------------------------------
def smoothing(args) -> str:
    """Free-form vs diffeomorphic with the public code's field smoothing (warp_sigma 0.5) and without it (0):
    our free-form results have no folding, so does the representation matter once the smoothing is gone?"""
    import torch

    from iterreg.methods import get_method
    from iterreg.resources import default_checkpoint
    torch.set_num_threads(args.threads)
    sections = []
    for ndim, size, count in ((2, 128, args.pairs_2d), (3, args.size, args.pairs))[:2 if args.with_3d else 1]:
        checkpoint = args.checkpoint if ndim == 3 and args.checkpoint else default_checkpoint("dio", ndim)
        variants = [(f"{representation}, warp_sigma {sigma}",
                     get_method("dio").create(checkpoint, options={"representation": representation,
                                                                   "warp_sigma": sigma}))
                    for sigma in (0.5, 0.0) for representation in REPRESENTATIONS]
        sections += _held_out_section(variants, ndim, size, count, args.first_seed, "freeform, warp_sigma 0.5",
                                      HEADER[:-1] + ["time / free-form smoothed"], shown="folding", warm_up=True)
    return "\n".join([
        "## DIO: free-form vs diffeomorphic, with and without the field smoothing (the paper's Table 2)", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_dio.py smoothing`. One bundled "
        "checkpoint per dimension, the representation and the optimization layer's field smoothing "
        "(`warp_sigma`, the public code's 0.5 voxel Gaussian after every update) switched at run time; all "
        "other options default. Folding % is the share of voxels with a non-positive Jacobian determinant. "
        f"Times are ratios to the first row in the same run (CPU, {args.threads} thread(s)).", "", *sections])


# --- robustness to another grid -----------------------------------------------------------------------------
def robustness(args) -> str:
    import torch

    from iterreg.imaging import prepare_pair
    from iterreg.methods import get_method
    from iterreg.sample_data import make_pair, on_coarser_grid
    torch.set_num_threads(2)
    variants = [("same grid (64^3)", (1, 1, 1)), ("moving: 3x thicker slices", (1, 1, 3)),
                ("moving: 2x coarser in-plane, 3x thicker slices", (2, 2, 3))]
    methods = _methods(3, args)
    dio_checkpoint = args.checkpoint or None
    for voxels in ("working", "acquired"):
        methods.append((f"DIO freeform, moving features on its own grid ({voxels} voxels)", get_method("dio").create(
            dio_checkpoint, ndim=3, options={"representation": "freeform", "features_on_own_grid": True,
                                             "own_grid_voxels": voxels}), None))
    rows = []
    for label, factors in variants:
        results = {name: [] for name, _, _ in methods}
        for k in range(args.pairs):
            sample = make_pair(args.size, seed=args.first_seed + k)
            moving = on_coarser_grid(sample.moving, factors)
            evaluation = evaluation_for(sample)  # scored against the original moving labels
            pair = prepare_pair(sample.fixed, moving)  # moving resampled onto the fixed grid, and kept as it was
            for name, method, _ in methods:
                steps, elapsed = timed_run(method, pair)
                results[name].append({**full_score(evaluation, steps[-1].displacement), "time": elapsed})
        print(label, {n: round(float(np.mean([r["dice"] for r in rs])), 3) for n, rs in results.items()}, flush=True)
        moving_size = "x".join(str(n) for n in moving.GetSize())
        for row in _rows(results, "classical"):
            rows.append([f"{label} ({moving_size})", *row])
    return "\n".join([
        "## DIO: moving images on another grid (the paper's domain-shift claim)", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_dio.py robustness`. Held-out "
        f"{args.size}^3 pairs (seeds {args.first_seed}-{args.first_seed + args.pairs - 1}); the moving image is "
        "re-sampled onto a coarser grid (thick slices averaged first, as acquired) while the fixed stays, and Dice "
        "/ TRE are scored against the original moving labels and landmarks. No method here is 'not applicable': "
        "the pipeline resamples every moving image onto the fixed grid before any method sees it (DESIGN.md §3), "
        "so all of them run; what differs is how much accuracy they lose. The last two rows are DIO as its paper "
        "describes it (§3.1): the moving image's features extracted on its own (coarser) grid and carried onto the "
        "fixed grid in physical space (option `features_on_own_grid`; the other DIO rows extract them from the "
        "resampled copy), either after resampling it in its own frame to the fixed working grid's voxel size "
        "(`own_grid_voxels` working, the paper's 'isotropic' setting) or on its voxels as acquired (the paper's "
        "'anisotropic' setting).", "",
        markdown_table(["moving grid", *HEADER], rows)])


# --- prompts ------------------------------------------------------------------------------------------------
def prompts(args) -> str:
    import torch

    from iterreg.imaging import prepare_pair
    from iterreg.methods import Prompts, get_method
    from iterreg.sample_data import make_pair
    torch.set_num_threads(2)
    counts = (0, 1, 3, 5, 10)
    options = {} if args.prompt_radius is None else {"prompt_radius_mm": args.prompt_radius}
    if args.prompt_max_radius is not None:
        options["prompt_max_radius_mm"] = args.prompt_max_radius
    method = get_method("dio").create(args.checkpoint, ndim=3, options=options)
    # the same refinements followed by the opt-in polish on the image grid, which keeps the landmark prompts
    polishing = get_method("dio").create(args.checkpoint, ndim=3, options={**options, "polish_iterations": args.polish})
    starts = ("no registration (identity)", "DIO result", "DIO result + regional failure")
    polished_label = f" (refined + polish {args.polish})"
    polished_counts = (0, 5) if args.polish else ()
    results = {(start + variant, k): [] for start in starts for variant in ("", polished_label) for k in counts}
    correlations = []
    for p in range(args.pairs):
        seed = args.first_seed + p
        sample = make_pair(args.prompt_size, seed=seed, n_landmarks=20)
        pair = prepare_pair(sample.fixed, sample.moving)
        sparse = evaluation_for(sample)
        dio_steps, _ = timed_run(method, pair)
        correlations.append(_residual_correlation(sparse, dio_steps[-1].displacement))
        # the same images with 80 landmarks, so that a region holds several of them
        dense = evaluation_for(make_pair(args.prompt_size, seed=seed, n_landmarks=80))
        failure, centre = _regional_failure(dense, pair.geometry, seed)
        fields = {starts[0]: torch.zeros_like(dio_steps[-1].displacement), starts[1]: dio_steps[-1].displacement,
                  starts[2]: dio_steps[-1].displacement + failure}
        runs = [(start, field, method, counts) for start, field in fields.items()]
        runs += [(start + polished_label, fields[start], polishing, polished_counts) for start in starts[1:]]
        for start, field, refiner, run_counts in runs:
            evaluation = dense if start.startswith(starts[2]) else sparse
            for k in run_counts:
                if start.startswith(starts[2]):  # the clinician prompts where it is off: every other landmark
                    if k > 5:  # within 40 mm of the failure, nearest first; the ones between them are held out
                        continue
                    chosen, held_out = _near_failure(evaluation, centre, k)
                else:
                    chosen, held_out = list(range(k)), list(range(10, 20))
                base = _held_out_score(evaluation, field, held_out)
                prompt = None if k == 0 else Prompts(evaluation.fixed_points[chosen], evaluation.moving_points[chosen],
                                                     spacing=pair.geometry.array_spacing)
                timed_run(refiner, pair, prompts=prompt, init=field)  # warm-up: first runs pay allocations
                refined, elapsed = timed_run(refiner, pair, prompts=prompt, init=field)
                after = _held_out_score(evaluation, refined[-1].displacement, held_out)
                results[(start, k)].append({
                    **after, "before": base["tre_held_out"], "time": elapsed, "steps": len(refined),
                    "drop": 1 - after["tre_held_out"] / base["tre_held_out"], "dice_change": after["dice"] - base["dice"],
                    "prompted": (_tre(evaluation, field, chosen), _tre(evaluation, refined[-1].displacement, chosen))
                    if k else (float("nan"), float("nan"))})
            print(f"pair {seed}, from {start}: " + ", ".join(
                f"{k}: {results[(start, k)][-1]['tre_held_out']:.2f}" for k in run_counts if results[(start, k)]),
                flush=True)
    rows = []
    for (start, k), rs in results.items():
        if not rs:
            continue
        mean = lambda key: float(np.mean([r[key] for r in rs]))  # noqa: E731
        prompted = np.mean([r["prompted"] for r in rs], axis=0)
        rows.append([start, str(k), f"{mean('before'):.2f} -> {mean('tre_held_out'):.2f}", f"{100 * mean('drop'):.0f} %",
                     f"{prompted[0]:.2f} -> {prompted[1]:.2f}" if k else "-",
                     f"{mean('dice'):.3f} ({mean('dice_change'):+.3f})", f"{mean('folding'):.3f}",
                     f"{mean('steps'):.0f}", f"{mean('time'):.2f}"])
    return "\n".join([
        "## DIO: landmark prompts (refinement)", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_dio.py prompts`. {args.pairs} held-out "
        f"{args.prompt_size}^3 pairs (seeds {args.first_seed}-{args.first_seed + args.pairs - 1}), 20 landmark pairs "
        "each: the first k are the prompts, the last 10 are never prompted and score the refinement (held-out TRE). "
        "A refinement continues a starting field (`init`) at scale 2 of the working grid (64^3 -> 32^3) with the "
        f"prompt options weight {method.options.prompt_weight:g}, radius {method.options.prompt_radius_mm:g} mm"
        f"{'' if args.prompt_radius is None else ' (--prompt-radius)'}"
        + ("" if args.prompt_max_radius is None else
           f", reach adapting up to {args.prompt_max_radius:g} mm where the prompts' residuals agree (the opt-in "
           "option prompt_max_radius_mm)")
        + "; k = 0 is the same refinement without "
        "prompts, so the prompts' own share is the difference to that row. Time = the method's refinement run, "
        "CPU, 2 threads, "
        "after one warm-up run (feature extraction of both images, optimisation, and every streamed step's "
        "128^3 field), without the worker's start-up. 'Regional failure' (a clinician's case: one region is off): "
        "the same images with 80 landmarks, the DIO result plus a smooth local error (5 mm at one landmark, "
        "Gaussian fall-off of 25 mm, random direction); the prompts are every other landmark within 40 mm of it "
        "(nearest first, at most 5), the landmarks between them are held out."
        + ("" if not args.polish else
           f" '(refined + polish {args.polish})': the same refinement followed by {args.polish} iterations of the "
           "opt-in polish on the 128^3 image grid (`polish_iterations`, Docs/methods.md), which keeps the landmark "
           "prompts."), "",
        markdown_table(["start", "prompts", "held-out TRE mm (start -> refined)", "held-out TRE drop",
                        "prompted TRE mm", "Dice (change)", "folding %", "steps", "time s"], rows), "",
        "Can prompts predict the error at other landmarks? Only if the errors of nearby landmarks agree. Mean cosine "
        "between the residual vectors (x_f + u(x_f) - x_m) of two landmarks after DIO, by their distance (all pairs "
        "of the 20 landmarks, both image pairs):", "",
        markdown_table(["distance mm", "landmark pairs", "mean cosine of residuals"], [
            [label, str(sum(c[label][0] for c in correlations)),
             f"{np.mean([v for c in correlations for v in c[label][1]]):.3f}"
             if any(c[label][1] for c in correlations) else "-"] for label in correlations[0]])])


def _regional_failure(evaluation, geometry, seed: int):
    """A smooth local misregistration: 5 mm at one landmark, Gaussian fall-off of 25 mm (voxels of the grid)."""
    import torch

    from iterreg.spatial import identity_grid
    generator = np.random.default_rng(seed)
    centre = int(generator.integers(len(evaluation.fixed_points)))
    direction = generator.normal(size=3)
    spacing = np.asarray(geometry.array_spacing)
    vector = torch.tensor(direction / np.linalg.norm(direction) * 5.0 / spacing, dtype=torch.float32)
    grid = identity_grid(geometry.array_shape)[0]
    d2 = (((grid - evaluation.fixed_points[centre].view(3, 1, 1, 1)) * torch.tensor(spacing, dtype=torch.float32)
           .view(3, 1, 1, 1)) ** 2).sum(0)
    return (vector.view(3, 1, 1, 1) * torch.exp(-d2 / (2 * 25.0 ** 2)))[None], centre


def _near_failure(evaluation, centre: int, k: int):
    """Landmarks within 40 mm of the failure, nearest first: every other one (from the second) is a prompt,
    the rest (the centre included) are held out."""
    ras = evaluation.geometry.array_index_to_ras(evaluation.fixed_points.numpy())
    distance = np.linalg.norm(ras - ras[centre], axis=1)
    near = [int(i) for i in np.argsort(distance) if distance[i] < 40.0]
    chosen = near[1::2][:k]
    return chosen, [i for i in near if i not in chosen]


def landmark_residuals(evaluation, u) -> np.ndarray:
    """Each mapped fixed landmark ``x_f + u(x_f)`` minus its moving partner, RAS mm, ``[N, 3]``."""
    from iterreg.spatial import sample_displacement_at
    points = evaluation.fixed_points
    mapped = evaluation.geometry.array_index_to_ras((points + sample_displacement_at(u.cpu(), points)).numpy())
    return mapped - evaluation.moving_points_ras


def _residual_correlation(evaluation, u, bins=((0, 20), (20, 40), (40, 80), (80, 1000))) -> dict:
    ras = evaluation.geometry.array_index_to_ras(evaluation.fixed_points.numpy())
    residual = landmark_residuals(evaluation, u)
    unit = residual / np.linalg.norm(residual, axis=1, keepdims=True).clip(1e-9)
    out = {}
    for low, high in bins:
        values = [float(unit[i] @ unit[j]) for i in range(len(ras)) for j in range(i)
                  if low <= np.linalg.norm(ras[i] - ras[j]) < high]
        out[f"{low}-{high}" if high < 1000 else f">= {low}"] = (len(values), values)
    return out


def _held_out_score(evaluation, u, held_out) -> dict:
    from iterreg.metrics import folding_percent
    s = evaluation.score(u)
    return {"tre_held_out": _tre(evaluation, u, held_out), "dice": s["dice_mean"], "folding": folding_percent(u)}


def _tre(evaluation, u, indices) -> float:
    return float(np.linalg.norm(landmark_residuals(evaluation, u)[indices], axis=1).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["accuracy", "robustness", "prompts", "smoothing"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--prompt-size", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt-radius", type=float, default=None, help="prompts: the prompts' reach in mm "
                        "(default: DIO's)")
    parser.add_argument("--prompt-max-radius", type=float, default=None, help="prompts: let the reach adapt up "
                        "to this many mm (DIO's opt-in prompt_max_radius_mm)")
    parser.add_argument("--polish", type=int, default=2, help="prompts: also the refinements from DIO's result "
                        "followed by this many polish iterations (0: none)")
    parser.add_argument("--pairs-2d", type=int, default=6)
    parser.add_argument("--first-seed", type=int, default=200)
    parser.add_argument("--checkpoint", default=None, help="a 3D dio checkpoint (default: the bundled one)")
    parser.add_argument("--threads", type=int, default=2, help="smoothing: CPU threads")
    parser.add_argument("--with-3d", action="store_true", help="smoothing: the 3D pairs too (slower)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    body = {"accuracy": accuracy, "robustness": robustness, "prompts": prompts, "smoothing": smoothing}[args.what](args)
    print(body)
    if not args.no_write:
        print(f"wrote {write_section('dio-' + args.what, body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
