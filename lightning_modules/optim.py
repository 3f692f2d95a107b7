"""Every optimizer and learning-rate schedule of the project, in one place.

Detection training (``DetectionModule``), the GAN stages (G, D and the extractor M) and the bench
all build their optimizers with :func:`build_optimizer` (so ``optim.scale_lr`` means the same thing
everywhere) and their schedules with :func:`build_scheduler` (stepped once per iteration). The
crop-classification warm start of ``pyramidlab-pretrain`` has its own, :func:`one_cycle_adamw`.

Scheduler config keys (``optim.scheduler``, ``srf.stageN.scheduler``):

* ``name``: ``step | cosine | constant``;
* ``warmup_iters``, ``warmup_ratio``: linear warmup from ``warmup_ratio`` to 1 (MMDetection's LinearWarmup);
* ``milestones``: epochs at which the lr is multiplied by ``gamma`` (``step``), converted with the
  iterations per epoch; or ``milestone_iters``: the same in iterations (the SRF-GAN paper states
  its schedules in iterations: "decay it by a factor of 0.1 at 120k iterations"), which wins;
* ``final_ratio``: the lr factor ``cosine`` ends at.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

log = logging.getLogger("pyramidlab")

SCHEDULES = ("step", "cosine", "constant")
SCHEDULER_KEYS = ("name", "warmup_iters", "warmup_ratio", "milestones", "milestone_iters", "gamma", "final_ratio")


# ---------------------------------------------------------------------------------- lr factors
def warmup_multistep_factor(
    step: int,
    *,
    warmup_iters: int,
    warmup_ratio: float,
    milestones: list[int],
    gamma: float,
) -> float:
    """LR multiplier at iteration ``step``: linear warmup, then ×gamma at each milestone (iterations)."""
    factor = gamma ** bisect.bisect_right(sorted(milestones), step)
    if warmup_iters > 0 and step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_ratio * (1 - alpha) + alpha
    return factor


def warmup_cosine_factor(step: int, *, warmup_iters: int, warmup_ratio: float, total: int, final_ratio: float) -> float:
    """Linear warmup then cosine decay to ``final_ratio`` at ``total`` iterations."""
    if warmup_iters > 0 and step < warmup_iters:
        alpha = step / warmup_iters
        return warmup_ratio * (1 - alpha) + alpha
    t = min(1.0, (step - warmup_iters) / max(1, total - warmup_iters))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------- schedules
def check_scheduler(cfg: Mapping[str, Any] | None, key: str = "optim.scheduler") -> dict[str, Any]:
    """The scheduler config as a plain dict; one-line errors naming ``key`` for unknown names or keys."""
    cfg = dict(cfg or {})
    name = cfg.get("name", "step")
    if name not in SCHEDULES:
        raise ValueError(f"{key}.name={name!r} is not known; choose one of {list(SCHEDULES)}")
    unknown = sorted(set(cfg) - set(SCHEDULER_KEYS))
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown}; expected some of {list(SCHEDULER_KEYS)}")
    for k in ("warmup_iters",):
        if int(cfg.get(k, 0)) < 0:
            raise ValueError(f"{key}.{k}={cfg[k]} must be >= 0")
    return cfg


def lr_factor(cfg: Mapping[str, Any], total: int, per_epoch: int) -> Callable[[int], float]:
    """The lr multiplier as a function of the iteration, for ``total`` iterations of ``per_epoch`` each."""
    cfg = check_scheduler(cfg)
    name = cfg.get("name", "step")
    warmup = dict(warmup_iters=int(cfg.get("warmup_iters", 0)), warmup_ratio=float(cfg.get("warmup_ratio", 0.001)))
    if name == "step":
        if cfg.get("milestone_iters") is not None:
            milestones = [int(m) for m in cfg["milestone_iters"]]
        else:
            milestones = [int(m * per_epoch) for m in cfg.get("milestones") or []]
        return functools.partial(warmup_multistep_factor, milestones=milestones, gamma=float(cfg.get("gamma", 0.1)), **warmup)
    if name == "cosine":
        return functools.partial(warmup_cosine_factor, total=total, final_ratio=float(cfg.get("final_ratio", 0.01)), **warmup)
    return functools.partial(warmup_multistep_factor, milestones=[], gamma=1.0, **warmup)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any] | None, total: int, per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per iteration (see the module docstring for ``cfg``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg or {}, total, per_epoch))


def iteration_budget(trainer: Any, steps_per_iteration: int = 1) -> tuple[int, int]:
    """(total iterations, iterations per epoch) of a fit.

    ``steps_per_iteration``: Lightning optimizer steps per batch — 1 for detection, 2 for the GAN
    stages (a D step and a G step; ``trainer.max_steps`` counts optimizer steps, Lightning #17958).
    """
    est = trainer.estimated_stepping_batches  # batches, capped by max_steps (in optimizer steps)
    if trainer.max_steps is not None and trainer.max_steps > 0:
        est = min(est, math.ceil(trainer.max_steps / steps_per_iteration))
    total = max(1, int(est)) if math.isfinite(est) else 1
    per_epoch = trainer.num_training_batches  # set up by estimated_stepping_batches
    if not (isinstance(per_epoch, int | float) and math.isfinite(per_epoch) and per_epoch > 0):
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        per_epoch = math.ceil(total / epochs)
    return total, max(1, int(per_epoch))


# ---------------------------------------------------------------------------------- optimizers
def _num_devices(tcfg: DictConfig) -> int:
    """Processes per node that ``trainer.devices`` asks for, as Lightning counts them."""
    devices = tcfg.get("devices", 1)
    gpu = str(tcfg.get("accelerator", "cpu")) in ("gpu", "cuda")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in (-1, "auto"):
        if not gpu:
            if devices == "auto":
                return 1  # Lightning's CPU "auto" is one process
            raise ValueError("trainer.devices=-1 means all GPUs but trainer.accelerator is cpu; set a number")
        if torch.cuda.device_count() < 1:
            raise ValueError(f"trainer.devices={devices} counts the visible GPUs and there are none; set a number")
        return torch.cuda.device_count()
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, int) and devices > 0:
        return devices
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        return len(devices)
    raise ValueError(f"trainer.devices={devices!r}: expected a positive int, -1, 'auto' or a list of device ids")


def total_batch_size(cfg: DictConfig) -> int:
    """Images per optimizer step: batch × devices × nodes × gradient accumulation."""
    tcfg = cfg.trainer
    return (
        int(cfg.data.batch_size)
        * _num_devices(tcfg)
        * int(tcfg.get("num_nodes", 1) or 1)
        * int(tcfg.get("accumulate_grad_batches", 1) or 1)
    )


def batch_scale(cfg: DictConfig) -> float:
    """``total batch / optim.base_batch_size``: the papers state lrs and iterations for 16 images."""
    base = int(cfg.optim.get("base_batch_size", 16))
    if base <= 0:
        raise ValueError(f"optim.base_batch_size={base}: expected a positive number of images")
    return total_batch_size(cfg) / base


def build_optimizer(cfg: DictConfig, node: DictConfig | None = None, key: str = "optim.optimizer") -> functools.partial:
    """A partial optimizer from ``node`` (default ``cfg.optim.optimizer``), lr scaled if ``optim.scale_lr``.

    The papers' "linearly scaled learning rate": ``lr × total batch / optim.base_batch_size``
    (the configs' lr values are for 16 images, the reference 8 GPUs × 2). Every optimizer of the
    project is built here — detection, the GAN stages' G, D and M, the bench — so scaling means
    the same everywhere. ``key`` names the node in errors.
    """
    node = cfg.optim.optimizer if node is None else node
    opt = instantiate(node)
    if not isinstance(opt, functools.partial):
        raise ValueError(f"{key}: {node.get('_target_')}: expected `_partial_: true` (a constructor waiting for "
                         "the parameters)")
    lr = opt.keywords.get("lr")
    if lr is not None and not (isinstance(lr, int | float) and lr > 0):
        raise ValueError(f"{key}.lr={lr!r} must be a positive number")
    if not cfg.optim.get("scale_lr", False):
        return opt
    if lr is None:
        raise ValueError(f"optim.scale_lr=true needs an explicit lr in {key}")
    scale = batch_scale(cfg)
    scaled = float(lr) * scale
    log.info(f"optim.scale_lr: {key}.lr {lr} x {total_batch_size(cfg)} images per step / "
             f"{cfg.optim.get('base_batch_size', 16)} = {scaled:g}")
    return functools.partial(opt.func, *opt.args, **{**opt.keywords, "lr": scaled})


def one_cycle_adamw(
    params: Any, *, lr: float, weight_decay: float, total: int, warmup_frac: float
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW with torch's one-cycle schedule (``lr``/25 up to ``lr`` over ``warmup_frac`` of ``total``
    iterations, then cosine down): the classification warm start of ``pyramidlab-pretrain``
    (``pretrain.lr``, ``pretrain.weight_decay``, ``pretrain.warmup_frac``), not a detection schedule.
    Its settings are not ``optim.*`` ones: the cached weights are keyed on ``pretrain`` alone, so a
    change of the detection optimizer never invalidates them."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total, pct_start=warmup_frac)


# ---------------------------------------------------------------------------------- guard
def check_finite(where: str, terms: Mapping[str, Tensor], stage: str | None = None) -> None:
    """Divergence guard: raise at once, in one line, if any loss term is NaN or Inf.

    Called before the backward, so no parameter sees the bad value; checkpoint callbacks do not
    save on an exception, so the last good checkpoint stays on disk. ``where`` names the step
    (e.g. ``"epoch 3, step 120"``), ``stage`` (optional) prefixes the message.
    """
    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
    if bad:
        values = [float(terms[k].detach().float().mean()) for k in bad]
        raise FloatingPointError(
            f"{stage + ': ' if stage else ''}non-finite loss at {where}: {', '.join(bad)} = {values}; lower the learning rate or lengthen "
            "the warmup (the last good checkpoint is kept)"
        )
