"""The DEQReg network (Zhang et al., "Deep equilibrium models for deformable image registration", §2.2-2.3).

A residual update ``f_theta(I_f, I_m o phi, phi)`` (the VoxelMorph-size U-Net) defines the map
``g(u) = u + f_theta(I_f, I_m o (x + u), u)``; registration is its fixed point ``u* = g(u*)``, i.e. the
place where the learned update vanishes. Training uses torchdeq: the forward solve runs without a graph,
then the phantom gradient (K damped steps u <- tau g(u) + (1 - tau) u from the detached solution) gives the
backward pass, so training memory does not depend on the number of solver iterations; ``states`` sampled
trajectory states (torchdeq's ``n_states``; the last is the solution) are returned for the intermediate
state correction loss (paper Eq. 9, weights ``gamma^(S-1-k)``, torchdeq's ``fp_correction`` 'exp').
Inference streams every solver evaluation (:func:`stream_solver`) and stops at the relative residual
tolerance or ``max_iter``.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ..spatial import warp
from .config import DictConfig
from .unet import UNet, UNetConfig, pad_to_multiple

__all__ = ["DEQRegConfig", "DEQRegNetwork", "DEQState", "stream_solver", "SOLVERS"]

SOLVERS = ("fixed_point_iter", "anderson")


@dataclass(frozen=True)
class DEQRegConfig(DictConfig):
    ndim: int = 3
    encoder: tuple = (16, 16, 32, 32, 32)
    decoder: tuple = (32, 32, 32, 32, 32, 16, 16)
    solver: str = "fixed_point_iter"  # the paper's; "anderson" accelerates
    max_iter: int = 48  # T
    tolerance: float = 1e-3  # relative residual |g(u) - u| / |g(u)| at which the solve stops
    damping: float = 1.0  # each solver iteration moves this far towards g(u) (torchdeq's tau), in training's
    # forward solve and at inference; 1: the paper's plain iteration (ours: < 1 for a checkpoint whose g is not
    # contractive everywhere, Docs/methods.md)
    phantom_steps: int = 2  # K
    tau: float = 0.5  # phantom-gradient damping
    states: int = 3  # S sampled states for the correction loss
    gamma: float = 0.5
    working_scale: float = 1.0
    residual_weight: float = 0.0  # > 0 (ours, not the paper's): penalise |f_theta|^2 at the solution reached
    jacobian_weight: float = 0.0  # > 0 (ours): torchdeq's Jacobian regularisation of g at the solution reached

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got '{self.solver}'")
        if self.max_iter < 1 or self.phantom_steps < 1 or self.states < 1 or not 0 < self.tau <= 1:
            raise ValueError("max_iter, phantom_steps and states must be >= 1 and tau in (0, 1]")
        if not 0 < self.damping <= 1:
            raise ValueError("damping must be in (0, 1]")
        if not 0 < self.working_scale <= 1:
            raise ValueError("working_scale must be in (0, 1]")

    def step_weights(self, count: int) -> list[float]:
        """Correction weights gamma^(S-1-k) of the sampled states, normalised to sum 1."""
        raw = [self.gamma ** (count - 1 - k) for k in range(count)]
        return [w / sum(raw) for w in raw]


@dataclass
class DEQState:
    """One solver evaluation on the working grid."""
    iteration: int
    displacement: torch.Tensor  # g(u_k): the current estimate
    update: torch.Tensor  # f_theta(u_k) = g(u_k) - u_k, the residual
    relative_residual: float


class DEQRegNetwork(nn.Module):
    def __init__(self, config: DEQRegConfig):
        super().__init__()
        self.config = config
        nd = config.ndim
        self.update = UNet(UNetConfig(ndim=nd, in_channels=2 + nd, out_channels=nd, encoder=config.encoder,
                                      decoder=config.decoder))
        self.auxiliary_loss: torch.Tensor | None = None  # set by a training forward (residual_weight)
        from torchdeq import get_deq
        self.deq = get_deq(core="sliced", f_solver=config.solver, f_max_iter=config.max_iter,
                           f_tol=config.tolerance, f_stop_mode="rel", grad=config.phantom_steps, tau=config.tau,
                           n_states=config.states)

    def residual(self, fixed: torch.Tensor, moving: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """f_theta(I_f, I_m o phi, phi), on the working grid."""
        x, crop = pad_to_multiple(torch.cat([fixed, warp(moving, u), u], dim=1), self.update.config.multiple)
        return self.update(x)[crop]

    def _map(self, fixed, moving) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda u: u + self.residual(fixed, moving, u)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, init: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Training: the sampled states (phantom gradients attached), the last being the solution;
        evaluation mode: ``[solution]``."""
        u0 = self._zero(fixed) if init is None else init
        states, _info = self.deq(self._map(fixed, moving), u0, solver_kwargs={"tau": self.config.damping})
        self.auxiliary_loss = None
        c = self.config
        if self.training and (c.residual_weight > 0 or c.jacobian_weight > 0):
            # Stabilisers for short (CPU) training, off in the paper's configuration (Docs/methods.md):
            # Eq. 5 defines the equilibrium by a vanishing update, so ask for it at the state the training solve
            # reached; and keep g = u + f contractive there (Bai et al. 2021's Jacobian regularisation,
            # Hutchinson estimate of |J_g|_F^2 / n from torchdeq), so iterating past it cannot drift away.
            from torchdeq.loss import jac_reg
            point = states[-1].detach().requires_grad_(c.jacobian_weight > 0)
            update = self.residual(fixed, moving, point)
            terms = []
            if c.residual_weight > 0:
                terms.append(c.residual_weight * update.pow(2).mean())
            if c.jacobian_weight > 0:
                terms.append(c.jacobian_weight * jac_reg(point + update, point))
            self.auxiliary_loss = sum(terms)
        return list(states)

    def _zero(self, fixed: torch.Tensor) -> torch.Tensor:
        return fixed.new_zeros((fixed.shape[0], self.config.ndim, *fixed.shape[2:]))

    @torch.no_grad()
    def iterate(self, fixed: torch.Tensor, moving: torch.Tensor, max_iter: int | None = None,
                tolerance: float | None = None, init: torch.Tensor | None = None,
                solver: str | None = None, damping: float | None = None) -> Iterator[DEQState]:
        """Every solver evaluation as it happens; the last one met the tolerance or used up ``max_iter``.
        ``damping`` < 1 moves each iterate only that far towards ``g(u)`` (torchdeq's ``tau``): the same fixed
        point, reached more slowly but without the oscillation a non-contractive ``g`` can start (None: the
        checkpoint's)."""
        max_iter = max_iter or self.config.max_iter
        tolerance = self.config.tolerance if tolerance is None else tolerance
        u0 = self._zero(fixed) if init is None else init
        for k, (u, gu) in enumerate(stream_solver(solver or self.config.solver, self._map(fixed, moving), u0,
                                                  max_iter, tau=damping or self.config.damping), start=1):
            update = gu - u
            relative = float(update.norm() / (gu.norm() + 1e-9))  # torchdeq's 'rel' stop criterion
            yield DEQState(k, gu, update, relative)
            if relative < tolerance:
                return


class _Stop(Exception):
    """Raised inside the solver thread to end a solve the consumer no longer wants."""


def stream_solver(name: str, func: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor,
                  max_iter: int, **solver_kwargs) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run torchdeq's solver ``name`` on ``func`` and yield ``(z, func(z))`` for every evaluation, in step.

    torchdeq's solvers loop internally with no per-iteration hook, and a clinician watches every iteration:
    the solver runs in a helper thread that hands each evaluation over and waits until the consumer asks
    for the next, so nothing is computed ahead and closing this generator stops the solver cleanly.
    """
    from torchdeq.solver import get_solver
    solver = get_solver(name)
    to_consumer: queue.Queue = queue.Queue(maxsize=1)
    to_solver: queue.Queue = queue.Queue(maxsize=1)

    def evaluate(z: torch.Tensor) -> torch.Tensor:
        z = z.view_as(z0)
        gz = func(z)
        to_consumer.put(("evaluation", z, gz))
        if to_solver.get() == "stop":
            raise _Stop
        return gz

    def run() -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                solver(evaluate, z0, max_iter=max_iter, tol=0.0, stop_mode="rel", return_final=True,
                       **solver_kwargs)
            to_consumer.put(("done", None, None))
        except _Stop:
            to_consumer.put(("done", None, None))
        except BaseException as exc:  # handed to the consumer, who raises it in its own thread
            to_consumer.put(("error", exc, None))

    thread = threading.Thread(target=run, name=f"torchdeq-{name}", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            kind, a, b = to_consumer.get()
            if kind == "done":
                finished = True
                return
            if kind == "error":
                finished = True
                raise a
            yield a, b
            to_solver.put("next")
    finally:
        if not finished:  # the consumer stopped early: release the waiting solver with "stop"
            to_solver.put("stop")
            while to_consumer.get()[0] == "evaluation":  # drain until the thread reports its end
                to_solver.put("stop")
        thread.join()
