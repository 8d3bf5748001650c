"""Client of the background worker: start it, poll without blocking, deliver steps in order, cancel, and clean
up (process tree, shared memory, temp files) on every exit path.

No Qt and no torch here: Slicer polls :meth:`WorkerClient.poll` from a ``qt.QTimer`` (see
``iterreg_slicer.worker_timer``); the CLI and the tests call :meth:`WorkerClient.wait`.

Threads: two daemon threads read the worker's stdout (protocol) and stderr (log). The stdout reader copies
each step's arrays out of its shared-memory slot and releases the slot at once, so the worker never waits
for the GUI; the GUI thread only hands ready messages to the callbacks. If the GUI falls behind by more
than ``max_pending_pictures`` steps, the arrays of further intermediate steps are dropped (metrics never).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError
from .worker_protocol import ArraySpec, Job, RING_SLOTS, slot_names, slot_size, unpack_arrays

__all__ = ["RunRequest", "StepMessage", "WorkerFailure", "WorkerClient", "WorkerStartError", "worker_command",
           "describe_methods"]

RUNNING_STATES = ("starting", "running", "cancelling")
FINAL_STATES = ("completed", "cancelled", "failed")


@dataclass
class RunRequest:
    """One registration for the worker: raw arrays (array order) with their ITK-style geometry dicts."""
    method: str
    fixed: np.ndarray
    fixed_geometry: dict
    moving: np.ndarray
    moving_geometry: dict
    steps: int | None = None
    checkpoint: str | None = None
    device: str = "auto"
    threads: int | None = None
    options: dict = field(default_factory=dict)
    fixed_landmarks_ras: np.ndarray | None = None
    moving_landmarks_ras: np.ndarray | None = None
    landmark_labels: list | None = None  # names of the pairs (markups labels), used in error messages
    prompt_weight: float = 1.0
    init_displacement: np.ndarray | None = None  # [ndim, *fixed shape] voxels of the fixed grid
    channels: dict | None = None  # name -> map indices or "all"; None: first 4 maps of every channel
    arrays: tuple = ("displacement", "warped")  # per-step arrays (the result always has both)

    def check(self) -> None:
        """Cheap checks before anything is started; the worker validates everything else."""
        for role, array, geometry in (("fixed", self.fixed, self.fixed_geometry),
                                      ("moving", self.moving, self.moving_geometry)):
            array = np.asarray(array)
            if array.ndim not in (2, 3) or not np.issubdtype(array.dtype, np.number):
                raise InputError(f"the {role} image must be a 2D or 3D numeric array, got {array.dtype} {array.shape}")
            expected = tuple(reversed(tuple(geometry.get("size", ()))))
            if tuple(array.shape) != expected:
                raise InputError(f"the {role} array {array.shape} does not match its geometry size "
                                 f"{tuple(geometry.get('size', ()))} (array order is reversed ITK order)")


@dataclass
class StepMessage:
    """A step as received: metrics always; arrays unless they were dropped (``dropped``) to keep up."""
    index: int
    phase: str
    metrics: dict[str, float]
    final: bool
    arrays: dict[str, np.ndarray] | None
    dropped: bool = False
    t_computed: float = 0.0  # worker clock (time.time) when the method yielded the step
    t_sent: float = 0.0  # when the worker had the arrays in the ring and sent the message
    t_received: float = 0.0  # when the arrays were copied into this process
    t_delivered: float = 0.0  # when the callback got it

    @property
    def displacement(self) -> np.ndarray | None:
        return None if self.arrays is None else self.arrays.get("displacement")

    @property
    def warped(self) -> np.ndarray | None:
        return None if self.arrays is None else self.arrays.get("warped")

    @property
    def channels(self) -> dict[str, np.ndarray]:
        if self.arrays is None:
            return {}
        return {k.split("/", 1)[1]: v for k, v in self.arrays.items() if k.startswith("channel/")}


@dataclass
class WorkerFailure:
    """Why a run failed. ``kind``: input, out_of_memory, internal (reported by the worker), crashed, timeout,
    protocol, callback (found by the client)."""
    kind: str
    message: str
    traceback: str = ""
    exit_code: int | None = None

    def __str__(self) -> str:
        return self.message


class WorkerStartError(RuntimeError):
    """The worker process could not be started at all."""


def worker_command() -> list[str]:
    """``PythonSlicer -m iterreg.worker`` inside Slicer, the running interpreter elsewhere.

    ``ITERREG_WORKER_PYTHON`` overrides the interpreter (e.g. a separate environment with CUDA torch)."""
    python = os.environ.get("ITERREG_WORKER_PYTHON")
    if not python:
        python = sys.executable
        if Path(python).stem.lower().startswith("slicerapp") or Path(python).stem == "Slicer":
            beside = Path(python).with_name("PythonSlicer" + Path(python).suffix)
            python = str(beside) if beside.exists() else (shutil.which("PythonSlicer") or python)
    return [python, "-m", "iterreg.worker"]


def _worker_environment() -> dict:
    env = dict(os.environ)
    engine_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (engine_parent, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def describe_methods(command: list[str] | None = None, timeout: float = 120.0) -> dict:
    """Ask a worker interpreter which methods it offers and whether it sees a GPU (``--describe``), so the
    GUI process never imports torch. Raises ``RuntimeError`` with the interpreter's message on failure."""
    command = (command or worker_command()) + ["--describe"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_worker_environment())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"could not ask the worker for its methods ({exc})") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"the worker could not list its methods: {last}")
    return json.loads(done.stdout)


class _Resources:
    """Everything a run holds outside this process's memory; ``release`` is idempotent and also runs from a
    ``weakref.finalize`` (garbage collection or interpreter exit)."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.blocks: list[shared_memory.SharedMemory] = []
        self.folder: Path | None = None

    def kill_tree(self, sig: int = signal.SIGKILL if hasattr(signal, "SIGKILL") else 9) -> None:
        process = self.process
        if process is None:
            return
        if os.name == "posix":
            try:  # the worker leads its own process group (start_new_session), so this reaches its children
                os.killpg(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        elif process.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)

    def release(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.kill_tree()
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self.kill_tree()  # stragglers left in the worker's group (e.g. multiprocessing's tracker)
            for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        for block in self.blocks:
            try:
                block.close()
            except BufferError:
                pass  # a numpy view still points into it; unlinking below still frees the name
            try:
                block.unlink()
            except FileNotFoundError:
                pass
        self.blocks = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class WorkerClient:
    """Runs one :class:`RunRequest` in a worker process.

    Callbacks run on the thread that calls :meth:`poll` (Slicer's GUI thread): ``on_step(StepMessage)`` for
    every step in order, ``on_log(level, text)`` for worker log lines and stderr, ``on_finished(client)``
    once at the end (``client.state`` is then completed, cancelled or failed; ``client.failure`` says why).
    """

    def __init__(self, request: RunRequest, on_step: Callable[[StepMessage], None] | None = None,
                 on_log: Callable[[str, str], None] | None = None,
                 on_finished: Callable[["WorkerClient"], None] | None = None,
                 command: list[str] | None = None, start_timeout_s: float = 180.0, stall_timeout_s: float = 300.0, cancel_grace_s: float = 10.0,
                 kill_grace_s: float = 3.0, max_pending_pictures: int = 4, channel_budget_maps: int = 4,
                 copy_arrays: bool = True, log_lines: int = 5000):
        self.request = request
        self.on_step, self.on_log, self.on_finished = on_step, on_log, on_finished
        self.command = list(command) if command else worker_command()
        self.start_timeout_s = start_timeout_s  # imports, loading weights, GPU initialisation
        self.stall_timeout_s, self.cancel_grace_s, self.kill_grace_s = stall_timeout_s, cancel_grace_s, kill_grace_s
        self.max_pending_pictures = max_pending_pictures
        # copy_arrays=False: a step's arrays are views into shared memory, valid only inside on_step (copy what
        # you keep; Slicer copies into MRML nodes anyway). Saves a copy and its page faults (~70 ms at 128^3).
        self.copy_arrays = copy_arrays
        self.channel_budget_maps = channel_budget_maps
        self.state = "idle"
        self.failure: WorkerFailure | None = None
        self.info: dict = {}  # the worker's "started" event: device, threads, steps, options
        self.history: list[dict] = []  # metrics of every received step, in order
        self.steps_received = 0
        self.result: StepMessage | None = None  # the run's output (final or last step before a cancel)
        self.done: dict = {}
        self.log: deque[str] = deque(maxlen=log_lines)
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.release)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stdin_lock = threading.Lock()
        self._pending_pictures = 0
        self._pending_lock = threading.Lock()
        self._last_message = 0.0
        self._cancel_at: float | None = None
        self._escalation = 0
        self._stdout_eof = False
        self._threads: list[threading.Thread] = []
        self._pid: int | None = None
        self._callbacks_enabled = True
        self._job_folder: Path | None = None

    # --- life cycle --------------------------------------------------------------------------------------
    def start(self) -> "WorkerClient":
        if self.state != "idle":
            raise RuntimeError("a WorkerClient runs once; create a new one for the next run")
        self.request.check()
        r = self._resources
        try:
            r.folder = Path(tempfile.mkdtemp(prefix="iterreg-job-"))  # mode 0700: private to this user
            job = self._write_job(r.folder)
            env = _worker_environment()
            kwargs = {"start_new_session": True} if os.name == "posix" else {
                "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
            r.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, cwd=str(r.folder), **kwargs)
        except (OSError, ValueError) as exc:
            self._resources.release()
            self.state = "failed"
            self.failure = WorkerFailure("start", f"could not start the worker ({' '.join(self.command)}): {exc}")
            raise WorkerStartError(self.failure.message) from exc
        self.state = "starting"
        self._pid, self._job_folder = r.process.pid, r.folder
        self._last_message = time.monotonic()
        for target, name in ((self._read_stdout, "iterreg-worker-stdout"), (self._read_stderr, "iterreg-worker-stderr")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._send({"__raw__": job.to_json()})
        return self

    def _write_job(self, folder: Path) -> Job:
        req = self.request
        from .worker_protocol import save_array

        save_array(folder, "fixed", np.asarray(req.fixed))
        save_array(folder, "moving", np.asarray(req.moving))
        if req.init_displacement is not None:
            save_array(folder, "init", np.asarray(req.init_displacement, dtype=np.float32))
        fixed_shape = tuple(np.shape(req.fixed))
        size = slot_size(fixed_shape, self.channel_budget_maps)
        names = slot_names(RING_SLOTS)
        for name in names:
            self._resources.blocks.append(shared_memory.SharedMemory(name=name, create=True, size=size))
        landmarks = {}
        if req.fixed_landmarks_ras is not None or req.moving_landmarks_ras is not None:
            landmarks = {"fixed_landmarks_ras": np.asarray(req.fixed_landmarks_ras, float).reshape(-1, 3).tolist(),
                         "moving_landmarks_ras": np.asarray(req.moving_landmarks_ras, float).reshape(-1, 3).tolist(),
                         "landmark_labels": None if req.landmark_labels is None else list(req.landmark_labels)}
        return Job(method=req.method, folder=str(folder), fixed_geometry=dict(req.fixed_geometry),
                   moving_geometry=dict(req.moving_geometry), steps=req.steps, checkpoint=req.checkpoint,
                   device=req.device, threads=req.threads, options=dict(req.options or {}),
                   prompt_weight=req.prompt_weight, has_init=req.init_displacement is not None,
                   channels=req.channels, arrays=list(req.arrays), ring=names, slot_bytes=size, **landmarks)

    @property
    def pid(self) -> int | None:
        """The worker's process id (it also leads the process group of anything it starts)."""
        return self._pid

    @property
    def job_folder(self) -> Path | None:
        """The private folder of this run's input and output files (removed when the run ends)."""
        return self._job_folder

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    def cancel(self) -> None:
        """Ask the worker to stop after its current step; it is terminated, then killed, if it does not."""
        if not self.running or self._cancel_at is not None:
            return
        self.state = "cancelling"
        self._cancel_at = time.monotonic()
        self._send({"type": "cancel"})

    def poll(self) -> bool:
        """Deliver whatever arrived (never blocks); returns True while the run is still going."""
        if not self.running:
            return False
        try:
            self._drain()
            self._check_progress()
        except Exception:
            # A failing callback must not leave a worker running on its own.
            self._callbacks_enabled = False  # the handler is broken: do not feed it the remaining steps
            if self.running:
                self._fail("callback", "the step handler raised an error; the run was stopped",
                           traceback.format_exc())
                self._finish()
            raise
        return self.running

    def wait(self, timeout: float | None = None, interval: float = 0.01) -> str:
        """Poll until the run ends (for the CLI and tests); on ``timeout`` the run is cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline and self._cancel_at is None:
                self.cancel()
            time.sleep(interval)
        return self.state

    def close(self) -> None:
        """Stop the worker if it still runs and free everything (idempotent)."""
        if self.running:
            self._cancel_at = self._cancel_at or time.monotonic()
            self._resources.kill_tree()
            self._finish()
        self._resources.release()

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- background threads ------------------------------------------------------------------------------
    def _send(self, message: dict) -> None:
        text = message["__raw__"] if "__raw__" in message else json.dumps(message)
        process = self._resources.process
        with self._stdin_lock:
            try:
                process.stdin.write(text.encode() + b"\n")
                process.stdin.flush()
            except (BrokenPipeError, OSError, ValueError, AttributeError):
                pass  # the worker is gone; its exit is noticed by the stdout reader

    def _read_stdout(self) -> None:
        stream = self._resources.process.stdout
        for raw in stream:
            self._last_message = time.monotonic()
            try:
                message = json.loads(raw)
                event = message["event"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                self._inbox.put(("garbage", raw[:200].decode("utf-8", "replace").strip()))
                break
            if event == "step":
                self._take_arrays(message)
            elif event == "result":
                self._load_result(message)
            self._inbox.put(("event", message))
        self._inbox.put(("eof", None))

    def _take_arrays(self, message: dict) -> None:
        slot = message.get("slot")
        message["_arrays"] = None
        if slot is None:
            return
        if not self.copy_arrays:
            try:
                specs = [ArraySpec.from_dict(d) for d in message.get("arrays", [])]
                message["_arrays"] = unpack_arrays(self._resources.blocks[int(slot)].buf, specs, copy=False)
            except (ValueError, IndexError, KeyError, TypeError) as exc:
                message["_bad_arrays"] = str(exc)
            message["_release_after_delivery"] = slot  # flow control is the ring itself
            message["_t_received"] = time.time()
            return
        with self._pending_lock:
            keep = message.get("final") or self._pending_pictures < self.max_pending_pictures
            if keep:
                self._pending_pictures += 1
        try:
            if keep:
                specs = [ArraySpec.from_dict(d) for d in message.get("arrays", [])]
                message["_arrays"] = unpack_arrays(self._resources.blocks[int(slot)].buf, specs, copy=True)
            else:
                message["dropped"] = True
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            message["_bad_arrays"] = str(exc)
        finally:
            message["_t_received"] = time.time()
            self._send({"type": "release", "slot": slot})

    def _load_result(self, message: dict) -> None:
        try:
            folder = self._resources.folder
            arrays = {}
            for name, path in message.get("files", {}).items():
                path = Path(path)
                if path.parent.resolve() != folder.resolve():
                    raise ValueError(f"result file {path} lies outside the job folder")
                arrays[name] = np.load(path, allow_pickle=False)
            message["_arrays"] = arrays
        except (OSError, ValueError) as exc:
            message["_bad_arrays"] = str(exc)
        message["_t_received"] = time.time()

    def _read_stderr(self) -> None:
        for raw in self._resources.process.stderr:
            self._inbox.put(("stderr", raw.decode("utf-8", "replace").rstrip("\n")))

    # --- GUI-thread side ---------------------------------------------------------------------------------
    def _drain(self, after_exit: bool = False) -> None:
        """Hand over what the reader threads queued. ``after_exit``: the last messages of a finished worker
        (steps and log lines only; no more state changes)."""
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if after_exit and kind not in ("event", "stderr"):
                continue
            if kind == "event":
                self._handle(payload)
            elif kind == "stderr":
                self._log("stderr", payload)
            elif kind == "garbage":
                self._log("error", f"unexpected worker output: {payload}")
                if self.running:
                    self._fail("protocol", "the worker wrote something that is not a protocol message "
                                           f"({payload[:60]!r}); it was stopped. See the log for details")
                    self._resources.kill_tree()
            elif kind == "eof":
                self._stdout_eof = True
            if not self.running and not after_exit:
                return

    def _handle(self, message: dict) -> None:
        event = message["event"]
        if event == "started":
            self.state = "running" if self.state == "starting" else self.state
            self.info = {k: v for k, v in message.items() if k != "event"}
        elif event == "step":
            step = self._step_from(message)
            self.history.append({"index": step.index, "phase": step.phase, **step.metrics})
            self.steps_received += 1
            if step.arrays is not None and self.copy_arrays:
                with self._pending_lock:
                    self._pending_pictures -= 1
            if "_bad_arrays" in message:
                self._log("warning", f"step {step.index}: arrays unreadable ({message['_bad_arrays']})")
            step.t_delivered = time.time()
            try:
                if self.on_step is not None and self._callbacks_enabled:
                    self.on_step(step)
            finally:
                if "_release_after_delivery" in message:
                    step.arrays = message["_arrays"] = None  # views die with the slot: nothing kept may change
                    self._send({"type": "release", "slot": message["_release_after_delivery"]})
        elif event == "result":
            if "_bad_arrays" in message:
                self._fail("protocol", f"the result could not be read: {message['_bad_arrays']}")
            else:
                self.result = StepMessage(int(message["index"]), "result", message.get("metrics", {}), True,
                                          message["_arrays"], t_received=message["_t_received"])
        elif event == "log":
            self._log(message.get("level", "info"), message.get("message", ""))
        elif event == "error":
            self.failure = WorkerFailure(message.get("kind", "internal"), message.get("message", "unknown error"),
                                         message.get("traceback", ""))
            self._log("error", self.failure.message)
            if self.failure.traceback:
                self._log("error", self.failure.traceback)
        elif event == "done":
            self.done = {k: v for k, v in message.items() if k != "event"}

    @staticmethod
    def _step_from(message: dict) -> StepMessage:
        return StepMessage(int(message["index"]), message.get("phase", ""), message.get("metrics", {}),
                           bool(message.get("final")), message.get("_arrays"), bool(message.get("dropped")),
                           float(message.get("t_computed", 0.0)), float(message.get("t_sent", 0.0)),
                           float(message.get("_t_received", 0.0)))

    def _log(self, level: str, text: str) -> None:
        self.log.append(f"[{level}] {text}")
        if self.on_log is not None:
            self.on_log(level, text)

    def _fail(self, kind: str, message: str, trace: str = "") -> None:
        if self.failure is None:
            self.failure = WorkerFailure(kind, message, trace)
            self._log("error", message)
        self.state = "failed"

    def _check_progress(self) -> None:
        process = self._resources.process
        now = time.monotonic()
        if self.state == "failed" or (self._stdout_eof and self._inbox.empty()):
            self._finish()
            return
        if self._cancel_at is not None:
            waited = now - self._cancel_at
            if self._escalation == 0 and waited > self.cancel_grace_s:
                self._escalation = 1
                self._log("warning", f"the worker did not stop within {self.cancel_grace_s:g} s; terminating it")
                self._resources.kill_tree(signal.SIGTERM)
            elif self._escalation == 1 and waited > self.cancel_grace_s + self.kill_grace_s:
                self._escalation = 2
                self._log("warning", "the worker ignored termination; killing it")
                self._resources.kill_tree()
        elif now - self._last_message > (self.start_timeout_s if self.state == "starting" else self.stall_timeout_s):
            limit = self.start_timeout_s if self.state == "starting" else self.stall_timeout_s
            what = "did not start within" if self.state == "starting" else "sent nothing for"
            self._fail("timeout", f"the worker {what} {limit:g} s and was stopped; it may be stuck "
                                  "(try fewer steps, a smaller image or the CPU device)")
            self._resources.kill_tree()
            self._finish()
        elif process.poll() is not None and not self._stdout_eof:
            # Exited but a grandchild still holds stdout open: the stdout reader would wait for it forever.
            self._resources.kill_tree()

    def _finish(self) -> None:
        """The worker is done or must be: end it, collect the verdict, free everything, tell the caller."""
        process = self._resources.process
        if process.poll() is None:
            try:
                process.wait(timeout=self.kill_grace_s if self._stdout_eof else 0.1)
            except subprocess.TimeoutExpired:
                self._resources.kill_tree()
                process.wait(timeout=10)
        self._resources.kill_tree()
        for thread in self._threads:
            thread.join(timeout=2)
        self._drain(after_exit=True)
        code = process.returncode
        if self.state != "failed":
            if self.failure is not None:  # the worker reported an error
                self.failure.exit_code = code
                self.state = "failed"
            elif self.done:
                # the worker decides: a cancel that arrives after the final step (while it saves) changes nothing
                self.state = "cancelled" if self.done.get("reason") == "cancelled" else "completed"
            elif self._cancel_at is not None:
                self.state = "cancelled"
            else:
                self._fail("crashed", f"the worker stopped unexpectedly ({_describe_exit(code)}) after "
                                      f"{self.steps_received} step(s); the steps received are kept. "
                                      f"Last log lines: {' | '.join(list(self.log)[-3:]) or 'none'}")
        if self.failure is not None and self.failure.exit_code is None:
            self.failure.exit_code = code
        self._resources.release()
        if self.on_finished is not None:
            self.on_finished(self)

def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
