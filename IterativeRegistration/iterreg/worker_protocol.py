"""The contract between the worker process and its client (DESIGN.md §4). NumPy only: the client imports it
inside Slicer's GUI process, where importing torch would cost seconds for nothing.

Channels:
- client -> worker, stdin, one JSON object per line: first the job (:class:`Job`), then any number of
  ``{"type": "release", "slot": k}`` (the client has copied slot ``k``) and ``{"type": "cancel"}``.
  End of stdin means the client is gone: the worker stops as if cancelled.
- worker -> client, stdout, one JSON object per line with an ``event`` key: ``started``, ``step``, ``log``,
  ``result``, ``error``, ``done`` (see :data:`EVENTS`). Everything else the worker or its libraries print
  goes to stderr, which the client keeps as the log.
- arrays: a ring of :data:`RING_SLOTS` shared-memory blocks that the *client* creates (so the client can
  always remove them, whatever happens to the worker). A ``step`` event names its slot and where each array
  lies in it; the slot stays the worker's again only after the client released it. When no slot is free the
  worker sends the step without arrays (``"dropped": true``) instead of waiting. The run's output arrays
  never go through the ring: the ``result`` event points to ``.npy`` files in the job folder.
"""
from __future__ import annotations

import json
import math
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PROTOCOL_VERSION", "RING_SLOTS", "EVENTS", "Job", "ArraySpec", "pack_arrays", "unpack_arrays",
           "slot_names", "slot_size", "packed_size", "save_array", "load_array", "encode_event", "EXIT_CODES"]

PROTOCOL_VERSION = 1
RING_SLOTS = 3
EVENTS = ("started", "step", "log", "result", "error", "done")
EXIT_CODES = {"ok": 0, "internal": 1, "input": 2, "out_of_memory": 3}
_ALIGN = 64  # bytes; every array starts on a cache line


@dataclass
class Job:
    """Everything the worker needs, JSON-serialisable. Arrays live as ``.npy`` files in ``folder`` (0700).

    Input files in ``folder``: ``fixed.npy`` and ``moving.npy`` (array order, any dtype), optional
    ``init.npy`` (``[ndim, *fixed shape]`` float32 voxels of the fixed grid), ``fixed_labels.npy`` /
    ``moving_labels.npy`` (integer, on their image's grid). Geometries are ITK-style dicts (size, spacing,
    origin, direction in LPS; see :class:`iterreg.geometry.Geometry`). Landmarks are RAS millimetres.
    """
    method: str
    folder: str
    fixed_geometry: dict
    moving_geometry: dict
    steps: int | None = None
    checkpoint: str | None = None
    device: str = "auto"
    threads: int | None = None
    options: dict = field(default_factory=dict)
    fixed_landmarks_ras: list | None = None  # [[r, a, s], ...] paired by index with moving_landmarks_ras
    moving_landmarks_ras: list | None = None
    landmark_labels: list | None = None  # names of the pairs, for messages
    prompt_weight: float = 1.0
    has_init: bool = False
    has_labels: bool = False
    channels: dict | None = None  # name -> list of map indices, or "all"; None: the first 4 maps of each
    arrays: list = field(default_factory=lambda: ["displacement", "warped"])  # per-step arrays to send
    ring: list[str] = field(default_factory=list)  # shared-memory block names, one per slot
    slot_bytes: int = 0
    protocol: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Job":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the job must be a JSON object")
        if data.get("protocol") != PROTOCOL_VERSION:
            raise ValueError(f"job protocol {data.get('protocol')!r}; this worker speaks {PROTOCOL_VERSION} "
                             "(the module and its worker come from different versions: reinstall the extension)")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown job field(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class ArraySpec:
    """Where one array lies inside a shared-memory slot."""
    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * math.prod(self.shape))

    def to_dict(self) -> dict:
        return {"name": self.name, "offset": self.offset, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict) -> "ArraySpec":
        return cls(str(data["name"]), int(data["offset"]), tuple(int(s) for s in data["shape"]), str(data["dtype"]))


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def packed_size(arrays: dict[str, np.ndarray]) -> int:
    return sum(_aligned(a.nbytes) for a in arrays.values())


def pack_arrays(arrays: dict[str, np.ndarray], buffer: memoryview) -> list[ArraySpec]:
    """Copy ``arrays`` one after another into ``buffer``; returns their specs (raises if they do not fit)."""
    specs, offset = [], 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if offset + array.nbytes > len(buffer):
            raise ValueError(f"arrays need {packed_size(arrays)} bytes; the slot has {len(buffer)}")
        target = np.ndarray(array.shape, array.dtype, buffer=buffer, offset=offset)
        target[...] = array
        specs.append(ArraySpec(name, offset, tuple(array.shape), array.dtype.str))
        offset += _aligned(array.nbytes)
    return specs


def unpack_arrays(buffer: memoryview, specs: list[ArraySpec], copy: bool = True) -> dict[str, np.ndarray]:
    """Arrays described by ``specs``; copies by default because the slot is reused once released."""
    out = {}
    for spec in specs:
        if spec.offset < 0 or spec.offset + spec.nbytes > len(buffer):
            raise ValueError(f"array '{spec.name}' lies outside the slot")
        view = np.ndarray(spec.shape, np.dtype(spec.dtype), buffer=buffer, offset=spec.offset)
        out[spec.name] = view.copy() if copy else view
    return out


def slot_names(count: int = RING_SLOTS) -> list[str]:
    """Fresh, short names (macOS allows 31 characters) for one job's ring."""
    token = secrets.token_hex(5)
    return [f"irreg_{token}_{k}" for k in range(count)]


def slot_size(fixed_shape: tuple[int, ...], channel_budget_maps: int = 4) -> int:
    """Bytes per slot: displacement (ndim maps) + warped image + ``channel_budget_maps`` float32 maps, all
    on the fixed grid. Channels that do not fit are downsampled by the worker (and it says so)."""
    voxels = math.prod(fixed_shape)
    maps = len(fixed_shape) + 1 + channel_budget_maps
    return maps * _aligned(voxels * 4) + _ALIGN * 16


def save_array(folder: str | Path, name: str, array: np.ndarray) -> Path:
    """Write ``name.npy`` whole or not at all (temp name, then rename)."""
    folder = Path(folder)
    tmp = folder / f".{name}.tmp.npy"
    np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
    final = folder / f"{name}.npy"
    tmp.replace(final)
    return final


def load_array(folder: str | Path, name: str) -> np.ndarray:
    return np.load(Path(folder) / f"{name}.npy", allow_pickle=False)


def encode_event(event: str, **fields: Any) -> str:
    return json.dumps({"event": event, **fields}, allow_nan=True) + "\n"
