"""A real inter-subject pair with anatomical landmarks, for benchmarks: MNI152 (fixed) <- Colin27 (moving).

- Fixed: the MNI ICBM152 2009a nonlinear symmetric T1 from the nilearn wheel, on the same ``size``^3 grid as
  the generated pairs (:func:`iterreg.sample_data.mni_template`).
- Moving: Colin27 (``ch2bet.nii.gz``, skull-stripped, 1 mm) from Debian's ``mricron-data`` package, on its
  own grid. Not bundled; found in ``/usr/share/mricron/templates`` or downloaded (``apt-get download``, no
  root) into a cache folder on first use.
- Landmarks: the 32 AFIDs anatomical fiducials of each template (``Resources/SampleData/afids``, CC-BY-4.0).
  The MNI152 ones were placed on the 2009c version of the template; nilearn ships 2009a (same stereotaxic
  space; a difference between the two would add the same error to every method).

Colin27's frame: mricron's header puts voxel (0, 0, 0) at RAS (-90, -125, -71); MNI's own Colin27 (which
TemplateFlow, and so AFIDs, use) at (-90, -126, -72). We use MNI's: with it, the classical optimizer's and
DIO's median TRE at the AFIDs are 0.2-0.4 mm lower than with mricron's header (measured in session 17).
"""
from __future__ import annotations

import csv
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmark_report import ROOT

AFIDS = ROOT / "Resources" / "SampleData" / "afids"
FIXED_AFIDS = AFIDS / "tpl-MNI152NLin2009cSym_res-1_desc-groundtruth_afids.fcsv"
MOVING_AFIDS = AFIDS / "tpl-MNIColin27_desc-groundtruth_afids.fcsv"
COLIN27_ORIGIN_RAS = (-90.0, -126.0, -72.0)  # MNI's Colin27 frame: where voxel (0, 0, 0) lies
SYSTEM_COLIN27 = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
CACHE = Path.home() / ".cache" / "iterreg" / "mricron-data"


@dataclass
class RealPair:
    fixed: "sitk.Image"  # noqa: F821
    moving: "sitk.Image"  # noqa: F821
    fixed_ras: np.ndarray  # [N, 3] landmarks, RAS mm
    moving_ras: np.ndarray
    names: list[str]  # the AFIDs' anatomical names, e.g. "AC"


def colin27_path(given: str | None = None) -> Path:
    """ch2bet.nii.gz: the path given, the system's mricron-data, the cache, or a download into the cache."""
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"Colin27 image '{given}' not found; give the path of mricron-data's "
                                    "ch2bet.nii.gz")
        return Path(given)
    cached = CACHE / "usr/share/mricron/templates/ch2bet.nii.gz"
    for candidate in (SYSTEM_COLIN27, cached):
        if candidate.is_file():
            return candidate
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mricron-data.", dir=CACHE.parent))
    try:
        subprocess.run(["apt-get", "download", "mricron-data"], cwd=staging, check=True, capture_output=True)
        deb = next(staging.glob("mricron-data_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging / "tree")], check=True, capture_output=True)
        shutil.rmtree(CACHE, ignore_errors=True)
        (staging / "tree").rename(CACHE)  # complete or absent: never a half-extracted cache
    except (OSError, subprocess.CalledProcessError, StopIteration) as exc:
        raise FileNotFoundError(
            "Colin27 (Debian's mricron-data) is not installed and could not be downloaded "
            f"({exc}); run `apt-get download mricron-data && dpkg-deb -x mricron-data_*.deb DIR` and pass "
            "--colin27 DIR/usr/share/mricron/templates/ch2bet.nii.gz") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cached


def read_afids(path: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """Points (RAS mm), labels ("1".."32") and anatomical names of an AFIDs .fcsv file."""
    from iterreg.landmarks import read_landmarks
    points, labels = read_landmarks(path, "AFIDs landmarks")
    names = {}
    with open(path, newline="") as handle:
        for row in csv.reader(line for line in handle if not line.startswith("#")):
            names[row[11]] = row[12]  # columns: id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,...
    return points, labels, [names[label] for label in labels]


def mni_colin27_pair(size: int = 128, colin27: str | None = None) -> RealPair:
    import SimpleITK as sitk

    from iterreg.geometry import LPS_TO_RAS_3D
    from iterreg.landmarks import pair_landmarks
    from iterreg.sample_data import mni_template
    fixed, _ = mni_template(size)
    moving = sitk.ReadImage(str(colin27_path(colin27)), sitk.sitkFloat32)
    moving.SetOrigin(tuple(float(v) for v in LPS_TO_RAS_3D @ np.array(COLIN27_ORIGIN_RAS)))  # ITK origins are LPS
    fixed_points, fixed_labels, names = read_afids(FIXED_AFIDS)
    moving_points, moving_labels, _ = read_afids(MOVING_AFIDS)
    fixed_ras, moving_ras, labels = pair_landmarks((fixed_points, fixed_labels), (moving_points, moving_labels))
    name_of = dict(zip(fixed_labels, names))
    return RealPair(fixed, moving, fixed_ras[:, :3], moving_ras[:, :3], [name_of[label] for label in labels])


def landmark_evaluation(real: RealPair):
    """The AFIDs on the fixed grid, ready to score a displacement (TRE only: no label maps on Colin27)."""
    import torch

    from iterreg.geometry import Geometry
    from iterreg.landmarks import landmarks_on_fixed_grid
    from iterreg.pipeline import _Evaluation
    geometry = Geometry.of(real.fixed)
    evaluation = _Evaluation(geometry)
    fixed_vox, moving_vox = landmarks_on_fixed_grid(geometry, Geometry.of(real.moving), real.fixed_ras,
                                                    real.moving_ras, real.names)
    evaluation.fixed_points = torch.tensor(fixed_vox, dtype=torch.float32)
    evaluation.moving_points = torch.tensor(moving_vox, dtype=torch.float32)
    evaluation.moving_points_ras = real.moving_ras
    evaluation.landmark_names = real.names
    return evaluation
