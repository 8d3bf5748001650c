"""Checkpoints: one ``.safetensors`` file holding the weights and, in its header, our JSON metadata (method,
architecture, training config, preprocessing, data summary, code version, metrics).

safetensors stores tensors only, so loading a checkpoint can never run code. Files are written to a temporary
name and renamed, so a killed process leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .atomic import atomic_file
from .errors import InputError

__all__ = ["save_checkpoint", "read_checkpoint", "code_version", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "iterreg-checkpoint/1"


def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": CHECKPOINT_FORMAT, "code_version": code_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **metadata}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"iterreg": json.dumps(meta, default=str)})
    return path


def read_checkpoint(path: str | Path, method: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and metadata; ``InputError`` for a missing file, another format or another method's weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"'{path}' is not a readable .safetensors checkpoint ({exc})") from None
    try:
        metadata = json.loads(header["iterreg"])
    except (KeyError, json.JSONDecodeError):
        raise InputError(f"'{path}' has no IterativeRegistration metadata; it was not written by our trainer") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"'{path}' has checkpoint format {metadata.get('format')!r}; this version reads "
                         f"{CHECKPOINT_FORMAT}")
    if method is not None and metadata.get("method") != method:
        raise InputError(f"'{path}' holds weights for method '{metadata.get('method')}', not '{method}'; choose a "
                         f"{method} checkpoint")
    return weights, metadata
