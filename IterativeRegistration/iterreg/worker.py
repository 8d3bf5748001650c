"""The background worker: ``python -m iterreg.worker`` (in Slicer: ``PythonSlicer -m iterreg.worker``).

Reads one :class:`~iterreg.worker_protocol.Job` line on stdin, runs the method and streams every step back
(protocol in :mod:`iterreg.worker_protocol`). Exit status: 0 finished or cancelled, 2 bad job, 3 out of
memory, 1 anything else; in every failing case an ``error`` event with the message (and traceback) comes
first. The process never waits for its reader: steps whose arrays find no free ring slot go without them.
"""
from __future__ import annotations

import io
import json
import os
import queue
import sys
import threading
import time
import traceback
import warnings
from multiprocessing import resource_tracker, shared_memory

from .worker_protocol import EXIT_CODES, Job, encode_event, pack_arrays, packed_size, save_array

__all__ = ["main"]

DEFAULT_CHANNEL_MAPS = 4


class EventChannel:
    """Protocol messages on a private copy of the original stdout; thread-safe; a vanished reader is noted,
    not raised (the run then stops as if cancelled)."""

    def __init__(self, stream: io.TextIOBase):
        self._stream = stream
        self._lock = threading.Lock()
        self.reader_gone = threading.Event()

    def send(self, event: str, **fields) -> None:
        line = encode_event(event, **fields)
        with self._lock:
            if self.reader_gone.is_set():
                return
            try:
                self._stream.write(line)
                self._stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.reader_gone.set()

    def log(self, message: str, level: str = "info") -> None:
        self.send("log", level=level, message=message)


class Control:
    """Reads the client's messages after the job (release a slot, cancel) on a daemon thread."""

    def __init__(self, stream: io.TextIOBase, slots: int, channel: EventChannel):
        self.cancelled = threading.Event()
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for k in range(slots):
            self._free.put(k)
        self._stream, self._channel = stream, channel
        threading.Thread(target=self._read, name="iterreg-control", daemon=True).start()

    def _read(self) -> None:
        for line in self._stream:
            try:
                message = json.loads(line)
                kind = message.get("type")
            except (json.JSONDecodeError, AttributeError):
                self._channel.log(f"ignored a malformed control message: {line[:80]!r}", "warning")
                continue
            if kind == "release":
                self._free.put(int(message["slot"]))
            elif kind == "cancel":
                self.cancelled.set()
        self.cancelled.set()  # end of stdin: the client is gone

    def stop_requested(self) -> bool:
        return self.cancelled.is_set() or self._channel.reader_gone.is_set()

    def take_free_slot(self) -> int | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return None


class Ring:
    """The client's shared-memory slots, attached by name (the client creates and removes them)."""

    def __init__(self, names: list[str], slot_bytes: int):
        self.blocks = []
        for name in names:
            block = shared_memory.SharedMemory(name=name)
            # Python < 3.13 registers attached blocks with this process's resource tracker, which would
            # unlink them when the worker exits although the client still owns them.
            resource_tracker.unregister(block._name, "shared_memory")  # noqa: SLF001
            if block.size < slot_bytes:
                raise ValueError(f"shared-memory slot {name} has {block.size} bytes, the job says {slot_bytes}")
            self.blocks.append(block)
        self.slot_bytes = slot_bytes

    def close(self) -> None:
        for block in self.blocks:
            block.close()


def _claim_stdout() -> io.TextIOBase:
    """Keep the real stdout for protocol messages only; anything else printed (by us, a library or C code)
    goes to stderr, i.e. the client's log, and cannot corrupt the protocol."""
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return io.TextIOWrapper(io.FileIO(protocol_fd, "w"), encoding="utf-8", line_buffering=False)


def describe_methods() -> list[dict]:
    """What a panel needs to offer each method, without importing torch into the GUI process."""
    import dataclasses

    from .methods import available_methods
    from .resources import bundled_checkpoints, checkpoint_metadata

    bundled: dict[str, list] = {}
    for ndim in (3, 2):  # 3D first: a Slicer volume is 3D unless it is a single slice
        for method, paths in bundled_checkpoints(ndim).items():
            bundled.setdefault(method, []).extend(paths)
    described = []
    for name, cls in available_methods().items():
        options = {f.name: f.default for f in dataclasses.fields(cls.Options)}
        checkpoint_steps = {str(path): cls.checkpoint_default_steps(checkpoint_metadata(path))
                            for path in bundled.get(name, [])}
        described.append({"name": name, "title": cls.title, "description": cls.description,
                          "default_steps": next(iter(checkpoint_steps.values()), cls.default_steps),
                          "checkpoint_default_steps": checkpoint_steps, "max_steps": cls.max_steps,
                          "supported_ndims": list(cls.supported_ndims), "needs_checkpoint": cls.needs_checkpoint,
                          "refines": cls.refines, "bundled_checkpoints": [str(p) for p in bundled.get(name, [])],
                          "options": options})
    return described


def main() -> int:
    if sys.argv[1:] == ["--describe"]:
        import torch

        from .networks.precision import bfloat16_is_native

        cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        print(json.dumps({"methods": describe_methods(), "cuda": torch.cuda.is_available(),
                          "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                          "bfloat16_devices": [d for d in ["cpu", *cuda] if bfloat16_is_native(d)]},
                         default=list))
        return 0
    channel = EventChannel(_claim_stdout())
    line = sys.stdin.readline()
    try:
        job = Job.from_json(line)
    except (ValueError, TypeError) as exc:
        channel.send("error", kind="input", message=f"the worker got an unreadable job: {exc}", traceback="")
        return EXIT_CODES["input"]
    control = Control(sys.stdin, len(job.ring), channel)
    ring = None
    try:
        ring = Ring(job.ring, job.slot_bytes) if job.ring else None
        return _run(job, channel, control, ring)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the client as an event
        kind, message = _describe_failure(exc, job)
        channel.send("error", kind=kind, message=message, traceback=traceback.format_exc())
        return EXIT_CODES[kind]
    finally:
        if ring is not None:
            ring.close()


def _describe_failure(exc: BaseException, job: Job) -> tuple[str, str]:
    from .errors import InputError
    from .devices import describe_out_of_memory, is_out_of_memory
    from .memory_budget import NotEnoughMemory

    if isinstance(exc, InputError):
        return "input", str(exc)
    if isinstance(exc, NotEnoughMemory):  # the pre-flight check: its message already says what to do
        return "out_of_memory", str(exc)
    if is_out_of_memory(exc):
        return "out_of_memory", describe_out_of_memory(exc, job.fixed_geometry.get("size"), job.device, job.method)
    if isinstance(exc, KeyboardInterrupt):
        return "internal", "the worker was interrupted"
    return "internal", f"{type(exc).__name__}: {exc}"


def _run(job: Job, channel: EventChannel, control: Control, ring: Ring | None) -> int:
    t_start = time.perf_counter()
    import numpy as np
    import torch

    from .devices import prepare_process, resolve_device
    from .methods import Prompts, finite_steps, get_method
    from .spatial import warp

    _forward_warnings(channel)
    from .errors import InputError
    unknown = sorted(set(job.arrays) - {"displacement", "warped"})
    if unknown:
        raise InputError(f"unknown per-step array(s) {unknown}; choose from displacement, warped")
    threads = prepare_process(job.threads)
    device = resolve_device(job.device)
    method_cls = get_method(job.method)
    from .memory_budget import check_memory
    fixed_geometry, moving_geometry = _job_geometries(job)
    # before any array is loaded
    check_memory(method_cls, fixed_geometry.size, moving_geometry.size, device, job.options, fixed_geometry.spacing)
    pair, prompts, init = _load_inputs(job, fixed_geometry, moving_geometry)
    method = method_cls.create(job.checkpoint, device, job.options, ndim=pair.geometry.image_ndim)
    steps = method.check_inputs(pair.fixed, pair.moving, job.steps)
    if prompts is not None:
        prompts = Prompts(*prompts, weight=job.prompt_weight, spacing=pair.geometry.array_spacing)
    moving_raw = torch.from_numpy(pair.moving_raw_on_fixed)[None, None].to(device)
    channel.send("started", method=method.name, title=method.title, device=str(device), threads=threads,
                 steps=method.planned_steps(steps), options=dict(method.options.__dict__), notes=pair.notes,
                 pid=os.getpid(), setup_s=time.perf_counter() - t_start)

    picker = _ChannelPicker(job.channels, ring.slot_bytes if ring else 0, channel)

    def output_arrays(step, names) -> dict:
        """The step's displacement and/or the *raw-intensity* moving image warped by it (what is shown)."""
        displacement = step.displacement.detach()
        arrays = {}
        if "displacement" in names:
            arrays["displacement"] = displacement[0].float().cpu().numpy()
        if "warped" in names:
            arrays["warped"] = warp(moving_raw, displacement.to(moving_raw.dtype))[0, 0].float().cpu().numpy()
        return arrays

    generator = method.run_pair(pair, steps, prompts, init)
    last, count = None, 0
    try:
        for step in finite_steps(method, generator):
            t_computed = time.time()
            count += 1
            last = step
            message = {"index": step.index, "phase": step.phase, "final": bool(step.final),
                       "metrics": {k: float(v) for k, v in step.metrics.items()}, "t_computed": t_computed}
            slot = control.take_free_slot() if ring is not None else None
            if slot is None:  # the client is behind: metrics only, no waiting, no array work
                channel.send("step", slot=None, arrays=[], dropped=True, **message)
            else:
                payload = output_arrays(step, job.arrays)
                payload.update(picker.pick(step.channels, ring.slot_bytes - packed_size(payload)))
                specs = pack_arrays(payload, ring.blocks[slot].buf)
                channel.send("step", slot=slot, arrays=[s.to_dict() for s in specs], dropped=False,
                             t_sent=time.time(), **message)
            if control.stop_requested():
                break
    finally:
        generator.close()
    cancelled = control.stop_requested() and not (last is not None and last.final)
    if last is None:
        channel.send("done", reason="cancelled" if cancelled else "completed", steps_run=0,
                     runtime_s=time.perf_counter() - t_start)
        return EXIT_CODES["ok"]
    # The output never depends on the ring: files in the private job folder, each written then renamed.
    from .spatial import jacobian_determinant

    from .imaging import resample_through_field

    outputs = output_arrays(last, ("displacement",))
    outputs["warped"] = resample_through_field(pair.moving_image, outputs["displacement"], pair.geometry)
    outputs["jacobian_determinant"] = jacobian_determinant(last.displacement.detach().float())[0].cpu().numpy()
    files = {name: str(save_array(job.folder, f"result_{name}", np.ascontiguousarray(a)))
             for name, a in outputs.items()}
    channel.send("result", index=last.index, files=files,
                 metrics={k: float(v) for k, v in last.metrics.items()})
    channel.send("done", reason="cancelled" if cancelled else "completed", steps_run=count,
                 runtime_s=time.perf_counter() - t_start)
    return EXIT_CODES["ok"]


def _job_geometries(job: Job):
    from .errors import InputError
    from .geometry import Geometry

    try:
        return Geometry.from_dict(job.fixed_geometry), Geometry.from_dict(job.moving_geometry)
    except ValueError as exc:
        raise InputError(f"bad image geometry in the job: {exc}") from None


def _load_inputs(job: Job, fixed_geometry, moving_geometry):
    """Job folder -> prepared pair on the fixed grid, landmark prompts (voxels) and warm-start field."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from .errors import InputError
    from .imaging import prepare_pair
    from .landmarks import landmarks_on_fixed_grid
    from .worker_protocol import load_array

    images = []
    for role, geometry in (("fixed", fixed_geometry), ("moving", moving_geometry)):
        array = load_array(job.folder, role)
        if tuple(array.shape) != geometry.array_shape:
            raise InputError(f"{role} image array {array.shape} does not match its geometry {geometry.array_shape}")
        images.append(geometry.apply_to(sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))))
    pair = prepare_pair(*images)
    prompts = None
    if job.fixed_landmarks_ras or job.moving_landmarks_ras:
        fixed_vox, moving_vox = landmarks_on_fixed_grid(
            fixed_geometry, moving_geometry, np.asarray(job.fixed_landmarks_ras or [], float).reshape(-1, 3),
            np.asarray(job.moving_landmarks_ras or [], float).reshape(-1, 3), job.landmark_labels)
        prompts = (torch.tensor(fixed_vox, dtype=torch.float32), torch.tensor(moving_vox, dtype=torch.float32))
    init = None
    if job.has_init:
        init_array = load_array(job.folder, "init")
        expected = (fixed_geometry.ndim, *fixed_geometry.array_shape)
        if tuple(init_array.shape) != expected:
            raise InputError(f"the starting displacement has shape {init_array.shape}; it must be {expected} "
                             "(voxels on the fixed grid): run again from scratch or use the same fixed volume")
        init = torch.from_numpy(np.asarray(init_array, dtype=np.float32))[None]
    return pair, prompts, init


class _ChannelPicker:
    """Chooses which visualisation maps travel with a step and shrinks them to fit the slot."""

    def __init__(self, selection: dict | None, slot_bytes: int, channel: EventChannel):
        self.selection = selection
        self.channel = channel
        self.warned: set[str] = set()

    def _indices(self, name: str, count: int) -> list[int]:
        if self.selection is None:
            return list(range(min(DEFAULT_CHANNEL_MAPS, count)))
        wanted = self.selection.get(name)
        if wanted is None:
            return []
        if wanted == "all":
            return list(range(count))
        valid = [int(i) for i in wanted if 0 <= int(i) < count]
        if len(valid) != len(wanted) and name not in self.warned:
            self.warned.add(name)
            self.channel.log(f"channel '{name}' has {count} maps; ignored indices outside 0..{count - 1}", "warning")
        return valid

    def pick(self, channels: dict, budget_bytes: int) -> dict:
        import numpy as np
        import torch.nn.functional as F

        chosen = {}
        for name, tensor in channels.items():
            indices = self._indices(name, tensor.shape[0])
            if indices:
                chosen[name] = tensor.detach()[indices].float()
        factor = 1
        while chosen and sum(t.numel() * 4 + 64 for t in chosen.values()) > budget_bytes:
            factor *= 2
            chosen = {name: F.avg_pool2d(t, 2, ceil_mode=True) if t.dim() == 3 else
                      F.avg_pool3d(t, 2, ceil_mode=True) for name, t in chosen.items()}
            if min(min(t.shape[1:]) for t in chosen.values()) <= 1:
                chosen = {}
        if factor > 1 and "_shrunk" not in self.warned:
            self.warned.add("_shrunk")
            self.channel.log(f"visualisation channels are sent at 1/{factor} resolution to fit the transfer "
                             "buffer; choose fewer channel maps to see them at full resolution", "warning")
        return {f"channel/{name}": np.ascontiguousarray(t.cpu().numpy()) for name, t in chosen.items()}


def _forward_warnings(channel: EventChannel) -> None:
    """Python warnings become ``log`` events (the user sees them in the module's log), not stderr noise."""
    def show(message, category, filename, lineno, file=None, line=None):
        channel.log(f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})", "warning")
    warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
