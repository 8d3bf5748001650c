"""Where bundled resources (sample data, demo checkpoints) live.

In a source checkout they are in the top-level ``Resources/`` folder; elsewhere (a Slicer extension build,
a pip install) point ``ITERREG_RESOURCES`` at that folder.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["resources_dir", "sample_pair_dir", "DEMO_PAIR"]

DEMO_PAIR = "mni_64"


def resources_dir() -> Path:
    env = os.environ.get("ITERREG_RESOURCES")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "Resources")
    for candidate in candidates:
        if (candidate / "SampleData").is_dir():
            return candidate
    raise FileNotFoundError("bundled Resources/ folder not found; set ITERREG_RESOURCES to the extension's "
                            "Resources folder")


def sample_pair_dir(name: str = DEMO_PAIR) -> Path:
    return resources_dir() / "SampleData" / name
