"""The training loop, for any learned method that offers the training hooks (``build_network``,
``default_architecture``, ``predict``): CPU, one GPU, or many through ``torchrun`` (DDP).

Run folder: ``config.yaml`` (effective config), ``last_state.pt`` (everything needed to resume: weights,
optimizer, scheduler, every rank's RNG states; written atomically), ``last.safetensors`` and
``best.safetensors`` (checkpoints the module loads), ``history.jsonl`` (validation), ``tensorboard/``.
Only rank 0 writes. Resuming after a kill continues from the last saved iteration and reproduces an
uninterrupted run exactly on the same machine (deterministic CPU kernels).
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from iterreg import losses
from iterreg.atomic import atomic_file, interrupted_writes
from iterreg.checkpoints import save_checkpoint
from iterreg.devices import resolve_device
from iterreg.errors import InputError
from iterreg.methods import get_method
from iterreg.metrics import dice
from iterreg.networks import precision
from iterreg.networks.unet import prefer_fast_cpu_layout
from iterreg.spatial import sample_displacement_at, vector_length, warp, warp_labels

from .coarse_moving import CoarseMovingSettings
from .datasets import Pair, PairSource

__all__ = ["train", "registration_loss", "Distributed"]

STATE_FILE = "last_state.pt"


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def registration_loss(fixed, moving, displacements, loss_config: dict, fixed_labels=None, moving_labels=None,
                      step_weights=None) -> tuple[torch.Tensor, dict]:
    """Weighted sum over the method's steps of similarity + lambda * regularizer (+ Dice with labels).
    ``loss_config["regularize"] = "last"`` regularizes only the final displacement, once (R2N2's Eq. 6)."""
    sim_kwargs = {"window": loss_config["window"]} if loss_config["similarity"] == "lncc" else {}
    weights = step_weights or [1.0] * len(displacements)
    if len(weights) != len(displacements):
        raise InputError(f"loss.step_weights has {len(weights)} entries for {len(displacements)} steps")
    total = 0.0
    parts = {"similarity": 0.0, "regularizer": 0.0, "steps": []}
    last_only = loss_config.get("regularize", "every") == "last"
    if loss_config.get("regularize", "every") not in ("every", "last"):
        raise InputError(f"loss.regularize must be 'every' or 'last', got {loss_config['regularize']!r}")
    for t, (weight, u) in enumerate(zip(weights, displacements)):
        warped = warp(moving, u)
        sim = losses.similarity_loss(loss_config["similarity"], fixed, warped, **sim_kwargs)
        step = sim
        if not last_only or t == len(displacements) - 1:
            reg = losses.regularizer_loss(loss_config["regularizer"], u)
            regularization = loss_config["regularization_weight"] * reg
            # the final field's regularizer counts once, whatever that step's similarity weight
            step = step + (regularization / weight if last_only else regularization)
        if loss_config.get("dice_weight", 0) > 0 and fixed_labels is not None and moving_labels is not None:
            step = step + loss_config["dice_weight"] * _soft_dice_loss(fixed_labels, moving_labels, u)
        total = total + weight * step
        parts["steps"].append(float(step.detach()))
    parts["similarity"], parts["regularizer"] = float(sim.detach()), float(reg.detach())
    return total, parts


def _soft_dice_loss(fixed_labels, moving_labels, u) -> torch.Tensor:
    from monai.losses import DiceLoss
    values = torch.unique(torch.cat([fixed_labels.flatten(), moving_labels.flatten()]))
    fixed_1h = torch.stack([(fixed_labels[:, 0] == v).float() for v in values], 1)
    moving_1h = torch.stack([(moving_labels[:, 0] == v).float() for v in values], 1)
    return DiceLoss(include_background=False)(warp(moving_1h, u), fixed_1h)


def _batch(pairs: list[Pair], device) -> dict:
    stack = lambda key: torch.stack([getattr(p, key) for p in pairs]).to(device)  # noqa: E731
    batch = {"fixed": stack("fixed"), "moving": stack("moving"), "fixed_labels": None, "moving_labels": None}
    if all(p.fixed_labels is not None for p in pairs):
        batch["fixed_labels"], batch["moving_labels"] = stack("fixed_labels"), stack("moving_labels")
    return batch


def _augment(pair: Pair, rng: np.random.Generator) -> Pair:
    """Flip both images (and labels) along random axes: the same anatomy, another orientation."""
    axes = [1 + a for a in range(pair.fixed.dim() - 1) if rng.random() < 0.5]
    if not axes:
        return pair
    flip = lambda t: None if t is None else torch.flip(t, axes)  # noqa: E731
    return Pair(flip(pair.fixed), flip(pair.moving), flip(pair.fixed_labels), flip(pair.moving_labels),
                spacing=pair.spacing, name=pair.name + " (flipped)")


@torch.no_grad()
def validate(method_cls, network, pairs: list[Pair], loss_config: dict, device,
             coarse: CoarseMovingSettings | None = None) -> dict:
    """Mean similarity loss, Dice and TRE (mm) of the final displacement on the validation pairs; with ``coarse``
    also ``coarse_*`` scores with each moving image re-acquired on a coarser grid."""
    metrics = _validate(method_cls, network, pairs, loss_config, device, None, None)
    if coarse is not None:
        factors = coarse.validation_factors(pairs[0].fixed.dim() - 1)
        metrics.update({f"coarse_{k}": v for k, v in
                        _validate(method_cls, network, pairs, loss_config, device, coarse, factors).items()})
    return metrics


def _validate(method_cls, network, pairs, loss_config, device, coarse, coarse_factors) -> dict:
    network.eval()
    sim_kwargs = {"window": loss_config["window"]} if loss_config["similarity"] == "lncc" else {}
    scores = {"similarity": [], "dice": [], "tre_mm": []}
    for pair in pairs:
        fixed, moving = pair.fixed[None].to(device), pair.moving[None].to(device)
        own = {} if coarse_factors is None else coarse.predict_arguments(moving, pair.spacing, coarse_factors)
        u = method_cls.predict(network, fixed, moving, **own)[-1]
        scores["similarity"].append(float(losses.similarity_loss(loss_config["similarity"], fixed, warp(moving, u),
                                                                 **sim_kwargs)))
        if pair.fixed_labels is not None:
            warped = warp_labels(pair.moving_labels[None].to(device), u)[0, 0].cpu().numpy()
            scores["dice"].append(dice(pair.fixed_labels[0].numpy(), warped)["mean"])
        if pair.fixed_points is not None:
            mapped = pair.fixed_points + sample_displacement_at(u.cpu(), pair.fixed_points)
            spacing = torch.tensor(pair.spacing or (1.0,) * u.shape[1])
            scores["tre_mm"].append(float(((mapped - pair.moving_points) * spacing).norm(dim=1).mean()))
    network.train()
    return {k: float(np.mean(v)) for k, v in scores.items() if v}


def _score(metrics: dict) -> float:
    """Higher is better: Dice if there are labels (the mean with the coarse-moving Dice when validated on both),
    else minus TRE, else minus the similarity loss."""
    if "dice" in metrics:
        return float(np.mean([metrics["dice"], metrics.get("coarse_dice", metrics["dice"])]))
    if "tre_mm" in metrics:
        return -metrics["tre_mm"]
    return -metrics["similarity"]


def train(config: dict, source: PairSource, out: str | Path, resume: bool = False, device: str = "auto",
          progress: bool = True, debug_ranks: bool = False) -> dict:
    out = Path(out)
    device_t = resolve_device(device)
    ddp = Distributed.from_environment(device_t)
    if device_t.type == "cuda" and ddp.world > 1:
        device_t = torch.device(f"cuda:{ddp.local_rank}")
        torch.cuda.set_device(device_t)
    if config["training"].get("amp") and not precision.bfloat16_is_native(device_t):
        raise InputError(f"training.amp (bfloat16 convolutions) is not native on this {device_t.type} (a CPU needs "
                         "AVX512-BF16 or AMX, a GPU compute capability 8+), where it would be slower than float32; "
                         "set training.amp false")
    state_path = out / STATE_FILE
    if ddp.main:
        if state_path.exists() and not resume:
            raise InputError(f"'{out}' already holds a training run; pass --resume to continue it or choose a new --out")
        if resume and not state_path.exists():
            raise InputError(f"nothing to resume in '{out}' ({STATE_FILE} is missing); drop --resume to start afresh")
        out.mkdir(parents=True, exist_ok=True)
        for name in (STATE_FILE, "last.safetensors", "best.safetensors", "history.jsonl", "config.yaml"):
            for leftover in interrupted_writes(out / name):  # a run killed mid-write; the real file is whole
                leftover.unlink()
        with atomic_file(out / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(config, sort_keys=False))

    t_cfg, loss_cfg, opt_cfg = config["training"], config["loss"], config["optimizer"]
    method_cls = get_method(config["method"])
    if not hasattr(method_cls, "predict"):
        raise InputError(f"method '{config['method']}' cannot be trained (it has no training hooks)")
    ndim = len(config["data"]["shape"])
    architecture = _architecture(method_cls, config, ndim)
    coarse = CoarseMovingSettings.from_config(config["data"], method_cls)
    torch.manual_seed(t_cfg["seed"])  # identical initial weights on every rank
    random.seed(t_cfg["seed"])
    network = method_cls.build_network(architecture)
    if t_cfg.get("init_from") and not resume:
        _load_initial_weights(network, t_cfg["init_from"], config["method"])
    network = prefer_fast_cpu_layout(network.to(device_t), device_t)  # before the optimizer sees the weights
    # training.amp: the convolutional blocks in bfloat16, as `precision=bfloat16` at inference; warps, inner
    # gradients and losses stay float32 (an autocast of the whole forward pass drove RIIR's 3D training to NaN)
    network = precision.compute_in_precision(network, "bfloat16" if t_cfg.get("amp") else "float32", device_t)
    model = network
    if ddp.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device_t.index] if device_t.type == "cuda" else None)
    optimizer = torch.optim.Adam(network.parameters(), lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"],
                                 amsgrad=bool(opt_cfg.get("amsgrad", False)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    data_rng = np.random.default_rng([t_cfg["seed"], ddp.rank])  # each rank draws its own pairs
    start, best, history = 0, -float("inf"), []

    if resume:
        state = torch.load(state_path, map_location="cpu", weights_only=True)  # tensors and plain data only
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"][ddp.rank]
        torch.set_rng_state(rng["torch"])
        data_rng.bit_generator.state = json.loads(rng["numpy"])
        start, best, history = state["iteration"], state["best"], json.loads(state["history"])

    writer = None
    if ddp.main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start if resume else None)
    validation = source.validation_pairs() if ddp.main else []
    bar = None
    if ddp.main and progress:
        from tqdm import tqdm
        bar = tqdm(total=t_cfg["iterations"], initial=start, desc=f"train {config['method']}", unit="it")

    network.train()
    seen = []
    t0 = time.perf_counter()
    for iteration in range(start, t_cfg["iterations"]):
        pairs = [source.train_pair(data_rng) for _ in range(t_cfg["batch_size"])]
        if config["data"].get("augment"):
            pairs = [_augment(p, data_rng) for p in pairs]
        seen.append(pairs[0].name)
        batch = _batch(pairs, device_t)
        factors = coarse.draw(ndim, data_rng) if coarse is not None else None
        own = {} if factors is None else coarse.predict_arguments(batch["moving"], pairs[0].spacing, factors)
        displacements = _predict(method_cls, model, batch["fixed"], batch["moving"], **own)
        weights = loss_cfg.get("step_weights") or _method_step_weights(method_cls, network, len(displacements))
        loss, parts = registration_loss(batch["fixed"], batch["moving"], displacements, loss_cfg,
                                        batch["fixed_labels"], batch["moving_labels"], weights)
        auxiliary = getattr(network, "auxiliary_loss", None)  # a method's own extra term (DEQReg residual_weight)
        if auxiliary is not None:
            loss = loss + auxiliary
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # a rare extreme pair must not throw the weights away (grad_clip, see Docs/training.md); the norm also
        # tells whether the step is finite: the same on every rank, since DDP has averaged the gradients
        norm = torch.nn.utils.clip_grad_norm_(network.parameters(), opt_cfg.get("grad_clip") or float("inf"))
        if not (torch.isfinite(loss.detach()) and torch.isfinite(norm)):
            saved = iteration // t_cfg["checkpoint_every"] * t_cfg["checkpoint_every"]
            kept = f"last.safetensors is from iteration {saved}" if saved else "no checkpoint was written yet"
            raise InputError(f"training diverged at iteration {iteration + 1}: the loss ({float(loss.detach()):.4g})"
                             f" or its gradient is not finite. Nothing of this iteration was applied and '{out}' is "
                             f"as it was ({kept}). Lower the learning rate, set optimizer.grad_clip, or set "
                             "training.amp false")
        optimizer.step()
        scheduler.step()
        done = iteration + 1
        if writer is not None and (done % t_cfg["log_every"] == 0 or done == 1):
            writer.add_scalar("train/loss", float(loss.detach()), done)
            writer.add_scalar("train/similarity", parts["similarity"], done)
            writer.add_scalar("train/regularizer", parts["regularizer"], done)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], done)
            for t, value in enumerate(parts["steps"]):
                writer.add_scalar(f"train/step_loss/{t + 1}", value, done)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if ddp.main and (done % t_cfg["validate_every"] == 0 or done == t_cfg["iterations"]):
            metrics = validate(method_cls, network, validation, loss_cfg, device_t, coarse)
            history.append({"iteration": done, **metrics})
            for key, value in metrics.items():
                writer.add_scalar(f"validation/{key}", value, done)
            writer.add_image("validation/fixed_moving_warped_field", _picture(method_cls, network, validation[0],
                                                                              device_t), done)
            if _score(metrics) > best:
                best = _score(metrics)
                save_checkpoint(out / "best.safetensors", network.state_dict(),
                                _metadata(config, architecture, source, metrics, done, ndim))
            with atomic_file(out / "history.jsonl") as tmp:
                tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
        if done % t_cfg["checkpoint_every"] == 0 or done == t_cfg["iterations"]:
            _save_state(out, ddp, network, optimizer, scheduler, data_rng, done, best, history, config,
                        architecture, source, ndim)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if debug_ranks:
        checksum = float(sum(p.double().sum() for p in network.parameters()))
        print(json.dumps({"rank": ddp.rank, "world": ddp.world, "first_pairs": seen[:3], "checksum": checksum}),
              flush=True)
    if ddp.world > 1:
        dist.barrier()
    return {"iterations": t_cfg["iterations"], "seconds": time.perf_counter() - t0,
            "validation": history[-1] if history else {}, "rank": ddp.rank}


def _architecture(method_cls, config: dict, ndim: int) -> dict:
    """The method's default architecture for ``ndim``, updated with what the config sets (a partial dict,
    e.g. ``--set architecture.inner_loss=nmi``)."""
    architecture = method_cls.default_architecture(ndim)
    unknown = sorted(set(config.get("architecture") or {}) - set(architecture))
    if unknown:
        raise InputError(f"unknown architecture key(s) {', '.join(unknown)} for {config['method']}; known: "
                         f"{', '.join(sorted(architecture))}")
    architecture.update(config.get("architecture") or {})
    if architecture.get("ndim", ndim) != ndim:
        raise InputError(f"architecture.ndim {architecture['ndim']} does not match data.shape ({ndim}D)")
    return architecture


def _load_initial_weights(network, path: str, method: str) -> None:
    """Fine-tuning: start from a checkpoint of the same method and architecture (weights only). A convolution
    that takes more input channels here than in the checkpoint (an input added last, e.g. RIIR's
    ``detail_input``) gets the checkpoint's weights for the channels it had and zeros for the new ones, so the
    fine-tune starts from exactly the checkpoint's network."""
    from iterreg.checkpoints import read_checkpoint
    weights, _ = read_checkpoint(path, method)
    own = network.state_dict()
    for name, value in weights.items():
        target = own.get(name)
        if (target is not None and value.dim() >= 3 and target.dim() == value.dim()
                and target.shape[0] == value.shape[0] and target.shape[2:] == value.shape[2:]
                and target.shape[1] > value.shape[1]):
            widened = torch.zeros_like(target)
            widened[:, :value.shape[1]] = value
            weights[name] = widened
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise InputError(f"training.init_from '{path}' does not fit this architecture: "
                         f"{str(exc).splitlines()[0]}") from None


def _method_step_weights(method_cls, network, count: int):
    """The outer-loss weight of each step the method returned: its own rule (RIIR's exponential weights,
    DEQReg's state correction), else uniform."""
    rule = getattr(method_cls, "step_weights", None)
    return rule(network, count) if rule is not None else None


def _predict(method_cls, model, fixed, moving, **kwargs):
    # DDP must see the forward call on the wrapper for its gradient hooks; ``predict`` calls model(x).
    return method_cls.predict(model, fixed, moving, **kwargs) if not hasattr(model, "module") else \
        method_cls.predict(_DDPView(model), fixed, moving, **kwargs)


class _DDPView(torch.nn.Module):
    """``predict`` reads ``network.config``; DDP hides it under ``.module``. A multi-step method runs all its
    steps inside one forward call, so DDP sees one forward and one backward per iteration."""

    def __init__(self, ddp_model):
        super().__init__()
        self.ddp = ddp_model
        self.config = ddp_model.module.config

    def forward(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)


def _schedule(config: dict):
    total = config["training"]["iterations"]
    warmup = config["schedule"].get("warmup_iterations", 0)
    name = config["schedule"]["name"]
    if name not in ("constant", "cosine"):
        raise InputError(f"unknown schedule '{name}'; choose constant or cosine")

    def factor(i: int) -> float:
        if warmup and i < warmup:
            return (i + 1) / warmup
        if name == "cosine":  # a Python float: numpy scalars in the scheduler state would fail the safe resume load
            return float(0.5 * (1 + np.cos(np.pi * min(i, total) / total)))
        return 1.0
    return factor


def _metadata(config, architecture, source, metrics, iteration, ndim) -> dict:
    loss = config["loss"]
    return {"method": config["method"], "architecture": architecture, "ndim": ndim,
            "training": {"similarity": loss["similarity"], "window": loss["window"], "iteration": iteration,
                         "config": config},
            "preprocessing": {"resample": "moving onto the fixed grid (linear, physical space)",
                              "intensity": "clip to the (1, 99) percentiles, scale to [0, 1]",
                              "training_shape": list(config["data"]["shape"])},
            "data": source.summary(), "metrics": metrics}


def _save_state(out, ddp, network, optimizer, scheduler, data_rng, done, best, history, config, architecture,
                source, ndim) -> None:
    rng = {"torch": torch.get_rng_state(), "numpy": json.dumps(data_rng.bit_generator.state)}
    every_rank = [rng]
    if ddp.world > 1:
        every_rank = [None] * ddp.world
        dist.all_gather_object(every_rank, rng)
    if not ddp.main:
        return
    state = {"iteration": done, "model": network.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": every_rank, "best": best, "history": json.dumps(history)}
    with atomic_file(out / STATE_FILE) as tmp:
        torch.save(state, tmp)
    metrics = history[-1] if history else {}
    save_checkpoint(out / "last.safetensors", network.state_dict(),
                    _metadata(config, architecture, source, metrics, done, ndim))


def _picture(method_cls, network, pair: Pair, device) -> torch.Tensor:
    """[3, H, 4W] image: fixed | moving | warped | displacement magnitude, central slice."""
    with torch.no_grad():
        network.eval()
        fixed, moving = pair.fixed[None].to(device), pair.moving[None].to(device)
        u = method_cls.predict(network, fixed, moving)[-1]
        warped = warp(moving, u)
        network.train()
    magnitude = vector_length(u)[:, None]
    magnitude = magnitude / magnitude.max().clamp_min(1e-6)
    tiles = []
    for volume in (fixed, moving, warped, magnitude):
        array = volume[0, 0].float().cpu()
        if array.dim() == 3:
            array = array[array.shape[0] // 2]
        tiles.append(torch.flip(array.clamp(0, 1), [0]))
    return torch.cat(tiles, dim=1)[None].expand(3, -1, -1)
