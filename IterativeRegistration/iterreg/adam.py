"""Adam for the few tensors an image registration optimises directly (a dense field, a Gaussian's parameters).

The update is torch.optim.Adam's (its single-tensor CPU path, same defaults, same order of operations, so the
same numbers). Written here because constructing any torch.optim optimizer imports torch._dynamo, 0.8 s per
process (measured on a 2-core CPU), which a fresh worker pays in every run: more than a whole polish iteration at
128^3 (iterreg/methods/polish.py). DIO's optimization layer has its own, normalised, update
(feature_optimizer.py).
"""
from __future__ import annotations

import torch

__all__ = ["Adam"]


class Adam:
    """``Adam([tensor], lr)``; then per iteration: ``zero_grad()``, backward, ``step()`` (as torch.optim.Adam)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = float(lr), betas, float(eps)
        self.step_count = 0
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        correction1 = 1 - self.beta1 ** self.step_count
        correction2_sqrt = (1 - self.beta2 ** self.step_count) ** 0.5
        for p, (mean, square) in zip(self.params, self.moments):
            if p.grad is None:
                continue
            mean.lerp_(p.grad, 1 - self.beta1)
            square.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            p.addcdiv_(mean, (square.sqrt() / correction2_sqrt).add_(self.eps), value=-self.lr / correction1)
