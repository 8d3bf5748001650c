"""Sample data that works offline: real anatomy (MNI ICBM152 2009 from the nilearn wheel, BSD-3) deformed by
known smooth random fields, with warped label maps, landmark pairs and the ground-truth displacement.

Construction of a 3D pair (all in voxels of one isotropic cube grid around the brain):
  fixed  = T ∘ exp(v_a),   moving = T ∘ exp(v_b)  (+ optional intensity change on the moving image)
  ground truth u with moving(x + u(x)) = fixed(x):  phi_u = exp(-v_b) ∘ exp(v_a)
Stationary velocities integrated by scaling and squaring make both maps diffeomorphic (no folding).
Also: 2D slice pairs and 2D+t series (a periodic deformation, as in R2N2's use).

Command line: ``python -m iterreg.sample_data --size 64 --seed 0 --out DIR``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import util as importlib_util
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .atomic import default_dir_mode
from .geometry import Geometry
from .imaging import resample_onto, write_image_atomic
from .landmarks import read_landmarks, write_markups_json
from .spatial import (compose, gaussian_smooth, identity_grid, integrate_velocity, sample_displacement_at,
                      warp, warp_labels)

__all__ = ["mni_template", "make_pair", "deformed_template", "make_slice_pair", "make_series", "on_coarser_grid",
           "SamplePair", "write_pair", "read_pair", "LABEL_NAMES", "MAX_MAGNITUDE_MM", "SOURCE"]

LABEL_NAMES = {1: "CSF/other brain", 2: "grey matter", 3: "white matter"}
MAX_MAGNITUDE_MM = 20.0  # the largest ground-truth peak the generators are asked for (a brain's motion, not a shift)
SOURCE = ("MNI ICBM152 2009a nonlinear symmetric template (T1, GM and WM probability maps) as shipped in the "
          "nilearn wheel (nilearn/datasets/data); nilearn is BSD-3-Clause and the ICBM152 2009 templates are "
          "distributed under a permissive copyright notice (McConnell Brain Imaging Centre, MNI).")


def _nilearn_data_dir() -> Path:
    spec = importlib_util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the sample anatomy comes from the nilearn package: pip install nilearn")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def mni_template(size: int = 64, margin_mm: float = 6.0) -> tuple[sitk.Image, sitk.Image]:
    """MNI T1 (float32, 0-255) and a label map (0 background, 1 CSF/other, 2 GM, 3 WM) on a ``size``^3
    isotropic grid that tightly covers the brain (orientation as in the template: LPS direction of the file).
    """
    data = _nilearn_data_dir()
    t1 = sitk.Cast(sitk.ReadImage(str(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")), sitk.sitkFloat32)
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")))
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")))
    t1_arr = sitk.GetArrayFromImage(t1)
    brain = t1_arr > 0
    other = np.clip(255.0 - gm.astype(float) - wm.astype(float), 0, None)
    labels_arr = (np.argmax(np.stack([other, gm, wm]), axis=0) + 1) * brain
    labels = sitk.GetImageFromArray(labels_arr.astype(np.uint8))
    labels.CopyInformation(t1)

    src = Geometry.of(t1)
    idx = np.argwhere(brain)
    corners = src.array_index_to_lps(np.array([idx.min(0), idx.max(0)], dtype=float))
    centre = corners.mean(0)
    side = float(np.abs(corners[1] - corners[0]).max()) + 2 * margin_mm
    spacing = side / size
    direction = src.direction_matrix
    origin = centre - direction @ np.full(3, spacing * (size - 1) / 2)
    grid = Geometry((size,) * 3, (spacing,) * 3, tuple(origin), tuple(direction.ravel()))
    return resample_onto(t1, grid), resample_onto(labels, grid, sitk.sitkNearestNeighbor)


def random_velocity(shape, magnitude_vox: float, generator: torch.Generator, control_spacing: int = 8,
                    smoothing: float | None = None) -> torch.Tensor:
    """A smooth random stationary velocity ``[1, ndim, *shape]`` whose exp has max |u| = ``magnitude_vox``."""
    nd = len(shape)
    coarse = [max(3, n // control_spacing) for n in shape]
    noise = torch.randn(1, nd, *coarse, generator=generator)
    v = torch.nn.functional.interpolate(noise, size=tuple(shape), mode="bilinear" if nd == 2 else "trilinear",
                                        align_corners=True)
    v = gaussian_smooth(v, smoothing if smoothing is not None else max(shape) / 24)
    if magnitude_vox <= 0:
        return torch.zeros_like(v)
    for _ in range(3):  # exp is nonlinear in v: rescale a few times to hit the requested magnitude
        peak = float(integrate_velocity(v).norm(dim=1).max())
        v = v * (magnitude_vox / max(peak, 1e-8))
    return v


@dataclass
class SamplePair:
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image
    moving_labels: sitk.Image
    ground_truth: np.ndarray | None  # voxel displacement [ndim, *shape] on the fixed grid (array order)
    fixed_landmarks_ras: np.ndarray  # [N, 3]
    moving_landmarks_ras: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def geometry(self) -> Geometry:
        return Geometry.of(self.fixed)


def _intensity_change(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Gamma change, smooth multiplicative bias (+-10%) and mild noise: a different-scanner look."""
    gamma = float(torch.empty(1).uniform_(0.75, 1.35, generator=generator))
    nd = image.dim() - 2
    bias = gaussian_smooth(torch.randn(1, 1, *[max(2, n // 16) for n in image.shape[2:]], generator=generator),
                           0.7)
    bias = torch.nn.functional.interpolate(bias, size=image.shape[2:],
                                           mode="bilinear" if nd == 2 else "trilinear", align_corners=True)
    bias = 1 + 0.1 * bias / bias.abs().max().clamp_min(1e-6)
    peak = image.max()
    out = (image / peak).clamp_min(0) ** gamma * bias * peak
    out = out + 0.01 * peak * torch.randn(image.shape, generator=generator) * (image > 0)
    return out.clamp_min(0), {"gamma": gamma, "bias_percent": 10.0, "noise_percent": 1.0}


def _choose_landmarks(fixed: torch.Tensor, labels: torch.Tensor, count: int, generator: torch.Generator,
                      border: int, within: torch.Tensor | None = None) -> torch.Tensor:
    """Distinctive points: inside the brain (and ``within``, a boolean mask, if given), high gradient magnitude,
    spread out (greedy min-distance)."""
    nd = fixed.dim() - 2
    grads = torch.gradient(gaussian_smooth(fixed, 1.0)[0, 0])
    strength = torch.sqrt(sum(g ** 2 for g in grads))
    mask = labels[0, 0] > 0
    if within is not None:
        mask = mask & within
    inner = torch.zeros_like(mask)
    inner[tuple(slice(border, n - border) for n in mask.shape)] = True
    candidates = torch.nonzero(mask & inner & (strength >= torch.quantile(strength[mask], 0.8)))
    order = torch.randperm(len(candidates), generator=generator)
    extent = max(fixed.shape[2:]) if within is None else float(within.sum()) ** (1 / nd)
    min_dist = extent / (2.0 * count ** (1 / nd))
    chosen: list[torch.Tensor] = []
    for i in order.tolist():
        c = candidates[i].float()
        if all(float((c - p).norm()) >= min_dist for p in chosen):
            chosen.append(c)
            if len(chosen) == count:
                break
    return torch.stack(chosen)


def _to_image(array: np.ndarray, geometry: Geometry, pixel) -> sitk.Image:
    return geometry.apply_to(sitk.Cast(sitk.GetImageFromArray(array), pixel))


def _local_window(labels: torch.Tensor, spacing: float, region_mm: float, generator: torch.Generator):
    """A Gaussian window (``[1, 1, *shape]``, 1 at its centre) of width ``region_mm`` around a random point of the
    brain at least two widths from the image border: where a local motion happens (a heart in a still chest)."""
    shape = labels.shape[2:]
    margin = int(math.ceil(2 * region_mm / spacing))
    inside = torch.zeros(shape, dtype=torch.bool)
    inside[tuple(slice(margin, n - margin) for n in shape)] = True
    candidates = torch.nonzero((labels[0, 0] > 0) & inside)
    if len(candidates) == 0:
        raise ValueError(f"region_mm {region_mm} is too wide for this image: no brain point is two widths "
                         "inside the border")
    centre = candidates[int(torch.randint(len(candidates), (1,), generator=generator))].float()
    d2 = ((identity_grid(shape)[0] - centre.view(-1, *[1] * len(shape))) ** 2).sum(0) * spacing ** 2
    return torch.exp(-d2 / (2 * region_mm ** 2))[None, None], centre


def _deformed_pair(template: torch.Tensor, labels: torch.Tensor, geometry: Geometry, seed: int,
                   magnitude_mm: float, intensity_change: bool, n_landmarks: int,
                   region_mm: float | None = None) -> SamplePair:
    generator = torch.Generator().manual_seed(seed)
    shape = template.shape[2:]
    spacing = min(geometry.spacing)
    v_a = random_velocity(shape, 1.0, generator)
    v_b = random_velocity(shape, 1.0, generator)
    window = None
    if region_mm is not None:  # both fields confined to one region: the relative motion is local
        window, centre = _local_window(labels, spacing, region_mm, generator)
        v_a, v_b = v_a * window, v_b * window
    # Scale both velocities together until the ground-truth field peaks at the requested magnitude.
    for _ in range(4):
        peak_mm = float(compose(integrate_velocity(-v_b), integrate_velocity(v_a)).norm(dim=1).max()) * spacing
        factor = magnitude_mm / max(peak_mm, 1e-8)
        v_a, v_b = v_a * factor, v_b * factor
    phi_a, phi_b_inv, phi_b = integrate_velocity(v_a), integrate_velocity(-v_b), integrate_velocity(v_b)
    fixed = warp(template, phi_a)
    moving = warp(template, phi_b)
    info = {"seed": seed, "magnitude_mm": magnitude_mm}
    if region_mm is not None:
        info.update(region_mm=region_mm, region_centre_index=centre.tolist())
    if intensity_change:
        moving, change = _intensity_change(moving, generator)
        info["intensity_change"] = change
    truth = compose(phi_b_inv, phi_a)
    fixed_labels, moving_labels = warp_labels(labels, phi_a), warp_labels(labels, phi_b)
    border = max(2, min(shape) // 10)
    # with a local motion the landmarks sample the moving region (elsewhere every method is exact)
    pts = _choose_landmarks(fixed, fixed_labels, n_landmarks, generator, border,
                            None if window is None else window[0, 0] > 0.5)
    moved = pts + sample_displacement_at(truth, pts)
    truth_mm = truth.norm(dim=1) * spacing
    info.update(ground_truth_max_mm=float(truth_mm.max()),
                ground_truth_p95_mm=float(torch.quantile(truth_mm.flatten()[::7], 0.95)),
                source=SOURCE, label_names=LABEL_NAMES)
    fixed_ras = geometry.array_index_to_ras(pts.numpy())
    moving_ras = geometry.array_index_to_ras(moved.numpy())
    pix = sitk.sitkInt16
    return SamplePair(
        fixed=_to_image(fixed[0, 0].round().numpy(), geometry, pix),
        moving=_to_image(moving[0, 0].round().numpy(), geometry, pix),
        fixed_labels=_to_image(fixed_labels[0, 0].numpy().astype(np.uint8), geometry, sitk.sitkUInt8),
        moving_labels=_to_image(moving_labels[0, 0].numpy().astype(np.uint8), geometry, sitk.sitkUInt8),
        ground_truth=truth[0].numpy(), fixed_landmarks_ras=_as_3d(fixed_ras),
        moving_landmarks_ras=_as_3d(moving_ras), info=info)


def _as_3d(points: np.ndarray) -> np.ndarray:
    """Landmark files are 3D RAS: 2D points get z = 0."""
    if points.shape[1] == 3:
        return points
    return np.concatenate([points, np.zeros((len(points), 1))], axis=1)


@lru_cache(maxsize=4)
def _template_tensors(size: int) -> tuple[torch.Tensor, torch.Tensor, Geometry]:
    t1, labels = mni_template(size)
    return (torch.from_numpy(sitk.GetArrayFromImage(t1))[None, None],
            torch.from_numpy(sitk.GetArrayFromImage(labels).astype(np.int64))[None, None], Geometry.of(t1))


def make_pair(size: int = 64, seed: int = 0, magnitude_mm: float = 10.0, intensity_change: bool | None = None,
              n_landmarks: int = 20, region_mm: float | None = None) -> SamplePair:
    """A 3D pair of ``size``^3 (64, 96, 128, ...) whose ground-truth displacement peaks at ``magnitude_mm``; the
    moving image has another contrast (gamma, bias, noise), as a second subject or session would.
    With ``region_mm`` the fields are confined to a Gaussian window of that width around a random point of the
    brain and the landmarks lie where it moves: a local motion within one scan (the 3D counterpart of
    :func:`make_slice_pair`'s, frames of a 4D series), so by default without the contrast change."""
    if not 0 <= magnitude_mm <= MAX_MAGNITUDE_MM:
        raise ValueError(f"magnitude_mm must be within 0-{MAX_MAGNITUDE_MM:g} mm")
    if intensity_change is None:
        intensity_change = region_mm is None
    template, labels, geometry = _template_tensors(size)
    return _deformed_pair(template, labels, geometry, seed, magnitude_mm, intensity_change, n_landmarks, region_mm)


def deformed_template(size: int = 64, seed: int = 0, magnitude_mm: float = 6.0,
                      intensity_change: bool = True, ndim: int = 3) -> tuple[torch.Tensor, torch.Tensor, Geometry]:
    """One random diffeomorphic deformation of the template (image ``[1, 1, *shape]`` 0-255 and labels):
    a synthetic "subject" for training. Any two of them form a pair (cheaper than ``make_pair``).
    ``ndim=2`` deforms the axial slice that :func:`make_slice_pair` uses."""
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    template, labels, geometry = _template_tensors(size) if ndim == 3 else _axial_slice(size)
    generator = torch.Generator().manual_seed(seed)
    velocity = random_velocity(template.shape[2:], 1.0, generator)
    peak_mm = float(integrate_velocity(velocity).norm(dim=1).max()) * min(geometry.spacing)
    phi = integrate_velocity(velocity * (magnitude_mm / max(peak_mm, 1e-8)))
    image = warp(template, phi)
    if intensity_change:
        image, _ = _intensity_change(image, generator)
    return image, warp_labels(labels, phi), geometry


def on_coarser_grid(image: sitk.Image, spacing_factors, labels: bool = False) -> sitk.Image:
    """The same anatomy as a scanner with coarser voxels would acquire it: spacing multiplied per axis (ITK order,
    e.g. ``(1, 1, 3)`` for 3x thicker slices), same origin and direction, the extent rounded to whole coarse voxels.
    An image is smoothed first (thick slices average their content); a label map is sampled nearest-neighbour."""
    factors = [float(f) for f in spacing_factors]
    if len(factors) != image.GetDimension() or min(factors) < 1:
        raise ValueError(f"spacing_factors must be {image.GetDimension()} factors >= 1, got {list(spacing_factors)}")
    spacing = [s * f for s, f in zip(image.GetSpacing(), factors)]
    size = [max(2, int(round(n / f))) for n, f in zip(image.GetSize(), factors)]
    if not labels:
        sigma = [max(0.4 * s * (f - 1), 1e-3) for s, f in zip(image.GetSpacing(), factors)]
        image = sitk.SmoothingRecursiveGaussian(image, sigma)
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                         image.GetOrigin(), spacing, image.GetDirection(), 0.0, image.GetPixelID())


def _axial_slice(size: int) -> tuple[torch.Tensor, torch.Tensor, Geometry]:
    template, labels, geom = _template_tensors(size)
    k = int(size * 0.55)  # a little above the centre: ventricles and cortex both visible
    g2 = Geometry(geom.size[:2], geom.spacing[:2], geom.origin[:2],
                  tuple(geom.direction_matrix[:2, :2].ravel()))
    return template[:, :, k], labels[:, :, k], g2


def make_slice_pair(size: int = 128, seed: int = 0, magnitude_mm: float = 8.0, intensity_change: bool = False,
                    n_landmarks: int = 12, region_mm: float | None = None) -> SamplePair:
    """A 2D pair: an axial MNI slice deformed by two known 2D fields (for 2D methods such as R2N2). With
    ``region_mm`` the fields are confined to a Gaussian window of that width around a random point of the brain
    (a local motion, as in R2N2's cine data) and the landmarks lie where it moves (window > 0.5)."""
    template, labels, geometry = _axial_slice(size)
    return _deformed_pair(template, labels, geometry, seed, magnitude_mm, intensity_change, n_landmarks,
                          region_mm)


def make_series(size: int = 128, frames: int = 10, seed: int = 0, magnitude_mm: float = 6.0) -> dict:
    """A 2D+t series: frame t = S ∘ exp(sin(2 pi t / frames) v) — a periodic, breathing-like motion.

    Returns ``{"frames": [sitk 2D images], "labels": [...], "ground_truth": [...], "geometry": ...}``; frame 0
    is the undeformed slice and ``ground_truth[t]`` is the voxel displacement that registers frame t (moving)
    onto frame 0 (fixed): ``frame_t(x + u(x)) = frame_0(x)``.
    """
    template, labels, geometry = _axial_slice(size)
    generator = torch.Generator().manual_seed(seed)
    v = random_velocity(template.shape[2:], magnitude_mm / min(geometry.spacing), generator)
    images, label_maps, truths = [], [], []
    for t in range(frames):
        s = float(np.sin(2 * np.pi * t / frames))
        phi = integrate_velocity(s * v)
        images.append(_to_image(warp(template, phi)[0, 0].numpy(), geometry, sitk.sitkFloat32))
        label_maps.append(_to_image(warp_labels(labels, phi)[0, 0].numpy().astype(np.uint8), geometry,
                                    sitk.sitkUInt8))
        truths.append(integrate_velocity(-s * v)[0].numpy())
    return {"frames": images, "labels": label_maps, "ground_truth": truths, "geometry": geometry}


PAIR_FILES = {
    "fixed": "fixed.nii.gz", "moving": "moving.nii.gz", "fixed_labels": "fixed_labels.nii.gz",
    "moving_labels": "moving_labels.nii.gz", "fixed_landmarks": "fixed_landmarks.mrk.json",
    "moving_landmarks": "moving_landmarks.mrk.json", "ground_truth": "ground_truth_displacement.nii.gz",
    "info": "pair.json",
}


def write_pair(pair: SamplePair, folder: str | os.PathLike, include_ground_truth: bool = True) -> Path:
    """Write every file of a pair into ``folder`` (built in a temp folder, then moved into place).

    The ground-truth field is large and noisy to compress; the bundled demo pair leaves it out (the landmark
    pairs carry the same information at the points that matter, and the generator recreates it exactly).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_image_atomic(pair.fixed, staging / PAIR_FILES["fixed"])
        write_image_atomic(pair.moving, staging / PAIR_FILES["moving"])
        write_image_atomic(pair.fixed_labels, staging / PAIR_FILES["fixed_labels"])
        write_image_atomic(pair.moving_labels, staging / PAIR_FILES["moving_labels"])
        if include_ground_truth:
            field_image = sitk.Cast(pair.geometry.displacement_to_sitk(pair.ground_truth), sitk.sitkVectorFloat32)
            write_image_atomic(field_image, staging / PAIR_FILES["ground_truth"])
        labels = [f"L{i + 1}" for i in range(len(pair.fixed_landmarks_ras))]
        write_markups_json(staging / PAIR_FILES["fixed_landmarks"], pair.fixed_landmarks_ras, labels, "fixed")
        write_markups_json(staging / PAIR_FILES["moving_landmarks"], pair.moving_landmarks_ras, labels, "moving")
        (staging / PAIR_FILES["info"]).write_text(json.dumps(pair.info, indent=1, default=str))
        os.chmod(staging, default_dir_mode())  # mkdtemp creates 0700
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def read_pair(folder: str | os.PathLike) -> SamplePair:
    folder = Path(folder)
    truth = None
    if (folder / PAIR_FILES["ground_truth"]).exists():
        truth = Geometry.displacement_from_sitk(sitk.ReadImage(str(folder / PAIR_FILES["ground_truth"])))[0]
    return SamplePair(
        fixed=sitk.ReadImage(str(folder / PAIR_FILES["fixed"])),
        moving=sitk.ReadImage(str(folder / PAIR_FILES["moving"])),
        fixed_labels=sitk.ReadImage(str(folder / PAIR_FILES["fixed_labels"])),
        moving_labels=sitk.ReadImage(str(folder / PAIR_FILES["moving_labels"])),
        ground_truth=None if truth is None else truth.astype(np.float32),
        fixed_landmarks_ras=read_landmarks(folder / PAIR_FILES["fixed_landmarks"], "fixed landmarks")[0],
        moving_landmarks_ras=read_landmarks(folder / PAIR_FILES["moving_landmarks"], "moving landmarks")[0],
        info=json.loads((folder / PAIR_FILES["info"]).read_text()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iterreg.sample_data", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--magnitude-mm", type=float, default=10.0)
    parser.add_argument("--no-intensity-change", action="store_true")
    parser.add_argument("--landmarks", type=int, default=20)
    parser.add_argument("--slice", action="store_true", help="write a 2D slice pair instead of a 3D pair")
    parser.add_argument("--no-ground-truth", action="store_true", help="leave out the ground-truth field file")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    make = make_slice_pair if args.slice else make_pair
    pair = make(args.size, args.seed, args.magnitude_mm, not args.no_intensity_change, args.landmarks)
    print(write_pair(pair, args.out, include_ground_truth=not args.no_ground_truth))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
