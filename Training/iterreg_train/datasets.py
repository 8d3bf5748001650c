"""Where training pairs come from. Every source yields :class:`Pair` tensors on the training grid
(``data.shape``), preprocessed as everywhere else (DESIGN.md §3): the moving image resampled onto the fixed
grid in physical space, intensities clipped to their (1, 99) percentiles and scaled to [0, 1]; label maps
follow with nearest-neighbour resampling.

- ``Learn2RegSource``: a Learn2Reg ``dataset.json`` (OASIS, NLST, ... are distributed that way): training
  images (random inter-subject pairs, or ``training_paired_images`` when the task is paired) and
  ``registration_val`` pairs; label maps from the ``label`` entries or the ``labelsTr`` folder.
- ``FolderSource``: ``images/`` with optional ``labels/`` (same file names); random pairs among the training
  subjects or the pairs listed in ``pairs.csv`` (``fixed,moving,split``).
- ``SyntheticSource``: deformed copies of the bundled MNI template (``iterreg.sample_data``); validation on
  ``make_pair`` pairs with ground-truth landmarks.
"""
from __future__ import annotations

import csv
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from iterreg.errors import InputError
from iterreg.geometry import Geometry
from iterreg.imaging import check_label_geometry, prepare_pair, read_image, resample_onto
from iterreg.spatial import resize_image

__all__ = ["Pair", "PairSource", "Learn2RegSource", "FolderSource", "SyntheticSource", "open_source"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Pair:
    """Tensors ``[1, *shape]`` (labels: int64) on the training grid; landmark voxels ``[N, ndim]`` or None."""
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor | None = None
    moving_labels: torch.Tensor | None = None
    fixed_points: torch.Tensor | None = None
    moving_points: torch.Tensor | None = None
    spacing: tuple[float, ...] | None = None  # mm per array axis on the training grid
    name: str = ""


class PairSource(ABC):
    def __init__(self, shape):
        self.shape = tuple(int(n) for n in shape)

    @abstractmethod
    def train_pair(self, rng: np.random.Generator) -> Pair:
        """A random training pair (``rng`` decides which: each rank passes its own)."""

    @abstractmethod
    def validation_pairs(self) -> list[Pair]:
        """The fixed validation set."""

    @abstractmethod
    def summary(self) -> dict:
        """What the data was (recorded in checkpoints)."""

    # shared preprocessing ---------------------------------------------------------------------------------
    def _pair_from_images(self, fixed: sitk.Image, moving: sitk.Image, fixed_labels=None, moving_labels=None,
                          name: str = "") -> Pair:
        prepared = prepare_pair(fixed, moving)
        out = Pair(resize_image(prepared.fixed, self.shape)[0], resize_image(prepared.moving, self.shape)[0],
                   name=name)
        geometry = prepared.geometry
        out.spacing = geometry.scaled_to_shape(self.shape).array_spacing  # mm per voxel of the training grid
        if fixed_labels is not None and moving_labels is not None:
            check_label_geometry(fixed_labels, fixed, f"label map of {name or 'the fixed image'}")
            check_label_geometry(moving_labels, moving, f"label map of {name or 'the moving image'}")
            moving_on_fixed = resample_onto(moving_labels, geometry, sitk.sitkNearestNeighbor)
            out.fixed_labels = _resize_labels(sitk.GetArrayFromImage(fixed_labels), self.shape)
            out.moving_labels = _resize_labels(sitk.GetArrayFromImage(moving_on_fixed), self.shape)
        return out


def _resize_labels(array: np.ndarray, shape) -> torch.Tensor:
    labels = torch.from_numpy(np.asarray(array).astype(np.int64))[None, None].float()
    return F.interpolate(labels, size=tuple(shape), mode="nearest")[0].long()


@lru_cache(maxsize=128)
def _read_cached(path: str, role: str) -> sitk.Image:
    return read_image(path, role)


def _existing(path: Path, what: str) -> str:
    if not path.is_file():
        raise InputError(f"{what} '{path}' does not exist; check the dataset folder and its file list")
    return str(path)


# --- Learn2Reg --------------------------------------------------------------------------------------------------
class Learn2RegSource(PairSource):
    def __init__(self, dataset_json: str | Path, shape):
        super().__init__(shape)
        self.path = Path(dataset_json)
        if not self.path.is_file():
            raise InputError(f"Learn2Reg dataset file '{self.path}' does not exist")
        try:
            self.meta = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"'{self.path}' is not valid JSON ({exc})") from None
        self.root = self.path.parent
        labels = {}
        for entry in self.meta.get("training", []):
            if isinstance(entry, dict) and entry.get("label"):
                labels[self._resolve(entry["image"])] = self._resolve(entry["label"])
        self.labels = labels
        self.images = [self._resolve(e["image"]) for e in self.meta.get("training", []) if isinstance(e, dict)]
        paired = self.meta.get("training_paired_images") or []
        self.train_pairs = [(self._resolve(p["fixed"]), self._resolve(p["moving"])) for p in paired]
        self.val_pairs = [(self._resolve(p["fixed"]), self._resolve(p["moving"]))
                          for p in self.meta.get("registration_val", [])]
        val_images = {p for pair in self.val_pairs for p in pair}
        self.train_images = [p for p in self.images if p not in val_images]
        if not self.train_pairs and len(self.train_images) < 2:
            raise InputError(f"'{self.path}' has no training pairs: its 'training' list needs at least two images "
                             "outside 'registration_val' (or a 'training_paired_images' list)")
        if not self.val_pairs:
            raise InputError(f"'{self.path}' has an empty validation split ('registration_val'); add pairs to it")
        for path in {p for pair in self.train_pairs + self.val_pairs for p in pair} | set(self.train_images):
            _existing(path, "image")

    def _resolve(self, relative: str) -> Path:
        return (self.root / relative).resolve()

    def _label_for(self, image: Path) -> Path | None:
        if image in self.labels:
            return self.labels[image]
        guess = Path(str(image).replace("imagesTr", "labelsTr"))
        return guess if guess != image and guess.is_file() else None

    def _load(self, fixed: Path, moving: Path) -> Pair:
        fl, ml = self._label_for(fixed), self._label_for(moving)
        labels = (None, None)
        if fl is not None and ml is not None:
            labels = (_read_cached(_existing(fl, "label map"), "label map"),
                      _read_cached(_existing(ml, "label map"), "label map"))
        return self._pair_from_images(_read_cached(str(fixed), "fixed image"), _read_cached(str(moving), "moving image"),
                                      *labels, name=f"{fixed.name} <- {moving.name}")

    def train_pair(self, rng):
        if self.train_pairs:
            fixed, moving = self.train_pairs[int(rng.integers(len(self.train_pairs)))]
        else:
            i, j = rng.choice(len(self.train_images), size=2, replace=False)
            fixed, moving = self.train_images[int(i)], self.train_images[int(j)]
        return self._load(fixed, moving)

    def validation_pairs(self):
        return [self._load(f, m) for f, m in self.val_pairs]

    def summary(self):
        return {"kind": "learn2reg", "dataset": str(self.path), "name": self.meta.get("name", ""),
                "training_images": len(self.train_images), "training_pairs": len(self.train_pairs),
                "validation_pairs": len(self.val_pairs), "shape": list(self.shape)}


# --- a folder of images -------------------------------------------------------------------------------------------
class FolderSource(PairSource):
    def __init__(self, folder: str | Path, shape, validation_fraction: float = 0.2):
        super().__init__(shape)
        self.root = Path(folder)
        images_dir = self.root / "images"
        if not images_dir.is_dir():
            raise InputError(f"'{self.root}' has no images/ folder; put the images in {images_dir}")
        self.images = sorted(p for p in images_dir.iterdir() if p.name.endswith(IMAGE_SUFFIXES))
        if len(self.images) < 2:
            raise InputError(f"'{images_dir}' holds {len(self.images)} image(s); registration needs at least 2")
        self.labels_dir = self.root / "labels"
        pairs_csv = self.root / "pairs.csv"
        self.train_listed, self.val_listed = [], []
        if pairs_csv.is_file():
            with pairs_csv.open() as handle:
                for row in csv.DictReader(handle):
                    pair = (_existing(images_dir / row["fixed"], "image"), _existing(images_dir / row["moving"], "image"))
                    (self.val_listed if row.get("split", "train").strip() == "validation" else self.train_listed).append(pair)
            if not self.val_listed:
                raise InputError(f"'{pairs_csv}' lists no pair with split=validation; the validation split is empty")
            if not self.train_listed:
                raise InputError(f"'{pairs_csv}' lists no training pair")
        else:
            n_val = max(2, int(round(len(self.images) * validation_fraction)))
            if len(self.images) - n_val < 2:
                raise InputError(f"'{images_dir}' holds {len(self.images)} images: too few for separate training and "
                                 "validation subjects (at least 4), or list pairs in pairs.csv")
            self.train_images = [str(p) for p in self.images[:-n_val]]
            val = [str(p) for p in self.images[-n_val:]]
            self.val_listed = [(val[i], val[(i + 1) % len(val)]) for i in range(len(val))]

    def _label(self, image: str):
        if not self.labels_dir.is_dir():
            return None
        path = self.labels_dir / Path(image).name
        return _read_cached(_existing(path, "label map"), "label map")

    def _load(self, fixed: str, moving: str) -> Pair:
        fl, ml = self._label(fixed), self._label(moving)
        return self._pair_from_images(_read_cached(fixed, "fixed image"), _read_cached(moving, "moving image"),
                                      fl, ml, name=f"{Path(fixed).name} <- {Path(moving).name}")

    def train_pair(self, rng):
        if self.train_listed:
            return self._load(*self.train_listed[int(rng.integers(len(self.train_listed)))])
        i, j = rng.choice(len(self.train_images), size=2, replace=False)
        return self._load(self.train_images[int(i)], self.train_images[int(j)])

    def validation_pairs(self):
        return [self._load(f, m) for f, m in self.val_listed]

    def summary(self):
        return {"kind": "folder", "folder": str(self.root), "images": len(self.images),
                "listed_pairs": bool(self.train_listed), "validation_pairs": len(self.val_listed),
                "labels": self.labels_dir.is_dir(), "shape": list(self.shape)}


# --- synthetic subjects from real anatomy ------------------------------------------------------------------------
class SyntheticSource(PairSource):
    TRAIN_SEED0, VALIDATION_SEED0 = 10_000, 100  # disjoint from the bundled pair (seed 0)

    def __init__(self, shape, subjects: int = 64, validation_pairs: int = 4, magnitude_mm: float = 6.0,
                 region_mm: float | None = None):
        super().__init__(shape)
        if len(set(self.shape)) != 1:
            raise InputError(f"synthetic data is generated on cubes or squares (axial slices); set data.shape to "
                             f"[n, n, n] or [n, n], got {list(self.shape)}")
        from iterreg.sample_data import MAX_MAGNITUDE_MM
        if not 0 < magnitude_mm <= MAX_MAGNITUDE_MM:
            raise InputError(f"data.magnitude_mm (the generated motion's peak) must be within 0-{MAX_MAGNITUDE_MM:g} "
                             f"mm, got {magnitude_mm}")
        if subjects < 2 or validation_pairs < 1:
            raise InputError("synthetic data needs at least 2 subjects and 1 validation pair")
        if region_mm is not None and not region_mm > 0:
            raise InputError(f"data.region_mm (the width of a local motion) must be > 0 mm, got {region_mm}; set it "
                             "to null for whole-image deformations")
        self.subjects, self.n_validation, self.magnitude_mm = subjects, validation_pairs, magnitude_mm
        self.region_mm = region_mm
        self._pool: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._local_pool: dict[int, Pair] = {}

    def _subject(self, index: int):
        if index not in self._pool:  # generated on first use, then kept (about 1 MB per 64^3 subject)
            from iterreg.imaging import normalise_intensity
            from iterreg.sample_data import deformed_template
            image, labels, _ = deformed_template(self.shape[0], self.TRAIN_SEED0 + index, self.magnitude_mm,
                                                 ndim=len(self.shape))
            normalised, _ = normalise_intensity(image[0, 0].numpy())
            self._pool[index] = (torch.from_numpy(normalised)[None], labels[0])
        return self._pool[index]

    def _local_pair(self, index: int) -> Pair:
        """With ``region_mm``: generated pair ``index``, whose motion is local (make_pair's / make_slice_pair's
        region)."""
        if index not in self._local_pool:
            from iterreg.sample_data import make_pair, make_slice_pair
            make = make_pair if len(self.shape) == 3 else make_slice_pair
            sample = make(self.shape[0], seed=self.TRAIN_SEED0 + index, magnitude_mm=self.magnitude_mm,
                          region_mm=self.region_mm)
            self._local_pool[index] = self._pair_from_images(sample.fixed, sample.moving, sample.fixed_labels,
                                                             sample.moving_labels, name=f"local motion {index}")
        return self._local_pool[index]

    def train_pair(self, rng):
        if self.region_mm is not None:
            return self._local_pair(int(rng.integers(self.subjects)))
        i, j = rng.choice(self.subjects, size=2, replace=False)
        (f, fl), (m, ml) = self._subject(int(i)), self._subject(int(j))
        spacing = self._geometry().array_spacing
        return Pair(f, m, fl, ml, spacing=spacing, name=f"synthetic {i} <- {j}")

    @lru_cache(maxsize=1)
    def _geometry(self) -> Geometry:
        from iterreg.sample_data import _axial_slice, _template_tensors
        return (_template_tensors if len(self.shape) == 3 else _axial_slice)(self.shape[0])[2]

    def validation_pairs(self):
        from iterreg.sample_data import make_pair, make_slice_pair
        pairs = []
        local = {} if self.region_mm is None else {"magnitude_mm": self.magnitude_mm, "region_mm": self.region_mm}
        for k in range(self.n_validation):
            if len(self.shape) == 3:
                sample = make_pair(self.shape[0], seed=self.VALIDATION_SEED0 + k, n_landmarks=20, **local)
            else:
                sample = make_slice_pair(self.shape[0], seed=self.VALIDATION_SEED0 + k, n_landmarks=12, **local)
            # a local motion barely changes the label maps' overlap: its landmarks (in the moving region) score
            # it, so the best checkpoint is chosen on TRE
            labels = (sample.fixed_labels, sample.moving_labels) if self.region_mm is None else (None, None)
            pair = self._pair_from_images(sample.fixed, sample.moving, *labels,
                                          name=f"make_pair seed {self.VALIDATION_SEED0 + k}")
            geometry = Geometry.of(sample.fixed)
            nd = geometry.ndim  # sample landmarks are always [N, 3] (z = 0 on a slice)
            pair.fixed_points = torch.tensor(geometry.ras_to_array_index(sample.fixed_landmarks_ras[:, :nd]),
                                             dtype=torch.float32)
            pair.moving_points = torch.tensor(geometry.ras_to_array_index(sample.moving_landmarks_ras[:, :nd]),
                                              dtype=torch.float32)
            pairs.append(pair)
        return pairs

    def summary(self):
        from iterreg.sample_data import SOURCE
        return {"kind": "synthetic", "source": SOURCE, "subjects": self.subjects,
                "training_seeds": [self.TRAIN_SEED0, self.TRAIN_SEED0 + self.subjects - 1],
                "validation_seeds": [self.VALIDATION_SEED0, self.VALIDATION_SEED0 + self.n_validation - 1],
                "magnitude_mm": self.magnitude_mm, "shape": list(self.shape)} | (
                    {} if self.region_mm is None else
                    {"region_mm": self.region_mm, "pairs": "make_pair" if len(self.shape) == 3 else "make_slice_pair"})


def open_source(data: str, config: dict) -> PairSource:
    """``synthetic``, a Learn2Reg ``dataset.json``, or a folder with ``images/``."""
    shape = config["data"]["shape"]
    if data == "synthetic":
        peak = {"magnitude_mm": config["data"]["magnitude_mm"]} if "magnitude_mm" in config["data"] else {}
        return SyntheticSource(shape, config["data"]["synthetic_subjects"], config["data"]["validation_pairs"],
                               region_mm=config["data"].get("region_mm"), **peak)  # an older run's config: default
    path = Path(data)
    if path.suffix == ".json":
        return Learn2RegSource(path, shape)
    if path.is_dir():
        return FolderSource(path, shape)
    raise InputError(f"data '{data}' is neither 'synthetic', a Learn2Reg dataset .json, nor a folder with images/")
