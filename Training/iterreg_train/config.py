"""Training configuration: the method's YAML defaults (``Training/configs/<method>.yaml``), then a user
YAML, then ``--set a.b=value`` overrides. The effective config is saved in the run folder."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from iterreg.errors import InputError

__all__ = ["load_config", "apply_override", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if key not in out:
            raise InputError(f"unknown config key '{where}{key}'; known: {', '.join(sorted(out))}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def apply_override(config: dict, assignment: str) -> dict:
    """``a.b=value`` (value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in assignment:
        raise InputError(f"--set expects key=value, got '{assignment}'")
    key, text = assignment.split("=", 1)
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string; a number is meant
        try:
            value = float(value)
        except ValueError:
            pass
    update: dict = {}
    node = update
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return _merge(config, update)


def load_config(method: str, user_file: str | None = None, overrides: list[str] | None = None) -> dict:
    defaults = CONFIG_DIR / f"{method}.yaml"
    if not defaults.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise InputError(f"no training config for method '{method}'; trainable methods: {', '.join(known)}")
    config = yaml.safe_load(defaults.read_text())
    if user_file:
        path = Path(user_file)
        if not path.is_file():
            raise InputError(f"config file '{path}' does not exist")
        user = yaml.safe_load(path.read_text()) or {}
        if user.get("method", method) != method:
            raise InputError(f"config file '{path}' is for method '{user['method']}', not '{method}'")
        config = _merge(config, user)
    for assignment in overrides or []:
        config = apply_override(config, assignment)
    _check(config)
    return config


def _check(config: dict) -> None:
    t, d, o = config["training"], config["data"], config["optimizer"]
    if t["iterations"] < 1 or t["batch_size"] < 1 or t["checkpoint_every"] < 1:
        raise InputError("training.iterations, batch_size and checkpoint_every must be >= 1")
    if o["lr"] <= 0:
        raise InputError("optimizer.lr must be > 0")
    if len(d["shape"]) not in (2, 3) or any(int(n) < 16 for n in d["shape"]):
        raise InputError(f"data.shape must be 2 or 3 sizes >= 16, got {d['shape']}")
