"""``iterreg-train train`` and ``iterreg-train evaluate`` (also ``python -m iterreg_train``).

Bad input exits with status 2 and one line saying what is wrong and what to do.
"""
from __future__ import annotations

import argparse
import json
import sys

from iterreg.errors import InputError

__all__ = ["main"]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a learned method; writes checkpoints into --out")
    p.add_argument("--method", required=True, help="method to train (e.g. voxelmorph)")
    p.add_argument("--data", required=True,
                   help="'synthetic' (deformed MNI subjects), a Learn2Reg dataset.json, or a folder with images/")
    p.add_argument("--out", required=True, help="run folder (checkpoints, config, TensorBoard logs)")
    p.add_argument("--config", help="YAML file overriding the method's defaults (Training/configs/<method>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set optimizer.lr=1e-3 (repeatable)")
    p.add_argument("--iterations", type=int, help="shortcut for --set training.iterations=N")
    p.add_argument("--lr", type=float, help="shortcut for --set optimizer.lr=X")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun assigns one GPU per rank)")
    p.add_argument("--threads", type=int, help="CPU threads per process")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug-ranks", action="store_true", help="print each rank's first pairs and a weight checksum")


def _train(args) -> int:
    from iterreg.devices import prepare_process

    from .config import load_config
    from .datasets import open_source
    from .trainer import train

    overrides = list(args.set)
    if args.iterations is not None:
        overrides.append(f"training.iterations={args.iterations}")
    if args.lr is not None:
        overrides.append(f"optimizer.lr={args.lr}")
    config = load_config(args.method, args.config, overrides)
    prepare_process(args.threads)
    source = open_source(args.data, config)
    result = train(config, source, args.out, resume=args.resume, device=args.device, progress=not args.quiet,
                   debug_ranks=args.debug_ranks)
    if result["rank"] == 0:
        print(f"trained {config['method']} for {result['iterations']} iterations; validation: "
              f"{json.dumps(result['validation'])}; checkpoints in {args.out}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint (and identity) on the validation split of --data")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="as for train")
    p.add_argument("--shape", type=int, nargs="+", help="evaluation grid (default: the checkpoint's training grid)")
    p.add_argument("--device", default="cpu")


def _evaluate(args) -> int:
    from iterreg.checkpoints import read_checkpoint

    from .config import load_config
    from .datasets import open_source
    from .evaluate import evaluate, format_table

    _, meta = read_checkpoint(args.checkpoint)
    config = load_config(meta["method"])
    config["data"]["shape"] = args.shape or meta["preprocessing"]["training_shape"]
    print(format_table(evaluate(args.checkpoint, open_source(args.data, config), args.device)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iterreg-train", description="Train and evaluate learned registration.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    args = parser.parse_args(argv)
    try:
        return {"train": _train, "evaluate": _evaluate}[args.command](args)
    except InputError as exc:
        print(f"iterreg-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("iterreg-train: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
