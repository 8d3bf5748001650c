"""Command line: ``iterreg register``, ``iterreg demo``, ``iterreg methods``.

Bad input (or an output folder that cannot be written) exits with status 2 and one line ``iterreg: error: <problem
and what to do>``; a run that does not fit in memory exits with status 3 the same way. Nothing is written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import InputError

__all__ = ["main"]


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"--option expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register MOVING onto FIXED and write the results to --out")
    p.add_argument("fixed", help="fixed image (.nii/.nii.gz/.nrrd/.mha)")
    p.add_argument("moving", help="moving image, any grid overlapping the fixed one")
    p.add_argument("--method", default="classical", help="method name (see `iterreg methods`)")
    p.add_argument("--steps", type=int, default=None, help="number of steps (default: the method's own)")
    p.add_argument("--checkpoint", default=None, help="weights for learned methods (.safetensors)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--fixed-landmarks", help="landmarks on the fixed image (.mrk.json/.fcsv/.csv, RAS mm)")
    p.add_argument("--moving-landmarks", help="the paired landmarks on the moving image")
    p.add_argument("--fixed-labels", help="label map on the fixed grid (for Dice/HD95)")
    p.add_argument("--moving-labels", help="label map on the moving grid")
    p.add_argument("--prompt", action="store_true", help="also use the landmarks as prompts, not only to score")
    p.add_argument("--init", metavar="DISPLACEMENT",
                   help="start from this displacement field (e.g. displacement.nii.gz of an earlier run on the same "
                        "fixed image): refine a result instead of starting from the identity")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --option similarity=mse (repeatable)")
    p.add_argument("--pictures", action="store_true", help="write steps.png and steps.gif")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _register(args) -> int:
    from .devices import prepare_process
    from .pipeline import RegistrationRequest, register_files

    prepare_process(args.threads)
    request = RegistrationRequest(
        fixed=args.fixed, moving=args.moving, out=args.out, method=args.method, steps=args.steps,
        checkpoint=args.checkpoint, device=args.device, fixed_landmarks=args.fixed_landmarks,
        moving_landmarks=args.moving_landmarks, fixed_labels=args.fixed_labels, moving_labels=args.moving_labels,
        options=_parse_options(args.option), pictures=args.pictures, use_landmarks_as_prompts=args.prompt,
        init=args.init)
    result = register_files(request, progress=not args.quiet)
    ev = result.evaluation
    print(f"{args.method}: {result.steps} steps in {result.runtime_s:.1f} s -> {result.out}")
    for key, label in (("dice_mean", "Dice (mean)"), ("hd95_mean_mm", "HD95 mm"), ("tre_mean_mm", "TRE mm")):
        if key in ev["after"]:
            start = f", {ev['start'][key]:.3f} at the start field" if "start" in ev else ""
            print(f"  {label}: {ev['before'][key]:.3f} before{start}, {ev['after'][key]:.3f} after")
    print(f"  folding: {ev['regularity']['folding_percent']:.3f} %")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="register the bundled sample pair with every available method")
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all available)")
    p.add_argument("--threads", type=int, default=None)


def _demo(args) -> int:
    from .devices import prepare_process, resolve_device
    from .pipeline import RegistrationRequest, register_files
    from .resources import sample_pair_dir
    from .sample_data import PAIR_FILES

    prepare_process(args.threads)
    device = resolve_device(args.device)
    pair_dir = sample_pair_dir()
    from .methods import ready_methods
    methods = args.methods or ready_methods(3)  # the sample pair is 3D
    print(f"IterativeRegistration demo: sample pair {pair_dir.name}, device {device}, methods {', '.join(methods)}")
    # (row, method, options, output folder); by default RIIR once more with the opt-in polish (Docs/methods.md)
    runs = [(name, name, {}, name) for name in methods]
    if not args.methods and "riir" in methods:
        runs.append(("riir + polish 1", "riir", {"polish_iterations": 1}, "riir_polish1"))
    rows = []
    for label, name, options, folder in runs:
        request = RegistrationRequest(
            fixed=str(pair_dir / PAIR_FILES["fixed"]), moving=str(pair_dir / PAIR_FILES["moving"]),
            out=str(Path(args.out) / folder), method=name, device=str(device), options=options,
            fixed_labels=str(pair_dir / PAIR_FILES["fixed_labels"]),
            moving_labels=str(pair_dir / PAIR_FILES["moving_labels"]),
            fixed_landmarks=str(pair_dir / PAIR_FILES["fixed_landmarks"]),
            moving_landmarks=str(pair_dir / PAIR_FILES["moving_landmarks"]), pictures=True)
        t0 = time.perf_counter()
        result = register_files(request, progress=True)
        ev = result.evaluation
        rows.append([label, result.steps, ev["after"]["dice_mean"], ev["after"]["hd95_mean_mm"],
                     ev["after"]["tre_mean_mm"], ev["regularity"]["folding_percent"], time.perf_counter() - t0])
    header = ["method", "steps", "Dice", "HD95 mm", "TRE mm", "folding %", "time s"]
    print(_table(header, rows))
    print(f"outputs (warped volume, displacement field, metrics per step, steps.png/steps.gif) in {args.out}/")
    return 0


def _table(header, rows) -> str:
    cells = [header] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _methods(_args) -> int:
    from .methods import available_methods

    for name, cls in available_methods().items():
        learned = "needs a checkpoint" if cls.needs_checkpoint else "no training needed"
        print(f"{name:12s} {cls.title}; default {cls.default_steps} steps (max {cls.max_steps}); "
              f"{'/'.join(f'{d}D' for d in cls.supported_ndims)}; {learned}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iterreg", description="Learned iterative image registration.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_register(sub)
    _add_demo(sub)
    sub.add_parser("methods", help="list the available methods")
    args = parser.parse_args(argv)
    handlers = {"register": _register, "demo": _demo, "methods": _methods}
    try:
        return handlers[args.command](args)
    except InputError as exc:
        print(f"iterreg: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        from .devices import describe_out_of_memory, is_out_of_memory
        from .memory_budget import NotEnoughMemory

        if isinstance(exc, NotEnoughMemory):  # the pre-flight check, before any work
            print(f"iterreg: error: {exc}", file=sys.stderr)
            return 3
        if is_out_of_memory(exc):  # ran out mid-run after all (another program grew, a GPU shared)
            message = describe_out_of_memory(exc, None, getattr(args, "device", ""), getattr(args, "method", ""))
            print(f"iterreg: error: {message}; no partial output was kept", file=sys.stderr)
            return 3
        raise
    except KeyboardInterrupt:
        print("iterreg: interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
