"""Network configurations travel in checkpoint metadata as JSON: one place that converts them."""
from __future__ import annotations

from dataclasses import asdict, fields

__all__ = ["DictConfig"]


class DictConfig:
    """Mixin for frozen dataclass configs: ``to_dict`` (tuples as lists, for JSON) and ``from_dict`` (lists of
    ints back to the tuples the fields default to)."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict):
        tuples = {f.name for f in fields(cls) if isinstance(f.default, tuple)}
        return cls(**{k: tuple(int(x) for x in v) if k in tuples else v for k, v in dict(data).items()})
