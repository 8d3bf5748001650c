"""Benchmark: every available method + an itk-elastix B-spline baseline on held-out generated pairs.

Prints a table (Dice, HD95, TRE, % folding, runtime, runtime ratio to elastix, peak memory) and writes
Docs/benchmarks.md with the machine it ran on. Each run happens in its own child process so that peak
memory (ru_maxrss of that child) belongs to that run alone. Not a test: run it by hand.

    .venv/bin/python Testing/benchmark_baselines.py --size 96 --pairs 3
    .venv/bin/python Testing/benchmark_baselines.py --methods riir riir:polish_iterations=1   (a method with options)
    (itk-elastix: pip install itk-elastix==0.25.4, or pip install -e ".[benchmark]")
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from benchmark_report import ROOT, machine, markdown_table, write_section
def run_child(args: list[str], env: dict | None = None) -> tuple[dict, float]:
    """Run this script in child mode (``env``: extra environment variables); return its JSON result and the
    child's own peak RSS in MB."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return result, result.pop("peak_rss_mb")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM resets at exec, unlike ru_maxrss, which a forked child
    inherits from its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_main(argv) -> None:
    """Child: register one pair with one method, print one JSON line."""
    import torch

    from iterreg.pipeline import RegistrationRequest, register_files
    from iterreg.sample_data import PAIR_FILES

    spec, pair_dir, out = argv
    method, options = parse_method_spec(spec)
    pair_dir = Path(pair_dir)
    f = lambda key: str(pair_dir / PAIR_FILES[key])
    if method == "elastix":  # the reference as its users run it
        torch.set_num_threads(os.cpu_count() or 1)
    else:  # our methods' process set-up, as the CLI and the worker do it (threads, freed memory kept)
        from iterreg.devices import prepare_process
        prepare_process(os.cpu_count() or 1)
    from iterreg import losses  # import MONAI's LNCC before timing: a worker or Slicer session has it loaded once
    losses.lncc_loss(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    if method == "elastix":
        result = elastix_register(pair_dir, Path(out))
    else:
        request = RegistrationRequest(fixed=f("fixed"), moving=f("moving"), out=out, method=method, device="cpu",
                                      options=options,
                                      fixed_labels=f("fixed_labels"), moving_labels=f("moving_labels"),
                                      fixed_landmarks=f("fixed_landmarks"), moving_landmarks=f("moving_landmarks"))
        r = register_files(request)
        result = {"runtime_s": r.runtime_s, "steps": r.steps, **r.evaluation["after"],
                  "folding_percent": r.evaluation["regularity"]["folding_percent"],
                  "std_log_jacobian": r.evaluation["regularity"]["std_log_jacobian"]}
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result, default=float))


# rows with an opt-in option beside the methods' defaults: the polish on the image grid (iterreg/methods/polish.py)
POLISHED_VARIANTS = ("riir:polish_iterations=1", "riir:polish_iterations=2", "riir:polish_iterations=10",
                     "deqreg:polish_iterations=1", "iirp:polish_iterations=1", "voxelmorph:polish_iterations=1",
                     "dio:polish_iterations=1", "dio:polish_iterations=2")


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` -> (name, options); the values stay strings (the method coerces)."""
    name, _, rest = spec.partition(":")
    return name, dict(item.split("=", 1) for item in rest.split(",") if item)


def row_label(spec: str) -> str:
    """The table's name for a method spec: ``riir:polish_iterations=1`` -> ``riir + polish 1``."""
    name, options = parse_method_spec(spec)
    words = [f"polish {v}" if k == "polish_iterations" else v if k == "precision" else f"{k} {v}"
             for k, v in options.items()]
    return " + ".join([name, *words])


def elastix_displacement(fixed_path: Path, moving_path: Path, out: Path):
    """itk-elastix B-spline, 3 resolutions, 500 iterations, 10 mm final grid (like the papers' baseline): the
    displacement in voxels of the fixed grid (``[1, 3, *shape]``) and elastix's own runtime in seconds."""
    import itk
    import SimpleITK as sitk
    import torch

    from iterreg.geometry import Geometry

    out.mkdir(parents=True, exist_ok=True)
    fixed = itk.imread(str(fixed_path), itk.F)
    moving = itk.imread(str(moving_path), itk.F)
    params = itk.ParameterObject.New()
    bspline = params.GetDefaultParameterMap("bspline", 3)
    bspline["MaximumNumberOfIterations"] = ["500"]
    bspline["FinalGridSpacingInPhysicalUnits"] = ["10"]
    params.AddParameterMap(bspline)
    start = time.perf_counter()
    _, transform = itk.elastix_registration_method(fixed, moving, parameter_object=params, log_to_console=False,
                                                   output_directory=str(out))
    runtime = time.perf_counter() - start
    previous = os.getcwd()
    os.chdir(out)  # transformix drops deformationField.nii into the working folder
    try:
        field = itk.transformix_deformation_field(moving, transform)  # LPS mm, fixed grid
    finally:
        os.chdir(previous)
    geometry = Geometry.of(sitk.ReadImage(str(fixed_path)))
    u = torch.from_numpy(geometry.displacement_lps_to_voxels(np.asarray(field).astype(np.float64))).float()[None]
    return u, runtime


def elastix_on_images(fixed, moving):
    """:func:`elastix_displacement` on two SimpleITK images (written to a temporary folder first, as elastix reads
    files): the displacement in voxels of the fixed grid and elastix's own runtime in seconds."""
    import tempfile

    from iterreg.imaging import write_image_atomic
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"{name}.nii.gz" for name in ("fixed", "moving")]
        for image, path in zip((fixed, moving), paths):
            write_image_atomic(image, path)
        return elastix_displacement(*paths, Path(folder) / "elastix")


def elastix_register(pair_dir: Path, out: Path) -> dict:
    """The elastix baseline on a written sample pair, evaluated with our own metrics."""
    import SimpleITK as sitk

    from iterreg.pipeline import RegistrationRequest, _load_evaluation
    from iterreg.metrics import field_regularity
    from iterreg.sample_data import PAIR_FILES

    f = lambda key: str(pair_dir / PAIR_FILES[key])  # noqa: E731
    u, runtime = elastix_displacement(Path(f("fixed")), Path(f("moving")), out)
    request = RegistrationRequest(fixed=f("fixed"), moving=f("moving"), out=str(out),
                                  fixed_labels=f("fixed_labels"), moving_labels=f("moving_labels"),
                                  fixed_landmarks=f("fixed_landmarks"), moving_landmarks=f("moving_landmarks"))
    evaluation = _load_evaluation(request, sitk.ReadImage(f("fixed")), sitk.ReadImage(f("moving")))
    scores = evaluation.score(u)
    regularity = field_regularity(u)
    return {"runtime_s": runtime, "steps": 3 * 500, **scores, "folding_percent": regularity["folding_percent"],
            "std_log_jacobian": regularity["std_log_jacobian"]}


def elastix_available() -> bool:
    try:
        import itk  # noqa: F401
        return hasattr(itk, "elastix_registration_method")
    except ImportError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=200,
                        help="held-out seeds (the demo pair uses 0, training validation 100-107)")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--no-write", action="store_true", help="print only; leave Docs/benchmarks.md alone")
    args = parser.parse_args()

    from iterreg.methods import ready_methods
    from iterreg.sample_data import make_pair, write_pair

    from iterreg.networks.precision import bfloat16_is_native
    methods = args.methods or ready_methods(3) + [v for v in POLISHED_VARIANTS
                                                  if parse_method_spec(v)[0] in ready_methods(3)]
    if not args.methods and bfloat16_is_native("cpu") and "riir" in ready_methods(3):
        methods.append("riir:polish_iterations=1,precision=bfloat16")  # as a user of such a CPU may choose
    if elastix_available():
        methods.append("elastix")
    else:
        print("itk-elastix not installed: the elastix baseline is skipped (pip install itk-elastix==0.25.4)")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.pairs):
            seed = args.first_seed + k
            pair_dir = write_pair(make_pair(args.size, seed=seed), Path(tmp) / f"pair_{seed}")
            for number, method in enumerate(methods):
                result, peak = run_child(["--child", method, str(pair_dir), str(Path(tmp) / f"out_{seed}_{number}")])
                result["peak_mb"] = peak
                results[method].append(result)
                print(f"pair {seed} {row_label(method):24s} Dice {result['dice_mean']:.3f} "
                      f"TRE {result['tre_mean_mm']:.2f} mm time {result['runtime_s']:.1f} s peak {peak:.0f} MB", flush=True)

    ref = np.mean([r["runtime_s"] for r in results["elastix"]]) if "elastix" in results else None
    header = ["method", "Dice", "HD95 mm", "TRE mm", "folding %", "std log J", "steps", "CPU time / elastix",
              "peak MB"]
    rows = []
    for method, rs in results.items():
        mean = lambda key: float(np.mean([r[key] for r in rs]))
        ratio = f"{mean('runtime_s') / ref:.2f}" if ref else "n/a"
        rows.append([row_label(method), f"{mean('dice_mean'):.3f}", f"{mean('hd95_mean_mm'):.2f}",
                     f"{mean('tre_mean_mm'):.2f}", f"{mean('folding_percent'):.3f}", f"{mean('std_log_jacobian'):.3f}",
                     f"{mean('steps'):.0f}", ratio, f"{mean('peak_mb'):.0f}"])
    table = markdown_table(header, rows)
    print(table)
    if ref:
        print(f"elastix mean runtime in this run: {ref:.1f} s")
    if not args.no_write:
        body = "\n".join([
            f"## All methods on generated MNI pairs ({args.size}^3): identity, classical, elastix, VoxelMorph, the "
            "iterative methods",
            "",
            f"Run {date.today().isoformat()} on {machine()}, by `Testing/benchmark_baselines.py --size {args.size} "
            f"--pairs {args.pairs} --first-seed {args.first_seed}`.",
            f"Held-out pairs: seeds {args.first_seed}-{args.first_seed + args.pairs - 1} of the sample-data generator "
            "(MNI152 2009 T1, two random diffeomorphic fields, ground-truth peak 10 mm, moving image with gamma/bias/"
            "noise change); labels CSF/GM/WM, 20 landmarks per pair. Means over pairs. Runtime is quoted as a ratio "
            "to itk-elastix (B-spline, 3 resolutions, 500 iterations, 10 mm final grid) measured in the same run; "
            "peak memory is the whole child process (Python + libraries + data). Lazy imports (MONAI) are done "
            "before timing, as in a running worker or Slicer session. 'method + polish k': the opt-in option "
            "`polish_iterations` (k iterations of the classical optimizer on the image grid after the network, from "
            "its field; not in the papers: Docs/methods.md); '+ bfloat16': the opt-in `precision` where the CPU has it "
            "natively.",
            "",
            table,
        ])
        print(f"wrote {write_section(f'baselines-{args.size}', body)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        raise SystemExit(main())
