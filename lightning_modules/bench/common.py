"""Shared by the bench sections: section names, config checks, devices, progress bars, timing stats,
and the training plumbing of the sections that train (``framework``/``data`` and ``convergence``): the
Lightning arm's config and callbacks, the plain arm's batches, optimizer and step."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from detection.detectors import Detector
from lightning_modules import builders as B
from lightning_modules import outputs as OUT
from lightning_modules.paths import CONF_DIR

console = OUT.console

SECTIONS = ("necks", "framework", "data", "eval", "data_scale", "convergence")
# Trainer precision -> autocast dtype of the plain loop and of the GPU latency rows.
AUTOCAST = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
GPU_VARIANTS = ("bf16-mixed", "16-mixed", "channels_last")
FP32 = "fp32"
# Lightning's framework files: their self time is the overhead the framework section looks for.
FRAMEWORK_FILES = ("/lightning/", "/lightning_utilities/", "/torchmetrics/", "/rich/")


# ------------------------------------------------------------------------------------- config
def group_options(group: str) -> list[str]:
    """Option names of config group ``group`` (``conf/<group>/**.yaml``, subfolders as ``a/b``)."""
    root = Path(CONF_DIR) / group
    return sorted(str(p.relative_to(root).with_suffix("").as_posix()) for p in root.rglob("*.yaml"))


def _names(key: str, value: Any) -> list[str]:
    if not OmegaConf.is_list(value) or not len(value):
        raise ValueError(f"{key}={value} must be a non-empty list, e.g. {key}=[a,b]")
    return [str(v) for v in value]


def _check_choices(key: str, values: list[str], group: str) -> None:
    choices = group_options(group)
    for v in values:
        if v not in choices:
            raise ValueError(f"{key}: unknown {group} {v!r}; choose from conf/{group}/: {choices}")


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key}={value} must be an integer >= {minimum}")
    return value


def bench_options(cfg: DictConfig) -> DictConfig:
    """Validate ``cfg.bench`` (one-line errors naming the key) and return it resolved."""
    if cfg.get("bench") is None:
        raise ValueError("the config has no `bench` node; run pyramidlab-bench (conf/bench.yaml)")
    b = OmegaConf.create(OmegaConf.to_container(cfg.bench, resolve=True))
    for s in _names("bench.sections", b.sections):
        if s not in SECTIONS:
            raise ValueError(f"bench.sections: unknown section {s!r}; choose from {list(SECTIONS)}")
    if b.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"bench.device={b.device!r} is not known; choose auto, cpu or cuda")
    if b.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench.device=cuda but no CUDA device is visible; use bench.device=auto or cpu")
    _check_choices("bench.detectors", _names("bench.detectors", b.detectors), "detector")
    _check_choices("bench.necks", _names("bench.necks", b.necks), "neck")
    _check_choices("bench.reference_neck", [b.reference_neck], "neck")
    _check_choices("bench.backbone", [b.backbone], "backbone")
    if b.reference_neck not in b.necks:
        # the ratios are the point of the table: measure the reference alongside
        b.necks = [b.reference_neck, *b.necks]
    if not OmegaConf.is_list(b.size) or len(b.size) != 2 or not all(isinstance(v, int) and v >= 32 for v in b.size):
        raise ValueError(f"bench.size={b.size} must be [H, W], two integers >= 32")
    if b.threads is not None:
        _positive_int("bench.threads", b.threads)
    _positive_int("bench.num_classes", b.num_classes)
    _positive_int("bench.repeats", b.repeats)
    _positive_int("bench.warmup", b.warmup, 0)
    if not OmegaConf.is_list(b.gpu_variants) or not OmegaConf.is_list(b.model_overrides):
        raise ValueError("bench.gpu_variants and bench.model_overrides must be lists (empty: [])")
    for v in b.gpu_variants:
        if v not in GPU_VARIANTS:
            raise ValueError(f"bench.gpu_variants: unknown variant {v!r}; choose from {list(GPU_VARIANTS)}")
    _positive_int("bench.framework.rounds", b.framework.rounds)
    # >= 1: the first step pays for worker start-up and allocations in both arms
    _positive_int("bench.framework.warmup_steps", b.framework.warmup_steps)
    _positive_int("bench.framework.steps", b.framework.steps)
    if b.eval.split not in ("train", "val"):
        raise ValueError(f"bench.eval.split={b.eval.split!r} is not known; choose train or val")
    _positive_int("bench.eval.images", b.eval.images)
    _positive_int("bench.eval.detections_per_image", b.eval.detections_per_image)
    _positive_int("bench.eval.repeats", b.eval.repeats)
    if not 0 <= float(b.eval.jitter) < 1:
        raise ValueError(f"bench.eval.jitter={b.eval.jitter} must be in [0, 1)")
    c = b.convergence
    if not OmegaConf.is_list(c.seeds) or not len(c.seeds) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in c.seeds) or len(set(c.seeds)) != len(c.seeds):
        raise ValueError(f"bench.convergence.seeds={c.seeds} must be a non-empty list of distinct integers, e.g. [0,1,2]")
    if c.max_steps is not None:
        # >= 2: the clock runs from the end of the first step (worker start-up) to the end of the last
        _positive_int("bench.convergence.max_steps", c.max_steps, 2)
    if c.eval_images is not None:
        _positive_int("bench.convergence.eval_images", c.eval_images)
    return b


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def compose_train(overrides: list[str]) -> DictConfig:
    """Compose ``conf/train.yaml`` with ``overrides``: the models the training entry point would build."""
    if GlobalHydra.instance().is_initialized():  # inside the running app
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # called as a library / from tests
        return compose(config_name="train", overrides=overrides)


def model_config(b: DictConfig, detector: str, neck: str) -> DictConfig:
    return compose_train([
        f"detector={detector}", f"neck={neck}", f"backbone={b.backbone}", f"data.num_classes={b.num_classes}",
        *b.model_overrides,
    ])


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so that the clock reads measure the work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _progress(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=transient,
    )


# ------------------------------------------------------------ training: both arms' plumbing
def training_config(cfg: DictConfig, device: torch.device, total_steps: int, steps_per_epoch: int) -> DictConfig:
    """The top-level training config on one device, stopped after ``total_steps`` optimizer steps,
    without validation or checkpoints (neither arm validates or saves: validation changes no weight,
    and its loader would draw from the RNG the training loader's workers are seeded from)."""
    fcfg = copy.deepcopy(cfg)
    with open_dict(fcfg):
        t = fcfg.trainer
        t.accelerator = "gpu" if device.type == "cuda" else "cpu"
        t.devices, t.num_nodes, t.strategy = 1, 1, "auto"
        t.max_steps = total_steps
        t.max_epochs = math.ceil(total_steps / steps_per_epoch)  # enough epochs: max_steps decides
        t.limit_train_batches = 1.0
        t.limit_val_batches = 0
        t.num_sanity_val_steps = 0
        t.enable_checkpointing = False
        t.fast_dev_run = False
        t.enable_model_summary = False  # once per round otherwise (outside the timed steps either way)
    precision = str(fcfg.trainer.precision)
    if precision not in AUTOCAST:
        raise ValueError(
            f"trainer.precision={precision}: the bench's plain loop runs {sorted(AUTOCAST)}; choose one of those"
        )
    if int(fcfg.trainer.get("accumulate_grad_batches") or 1) != 1:
        raise ValueError(f"trainer.accumulate_grad_batches={fcfg.trainer.accumulate_grad_batches}: the bench's plain "
                         "loop steps after every batch; set it to 1")
    return fcfg


def lightning_callbacks(fcfg: DictConfig) -> list[L.Callback]:
    # as configured (progress bar, LR monitor, curves, ...) minus checkpointing, which the plain
    # arm has no counterpart for (and Lightning refuses with enable_checkpointing=False)
    return [c for c in B.build_callbacks(fcfg) if not isinstance(c, ModelCheckpoint)]


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """``set_epoch`` of the loader's sampler(s), as Lightning's fit loop calls it at every epoch start."""
    for s in {id(s): s for s in (getattr(loader, "sampler", None),
                                 getattr(getattr(loader, "batch_sampler", None), "sampler", None))}.values():
        if callable(getattr(s, "set_epoch", None)):
            s.set_epoch(epoch)


def seed_workers(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """Seed ``loader``'s workers as the Trainer seeds them after ``seed_everything(workers=True)``
    (``PL_SEED_WORKERS=1``: Lightning 2.6's ``_auto_add_worker_init_fn`` gives a loader without a
    ``worker_init_fn`` Lightning's public ``pl_worker_init_function``), so that both arms' workers draw
    the same augmentations."""
    if int(os.environ.get("PL_SEED_WORKERS", 0)) and loader.worker_init_fn is None:
        loader.worker_init_fn = functools.partial(pl_worker_init_function, rank=0)
    return loader


def cycle_batches(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """Batches of ``loader`` across epoch ends, each epoch started as the fit loop starts it."""
    epoch = 0
    while True:
        set_epoch(loader, epoch)
        yield from loader
        epoch += 1


def to_device(batch: Any, device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = batch
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return images, targets


def plain_optimizers(fcfg: DictConfig, net: Detector, total_steps: int,
                     per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and per-step LR schedule ``DetectionModule.configure_optimizers`` builds (with
    lightning_modules/optim.py) for ``total_steps`` steps of ``per_epoch`` per epoch; the namespace
    stands in for the Trainer fields ``iteration_budget`` reads."""
    holder = B.build_module(fcfg, net)
    holder.trainer = SimpleNamespace(estimated_stepping_batches=total_steps, max_epochs=fcfg.trainer.max_epochs,
                                     max_steps=-1, num_training_batches=per_epoch)
    conf = holder.configure_optimizers()
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


class PlainStep:
    """One iteration of torchvision's ``references/detection/engine.py::train_one_epoch``: forward
    (under autocast for a mixed ``trainer.precision``), sum of the loss dict, finite check, zero_grad,
    backward, the Trainer's gradient clipping (``trainer.gradient_clip_val`` / ``_algorithm``, as
    torchvision's classification reference clips: after unscaling), optimizer step, LR step."""

    def __init__(self, fcfg: DictConfig, net: Detector, device: torch.device, total_steps: int,
                 per_epoch: int) -> None:
        self.net, self.device = net.to(device).train(), device  # on the device before the optimizer takes it
        self.optimizer, self.lr_scheduler = plain_optimizers(fcfg, net, total_steps, per_epoch)
        self.dtype = AUTOCAST[str(fcfg.trainer.precision)]
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        clip = fcfg.trainer.get("gradient_clip_val")
        self.clip = float(clip) if clip is not None and float(clip) > 0 else None
        self.clip_algorithm = str(fcfg.trainer.get("gradient_clip_algorithm") or "norm")
        if self.clip_algorithm not in ("norm", "value"):
            raise ValueError(f"trainer.gradient_clip_algorithm={self.clip_algorithm!r}: expected norm or value")
        self.count = 0
        self.last: dict[str, float] = {}  # the last call's phases in seconds: forward, backward, optimizer

    def _clip(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]  # Lightning clips these
        if self.clip_algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        else:
            torch.nn.utils.clip_grad_value_(params, self.clip)

    def __call__(self, images: list[torch.Tensor], targets: list[dict]) -> float:
        """Train on one batch (already on the device); the summed loss before the step."""
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None \
            else contextlib.nullcontext()
        t0 = time.perf_counter()
        with autocast:
            loss_dict = self.net(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()  # synchronises
        t1 = time.perf_counter()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"plain loop: non-finite loss {loss_value} at step {self.count}: "
                                     f"{ {n: float(v) for n, v in loss_dict.items()} }")
        self.optimizer.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(losses).backward()
            sync(self.device)
            t2 = time.perf_counter()
            if self.clip is not None:
                self.scaler.unscale_(self.optimizer)
                self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            losses.backward()
            if self.clip is not None:
                self._clip()
            sync(self.device)
            t2 = time.perf_counter()
            self.optimizer.step()
        self.lr_scheduler.step()
        sync(self.device)
        # forward (+ loss), backward (+ clipping without a scaler), optimizer + LR step (+ the scaler's unscale/clip)
        self.last = {"forward": t1 - t0, "backward": t2 - t1, "optimizer": time.perf_counter() - t2}
        self.count += 1
        return loss_value
