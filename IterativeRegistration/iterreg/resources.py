"""Where bundled resources (sample data, demo checkpoints) live.

In a source checkout they are in the top-level ``Resources/`` folder; elsewhere (a Slicer extension build,
a pip install) point ``ITERREG_RESOURCES`` at that folder.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["resources_dir", "sample_pair_dir", "DEMO_PAIR", "bundled_checkpoints", "checkpoint_metadata",
           "default_checkpoint"]

DEMO_PAIR = "mni_64"


def resources_dir() -> Path:
    env = os.environ.get("ITERREG_RESOURCES")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates.append(here.parents[2] / "Resources")  # source checkout: <repo>/Resources
    candidates.append(here.parents[1] / "Resources")  # installed extension: qt-scripted-modules/Resources
    for candidate in candidates:
        if (candidate / "SampleData").is_dir():
            return candidate
    raise FileNotFoundError("bundled Resources/ folder not found; set ITERREG_RESOURCES to the extension's "
                            "Resources folder")


def sample_pair_dir(name: str = DEMO_PAIR) -> Path:
    return resources_dir() / "SampleData" / name


def bundled_checkpoints(ndim: int | None = None) -> dict[str, list[Path]]:
    """Method name -> bundled checkpoints (``Resources/Checkpoints/*.safetensors``), read from their headers;
    only those trained on ``ndim``-D images when given."""
    found: dict[str, list[Path]] = {}
    try:
        folder = resources_dir() / "Checkpoints"
    except FileNotFoundError:
        return found
    for path in sorted(folder.glob("*.safetensors")):
        metadata = checkpoint_metadata(path)
        if not metadata:
            continue  # not one of ours: ignore rather than offer it
        if ndim is None or metadata.get("ndim", 3) == ndim:
            found.setdefault(metadata["method"], []).append(path)
    return found


def checkpoint_metadata(path: str | Path) -> dict:
    """A checkpoint's metadata from its header alone (no weights read); ``{}`` if it is not one of ours."""
    import json

    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {})["iterreg"])
    except (OSError, KeyError, ValueError):
        return {}


def default_checkpoint(method: str, ndim: int | None = None) -> Path | None:
    """The bundled checkpoint a learned method uses when none is given: for ``ndim``-D images, or when the
    dimension is not known, a 3D one if there is one; among several, the first by file name (so a variant
    named ``<default>_<what>`` sorts after its default, as ``r2n2_mni128_2d_local`` after ``r2n2_mni128_2d``)."""
    paths = bundled_checkpoints(ndim or 3).get(method) or ([] if ndim else bundled_checkpoints().get(method))
    return paths[0] if paths else None
