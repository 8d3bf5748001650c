"""Polish: a few iterations of the classical optimizer on the image grid after a network (opt-in; ours).

Instance optimisation after a learned registration, as the Learn2Reg challenges' leading entries do it: the
network's field is the start, and the classical optimizer's finest level (``classical.py``: Adam on a dense
correction, smoothed gradient and field) runs ``polish_iterations`` iterations of the network's own training
loss (similarity, window) plus a diffusion term on the full image grid; landmark prompts carry into it (the
classical optimizer's landmark term), so a polished refinement keeps the points a clinician placed. Not in any
of the five papers, so off by default. Measured on held-out 128^3 pairs (Docs/benchmarks.md, ``baselines-128``,
the "+ polish" rows): one iteration adds 0.01-0.03 Dice to every network method, because the networks iterate on
a coarser working grid or predict in one pass (DIO: optimise on feature images at half resolution), and the
image grid's fine boundaries are where their Dice is lost (Docs/methods.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .base import MethodOptions, Prompts, Step
from .classical import ClassicalMethod, ClassicalOptions
from ..errors import InputError

__all__ = ["PolishOptions", "polished", "polish_memory_per_voxel", "MAX_POLISH_ITERATIONS", "POLISH_STEP_MM"]

MAX_POLISH_ITERATIONS = 200  # beyond this the classical optimizer itself is the better choice
# Adam's learning rate is about how far each voxel moves per iteration, so it is set in mm where the spacing is
# known: 0.3 mm was the best single iteration on held-out 128^3 pairs (1.5 mm voxels: 0.2 voxels, the classical
# optimizer's default; 0.1, 0.15, 0.3 voxels were worse) and on 64^3 ones (3 mm voxels: 0.1 voxels; 0.2 voxels
# lowered RIIR's Dice after one iteration). Without a spacing (a run on bare tensors) the classical default is used
POLISH_STEP_MM = 0.3


@dataclass(frozen=True)
class PolishOptions(MethodOptions):
    # iterations of the classical optimizer on the image grid after the network, from its field (0: none, the
    # paper's method alone)
    polish_iterations: int = 0

    def check(self) -> None:
        super().check()  # cooperative: combined with WorkingGridOptions and NetworkOptions
        if not 0 <= self.polish_iterations <= MAX_POLISH_ITERATIONS:
            raise InputError(f"polish_iterations must be 0 to {MAX_POLISH_ITERATIONS}, got "
                             f"{self.polish_iterations}; for longer optimisation use the classical method")


def polish_memory_per_voxel(options: dict | None) -> float:
    """Bytes per image-grid voxel a polish asked for in ``options`` needs (0 without one): the classical optimizer's
    finest level, which runs after the network has finished, so a run's peak is the larger of the two."""
    return ClassicalMethod.memory_per_voxel if int((options or {}).get("polish_iterations", 0) or 0) else 0.0


def polished(method, steps: Iterator[Step], fixed: torch.Tensor, moving: torch.Tensor,
             spacing: Sequence[float] | None = None, prompts: Prompts | None = None) -> Iterator[Step]:
    """``steps`` (a network method's run) followed by its options' ``polish_iterations`` classical iterations
    from the last step's field; the network's last step is then no longer the final one. ``spacing`` (mm per array
    axis) sets the step to ``POLISH_STEP_MM`` along the finest axis. ``prompts``: the run's landmark prompts, which
    the polish keeps (label prompts are the network's alone: the classical optimizer has no label term)."""
    iterations = getattr(method.options, "polish_iterations", 0)
    if not iterations:
        yield from steps
        return
    last = None
    for step in steps:
        step.final = False
        last = step
        yield step
    if last is None:  # a cancelled run
        return
    learning_rate = POLISH_STEP_MM / min(spacing) if spacing else ClassicalOptions.learning_rate
    optimizer = ClassicalMethod(ClassicalOptions(similarity=method.similarity, learning_rate=learning_rate,
                                                 **method.similarity_kwargs), method.device)
    first = last.index + 1
    landmarks = prompts if prompts is not None and prompts.fixed_points is not None else None
    for k, step in enumerate(optimizer.run(fixed, moving, iterations, prompts=landmarks, init=last.displacement),
                             start=1):
        step.index = first + k - 1
        step.phase = f"polish on the image grid, iteration {k}/{iterations}"
        step.metrics["polish_iteration"] = k
        yield step
