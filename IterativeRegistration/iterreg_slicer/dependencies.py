"""Python packages the worker needs inside Slicer: detected without importing them, installed only after the
user agreed (never at import time; DESIGN.md §5)."""
from __future__ import annotations

import importlib.util

__all__ = ["REQUIRED", "missing_packages", "install"]

# import name -> pip requirement (torch comes from the PyTorch extension when it is installed)
REQUIRED = {"torch": "torch", "SimpleITK": "SimpleITK", "monai": "monai>=1.4", "safetensors": "safetensors",
            "torchdeq": "torchdeq==0.1.0", "psutil": "psutil>=5.9"}


def missing_packages() -> list[str]:
    return [requirement for module, requirement in REQUIRED.items() if importlib.util.find_spec(module) is None]


def install(requirements: list[str]) -> None:
    """Install into Slicer's Python; PyTorch through the PyTorch extension's helper when present (it picks
    the right CUDA build), otherwise pip."""
    import slicer

    rest = list(requirements)
    if "torch" in rest:
        try:
            import PyTorchUtils  # the "PyTorch" Slicer extension
            PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
            rest.remove("torch")
        except ImportError:
            pass
    if rest:
        try:  # Slicer >= 5.10
            slicer.packaging.pip_ensure(rest)
        except (AttributeError, TypeError):
            slicer.util.pip_install(rest)
