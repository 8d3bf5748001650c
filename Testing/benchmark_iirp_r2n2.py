"""Benchmarks for IIRP-Net and R2N2 (issue 7). Not tests: run by hand; each prints a table and writes its
section of Docs/benchmarks.md with the machine it ran on.

    .venv/bin/python Testing/benchmark_iirp_r2n2.py iterstop      # RP-Net vs IIRP-Net, the paper's Table 3
    .venv/bin/python Testing/benchmark_iirp_r2n2.py compactness   # R2N2 vs B-spline grids, as in its paper
    .venv/bin/python Testing/benchmark_iirp_r2n2.py series        # R2N2 on a 2D+t series, frame by frame
    .venv/bin/python Testing/benchmark_iirp_r2n2.py localisation  # can R2N2 learn to find one local deformation?

Held-out generated pairs (seeds from 200; training used 10000+ and validation 100+).
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from benchmark_report import machine, markdown_table, write_section


LOCAL_MAGNITUDE_MM = 6.0  # default peak of a local motion (--region-mm): that of the synthetic training pairs


def evaluation_for(sample):
    """Labels and landmarks of a generated pair on its fixed grid, ready to score displacements."""
    import SimpleITK as sitk
    import torch

    from iterreg.geometry import Geometry
    from iterreg.landmarks import landmarks_on_fixed_grid
    from iterreg.pipeline import _Evaluation

    geometry = Geometry.of(sample.fixed)
    evaluation = _Evaluation(geometry)
    evaluation.fixed_labels = sitk.GetArrayFromImage(sample.fixed_labels).astype(np.int64)
    evaluation.moving_labels = torch.from_numpy(sitk.GetArrayFromImage(sample.moving_labels).astype(np.int64))[None, None]
    nd = geometry.ndim
    names = [str(k) for k in range(len(sample.fixed_landmarks_ras))]
    fixed_vox, moving_vox = landmarks_on_fixed_grid(geometry, Geometry.of(sample.moving),
                                                    sample.fixed_landmarks_ras[:, :nd],
                                                    sample.moving_landmarks_ras[:, :nd], names)
    evaluation.fixed_points = torch.tensor(fixed_vox, dtype=torch.float32)
    evaluation.moving_points = torch.tensor(moving_vox, dtype=torch.float32)
    evaluation.moving_points_ras = sample.moving_landmarks_ras[:, :nd]
    return evaluation


def pairs(ndim: int, size: int, count: int, first_seed: int, region_mm: float | None = None,
          local_magnitude_mm: float = LOCAL_MAGNITUDE_MM):
    """Held-out generated pairs; ``region_mm``: a local motion (peak ``local_magnitude_mm``) within a window that
    wide."""
    from iterreg.imaging import prepare_pair
    from iterreg.sample_data import make_pair, make_slice_pair
    make = make_pair if ndim == 3 else make_slice_pair
    for k in range(count):
        if region_mm is not None:
            sample = make(size, seed=first_seed + k, magnitude_mm=local_magnitude_mm, region_mm=region_mm)
        else:
            sample = make(size, seed=first_seed + k)
        yield first_seed + k, prepare_pair(sample.fixed, sample.moving), evaluation_for(sample), sample


def score(evaluation, u) -> dict:
    from iterreg.metrics import folding_percent
    s = evaluation.score(u)
    return {"dice": s["dice_mean"], "tre": s["tre_mean_mm"], "folding": folding_percent(u)}


# --- IIRP: Table 3 ------------------------------------------------------------------------------------------
def iterstop(args) -> str:
    import torch

    from iterreg.methods import get_method

    torch.set_num_threads(2)
    configurations = [("RP-Net (1, 1, 1, 1)", {"level_iterations": [1, 1, 1, 1]})]
    configurations += [(f"IIRP-Net delta = {d:g}", {"delta": d}) for d in (0.01, 0.005, 0.001, 0.0005, 0.0001)]
    configurations += [(f"IIRP-Net ({t}, {t}, {t}, {t}), no IterStop", {"level_iterations": [t] * 4}) for t in (2, 3, 5)]
    sections = []
    for ndim, size, count in ((3, args.size, args.pairs), (2, 128, args.pairs_2d)):
        results = {name: [] for name, _ in configurations}
        for seed, pair, evaluation, _ in pairs(ndim, size, count, args.first_seed):
            for name, options in configurations:
                method = get_method("iirp").create(options=options, ndim=ndim)
                start = time.perf_counter()
                steps = list(method.run(pair.fixed, pair.moving, steps=200))
                elapsed = time.perf_counter() - start
                kept = [sum(1 for s in steps if s.metrics["level"] == level and s.metrics["accepted"])
                        for level in (4, 3, 2, 1)]
                results[name].append({**score(evaluation, steps[-1].displacement), "time": elapsed, "passes": kept})
            print(f"{ndim}D pair {seed}: " + ", ".join(f"{n.split(' ')[0]} {r[-1]['dice']:.3f}"
                                                       for n, r in results.items()), flush=True)
        reference = results[configurations[0][0]]
        base_dice = np.mean([r["dice"] for r in reference])
        base_time = np.mean([r["time"] for r in reference])
        rows = []
        for name, rs in results.items():
            mean = lambda key: float(np.mean([r[key] for r in rs]))  # noqa: E731
            passes = np.mean([r["passes"] for r in rs], axis=0)
            rows.append([name, f"{mean('dice'):.4f} ({mean('dice') - base_dice:+.4f})", f"{mean('tre'):.2f}",
                         f"{mean('folding'):.3f}", "(" + ", ".join(f"{p:.1f}" for p in passes) + ")",
                         f"{mean('time') / base_time:.1f}"])
        grid = f"{size}^3" if ndim == 3 else f"{size}^2 axial slices"
        sections += [f"### {ndim}D, {grid}, {count} held-out pairs (seeds {args.first_seed}-{args.first_seed + count - 1})",
                     "", markdown_table(["configuration", "Dice (vs RP-Net)", "TRE mm", "folding %",
                                         "passes kept per level (a, b, c, d)", "time / RP-Net"], rows), ""]
    body = "\n".join([
        "## IIRP-Net: RP-Net vs iterative inference with IterStop (the paper's Table 3 and Fig. 5 pattern)", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_iirp_r2n2.py iterstop`. Bundled "
        "checkpoints (`iirp_mni64`, `iirp_mni128_2d`), one network per dimension; every configuration runs the same "
        "weights. (a, b, c, d) = estimator passes kept per level, coarse to fine (the first pass at each level is "
        "RP-Net's own and always kept; a pass whose NCC gain is below delta is reverted and ends the level). "
        "'No IterStop' runs a fixed number of passes per level. Times are ratios to RP-Net in the same run "
        "(CPU, 2 threads).", "", *sections])
    return body


# --- R2N2: compactness and speed ----------------------------------------------------------------------------
def checkpoint_label(args, ndim: int = 2) -> str:
    from pathlib import Path

    from iterreg.resources import default_checkpoint
    return args.checkpoint or Path(default_checkpoint("r2n2", ndim)).name


def bspline_register(fixed, moving, mesh: int, sampling: float | None = None):
    """A plain SimpleITK B-spline registration (MSE, LBFGSB, 3 resolutions), returning the voxel field and its
    number of parameters; the paper's comparison is a B-spline grid optimised on the image pair. ``sampling``: the
    fraction of voxels the metric reads (random, fixed seed) - every voxel when None; 3D grids need it to finish in
    minutes, as elastix samples too."""
    import SimpleITK as sitk
    import torch

    from iterreg.geometry import Geometry

    transform = sitk.BSplineTransformInitializer(fixed, [mesh] * fixed.GetDimension(), order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    if sampling is not None:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling, 7)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-6, numberOfIterations=100)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(transform, inPlace=True)  # one mesh for all levels: its size is the parameter count
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    start = time.perf_counter()
    reg.Execute(fixed, moving)
    elapsed = time.perf_counter() - start
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())
    geometry = Geometry.of(fixed)
    u = geometry.displacement_lps_to_voxels(sitk.GetArrayFromImage(field))
    return torch.from_numpy(u).float()[None], len(transform.GetParameters()), elapsed


def fit_gaussians(fixed, moving, count: int, sigma_max: float, tv_weight: float, greedy_iterations: int = 60,
                  joint_iterations: int = 100):
    """R2N2's transform without its network: ``count`` local Gaussians (the same ranges of centre, widths,
    rotation and weight as the parameter network's outputs) fitted to one pair by Adam on R2N2's training loss
    (MSE + TV). Greedy, as R2N2 adds them: each new Gaussian starts where a Gaussian bump of the loss gradient is
    largest, pointing downhill with the best of a few strengths, and is fitted alone; then all are refined
    together. The representation's own accuracy at that size, to separate it from what the network has learned.
    2D or 3D. Returns the voxel field."""
    import torch

    from iterreg import losses
    from iterreg.networks.r2n2 import (downhill_mse_gradient, gaussian_displacement, gaussian_from_raw,
                                       rotation_angle_count)
    from iterreg.spatial import normalised_grid, warp

    shape = tuple(fixed.shape[2:])
    nd = len(shape)

    def field(raws, base=None):
        u = fixed.new_zeros(1, nd, *shape) if base is None else base
        for r in raws:  # r = [centre nd (tanh: inside the image, as a soft-argmax), the parameter network's outputs]
            u = u + gaussian_displacement(gaussian_from_raw(r, nd, sigma_max), shape)[0]
        return u

    def loss(raws, base=None):
        u = field(raws, base)
        return losses.mse(fixed, warp(moving, u)) + tv_weight * losses.isotropic_tv(u)

    def fitted(raws, iterations, lr, base=None):
        optimizer = torch.optim.Adam(raws, lr=lr)
        for _ in range(iterations):
            optimizer.zero_grad()
            loss(raws, base).backward()
            optimizer.step()

    raws = []
    for _ in range(count):
        base = field(raws).detach()  # the Gaussians placed so far stay put while the new one is fitted
        # the network's own gradient input: a mid-width Gaussian's first-order gain, and which way it points
        bump = downhill_mse_gradient(fixed, moving, base, 0.5 * sigma_max)
        index = np.unravel_index(int((bump ** 2).sum(1).flatten().argmax()), shape)
        raw = torch.zeros(1, 3 * nd + rotation_angle_count(nd))
        centre = normalised_grid(shape)[(0, slice(None), *index)]
        raw[0, :nd] = torch.atanh(centre.clamp(-0.95, 0.95))  # the centre's convention
        downhill = bump[(0, slice(None), *index)]
        downhill = downhill / (downhill.norm() + 1e-12)
        # The starting strength (normalised units: 0.16-5 pixels at 128) is the one that lowers the loss most. A
        # fixed 3 pixels overshot small local misfits, and Adam's steps then carried the Gaussian off the region
        # (session 22: a local-motion pair's fit left its landmarks where they were).
        with torch.no_grad():
            def loss_with_strength(strength):
                raw[0, 2 * nd:3 * nd] = torch.atanh(strength * downhill)
                return float(loss([raw], base))
            strength = min((0.0025, 0.005, 0.01, 0.02, 0.04, 0.08), key=loss_with_strength)
            raw[0, 2 * nd:3 * nd] = torch.atanh(strength * downhill)
        raw.requires_grad_(True)
        fitted([raw], greedy_iterations, 0.01, base)  # small steps keep the centre near where it started
        raws.append(raw.detach())
    raws = [r.clone().requires_grad_(True) for r in raws]
    fitted(raws, joint_iterations, 0.01)
    return field([r.detach() for r in raws]).detach()


def _elastix(sample) -> dict | None:
    """itk-elastix on the pair, 2D or 3D (the all-methods tables' baseline), or None if not installed."""
    import tempfile
    from pathlib import Path

    from benchmark_baselines import elastix_available, elastix_register

    from iterreg.sample_data import write_pair
    if not elastix_available():
        return None
    with tempfile.TemporaryDirectory() as tmp:  # elastix_register leaves the working folder as it found it
        result = elastix_register(write_pair(sample, Path(tmp) / "pair"), Path(tmp) / "elastix")
    return {"dice": result["dice_mean"], "tre": result["tre_mean_mm"], "folding": result["folding_percent"],
            "time": result["runtime_s"]}


def compactness(args) -> str:
    import torch

    from iterreg.methods import get_method
    from iterreg.networks.r2n2 import WEIGHT_SEARCH_SCALES, rotation_angle_count

    torch.set_num_threads(2)
    nd = args.ndim
    size, count = (128, args.pairs_2d) if nd == 2 else (args.size, args.pairs)
    voxels = size ** nd
    meshes = (2, 3, 4, 6, 8, 12, 16) if nd == 2 else (2, 3, 4, 6, 8)
    sampling = None if nd == 2 else 0.1  # a 3D grid's L-BFGS-B on every voxel takes many minutes per mesh
    identity_all, classical_all, elastix_all = [], [], []
    network_all = {}  # (Gaussians, variant) -> scores: the network's transform at T and after its first 8
    variants = {"": {}, " + weight search": {"weight_search": True},  # the opt-in test-time options
                f" + refinement ({args.refine_iterations} steps each)": {"refine_iterations": args.refine_iterations}}
    bspline_all = {m: [] for m in meshes}
    # a local motion needs few Gaussians (2D: 8 fitted ones reach 0.6 mm); whole-brain 3D motion needs many
    fitted_counts = (8, 25) if nd == 2 else (8, 16) if args.region_mm is not None else (25, 50)
    fitted_all = {n: [] for n in fitted_counts}
    steps_used = None
    for seed, pair, evaluation, sample in pairs(nd, size, count, args.first_seed, args.region_mm,
                                                args.local_magnitude_mm):
        method = get_method("r2n2").create(args.checkpoint, ndim=nd)
        steps_used = args.r2n2_steps or method.network.config.steps
        list(method.run(pair.fixed, pair.moving, steps=1))  # warm-up: the timed runs below start alike
        for variant, options in variants.items():
            method.options = type(method.options).from_dict(options)
            for n in sorted({min(8, steps_used), steps_used}):
                start = time.perf_counter()
                steps = list(method.run(pair.fixed, pair.moving, steps=n))
                network_all.setdefault((n, variant), []).append({
                    **score(evaluation, steps[-1].displacement), "time": time.perf_counter() - start,
                    "params": n * method.network.config.parameter_count})
        r2n2 = network_all[(steps_used, "")][-1]
        classical = get_method("classical").create()
        start = time.perf_counter()
        csteps = list(classical.run(pair.fixed, pair.moving))
        classical_all.append({**score(evaluation, csteps[-1].displacement), "time": time.perf_counter() - start,
                              "params": nd * voxels})
        identity_all.append({**score(evaluation, torch.zeros_like(steps[-1].displacement)), "params": 0})
        import SimpleITK as sitk
        fixed_img, moving_img = (sitk.Cast(i, sitk.sitkFloat32) for i in (sample.fixed, sample.moving))
        for mesh in meshes:
            u, n, elapsed = bspline_register(fixed_img, moving_img, mesh, sampling)
            bspline_all[mesh].append({**score(evaluation, u), "time": elapsed, "params": n})
        elastix = _elastix(sample)
        if elastix is not None:
            elastix_all.append(elastix)
        config = method.network.config
        tv_weight = method.metadata["training"]["config"]["loss"]["regularization_weight"]  # the checkpoint's own
        for n in fitted_counts:
            start = time.perf_counter()
            u = fit_gaussians(pair.fixed, pair.moving, n, config.sigma_max, tv_weight)
            fitted_all[n].append({**score(evaluation, u), "time": time.perf_counter() - start,
                                  "params": n * config.parameter_count})
        print(f"pair {seed}: identity TRE {identity_all[-1]['tre']:.2f}, R2N2 {r2n2['tre']:.2f} ({r2n2['params']} "
              "numbers), " + ", ".join(f"{v.strip(' +')} {network_all[(steps_used, v)][-1]['tre']:.2f}"
                                       for v in variants if v) + ", classical "
              f"{classical_all[-1]['tre']:.2f}, elastix "
              f"{elastix['tre'] if elastix else float('nan'):.2f}, B-spline " +
              ", ".join(f"{m}:{bspline_all[m][-1]['tre']:.2f}" for m in meshes) + ", fitted Gaussians " +
              ", ".join(f"{n}:{fitted_all[n][-1]['tre']:.2f}" for n in fitted_counts), flush=True)
    mean = lambda rs, key: float(np.mean([r[key] for r in rs]))  # noqa: E731
    reference, reference_name = (elastix_all, "elastix") if elastix_all else (network_all[(steps_used, "")], "R2N2")
    time_ratio = lambda rs: f"{mean(rs, 'time') / mean(reference, 'time'):.2f}" if rs and "time" in rs[0] else "-"  # noqa: E731

    def row(name, rs, params):
        return [name, f"{mean(rs, 'dice'):.3f}", f"{mean(rs, 'tre'):.2f}", f"{mean(rs, 'folding'):.3f}", params,
                time_ratio(rs)]
    network_label = lambda n, variant: (f"R2N2, {n} Gaussians" if n == steps_used else  # noqa: E731
                                        f"R2N2, its first {n} Gaussians") + variant
    order = list(variants)
    networks = sorted(network_all.items(), key=lambda item: (order.index(item[0][1]), item[0][0]))  # plain first
    rows = [row("identity", identity_all, "0")]
    rows += [row(network_label(n, variant), rs, f"{mean(rs, 'params'):.0f}") for (n, variant), rs in networks]
    rows.append(row("classical (dense, ours)", classical_all, f"{nd * voxels}"))
    rows += [row(f"{n} Gaussians fitted to each pair (no network)", fitted_all[n], f"{mean(fitted_all[n], 'params'):.0f}")
             for n in fitted_counts]
    if elastix_all:
        rows.append(row("itk-elastix (B-spline, 3 levels)", elastix_all, "-"))
    for mesh in meshes:
        rs = bspline_all[mesh]
        rows.append(row(f"B-spline, mesh {'x'.join([str(mesh)] * nd)}", rs, f"{mean(rs, 'params'):.0f}"))
    table = markdown_table(["transform", "Dice", "TRE mm", "folding %", "parameters",
                            f"CPU time / {reference_name}"], rows)

    def coarsest_bspline_within(tre):
        return next(((m, mean(bspline_all[m], "params")) for m in meshes if mean(bspline_all[m], "tre") <= tre), None)

    def versus_grids(label, rs):
        tre, params = mean(rs, "tre"), mean(rs, "params")
        grid = coarsest_bspline_within(tre)
        return (f"{label} ({params:.0f} numbers, TRE {tre:.2f} mm): " +
                (f"the coarsest B-spline grid at least as accurate is {'x'.join([str(grid[0])] * nd)} with "
                 f"{grid[1]:.0f} parameters ({100 * params / grid[1]:.0f}% of them)." if grid else
                 "no B-spline grid tried is as accurate."))

    verdict = " ".join([versus_grids(network_label(n, variant), rs) for (n, variant), rs in networks] +
                       [versus_grids(f"{n} fitted Gaussians", fitted_all[n]) for n in fitted_counts] +
                       ["(The paper: R2N2 needs ~7.6% of a grid's parameters.)"])
    if args.region_mm is not None:
        title = ("## R2N2: compactness on a local motion (the kind of motion of its paper's cine data)" if nd == 2
                 else "## R2N2 in 3D: compactness on a local motion")
        data = (f"{'128^2 axial slice' if nd == 2 else f'{size}^3'} pairs whose motion is confined to a Gaussian "
                f"window of {args.region_mm:g} mm around a random point of the brain "
                f"(peak {args.local_magnitude_mm:g} mm; "
                f"`{'make_slice_pair' if nd == 2 else 'make_pair'}(region_mm=...)`; the landmarks lie where the "
                "window exceeds 0.5, so TRE measures the moving region)")
    elif nd == 2:
        title, data = "## R2N2: compactness and speed (its paper's comparison)", "128^2 axial slice pairs"
    else:
        title, data = "## R2N2 in 3D: compactness, and the representation's ceiling", f"{size}^3 pairs"
    per_gaussian = (f"{config.parameter_count} per Gaussian: centre {nd}, widths {nd}, rotation "
                    f"{rotation_angle_count(nd)}, weight {nd}")
    command = "compactness" + ("" if nd == 2 else f" --ndim 3 --size {size} --pairs {count}") + (
        "" if args.region_mm is None else f" --region-mm {args.region_mm:g}") + (
        "" if args.local_magnitude_mm == LOCAL_MAGNITUDE_MM else
        f" --local-magnitude-mm {args.local_magnitude_mm:g}") + (
        "" if args.checkpoint is None else f" --checkpoint {args.checkpoint}")
    return "\n".join([
        title, "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_iirp_r2n2.py {command}`. Checkpoint "
        f"`{checkpoint_label(args, nd)}`; {count} held-out {data} (seeds {args.first_seed}-"
        f"{args.first_seed + count - 1}); means over pairs. 'Parameters' counts the numbers that describe "
        f"the final transform (R2N2: {per_gaussian}; B-spline: {nd} per "
        "control point of a cubic grid with that many mesh cells, SimpleITK, MSE, L-BFGS-B, 3 resolutions" +
        ("" if sampling is None else f", the metric on a random {sampling:.0%} of the voxels") + "; dense: "
        f"{nd} per voxel). Times are ratios to {reference_name}'s in the same run (CPU, 2 threads" +
        ("; elastix: its default B-spline map, 3 resolutions, as in the all-methods tables). " if elastix_all else
         "; itk-elastix is not installed). ") + "'Gaussians fitted to each pair' is "
        "R2N2's transform without its network: that many Gaussians, with the parameter network's ranges, fitted "
        "to the pair by Adam on the checkpoint's training loss (MSE + TV), one at a time and then together "
        "(`fit_gaussians`): how compact the representation is, apart from what the network has learned (its "
        "time is that of this unoptimised fit). 'Its first 8 Gaussians': a separate run of that many steps. '+ weight "
        "search': the same checkpoint with the opt-in option `weight_search` (each step's weight times the factor "
        f"of {', '.join(f'{s:g}' for s in WEIGHT_SEARCH_SCALES)} that lowers the MSE most; not in the paper). "
        "'+ refinement': the same checkpoint with the opt-in option `refine_iterations` (each step's Gaussian, "
        f"centre, widths, rotation and weight, refined by {args.refine_iterations} Adam steps on the MSE of the "
        "working grid before it is added; not in the paper).", "",
        table, "", verdict])


def series(args) -> str:
    """R2N2 on a generated 2D+t series (breathing-like periodic motion), all frames to frame 0 in one run."""
    import SimpleITK as sitk
    import torch

    from iterreg.imaging import normalise_intensity
    from iterreg.sample_data import make_series
    from iterreg.methods import get_method
    from iterreg.metrics import dice
    from iterreg.spatial import warp_labels

    torch.set_num_threads(2)
    data = make_series(128, frames=args.frames, seed=args.first_seed)
    frames = np.stack([sitk.GetArrayFromImage(f) for f in data["frames"]])  # [T, H, W]
    labels = np.stack([sitk.GetArrayFromImage(f) for f in data["labels"]]).astype(np.int64)
    volume = torch.from_numpy(normalise_intensity(frames)[0]).float()[None, None]  # frames along axis 0
    series_options = {"frame_axis": 0, "fixed_frame": 0}
    method = get_method("r2n2").create(args.checkpoint, ndim=2, options=series_options)
    gaussians = args.r2n2_steps or method.network.config.steps
    list(method.run(volume, volume, steps=1))  # warm-up: the timed runs below start alike
    rows = []
    for name, options in (("R2N2", {}), (f"R2N2 + refinement ({args.refine_iterations} steps each)",
                                         {"refine_iterations": args.refine_iterations})):
        method.options = type(method.options).from_dict({**series_options, **options})
        start = time.perf_counter()
        steps = list(method.run(volume, volume, steps=gaussians))
        elapsed = time.perf_counter() - start
        u = steps[-1].displacement  # [1, 3, T, H, W]
        before, after = [], []
        for t in range(1, args.frames):
            moving_labels = torch.from_numpy(labels[t])[None, None]
            field = u[:, 1:, t]
            before.append(dice(labels[0], labels[t])["mean"])
            after.append(dice(labels[0], warp_labels(moving_labels, field)[0, 0].numpy())["mean"])
        rows.append([name, str(args.frames - 1), f"{np.mean(before):.3f}", f"{np.mean(after):.3f}",
                     f"{min(after):.3f}", f"{elapsed:.1f}", f"{elapsed / (args.frames - 1):.2f}"])
    table = markdown_table(["transform", "frames registered", "Dice before", "Dice after", "worst frame after",
                            "CPU s (all)", "CPU s per frame"], rows)
    return "\n".join([
        "## R2N2: a 2D+t series registered frame by frame", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_iirp_r2n2.py series`. A generated "
        f"{args.frames}-frame 128^2 series (`make_series`, seed {args.first_seed}: a periodic, breathing-like "
        "deformation of an axial MNI slice), every frame registered to frame 0 in one run (`frame_axis`, "
        f"`fixed_frame`), checkpoint `{checkpoint_label(args)}`, {gaussians} Gaussians per frame, all frames in one "
        "batch; '+ refinement': with the opt-in option `refine_iterations` (each Gaussian refined by Adam steps on "
        "the MSE before it is added; not in the paper). Absolute CPU seconds (2 threads), after a warm-up run.", "",
        table])


def _one_gaussian_pairs(source, count: int, size: int, generator):
    """``count`` batches of 4: fixed = a generated subject slice warped by one random rotated Gaussian (centre in
    [-0.6, 0.6], widths 0.1-0.3, weight up to 0.15 of the half-extent, ~5 pixels at 64), moving = that slice."""
    import math

    import torch

    from iterreg.networks.r2n2 import LocalDeformation, gaussian_displacement
    from iterreg.spatial import warp
    batches = []
    for _ in range(count):
        moving = torch.stack([source._subject(int(torch.randint(source.subjects, (1,), generator=generator)))[0]
                              for _ in range(4)])
        g = LocalDeformation(torch.rand(4, 2, generator=generator) * 1.2 - 0.6,
                             torch.rand(4, 2, generator=generator) * 0.2 + 0.1,
                             torch.rand(4, 1, generator=generator) * math.pi,
                             (torch.rand(4, 2, generator=generator) * 2 - 1) * 0.15)
        batches.append((warp(moving, gaussian_displacement(g, (size, size))[0]), moving, g))
    return batches


def localisation(args) -> str:
    """Train a fresh 2D R2N2 (leaky ReLU + instance norm, one step) on one-Gaussian pairs, with the paper's input
    [F, M o f] and with the difference input [F, M o f - F]: (a) supervised on the Gaussian's centre alone, (b)
    unsupervised (MSE), as in training. Same seeds, same held-out batches."""
    import torch
    from iterreg_train.datasets import SyntheticSource

    from iterreg.networks.r2n2 import R2N2Config, R2N2Network
    from iterreg.spatial import warp
    torch.set_num_threads(1)
    size = 64
    source = SyntheticSource([size, size], subjects=32)
    held_out = _one_gaussian_pairs(source, 4, size, torch.Generator().manual_seed(123))
    centre_guess = float(torch.cat([g.center for _, _, g in held_out]).norm(dim=1).mean())
    rows = []
    for task, iterations in (("centre (supervised)", args.probe_iterations), ("MSE (unsupervised)", args.probe_iterations * 3)):
        for difference in (False, True):
            torch.manual_seed(0)
            network = R2N2Network(R2N2Config(ndim=2, steps=1, activation="leaky_relu", instance_norm=True,
                                             difference_input=difference))
            optimiser = torch.optim.Adam(network.parameters(), lr=1e-3, amsgrad=True)
            generator = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            for _ in range(iterations):
                (fixed, moving, g), = _one_gaussian_pairs(source, 1, size, generator)
                state = next(network.iterate(fixed, moving, 1))
                if task.startswith("centre"):
                    loss = ((state.gaussian.center - g.center) ** 2).mean()
                else:
                    loss = ((warp(moving, state.displacement) - fixed) ** 2).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            seconds = time.perf_counter() - start
            network.eval()
            with torch.no_grad():
                if task.startswith("centre"):
                    value = float(torch.cat([(next(network.iterate(f, m, 1)).gaussian.center - g.center).norm(dim=1)
                                             for f, m, g in held_out]).mean())
                    result = f"centre error {value:.3f} (always guessing the middle: {centre_guess:.3f})"
                else:
                    ratios = [float(((warp(m, next(network.iterate(f, m, 1)).displacement) - f) ** 2).mean()
                                    / ((m - f) ** 2).mean()) for f, m, _ in held_out]
                    result = f"MSE left {np.mean(ratios):.3f} of the unregistered"
            rows.append([task, "[F, M o f - F] (ours)" if difference else "[F, M o f] (paper)", str(iterations),
                         result, f"{seconds:.0f}"])
            print(rows[-1], flush=True)
    table = markdown_table(["task", "input", "iterations", "held-out result (16 pairs)", "time s"], rows)
    return "\n".join([
        "## R2N2: can the network learn to find one local deformation?", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_iirp_r2n2.py localisation`. A fresh 2D "
        "R2N2 (16-32-32-64, leaky ReLU + instance norm, one step) is trained on 64^2 pairs whose only difference is "
        "one random rotated Gaussian deformation (centre in [-0.6, 0.6], widths 0.1-0.3, at most ~5 pixels), batch "
        "4, Adam (AMSGrad) 1e-3, one thread, and scored on 4 held-out batches. The two inputs carry the same "
        "information (one is a linear change of the other), so any difference below is how easily the network "
        "learns from it: the reason `difference_input` is on by default (Docs/methods.md, R2N2).", "", table])


STEP_SIZE_AMPLITUDES = (0.5, 1.0, 2.0, 4.0)  # pixels of the network's working grid


def step_size(args) -> str:
    """Does the network's first Gaussian grow with the misalignment? Held-out images (the fixed ones, on each
    checkpoint's working grid) against the same image warped by one Gaussian displacement of a known size, at
    random places of the brain; the first step's weight is compared with the displacement that undoes it."""
    import torch

    from iterreg.methods import get_method
    from iterreg.methods.learned import WorkingGrid
    from iterreg.networks.r2n2 import LocalDeformation, gaussian_displacement, rotation_angle_count
    from iterreg.resources import bundled_checkpoints
    from iterreg.spatial import normalised_to_voxels, warp
    torch.set_num_threads(2)
    checkpoints = args.checkpoints or [str(p) for nd in (2, 3) for p in bundled_checkpoints(nd).get("r2n2", [])]
    rows = []
    for path in checkpoints:
        method = get_method("r2n2").create(path)
        network = method.network
        nd = network.config.ndim
        found = {a: [] for a in STEP_SIZE_AMPLITUDES}
        generator = torch.Generator().manual_seed(0)
        held_out = pairs(2, 128, args.pairs_2d, args.first_seed) if nd == 2 else \
            pairs(3, args.size, args.pairs, args.first_seed)
        for _, pair, _, _ in held_out:
            grid = WorkingGrid.for_images(pair.fixed, network.config.working_scale, method.trained_working_size)
            fixed = grid.image_down(pair.fixed)
            shape = fixed.shape[2:]
            for _ in range(4):
                center = torch.rand(1, nd, generator=generator) * 0.8 - 0.4  # inside the brain
                direction = torch.randn(1, nd, generator=generator)
                direction = direction / direction.norm()
                for amplitude in STEP_SIZE_AMPLITUDES:
                    weight = direction * amplitude / normalised_to_voxels(torch.ones(nd), shape)  # normalised
                    bump = LocalDeformation(center, torch.full((1, nd), 0.12), torch.zeros(1, rotation_angle_count(nd)),
                                            weight)
                    moving = warp(fixed, gaussian_displacement(bump, shape)[0], padding_mode="border")
                    with torch.no_grad():
                        g = next(network.iterate(fixed, moving, 1)).gaussian
                    w = normalised_to_voxels(g.weight[0], shape)
                    found[amplitude].append((float(w.norm()), float(torch.nn.functional.cosine_similarity(
                        w, -direction[0], dim=0))))
        rows.append([Path(path).stem, "x".join(str(n) for n in shape)] +
                    [f"{np.mean([n for n, _ in found[a]]):.2f}" for a in STEP_SIZE_AMPLITUDES] +
                    [f"{np.mean([c for a in STEP_SIZE_AMPLITUDES for _, c in found[a]]):.2f}"])
        print(rows[-1], flush=True)
    table = markdown_table(["checkpoint", "working grid"] + [f"weight for {a:g} px" for a in STEP_SIZE_AMPLITUDES] +
                           ["cosine to the undoing direction"], rows)
    return "\n".join([
        "## R2N2: does the first Gaussian grow with the misalignment?", "",
        f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_iirp_r2n2.py step-size`. The fixed "
        f"images of held-out pairs (2D: 128^2 slices, seeds {args.first_seed}-{args.first_seed + args.pairs_2d - 1}; "
        f"3D: {args.size}^3 volumes, seeds {args.first_seed}-{args.first_seed + args.pairs - 1}), each on the "
        "checkpoint's working grid, against the same image warped by one Gaussian displacement (width 0.12 of the "
        "half-extent, 4 random places within the central 40 % and random directions per image) of 0.5-4 pixels "
        "(voxels) of the working grid. Shown: the mean length of the first step's weight (pixels of the working "
        "grid), and its mean cosine to the direction that undoes the displacement. A network that sees how far "
        "the images are apart answers more to a larger displacement.", "", table])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["iterstop", "compactness", "series", "localisation", "step-size"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--pairs-2d", type=int, default=6)
    parser.add_argument("--ndim", type=int, choices=(2, 3), default=2, help="compactness: 2D slices (the paper) or 3D")
    parser.add_argument("--first-seed", type=int, default=200)
    parser.add_argument("--r2n2-steps", type=int, default=0, help="Gaussians per pair (0: the checkpoint's trained T)")
    parser.add_argument("--refine-iterations", type=int, default=10, help="compactness: Adam steps per Gaussian of "
                        "the '+ refinement' rows (the option refine_iterations)")
    parser.add_argument("--region-mm", type=float, default=None, help="compactness: pairs with a local "
                        "motion within a Gaussian window this wide (sections r2n2-compactness-local, -3d-local)")
    parser.add_argument("--local-magnitude-mm", type=float, default=LOCAL_MAGNITUDE_MM, help="compactness: the "
                        "local motion's peak (mm)")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--checkpoint", default=None, help="an r2n2 checkpoint (default: the bundled one "
                        "of that dimension)")
    parser.add_argument("--probe-iterations", type=int, default=1000, help="localisation: iterations of the centre "
                        "task (the MSE task runs 3x as many)")
    parser.add_argument("--checkpoints", nargs="*", default=None, help="step-size: r2n2 checkpoints to compare "
                        "(default: the bundled 2D ones)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.what in ("compactness", "series") and args.checkpoint is None:
        from iterreg.resources import default_checkpoint
        if default_checkpoint("r2n2", 2 if args.what == "series" else args.ndim) is None:
            print("no r2n2 checkpoint of that dimension is bundled (Docs/training.md says why); train one with "
                  "iterreg-train and pass it with --checkpoint")
            return 2
    body = {"iterstop": iterstop, "compactness": compactness, "series": series, "localisation": localisation,
            "step-size": step_size}[args.what](args)
    print(body)
    if not args.no_write:
        key = {'iterstop': 'iirp-iterstop', 'compactness': 'r2n2-compactness', 'series': 'r2n2-series',
               'localisation': 'r2n2-localisation', 'step-size': 'r2n2-step-size'}[args.what]
        if args.what == "compactness":
            key += ("-3d" if args.ndim == 3 else "") + ("" if args.region_mm is None else "-local")
        print(f"wrote {write_section(key, body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
