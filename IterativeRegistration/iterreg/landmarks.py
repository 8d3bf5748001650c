"""Landmark files: Slicer markups JSON (.mrk.json), Slicer fiducial CSV (.fcsv) and plain CSV (x,y,z RAS mm).

Points are returned in RAS mm with their labels; pairing is by label when both files have unique labels
that match, otherwise by order. Conversion to voxels goes through :class:`iterreg.geometry.Geometry`.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_file
from .errors import InputError
from .geometry import LPS_TO_RAS_3D

__all__ = ["read_landmarks", "write_markups_json", "pair_landmarks", "check_landmark_pairs", "check_inside",
           "landmarks_on_fixed_grid"]


def read_landmarks(path: str | os.PathLike, role: str) -> tuple[np.ndarray, list[str]]:
    """Return ``(points [N, 3] RAS mm, labels)``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{role} file '{p}' does not exist")
    try:
        if p.name.endswith(".json"):
            points, labels = _read_markups_json(p)
        elif p.suffix == ".fcsv":
            points, labels = _read_csv(p, fcsv=True)
        elif p.suffix in (".csv", ".txt"):
            points, labels = _read_csv(p, fcsv=False)
        else:
            raise InputError(f"{role} '{p}' has an unknown format; use .mrk.json, .fcsv or .csv (x,y,z RAS mm)")
    except (ValueError, KeyError, IndexError, json.JSONDecodeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{role} '{p}' could not be parsed ({exc})") from None
    if len(points) == 0:
        raise InputError(f"{role} '{p}' holds no points")
    bad = [labels[i] for i in np.flatnonzero(~np.all(np.isfinite(points), axis=1))]
    if bad:
        raise InputError(f"{role} point '{bad[0]}' has a non-finite coordinate")
    return points, labels


def _read_markups_json(p: Path) -> tuple[np.ndarray, list[str]]:
    doc = json.loads(p.read_text())
    points, labels = [], []
    for markup in doc["markups"]:
        lps = markup.get("coordinateSystem", "LPS") == "LPS"
        for i, cp in enumerate(markup.get("controlPoints", [])):
            position = np.asarray(cp["position"], dtype=float)
            points.append(LPS_TO_RAS_3D @ position if lps else position)
            labels.append(str(cp.get("label") or f"P{i + 1}"))
    return np.asarray(points, dtype=float).reshape(-1, 3), labels


def _read_csv(p: Path, fcsv: bool) -> tuple[np.ndarray, list[str]]:
    points, labels = [], []
    lps = False
    with p.open(newline="") as fh:
        for row in csv.reader(fh):
            if not row or not row[0].strip():
                continue
            if row[0].startswith("#"):
                lps = lps or "LPS" in row[0]
                continue
            if fcsv:  # id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,...
                xyz, label = row[1:4], row[11] if len(row) > 11 else ""
            else:
                if not _is_number(row[0]):
                    continue  # header line
                xyz, label = row[0:3], row[3] if len(row) > 3 else ""
            points.append([float(v) for v in xyz])
            labels.append(label.strip() or f"P{len(points)}")
    arr = np.asarray(points, dtype=float).reshape(-1, 3)
    return (arr @ LPS_TO_RAS_3D if lps else arr), labels


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def pair_landmarks(fixed: tuple[np.ndarray, list[str]], moving: tuple[np.ndarray, list[str]]):
    """Pair by label if both label sets are unique and equal, else by order; errors name the problem."""
    (pf, lf), (pm, lm) = fixed, moving
    for role, labels in (("fixed", lf), ("moving", lm)):
        seen = set()
        for label in labels:
            if label in seen and set(lf) == set(lm):
                raise InputError(f"{role} landmark label '{label}' appears twice; labels must be unique")
            seen.add(label)
    if len(set(lf)) == len(lf) and len(set(lm)) == len(lm) and set(lf) == set(lm):
        order = [lm.index(label) for label in lf]
        return pf, pm[order], lf
    if len(pf) != len(pm):
        missing = sorted(set(lf) ^ set(lm))
        hint = f" (unpaired: {', '.join(missing[:5])})" if missing else ""
        raise InputError(f"{len(pf)} fixed but {len(pm)} moving landmarks{hint}; every fixed point needs one "
                         "moving partner")
    for i in range(len(pf)):
        for j in range(i):
            if np.allclose(pf[i], pf[j]) and np.allclose(pm[i], pm[j]):
                raise InputError(f"landmark pair '{lf[i]}' duplicates pair '{lf[j]}'")
    return pf, pm, lf


def check_landmark_pairs(fixed: np.ndarray, moving: np.ndarray, labels: list[str]) -> None:
    """Paired points (any coordinates) must be finite and not repeat: a repeated pair says nothing new, and one
    fixed point with two different partners asks for the impossible. Errors name the point."""
    fixed, moving = np.asarray(fixed, float), np.asarray(moving, float)
    for role, points in (("fixed", fixed), ("moving", moving)):
        bad = np.flatnonzero(~np.all(np.isfinite(points), axis=1))
        if len(bad):
            raise InputError(f"{role} landmark '{labels[bad[0]]}' has a non-finite coordinate; re-place or delete it")
    for i in range(len(fixed)):
        for j in range(i):
            if np.allclose(fixed[i], fixed[j], atol=1e-6):
                if np.allclose(moving[i], moving[j], atol=1e-6):
                    raise InputError(f"landmark pair '{labels[i]}' duplicates pair '{labels[j]}'; delete one of them")
                raise InputError(f"fixed landmark '{labels[i]}' is also fixed landmark '{labels[j]}' but their moving "
                                 "partners differ; one point cannot map to two places: move or delete one pair")


def check_inside(points_voxels: np.ndarray, labels: list[str], geometry, role: str) -> None:
    """Every landmark must fall inside the grid it refers to."""
    inside = geometry.contains_array_index(points_voxels)
    if not inside.all():
        i = int(np.flatnonzero(~inside)[0])
        raise InputError(f"{role} landmark '{labels[i]}' lies outside the image; check its coordinates "
                         "(RAS mm) or the file's coordinate system")


def landmarks_on_fixed_grid(fixed_geometry, moving_geometry, fixed_ras: np.ndarray, moving_ras: np.ndarray,
                            labels: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paired RAS landmarks -> array-order voxel coordinates of the *fixed* grid (both sets), after checking
    that each point lies inside its own image. This is the form methods take as prompts."""
    nd = fixed_geometry.ndim
    fixed_ras = np.asarray(fixed_ras, dtype=float)[:, :nd]
    moving_ras = np.asarray(moving_ras, dtype=float)[:, :nd]
    if fixed_ras.shape != moving_ras.shape:
        raise InputError(f"{len(fixed_ras)} fixed but {len(moving_ras)} moving landmarks; every fixed point "
                         "needs one moving partner")
    labels = labels or [str(i + 1) for i in range(len(fixed_ras))]
    check_landmark_pairs(fixed_ras, moving_ras, labels)
    fixed_vox = fixed_geometry.ras_to_array_index(fixed_ras)
    check_inside(fixed_vox, labels, fixed_geometry, "fixed")
    check_inside(moving_geometry.ras_to_array_index(moving_ras), labels, moving_geometry, "moving")
    return fixed_vox, fixed_geometry.ras_to_array_index(moving_ras)


def write_markups_json(path: str | os.PathLike, points_ras: np.ndarray, labels: list[str] | None = None,
                       name: str = "F") -> None:
    """Write a Slicer markups fiducial file (RAS), atomically."""
    labels = labels or [f"{name}-{i + 1}" for i in range(len(points_ras))]
    doc = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                   "Schema/markups-schema-v1.0.3.json#",
        "markups": [{
            "type": "Fiducial", "coordinateSystem": "RAS", "coordinateUnits": "mm", "name": name,
            "controlPoints": [
                {"id": str(i + 1), "label": label, "position": [float(v) for v in pt],
                 "positionStatus": "defined"}
                for i, (pt, label) in enumerate(zip(np.asarray(points_ras), labels))],
        }],
    }
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
