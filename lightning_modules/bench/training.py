"""The ``framework`` and ``data`` sections: Lightning vs a plain loop, the DataLoader vs the step."""

from __future__ import annotations

import copy
import cProfile
import gc
import io
import math
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from detection.detectors import Detector
from lightning_modules import builders as B
from lightning_modules import checkpoints as CK
from lightning_modules import loggers as LG
from lightning_modules.bench.common import (
    FRAMEWORK_FILES,
    PlainStep,
    _progress,
    console,
    cycle_batches,
    lightning_callbacks,
    seed_workers,
    sync,
    to_device,
    training_config,
)


# -------------------------------------------------------------------- framework and data
@dataclass
class RoundResult:
    images: int = 0
    seconds: float = 0.0  # timed steps, wall clock
    cpu_s: float = 0.0  # this process's CPU time over the timed steps (loader workers are others)
    wait_s: float = 0.0  # plain loop: time spent waiting on the DataLoader
    round_s: float = 0.0  # the whole round: set-up, worker start, warm-up, timed steps, tear-down
    steps: int = 0  # timed steps
    phases: dict[str, float] = field(default_factory=dict)  # plain loop: seconds per phase over the timed steps

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


def lightning_round(fcfg: DictConfig, b: DictConfig, module: L.LightningModule, dm: L.LightningDataModule,
                    device: torch.device) -> RoundResult:
    timer = StepTimer(b.framework.warmup_steps, b.framework.steps, device)
    loggers = LG.build_loggers(fcfg)
    trainer = B.build_trainer(fcfg, lightning_callbacks(fcfg) + [timer], loggers)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        LG.finish_loggers(loggers)
    timer.result.round_s = time.perf_counter() - start
    if not timer.result.seconds > 0:
        raise RuntimeError(f"the Lightning arm stopped after {timer.count} of {fcfg.trainer.max_steps} steps")
    del trainer
    gc.collect()
    return timer.result


def plain_round(fcfg: DictConfig, b: DictConfig, net: Detector, dm: L.LightningDataModule,
                device: torch.device) -> RoundResult:
    """torchvision's ``references/detection/engine.py::train_one_epoch``, less its metric printing."""
    start_round = time.perf_counter()
    warmup, steps = b.framework.warmup_steps, b.framework.steps
    loader = seed_workers(dm.train_dataloader())
    step = PlainStep(fcfg, net, device, warmup + steps, len(loader))
    batches = cycle_batches(loader)
    res = RoundResult()
    start = start_cpu = math.nan
    with _progress(transient=True) as progress:
        task = progress.add_task("plain loop", total=warmup + steps)
        for k in range(warmup + steps):
            if k == warmup:
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
            fetch = time.perf_counter()
            images, targets = to_device(next(batches), device)
            fetched = time.perf_counter()
            step(images, targets)
            if k >= warmup:
                res.images += len(images)
                res.steps += 1
                res.wait_s += fetched - fetch
                for phase, sec in {"data": fetched - fetch, **step.last}.items():
                    res.phases[phase] = res.phases.get(phase, 0.0) + sec
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
    batches = cycle_batches(dm.train_dataloader())
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
    net = CK.build_net(cfg)
    plain_net = copy.deepcopy(net)  # the same initial weights for both arms
    dm = B.build_datamodule(cfg.data, net.with_masks)
    dm.prepare_data()
    dm.setup("fit")
    fcfg = training_config(cfg, device, b.framework.warmup_steps + b.framework.steps, len(dm.train_dataloader()))
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
    loggers = [type(lg).__name__ for lg in LG.build_loggers(fcfg)] if fcfg.get("logger") else []
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
    # where a plain-loop step's time goes (median over rounds, ms per step): data wait, forward + loss,
    # backward, optimizer + LR step; "other" is the rest of the step (progress bar, device copies)
    phases = {ph: statistics.median(1000 * r.phases[ph] / r.steps for r in res["plain"])
              for ph in ("data", "forward", "backward", "optimizer")}
    step_ms = statistics.median(1000 * r.seconds / r.steps for r in res["plain"])
    entry["plain_step_ms"] = round(step_ms, 1)
    entry["plain_phase_ms"] = {**{k: round(v, 1) for k, v in phases.items()},
                               "other": round(step_ms - sum(phases.values()), 1)}
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


