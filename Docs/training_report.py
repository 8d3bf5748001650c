"""Record how a bundled checkpoint was made, and how good it is, in Docs/training.md.

Reads the run folder (effective config, validation history, the command in its config) and the checkpoint's
metadata, then scores identity and the checkpoint on the run's validation pairs and on the bundled sample
pair. Writes one section per checkpoint between ``<!-- <name>:begin/end -->`` markers.

    python Docs/training_report.py RUN_DIR CHECKPOINT --command "iterreg-train train ..." [--minutes M]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "Testing"))

from benchmark_report import machine, markdown_table, write_section  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--command", required=True, help="the training command that was run")
    parser.add_argument("--minutes", type=float, help="wall-clock training time")
    args = parser.parse_args()

    import torch

    from iterreg.checkpoints import read_checkpoint
    from iterreg.resources import sample_pair_dir
    from iterreg.sample_data import read_pair
    from iterreg_train.config import load_config
    from iterreg_train.datasets import SyntheticSource, open_source
    from iterreg_train.evaluate import HEADER, evaluate

    _, meta = read_checkpoint(args.checkpoint)
    config = load_config(meta["method"])
    config["data"] = meta["training"]["config"]["data"]
    source = open_source(meta["data"]["kind"] if meta["data"]["kind"] == "synthetic" else meta["data"]["dataset"],
                         config)
    validation_rows = evaluate(str(args.checkpoint), source, references=("identity", "classical"))

    sample = read_pair(sample_pair_dir())

    class BundledPair(SyntheticSource):  # the demo pair, scored the same way
        def validation_pairs(self):
            pair = self._pair_from_images(sample.fixed, sample.moving, sample.fixed_labels, sample.moving_labels,
                                          name="bundled mni_64")
            from iterreg.geometry import Geometry
            geometry = Geometry.of(sample.fixed)
            pair.fixed_points = torch.tensor(geometry.ras_to_array_index(sample.fixed_landmarks_ras), dtype=torch.float32)
            pair.moving_points = torch.tensor(geometry.ras_to_array_index(sample.moving_landmarks_ras), dtype=torch.float32)
            return [pair]

    # scored on its own grid, as the demo registers it (its landmarks are voxels of that grid), whatever size
    # the checkpoint was trained at
    bundled_rows = evaluate(str(args.checkpoint), BundledPair(tuple(reversed(sample.fixed.GetSize()))),
                            references=("identity", "classical")) if meta.get("ndim", 3) == 3 else None
    def cell(value, digits: int) -> str:  # '-' where a score does not exist (pairs without labels: no Dice)
        return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    fmt = lambda rows: markdown_table(HEADER, [[r[0]] + [cell(v, 3) for v in r[1:]] for r in rows])  # noqa: E731
    history = [json.loads(line) for line in (args.run / "history.jsonl").read_text().splitlines()]
    history_table = markdown_table(["iteration", "validation Dice", "TRE mm", "similarity"],
                                   [[str(h["iteration"]), cell(h.get("dice"), 3), cell(h.get("tre_mm"), 2),
                                     f"{h['similarity']:.4f}"] for h in history])
    name = args.checkpoint.stem
    body = "\n".join([
        f"## `{args.checkpoint.name}` ({meta['method']})",
        "",
        f"Trained {date.today().isoformat()} on {machine()}"
        + (f" in {args.minutes:.0f} minutes" if args.minutes else "") + f"; {args.checkpoint.stat().st_size / 2**20:.1f} MB.",
        "",
        f"Command: `{args.command}`",
        "",
        f"Data: {json.dumps(meta['data'])}",
        "",
        f"Checkpoint kept: best validation score at iteration {meta['training']['iteration']} "
        f"(code {meta['code_version']}).",
        "",
        "Validation during training (mean over the validation pairs):",
        "",
        history_table,
        "",
        "Scored on the validation pairs (held-out seeds), with the untrained references in the same run "
        "(classical: its default 150 steps):",
        "",
        fmt(validation_rows),
        "",
    ] + ([] if bundled_rows is None else [
        "On the bundled sample pair (`Resources/SampleData/mni_64`, what the demo registers):",
        "",
        fmt(bundled_rows),
    ]))
    print(body)
    path = HERE / "training.md"
    if not path.exists():
        path.write_text("# Bundled checkpoints: how they were trained\n\nEach section is written by "
                        "`Docs/training_report.py` from the run folder and the checkpoint.\n")
    write_section(name, body, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
