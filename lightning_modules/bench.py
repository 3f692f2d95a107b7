"""pyramidlab-bench: parameters, latency, training throughput, data and evaluation speed, side by side.

One process measures every section of ``bench.sections`` (config ``conf/bench.yaml``):

- ``necks``: for each ``bench.detectors`` × ``bench.necks`` model (composed from the same config
  groups as training, in the papers' layout), trainable / total parameters and batch-1 latency on
  one random ``bench.size`` image in eval mode under ``torch.inference_mode``; ``ratio_vs_fpn`` is
  the median over repeats of (this model's time / the same detector's ``fpn`` time in that repeat).
- ``framework``: training images/s of :class:`DetectionModule` under the Lightning Trainer against
  a plain loop written like torchvision's detection reference, from one initialisation, on the
  same DataModule, optimizer, LR schedule, batch size and number of steps.
- ``data``: the training DataLoader alone (images/s) against the step's consumption (images per
  second of compute in the plain loop, loader waits excluded).
- ``eval``: CocoEvaluator with pycocotools, faster-coco-eval and hotcoco on the same synthetic
  predictions, end to end (update + compute), time, AP and where the time goes; plus a COCO-sized
  case (5,000 images x 100 detections, bbox and segm): :mod:`lightning_modules.bench_eval`.

Every comparison warms up first and interleaves its candidates (each repeat / round runs all of
them once), so drift (other jobs on the machine, clocks, caches) hits every candidate alike;
medians are reported with min / max. On CUDA every timing is synchronised and the necks section
adds autocast (bf16 / fp16) and channels_last rows. Results: ``bench.json`` and ``bench.md`` in
the run dir, written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import cProfile
import gc
import io
import math
import os
import platform
import pstats
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import lightning as L
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from detection.detectors import Detector, parameter_summary
from detection.evaluation import write_json_atomic
from lightning_modules import bench_data_scale, bench_eval
from lightning_modules import builders as B
from lightning_modules.paths import CONF_DIR

console = B.console

SECTIONS = ("necks", "framework", "data", "eval", "data_scale")
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


# -------------------------------------------------------------------------------------- necks
@dataclass
class Candidate:
    """One timed model: a (detector, neck) pair in one variant (fp32, autocast, channels_last)."""

    detector: str
    neck: str
    variant: str
    run: Callable[[list[torch.Tensor]], Any]
    ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # this process's CPU time, all its threads
    detections: int = 0  # post-processing and the mask head scale with it: equal counts, fair times


def _variant_runner(net: Detector, variant: str) -> Callable[[list[torch.Tensor]], Any]:
    dtype = AUTOCAST.get(variant)
    if dtype is None:
        return net

    def run(images: list[torch.Tensor]) -> Any:
        with torch.autocast("cuda", dtype=dtype):
            return net(images)

    return run


def run_necks(b: DictConfig, device: torch.device) -> dict[str, Any]:
    """Build every model once, then time ``warmup + repeats`` interleaved passes over all of them."""
    variants = [FP32] + (list(b.gpu_variants) if device.type == "cuda" else [])
    pairs = [(d, n) for d in b.detectors for n in b.necks]
    params: dict[tuple[str, str], dict[str, int]] = {}
    candidates: list[Candidate] = []
    with _progress() as progress:
        task = progress.add_task("necks: build", total=len(pairs))
        for d, n in pairs:
            progress.update(task, description=f"necks: build {d} + {n}")
            torch.manual_seed(b.seed)
            net = B.build_net(model_config(b, d, n)).eval().to(device)
            s = parameter_summary(net)
            params[d, n] = {"params_trainable": s["params_trainable"], "params_total": s["params_total"]}
            for v in variants:
                if v == "channels_last":
                    # a copy: channels_last changes the weights' layout, the other rows keep NCHW
                    m = copy.deepcopy(net).to(memory_format=torch.channels_last)
                    candidates.append(Candidate(d, n, v, m))
                else:
                    candidates.append(Candidate(d, n, v, _variant_runner(net, v)))
            progress.advance(task)

        g = torch.Generator().manual_seed(b.seed)
        image = torch.rand(3, *b.size, generator=g).to(device)  # one random image in [0, 1]
        passes = b.warmup + b.repeats
        task = progress.add_task("necks: time", total=passes * len(candidates))
        with torch.inference_mode():
            for r in range(passes):
                for c in candidates:
                    progress.update(task, description=f"necks: {'warm-up' if r < b.warmup else 'repeat'} "
                                    f"{r + 1}/{passes} {c.detector} + {c.neck} {c.variant}")
                    sync(device)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    out = c.run([image])
                    sync(device)
                    if r >= b.warmup:
                        c.ms.append(1000 * (time.perf_counter() - start))
                        c.cpu_ms.append(1000 * (time.process_time() - start_cpu))
                    c.detections = len(out[0]["scores"])
                    progress.advance(task)

    by_key = {(c.detector, c.neck, c.variant): c for c in candidates}

    def paired(c: list[float], ref: list[float]) -> float:
        # per-repeat ratio, then the median: each pair ran seconds apart in the same pass
        return statistics.median(t / r for t, r in zip(c, ref))

    def spread(c: list[float], ref: list[float], key: str) -> dict[str, Any]:
        """The per-repeat ratios' quartiles and the median's standard error (1.2533 s / sqrt(n), the
        normal approximation): two runs agree within about 2 x sem when the machine behaves alike."""
        ratios = [t / r for t, r in zip(c, ref)]
        out: dict[str, Any] = {f"{key}_repeats": [round(v, 4) for v in ratios]}
        if len(ratios) >= 2:
            q = statistics.quantiles(ratios, n=4, method="inclusive")
            out[f"{key}_q25"], out[f"{key}_q75"] = round(q[0], 4), round(q[2], 4)
            out[f"{key}_sem"] = round(1.2533 * statistics.stdev(ratios) / math.sqrt(len(ratios)), 4)
        return out

    rows, gpu_rows = [], []
    for c in candidates:
        ref = by_key[c.detector, b.reference_neck, c.variant]
        st = _stats(c.ms)
        row = {
            "detector": c.detector, "neck": c.neck, **params[c.detector, c.neck],
            "ms_median": round(st["median"], 3), "ms_min": round(st["min"], 3), "ms_max": round(st["max"], 3),
            "ratio_vs_fpn": round(paired(c.ms, ref.ms), 4), "detections": c.detections,
            **spread(c.ms, ref.ms, "ratio_vs_fpn"),
        }
        if device.type == "cpu":
            # On a machine shared with other jobs wall time also counts waiting for a core; the
            # process's CPU time does not, so its ratio is the steadier figure there.
            row["cpu_ms_median"] = round(statistics.median(c.cpu_ms), 3)
            row["ratio_vs_fpn_cpu"] = round(paired(c.cpu_ms, ref.cpu_ms), 4)
            row.update(spread(c.cpu_ms, ref.cpu_ms, "ratio_vs_fpn_cpu"))
        if c.variant == FP32:
            rows.append(row)
        else:
            fp32 = by_key[c.detector, c.neck, FP32]
            gpu_rows.append({**row, "variant": c.variant, "speedup_vs_fp32": round(paired(fp32.ms, c.ms), 4)})
    memory = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        memory["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    del candidates, by_key
    gc.collect()
    return {"rows": rows, "gpu_rows": gpu_rows, "memory": memory}


# -------------------------------------------------------------------- framework and data
@dataclass
class RoundResult:
    images: int = 0
    seconds: float = 0.0  # timed steps, wall clock
    cpu_s: float = 0.0  # this process's CPU time over the timed steps (loader workers are others)
    wait_s: float = 0.0  # plain loop: time spent waiting on the DataLoader
    round_s: float = 0.0  # the whole round: set-up, worker start, warm-up, timed steps, tear-down

    @property
    def img_s(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms_per_img(self) -> float:
        return 1000 * self.cpu_s / self.images

    @property
    def step_img_s(self) -> float:
        return self.images / (self.seconds - self.wait_s)


class StepTimer(L.Callback):
    """Wall clock from the end of warm-up step ``warmup`` to the end of step ``warmup + steps``.

    Hook to hook, so each timed interval holds whole loop iterations: data fetch, step, every
    other callback, logging and the progress bar, whatever order Lightning calls them in.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.count = 0
        self.result = RoundResult()
        self._start = self._start_cpu = math.nan

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.count += 1
        if self.count > self.warmup:
            self.result.images += len(batch[0])
        if self.count in (self.warmup, self.warmup + self.steps):
            sync(self.device)
            now, now_cpu = time.perf_counter(), time.process_time()
            if self.count == self.warmup:
                self._start, self._start_cpu = now, now_cpu
            else:
                self.result.seconds = now - self._start
                self.result.cpu_s = now_cpu - self._start_cpu


def training_config(cfg: DictConfig, b: DictConfig, device: torch.device, steps_per_epoch: int) -> DictConfig:
    """The top-level training config on one device, stopped after the round's steps, without
    validation or checkpoints (neither arm evaluates or saves: both measure training alone)."""
    fcfg = copy.deepcopy(cfg)
    total = b.framework.warmup_steps + b.framework.steps
    with open_dict(fcfg):
        t = fcfg.trainer
        t.accelerator = "gpu" if device.type == "cuda" else "cpu"
        t.devices, t.num_nodes, t.strategy = 1, 1, "auto"
        t.max_steps = total
        t.max_epochs = math.ceil(total / steps_per_epoch)  # enough epochs: max_steps decides
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
    return fcfg


def lightning_callbacks(fcfg: DictConfig) -> list[L.Callback]:
    # as configured (progress bar, LR monitor, curves, ...) minus checkpointing, which the plain
    # arm has no counterpart for (and Lightning refuses with enable_checkpointing=False)
    return [c for c in B.build_callbacks(fcfg) if not isinstance(c, ModelCheckpoint)]


def lightning_round(fcfg: DictConfig, b: DictConfig, module: L.LightningModule, dm: L.LightningDataModule,
                    device: torch.device) -> RoundResult:
    timer = StepTimer(b.framework.warmup_steps, b.framework.steps, device)
    loggers = B.build_loggers(fcfg)
    trainer = B.build_trainer(fcfg, lightning_callbacks(fcfg) + [timer], loggers)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        B.finish_loggers(loggers)
    timer.result.round_s = time.perf_counter() - start
    if not timer.result.seconds > 0:
        raise RuntimeError(f"the Lightning arm stopped after {timer.count} of {fcfg.trainer.max_steps} steps")
    del trainer
    gc.collect()
    return timer.result


def _cycle(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """Batches of ``loader`` across epoch ends (a new epoch starts as the loop would start it)."""
    while True:
        yield from loader


def _to_device(batch: Any, device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = batch
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return images, targets


def plain_optimizers(fcfg: DictConfig, net: Detector, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and per-step LR schedule ``DetectionModule.configure_optimizers`` builds for
    the same step budget; the namespace stands in for the Trainer fields it reads (no max_steps cap; batches
    per epoch unknown, so the schedule spreads ``total_steps`` over ``max_epochs``)."""
    holder = B.build_module(fcfg, net)
    holder.trainer = SimpleNamespace(estimated_stepping_batches=total_steps, max_epochs=fcfg.trainer.max_epochs,
                                     max_steps=-1, num_training_batches=float("inf"))
    conf = holder.configure_optimizers()
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def plain_round(fcfg: DictConfig, b: DictConfig, net: Detector, dm: L.LightningDataModule,
                device: torch.device) -> RoundResult:
    """torchvision's ``references/detection/engine.py::train_one_epoch``, less its metric printing."""
    start_round = time.perf_counter()
    warmup, steps = b.framework.warmup_steps, b.framework.steps
    net.to(device).train()  # before the optimizer takes the parameters
    optimizer, lr_scheduler = plain_optimizers(fcfg, net, warmup + steps)
    dtype = AUTOCAST[str(fcfg.trainer.precision)]
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    batches = _cycle(dm.train_dataloader())
    res = RoundResult()
    start = start_cpu = math.nan
    with _progress(transient=True) as progress:
        task = progress.add_task("plain loop", total=warmup + steps)
        for k in range(warmup + steps):
            if k == warmup:
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
            fetch = time.perf_counter()
            images, targets = _to_device(next(batches), device)
            fetched = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                loss_dict = net(images, targets)
                losses = sum(loss for loss in loss_dict.values())
            loss_value = losses.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"plain loop: non-finite loss {loss_value} at step {k}: "
                                         f"{ {n: float(v) for n, v in loss_dict.items()} }")
            optimizer.zero_grad()
            if scaler is not None:
                scaler.scale(losses).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                losses.backward()
                optimizer.step()
            lr_scheduler.step()
            if k >= warmup:
                res.images += len(images)
                res.wait_s += fetched - fetch
            progress.advance(task)
        sync(device)
        res.seconds = time.perf_counter() - start
        res.cpu_s = time.process_time() - start_cpu
    batches.close()  # ends the DataLoader iterator and its workers
    gc.collect()
    res.round_s = time.perf_counter() - start_round
    return res


def loader_round(b: DictConfig, dm: L.LightningDataModule) -> RoundResult:
    """The training DataLoader alone: batches as fast as its workers produce them."""
    warmup, steps = b.framework.warmup_steps, b.framework.steps
    batches = _cycle(dm.train_dataloader())
    res = RoundResult()
    start_round = time.perf_counter()
    start = math.nan
    for k in range(warmup + steps):
        if k == warmup:
            start = time.perf_counter()
        images, _ = next(batches)
        if k >= warmup:
            res.images += len(images)
    res.seconds = time.perf_counter() - start
    batches.close()
    gc.collect()
    res.round_s = time.perf_counter() - start_round
    return res


def _profiled(fn: Callable[[], RoundResult], steps: int, path: Path) -> dict[str, float]:
    """Run one round ``fn`` of ``steps`` optimizer steps under cProfile; write the top functions to
    ``path``; return its self time in total and in the framework's own files (FRAMEWORK_FILES),
    over the whole round (set-up and warm-up included, as a profile cannot leave them out)."""
    prof = cProfile.Profile()
    prof.enable()
    res = fn()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(25)
    path.write_text(buf.getvalue())
    entries = stats.stats.items()  # type: ignore[attr-defined]
    total = sum(v[2] for _, v in entries)
    framework = sum(v[2] for k, v in entries if any(f in k[0] for f in FRAMEWORK_FILES))
    return {
        "img_s": round(res.img_s, 3),
        "round_self_s": round(total, 3),
        "framework_self_s": round(framework, 3),
        "framework_ms_per_step": round(1000 * framework / steps, 3),
    }


def run_training(cfg: DictConfig, b: DictConfig, device: torch.device, arms: list[str]) -> dict[str, Any]:
    """Interleaved rounds of the requested arms (``lightning``, ``plain``, ``loader``); medians."""
    L.seed_everything(cfg.seed if cfg.get("seed") is not None else b.seed, workers=True)
    net = B.build_net(cfg)
    plain_net = copy.deepcopy(net)  # the same initial weights for both arms
    dm = B.build_datamodule(cfg.data, net.with_masks)
    dm.prepare_data()
    dm.setup("fit")
    fcfg = training_config(cfg, b, device, len(dm.train_dataloader()))
    module = B.build_module(fcfg, net)
    results: dict[str, list[RoundResult]] = {a: [] for a in arms}
    for r in range(b.framework.rounds):
        # alternate the order, so neither arm always runs first in a round
        order = arms if r % 2 == 0 else arms[::-1]
        for arm in order:
            console.print(f"[bold]framework round {r + 1}/{b.framework.rounds}: {arm}")
            if arm == "lightning":
                res = lightning_round(fcfg, b, module, dm, device)
            elif arm == "plain":
                res = plain_round(fcfg, b, plain_net, dm, device)
            else:
                res = loader_round(b, dm)
            console.print(f"  {res.images} images in {res.seconds:.2f} s: {res.img_s:.2f} images/s")
            results[arm].append(res)
    out: dict[str, Any] = {"results": results, "config": fcfg}
    if b.framework.profile:
        run_dir = Path(cfg.paths.output_dir)
        out["profile"] = {}
        steps = b.framework.warmup_steps + b.framework.steps
        if "lightning" in arms:
            out["profile"]["lightning"] = _profiled(
                lambda: lightning_round(fcfg, b, module, dm, device), steps, run_dir / "profile_lightning.txt")
        if "plain" in arms:
            out["profile"]["plain"] = _profiled(
                lambda: plain_round(fcfg, b, plain_net, dm, device), steps, run_dir / "profile_plain.txt")
    return out


def framework_entry(train: dict[str, Any], b: DictConfig) -> dict[str, Any]:
    res = train["results"]
    fcfg = train["config"]
    lit = [r.img_s for r in res["lightning"]]
    plain = [r.img_s for r in res["plain"]]
    lightning_img_s, plain_img_s = statistics.median(lit), statistics.median(plain)
    callbacks = [type(c).__name__ for c in lightning_callbacks(fcfg)]
    loggers = [type(lg).__name__ for lg in B.build_loggers(fcfg)] if fcfg.get("logger") else []
    entry = {
        "lightning_img_s": lightning_img_s,
        "plain_img_s": plain_img_s,
        "ratio": plain_img_s / lightning_img_s,
        "lightning_img_s_rounds": [round(v, 3) for v in lit],
        "plain_img_s_rounds": [round(v, 3) for v in plain],
        # paired per round (the two arms ran back to back): less sensitive to drift across rounds
        "ratio_median_of_rounds": round(statistics.median(p / q for p, q in zip(plain, lit)), 4),
        # main-process CPU time per image, Lightning over plain (same direction as ratio): steadier
        # than wall time when other jobs share the machine; the loader workers are not in it
        "ratio_cpu": statistics.median(r.cpu_ms_per_img for r in res["lightning"])
        / statistics.median(r.cpu_ms_per_img for r in res["plain"]),
        "lightning_cpu_ms_per_img": round(statistics.median(r.cpu_ms_per_img for r in res["lightning"]), 2),
        "plain_cpu_ms_per_img": round(statistics.median(r.cpu_ms_per_img for r in res["plain"]), 2),
        "lightning_round_s": round(statistics.median(r.round_s for r in res["lightning"]), 2),
        "plain_round_s": round(statistics.median(r.round_s for r in res["plain"]), 2),
        "batch_size": int(fcfg.data.batch_size),
        "warmup_steps": b.framework.warmup_steps,
        "steps": b.framework.steps,
        "rounds": b.framework.rounds,
        "precision": str(fcfg.trainer.precision),
        "lightning_arm": {
            "callbacks": callbacks,
            "loggers": loggers,
            "log_every_n_steps": fcfg.trainer.get("log_every_n_steps"),
            "excluded": ["validation", "sanity check", "checkpointing"],
        },
    }
    if "profile" in train:
        entry["profile"] = train["profile"]
    return entry


def data_entry(train: dict[str, Any]) -> dict[str, Any]:
    res = train["results"]
    fcfg = train["config"]
    loader = statistics.median(r.img_s for r in res["loader"])
    step = statistics.median(r.step_img_s for r in res["plain"])
    return {
        "loader_img_s": loader,
        "step_img_s": step,
        "loader_over_step": loader / step,
        # the direct sign of a bottleneck: the plain loop's share of time spent waiting on data
        "loader_wait_frac": round(statistics.median(r.wait_s / r.seconds for r in res["plain"]), 4),
        "num_workers": int(fcfg.data.num_workers),
        "batch_size": int(fcfg.data.batch_size),
    }


# ---------------------------------------------------------------------------------------- eval
def run_eval(cfg: DictConfig, b: DictConfig) -> dict[str, Any]:
    """The eval section (:mod:`lightning_modules.bench_eval`) on the ground truth of ``bench.eval.split``."""
    dm = B.build_datamodule(cfg.data, with_masks=False)
    dm.prepare_data()
    dm.setup("fit")
    ds = dm.train_dataset if b.eval.split == "train" else dm.val_dataset
    with _progress() as progress:
        # updated batch by batch, as validation does
        return bench_eval.run_eval(ds, b, int(cfg.data.val_batch_size), progress)


# -------------------------------------------------------------------------------------- report
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }
    # OpenMP's spin-waiting threads collapse under oversubscription (measured on a shared 2-core
    # machine: 10-30x slower steps with the default policy, none with OMP_WAIT_POLICY=PASSIVE)
    info["env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    if hasattr(os, "getloadavg"):
        # other jobs on the machine move every figure: the load says how busy it was
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def command_line() -> str:
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join(["pyramidlab-bench", *(shlex.quote(o) for o in overrides)])


def check_targets(results: dict[str, Any], b: DictConfig) -> list[dict[str, Any]]:
    t = b.targets
    checks: list[dict[str, Any]] = []

    def add(what: str, value: float | None, bound: float, upper: bool) -> None:
        met = None if value is None else (value <= bound if upper else value >= bound)
        checks.append({"what": what, "value": value, ("max" if upper else "min"): bound, "met": met})

    rows = {(r["detector"], r["neck"]): r for r in results.get("necks") or []}
    for spec in t.necks:
        row = rows.get((spec.detector, spec.neck))
        add(f"{spec.detector} {spec.neck} / {b.reference_neck} latency", row and row["ratio_vs_fpn"],
            float(spec.max_ratio), True)
    if results.get("framework"):
        add("plain / lightning images/s", results["framework"]["ratio"], float(t.framework_max_ratio), True)
    if results.get("eval"):
        add("pycocotools / faster-coco-eval time, CocoEvaluator", results["eval"]["speedup"],
            float(t.eval_min_speedup), False)
        add(f"pycocotools / fastest ({results['eval']['fastest']}) time, CocoEvaluator",
            results["eval"]["speedup_fastest"], float(t.eval_min_speedup_fastest), False)
    if results.get("data"):
        add("loader / step images/s", results["data"]["loader_over_step"], float(t.data_min_ratio), False)
    if results.get("data_scale"):
        add("COCO-scale loader: workers' summed PSS growth (MB)", results["data_scale"]["workers_pss_growth_mb"],
            float(t.data_scale_max_growth_mb), True)
    return checks


def _ratio_cell(row: dict[str, Any], key: str) -> str:
    """``1.051 ± 0.008 [1.030, 1.070]``: median ratio, its standard error, the per-repeat quartiles."""
    if f"{key}_sem" not in row:
        return f"{row[key]:.3f}"
    return f"{row[key]:.3f} ± {row[f'{key}_sem']:.3f} [{row[f'{key}_q25']:.3f}, {row[f'{key}_q75']:.3f}]"


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    dev = results["device"]
    hw = dev["gpu"] or f"{dev['cpu']} ({dev['cpu_affinity']} cores, {dev['torch_threads']} torch threads)"
    out = [
        f"# pyramidlab-bench — {results['date']}", "",
        f"`{results['command']}`", "",
        f"{hw}; torch {dev['torch']}, torchvision {dev['torchvision']}, lightning {dev['lightning']}; "
        f"load average {dev.get('loadavg_start')} at start, {dev.get('loadavg_end')} at the end; "
        f"section wall times (s): {results.get('seconds')}.",
    ]
    cfg = results["config"]
    if results.get("necks"):
        h, w = cfg["size"]
        out += ["", f"## Necks: batch 1, {h}×{w}, eval mode, inference_mode, {dev['device']}, "
                f"{cfg['repeats']} interleaved repeats after {cfg['warmup']} warm-up", ""]
        cpu = "ratio_vs_fpn_cpu" in results["necks"][0]
        out += _md_table(
            ["detector", "neck", "trainable (M)", "total (M)", "ms median", "ms min", "ms max",
             f"× {cfg['reference_neck']}", *(["CPU ms median", f"× {cfg['reference_neck']} (CPU time)"] if cpu else []),
             "detections"],
            [[r["detector"], r["neck"], f"{r['params_trainable'] / 1e6:.2f}", f"{r['params_total'] / 1e6:.2f}",
              f"{r['ms_median']:.1f}", f"{r['ms_min']:.1f}", f"{r['ms_max']:.1f}", _ratio_cell(r, "ratio_vs_fpn"),
              *([f"{r['cpu_ms_median']:.1f}", _ratio_cell(r, "ratio_vs_fpn_cpu")] if cpu else []), r["detections"]]
             for r in results["necks"]],
        )
        out += ["", f"× {cfg['reference_neck']}: median over repeats of the per-repeat time ratio to the same "
                f"detector with {cfg['reference_neck']}, ± the median's standard error, [quartiles of the per-repeat "
                "ratios]; CPU time: this process's, all threads (on a shared "
                "machine wall time also counts waiting for a core). Random weights; detections: what each model kept of the "
                f"random image (post-processing and the mask head scale with it). Peak memory: {results['memory']}."]
    if results.get("gpu"):
        out += ["", "## GPU variants (CUDA-synchronised)", ""]
        out += _md_table(
            ["detector", "neck", "variant", "ms median", "ms min", "ms max", f"× {cfg['reference_neck']}",
             "speed-up vs fp32"],
            [[r["detector"], r["neck"], r["variant"], f"{r['ms_median']:.2f}", f"{r['ms_min']:.2f}",
              f"{r['ms_max']:.2f}", f"{r['ratio_vs_fpn']:.3f}", f"{r['speedup_vs_fp32']:.2f}"]
             for r in results["gpu"]],
        )
    f = results.get("framework")
    if f:
        arm = f["lightning_arm"]
        out += ["", f"## Framework: training images/s, batch {f['batch_size']}, {f['steps']} timed steps after "
                f"{f['warmup_steps']} warm-up, {f['rounds']} interleaved rounds, precision {f['precision']}", ""]
        out += _md_table(
            ["Lightning img/s", "plain loop img/s", "ratio plain / Lightning", "per-round ratio (median)",
             "CPU ms/img Lightning", "CPU ms/img plain", "ratio (CPU time)"],
            [[f"{f['lightning_img_s']:.2f}", f"{f['plain_img_s']:.2f}", f"{f['ratio']:.3f}",
              f"{f['ratio_median_of_rounds']:.3f}", f"{f['lightning_cpu_ms_per_img']:.1f}",
              f"{f['plain_cpu_ms_per_img']:.1f}", f"{f['ratio_cpu']:.3f}"]],
        )
        out += ["", f"Rounds: Lightning {f['lightning_img_s_rounds']}, plain {f['plain_img_s_rounds']} img/s. "
                f"The Lightning arm: DetectionModule under the Trainer with callbacks {arm['callbacks']}, loggers "
                f"{arm['loggers']}, log_every_n_steps={arm['log_every_n_steps']}; without {', '.join(arm['excluded'])} "
                "(in both arms). The plain arm: torchvision's reference loop (forward, sum, loss.item() finite "
                "check, zero_grad, backward, step, scheduler step) with the same optimizer and LR schedule."]
        if f.get("profile"):
            out += ["", f"cProfile (one extra round per arm, profile_*.txt): {f['profile']}"]
    d = results.get("data")
    if d:
        out += ["", f"## Data: training DataLoader, num_workers={d['num_workers']}, batch {d['batch_size']}", ""]
        out += _md_table(
            ["loader alone img/s", "step consumes img/s", "loader / step", "plain loop time waiting on data"],
            [[f"{d['loader_img_s']:.1f}", f"{d['step_img_s']:.2f}", f"{d['loader_over_step']:.1f}",
              f"{100 * d['loader_wait_frac']:.1f} %"]],
        )
    e = results.get("eval")
    if e:
        out += bench_eval.render(e)
    if results.get("data_scale"):
        out += bench_data_scale.render(results["data_scale"])
    if results.get("targets"):
        out += ["", "## Targets (issue 6)", ""]
        out += _md_table(
            ["target", "value", "bound", "met"],
            [[t["what"], "–" if t["value"] is None else f"{t['value']:.3f}",
              f"≤ {t['max']}" if "max" in t else f"≥ {t['min']}",
              {True: "yes", False: "**no**", None: "not measured"}[t["met"]]] for t in results["targets"]],
        )
    return "\n".join(out) + "\n"


def write_text_atomic(path: Path, text: str) -> Path:
    """Temp file in the same folder, then ``os.replace``: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------ app
def bench(cfg: DictConfig) -> dict[str, Any]:
    """Run the sections of ``cfg.bench``; write bench.json and bench.md into ``cfg.paths.output_dir``."""
    b = bench_options(cfg)
    threads = torch.get_num_threads()
    if b.threads is not None:
        torch.set_num_threads(b.threads)
    try:
        return _bench(cfg, b)
    finally:
        torch.set_num_threads(threads)  # process-wide: leave it as found (tests, notebooks)


def _bench(cfg: DictConfig, b: DictConfig) -> dict[str, Any]:
    device = resolve_device(b.device)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": command_line(),
        "device": device_info(device),
        "config": OmegaConf.to_container(b),
        "necks": None, "gpu": None, "memory": None, "framework": None, "data": None, "eval": None,
        "data_scale": None,
    }
    console.print(f"[bold]{escape(results['command'])}[/]  ->  {escape(str(out_dir))}")  # [a,b]: not markup
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if "necks" in b.sections:
        necks = run_necks(b, device)
        results["necks"], results["memory"] = necks["rows"], necks["memory"]
        results["gpu"] = necks["gpu_rows"] or None
        seconds["necks"] = round(time.perf_counter() - start, 1)
    arms = [a for a, s in (("lightning", "framework"), ("plain", "framework"), ("plain", "data"),
                           ("loader", "data")) if s in b.sections]
    arms = list(dict.fromkeys(arms))
    if arms:
        start = time.perf_counter()
        train = run_training(cfg, b, device, arms)
        if "framework" in b.sections:
            results["framework"] = framework_entry(train, b)
        if "data" in b.sections:
            results["data"] = data_entry(train)
        seconds["framework+data"] = round(time.perf_counter() - start, 1)
    if "eval" in b.sections:
        start = time.perf_counter()
        results["eval"] = run_eval(cfg, b)
        seconds["eval"] = round(time.perf_counter() - start, 1)
    if "data_scale" in b.sections:
        start = time.perf_counter()
        with _progress() as progress:
            results["data_scale"] = bench_data_scale.run_data_scale(b.data_scale, b.seed, progress)
        seconds["data_scale"] = round(time.perf_counter() - start, 1)
    results["seconds"] = seconds
    if hasattr(os, "getloadavg"):
        results["device"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    results["targets"] = check_targets(results, b)
    write_json_atomic(out_dir / "bench.json", results, indent=2)
    md = render_markdown(results)
    write_text_atomic(out_dir / "bench.md", md)
    print(md)
    console.print(f"bench.json, bench.md: {escape(str(out_dir))}")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
def main(cfg: DictConfig) -> None:
    bench(cfg)


if __name__ == "__main__":
    sys.exit(main())
