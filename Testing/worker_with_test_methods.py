"""The real worker (``iterreg.worker.main``) with extra methods that misbehave on purpose.

Used by the failure-mode tests and the latency benchmark as ``[sys.executable, this file]``. Every fault
happens inside a method, exactly where a real method's bug, crash or hang would happen.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from iterreg.methods import MethodOptions, RegistrationMethod, Step, register_method
from iterreg.spatial import warp

FAULTS = ("none", "raise", "abort", "sigkill", "hang", "print", "oom", "ignore_cancel", "grandchild")


@dataclass(frozen=True)
class ScriptedOptions(MethodOptions):
    fault: str = "none"
    fault_at: int = 3  # the step index at which the fault happens
    delay_s: float = 0.0  # time per step
    hidden_maps: int = 2  # maps in the "hidden" visualisation channel
    hidden_scale: int = 2  # the hidden channel is at 1/scale resolution


def expected_displacement(index: int, shape) -> torch.Tensor:
    """What step ``index`` of the scripted method yields: a smooth, step-dependent field."""
    nd = len(shape)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    field = torch.stack([torch.sin(3 * a + 0.1 * index) for a in axes[::-1]][:nd])
    return (0.05 * (index + 1) * field)[None]


@register_method
class ScriptedMethod(RegistrationMethod):
    """Yields a known field per step (no optimisation), then misbehaves as its options say."""
    name = "scripted"
    title = "Scripted test method"
    default_steps = 10
    max_steps = 100000
    supported_ndims = (3,)
    Options = ScriptedOptions

    def run(self, fixed, moving, steps=None, prompts=None, init=None):
        steps = self.check_inputs(fixed, moving, steps)
        o = self.options
        shape = fixed.shape[2:]
        small = [max(1, n // o.hidden_scale) for n in shape]
        for index in range(steps):
            if index == o.fault_at:
                self._fault(o.fault)
            u = expected_displacement(index, shape).to(fixed)
            if index == o.fault_at and o.fault == "diverge":  # a learned update blown up past its training
                u = torch.full_like(u, float("nan"))
            hidden = torch.arange(o.hidden_maps, dtype=torch.float32)[:, None, None, None].expand(-1, *small) + index
            yield Step(index, u, warp(moving, u), {"similarity": float(index), "regularizer": 0.0,
                                                   "update_norm": 0.05, "folding_percent": 0.0},
                       channels={"hidden": hidden.clone()}, phase=f"step {index + 1}", final=index == steps - 1)
            if o.delay_s:
                time.sleep(o.delay_s)

    @staticmethod
    def _fault(fault: str) -> None:
        if fault == "raise":
            raise RuntimeError("simulated failure inside the method")
        if fault == "abort":
            os.abort()
        if fault == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "hang":
            time.sleep(3600)
        if fault == "print":
            print("garbage printed by a library: {not json")
            os.write(1, b"\x00\xff raw bytes on file descriptor 1\n")
        if fault == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB (GPU 0; 79.1 GiB "
                                              "total capacity; 77.0 GiB already allocated)")
        if fault == "ignore_cancel":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(3600)
        if fault == "grandchild":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
            Path(os.environ["ITERREG_TEST_GRANDCHILD_PID"]).write_text(str(child.pid))
            time.sleep(3600)


@register_method
class LearnedScriptedMethod(ScriptedMethod):
    """Same, but declared learned: exercises the checkpoint checks of the real method factory."""
    name = "scripted_learned"
    needs_checkpoint = True

    @classmethod
    def from_checkpoint(cls, path, device="cpu", options=None):
        return cls(cls.Options.from_dict(options), device)


@register_method
class HungryScriptedMethod(ScriptedMethod):
    """Declares a memory need no machine has: exercises the worker's pre-flight memory check."""
    name = "scripted_hungry"
    memory_per_voxel = 1e15


if __name__ == "__main__":
    from iterreg.worker import main

    sys.exit(main())
