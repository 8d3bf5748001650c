"""Score a checkpoint (and identity, for reference) on a data split: the benchmark's metrics table."""
from __future__ import annotations

import time

import numpy as np
import torch

from iterreg.methods import get_method
from iterreg.metrics import dice, field_regularity, hd95
from iterreg.spatial import sample_displacement_at, warp_labels

from .datasets import PairSource

__all__ = ["evaluate", "format_table"]

HEADER = ["method", "Dice", "HD95 mm", "TRE mm", "folding %", "std log J", "time s"]


def _scores(pair, displacement) -> dict:
    out = {}
    if pair.fixed_labels is not None:
        warped = warp_labels(pair.moving_labels[None], displacement)[0, 0].numpy()
        out["dice"] = dice(pair.fixed_labels[0].numpy(), warped)["mean"]
        out["hd95"] = hd95(pair.fixed_labels[0].numpy(), warped, pair.spacing or (1.0,) * displacement.shape[1])["mean"]
    if pair.fixed_points is not None:
        mapped = pair.fixed_points + sample_displacement_at(displacement, pair.fixed_points)
        spacing = torch.tensor(pair.spacing or (1.0,) * displacement.shape[1])
        out["tre"] = float(((mapped - pair.moving_points) * spacing).norm(dim=1).mean())
    regularity = field_regularity(displacement)
    out["folding"], out["std_log_j"] = regularity["folding_percent"], regularity["std_log_jacobian"]
    return out


def evaluate(checkpoint: str, source: PairSource, device: str = "cpu",
             references: tuple[str, ...] = ("identity",)) -> list[list]:
    """One row per reference method (untrained ones: identity, classical) and one for the checkpoint."""
    pairs = source.validation_pairs()
    rows = []
    for name, method in [(r, get_method(r).create(device=device)) for r in references] + [("checkpoint", None)]:
        if method is None:
            from iterreg.checkpoints import read_checkpoint
            _, meta = read_checkpoint(checkpoint)
            method = get_method(meta["method"]).create(checkpoint, device=device)
            name = meta["method"]
        per_pair, seconds = [], []
        for pair in pairs:
            t0 = time.perf_counter()
            *_, last = method.run(pair.fixed[None], pair.moving[None])
            seconds.append(time.perf_counter() - t0)
            per_pair.append(_scores(pair, last.displacement.detach().cpu()))
        mean = lambda key: float(np.mean([p[key] for p in per_pair])) if key in per_pair[0] else float("nan")  # noqa: E731
        rows.append([name, mean("dice"), mean("hd95"), mean("tre"), mean("folding"), mean("std_log_j"),
                     float(np.mean(seconds))])
    return rows


def format_table(rows: list[list]) -> str:
    from iterreg.cli import _table
    return _table(HEADER, rows)
