"""One registration from files to files: validate everything, run a method, evaluate, save atomically.

Used by the CLI and the demo. All input checks happen before any output exists; outputs are staged in a
hidden folder inside ``out`` and moved into place only when the run succeeded, so a failure leaves no
partial file behind.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .atomic import atomic_file
from .devices import resolve_device
from .errors import InputError, OutputError
from .geometry import Geometry
from .imaging import (check_label_geometry, prepare_pair, read_image, read_image_header, read_image_size,
                      resample_onto,
                      resample_through_field, write_image_atomic)
from .memory_budget import check_memory
from .landmarks import landmarks_on_fixed_grid, pair_landmarks, read_landmarks
from .methods import Prompts, Step, finite_steps, get_method
from .metrics import dice, field_regularity, hd95, tre
from .pictures import StepPictures
from .spatial import sample_displacement_at, warp_labels

__all__ = ["RegistrationRequest", "RegistrationResult", "register_files"]


@dataclass
class RegistrationRequest:
    fixed: str
    moving: str
    out: str
    method: str = "classical"
    steps: int | None = None
    checkpoint: str | None = None
    device: str = "auto"
    fixed_landmarks: str | None = None
    moving_landmarks: str | None = None
    fixed_labels: str | None = None
    moving_labels: str | None = None
    options: dict = field(default_factory=dict)
    pictures: bool = False
    use_landmarks_as_prompts: bool = False
    init: str | None = None  # an ITK displacement field on the fixed grid to start from (a refinement)


@dataclass
class RegistrationResult:
    out: Path
    steps: int
    runtime_s: float
    evaluation: dict
    files: list[str]


@dataclass
class _Evaluation:
    """Labels and landmarks on the fixed grid, ready to score any displacement."""
    geometry: Geometry
    fixed_labels: np.ndarray | None = None
    moving_labels: torch.Tensor | None = None
    fixed_points: torch.Tensor | None = None  # voxels, fixed grid
    moving_points: torch.Tensor | None = None  # voxels of the fixed grid too (prompt form)
    moving_points_ras: np.ndarray | None = None
    landmark_names: list[str] | None = None

    def score(self, displacement: torch.Tensor) -> dict:
        result: dict = {}
        if self.fixed_labels is not None:
            warped = warp_labels(self.moving_labels, displacement.cpu())[0, 0].numpy()
            d = dice(self.fixed_labels, warped)
            h = hd95(self.fixed_labels, warped, self.geometry.array_spacing)
            result.update(dice_mean=d["mean"], dice_per_label=d["per_label"], hd95_mean_mm=h["mean"],
                          hd95_per_label_mm=h["per_label"])
        if self.fixed_points is not None:
            mapped = self.fixed_points + sample_displacement_at(displacement.cpu(), self.fixed_points)
            t = tre(self.geometry.array_index_to_ras(mapped.numpy()), self.moving_points_ras)
            result.update(tre_mean_mm=t["mean"], tre_median_mm=t["median"], tre_max_mm=t["max"])
        return result


def _load_evaluation(request: RegistrationRequest, fixed: sitk.Image, moving: sitk.Image) -> _Evaluation:
    geometry = Geometry.of(fixed)
    evaluation = _Evaluation(geometry)
    if (request.fixed_labels is None) != (request.moving_labels is None):
        raise InputError("give both --fixed-labels and --moving-labels, or neither")
    if request.fixed_labels:
        fixed_labels = read_image(request.fixed_labels, "fixed label map")
        moving_labels = read_image(request.moving_labels, "moving label map")
        check_label_geometry(fixed_labels, fixed, "fixed label map")
        check_label_geometry(moving_labels, moving, "moving label map")
        moving_on_fixed = resample_onto(moving_labels, geometry, sitk.sitkNearestNeighbor)
        evaluation.fixed_labels = sitk.GetArrayFromImage(fixed_labels).astype(np.int64)
        evaluation.moving_labels = torch.from_numpy(
            sitk.GetArrayFromImage(moving_on_fixed).astype(np.int64))[None, None]
    if (request.fixed_landmarks is None) != (request.moving_landmarks is None):
        raise InputError("give both --fixed-landmarks and --moving-landmarks, or neither")
    if request.fixed_landmarks:
        fixed_ras, moving_ras, names = pair_landmarks(read_landmarks(request.fixed_landmarks, "fixed landmarks"),
                                                      read_landmarks(request.moving_landmarks, "moving landmarks"))
        fixed_vox, moving_vox = landmarks_on_fixed_grid(geometry, Geometry.of(moving), fixed_ras, moving_ras, names)
        evaluation.fixed_points = torch.tensor(fixed_vox, dtype=torch.float32)
        evaluation.moving_points = torch.tensor(moving_vox, dtype=torch.float32)
        evaluation.moving_points_ras = moving_ras[:, :geometry.ndim]
        evaluation.landmark_names = names
    return evaluation


def register_files(request: RegistrationRequest, on_step: Callable[[Step], None] | None = None,
                   progress: bool = False) -> RegistrationResult:
    """Run one registration; raises :class:`InputError` (nothing written) for bad input."""
    method_cls = get_method(request.method)
    device = resolve_device(request.device)
    # Before any pixel is read: does the run fit in memory? (sizes from the headers)
    fixed_size, fixed_spacing = read_image_header(request.fixed, "fixed image")
    check_memory(method_cls, fixed_size, read_image_size(request.moving, "moving image"), device, request.options,
                 fixed_spacing)
    fixed = read_image(request.fixed, "fixed image")
    moving = read_image(request.moving, "moving image")
    pair = prepare_pair(fixed, moving)
    evaluation = _load_evaluation(request, fixed, moving)
    method = method_cls.create(request.checkpoint, device, request.options, ndim=pair.geometry.image_ndim)
    steps = method.check_inputs(pair.fixed, pair.moving, request.steps)
    prompts = None
    if request.use_landmarks_as_prompts and evaluation.fixed_points is not None:
        prompts = Prompts(evaluation.fixed_points, evaluation.moving_points, spacing=pair.geometry.array_spacing)
    init = None if request.init is None else _starting_field(request.init, pair.geometry)

    out = Path(request.out)
    created_out = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    except OSError as exc:
        raise InputError(f"cannot write to output folder '{out}' ({exc.strerror}); choose a writable folder") \
            from None
    try:
        return _run_and_save(request, method, pair, evaluation, steps, prompts, staging, out, on_step, progress,
                             init)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_out and not any(out.iterdir()):
            out.rmdir()
        raise


def _starting_field(path: str, geometry: Geometry) -> torch.Tensor:
    """A saved displacement field (LPS mm, as this tool writes it) -> voxels on the fixed grid."""
    field_image = read_image(path, "starting displacement")
    try:
        voxels, field_geometry = Geometry.displacement_from_sitk(field_image)
    except ValueError as exc:
        raise InputError(f"starting displacement '{path}': {exc}") from None
    if not field_geometry.same_grid(geometry):
        raise InputError(f"starting displacement '{path}' is not on the fixed image's grid; give the "
                         "displacement.nii.gz of a run on this fixed image")
    return torch.from_numpy(np.ascontiguousarray(voxels, dtype=np.float32))[None]


def _run_and_save(request, method, pair, evaluation, steps, prompts, staging: Path, out: Path, on_step, progress,
                  init=None):
    from tqdm import tqdm  # only the CLI path shows progress

    pictures = StepPictures(pair.fixed) if request.pictures else None
    records = []
    start = time.perf_counter()
    last: Step | None = None
    bar = tqdm(total=method.planned_steps(steps), desc=request.method, unit="step", disable=not progress, leave=False)
    run = method.run_pair(pair, steps, prompts, init)
    for step in finite_steps(method, run):
        last = step
        records.append({"step": step.index, "phase": step.phase, "elapsed_s": time.perf_counter() - start,
                        **step.metrics})
        if pictures is not None:
            pictures.add(step.warped, f"step {step.index + 1}")
        if on_step is not None:
            on_step(step)
        bar.update(1)
        bar.set_postfix(similarity=f"{step.metrics['similarity']:.4f}")
    bar.close()
    runtime = time.perf_counter() - start
    if last is None:
        raise RuntimeError(f"method '{request.method}' produced no step")
    displacement = last.displacement.detach().cpu()
    identity = torch.zeros_like(displacement)
    evaluation_result = {"before": evaluation.score(identity), "after": evaluation.score(displacement),
                         "regularity": field_regularity(displacement)}
    if init is not None:  # a refinement: also how good the field it started from was
        evaluation_result["start"] = evaluation.score(init.cpu())

    try:
        files = _write_outputs(request, method, pair, evaluation, pictures, records, steps, runtime,
                               evaluation_result, displacement, staging)
    except (OSError, RuntimeError) as exc:  # SimpleITK reports a failed write as RuntimeError
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1]
        raise OutputError(f"could not write the results into '{out}' ({reason}); free some disk space or choose "
                          "another output folder - nothing was written there") from None
    for name in files:  # publish: each file appears complete, then the staging folder goes
        (staging / name).replace(out / name)
    staging.rmdir()
    return RegistrationResult(out, len(records), runtime, evaluation_result, files)


def _write_outputs(request, method, pair, evaluation, pictures, records, steps, runtime, evaluation_result,
                   displacement, staging: Path) -> list[str]:
    """Every result file, complete, in the private staging folder; returns their names."""
    geometry = pair.geometry
    files = []
    warped_raw = resample_through_field(pair.moving_image, displacement[0].numpy(), geometry)
    write_image_atomic(geometry.apply_to(sitk.GetImageFromArray(warped_raw)), staging / "warped.nii.gz")
    files.append("warped.nii.gz")
    field_image = sitk.Cast(geometry.displacement_to_sitk(displacement[0].numpy()), sitk.sitkVectorFloat32)
    write_image_atomic(field_image, staging / "displacement.nii.gz")
    files.append("displacement.nii.gz")
    if evaluation.moving_labels is not None:
        warped_labels = warp_labels(evaluation.moving_labels, displacement)[0, 0].numpy().astype(np.int16)
        write_image_atomic(geometry.apply_to(sitk.GetImageFromArray(warped_labels)),
                           staging / "warped_labels.nii.gz")
        files.append("warped_labels.nii.gz")
    with atomic_file(staging / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    files.append("metrics.jsonl")
    if pictures is not None:
        pictures.write_strip(staging / "steps.png")
        pictures.write_gif(staging / "steps.gif")
        files += ["steps.png", "steps.gif"]
    summary = {
        "method": request.method, "options": method.options.__dict__, "steps_run": len(records),
        "steps_requested": steps, "runtime_s": runtime, "device": str(method.device),
        "fixed": str(request.fixed), "moving": str(request.moving), "notes": pair.notes,
        "intensity": {"fixed": pair.fixed_intensity.__dict__, "moving": pair.moving_intensity.__dict__},
        "evaluation": evaluation_result,
        "displacement_convention": "displacement.nii.gz: ITK displacement field (LPS mm, fixed grid) of the "
                                   "resampling transform fixed -> moving; load in Slicer as a transform",
    }
    with atomic_file(staging / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    files.append("summary.json")
    return files
