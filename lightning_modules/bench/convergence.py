"""The ``convergence`` section: does the framework train the model as well as a plain PyTorch loop?

The model of the bench's top-level config (``experiment=shapes_retinanet`` by default; add
``experiment=shapes_fcos`` for the one ``make train`` trains) is trained twice per seed of
``bench.convergence.seeds``:

- ``lightning``: :class:`DetectionModule` under the Lightning Trainer, built by the builders
  ``pyramidlab-train`` uses (``builders.py``, ``loggers.py``), with the configured callbacks and
  loggers;
- ``plain``: torchvision's ``references/detection/engine.py::train_one_epoch`` loop
  (:class:`~lightning_modules.bench.common.PlainStep`, the framework section's step);

from one initialisation (a deep copy), on the same DataModule's train loader (same order, same
augmentation draws: both arms re-seed and seed the loader's workers as the Trainer does), with the
optimizer and per-step LR schedule of ``lightning_modules/optim.py`` over the same number of steps
(the recipe's ``trainer.max_epochs`` × batches per epoch, or ``bench.convergence.max_steps``) and
the same gradient clipping. Neither arm validates or checkpoints (neither changes a weight); the
last weights of both are evaluated by the same evaluator (``DetectionModule``'s test step, the one
``make train`` reports) on ``data.test_split``. The first step's loss and batch of both arms are
recorded as the evidence that they start alike.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from detection.detectors import Detector
from lightning_modules import builders as B
from lightning_modules import checkpoints as CK
from lightning_modules import loggers as LG
from lightning_modules.bench.common import (
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
from lightning_modules.config_checks import resolve_num_classes

# bench.json key prefix -> CocoEvaluator metric (0-1; -1 where the split has no object of that size)
METRICS = {"ap": "bbox/AP", "ap50": "bbox/AP50", "ap75": "bbox/AP75", "aps": "bbox/APs", "apm": "bbox/APm",
           "apl": "bbox/APl"}
ARMS = ("lightning", "plain")


@dataclass
class ArmResult:
    """One arm's training of one seed: what it saw first, its losses, its time and its metrics."""

    init_weights: float = math.nan  # sum of the state dict at the first step
    first_batch: dict[str, Any] | None = None  # image ids and pixel + box sum of the first batch
    losses: list[float] = field(default_factory=list)  # summed loss of every step, before its update
    images: int = 0  # trained on after the first step
    seconds: float = 0.0  # end of the first step to the end of the last: the steps (fetch included)
    total_s: float = 0.0  # the whole arm: set-up, loader and worker start, every step (Lightning: its teardown)
    eval_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    _t0: float = math.nan

    def step_done(self, loss: float, images: int, device: torch.device) -> None:
        """Record a finished step; the clock starts at the end of the first (worker start-up, first
        allocations) and stops at the end of each later one."""
        self.losses.append(loss)
        sync(device)
        now = time.perf_counter()
        if len(self.losses) == 1:
            self._t0 = now
        else:
            self.images += images
            self.seconds = now - self._t0

    def entry(self) -> dict[str, Any]:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {
            **{k: self.metrics[m] for k, m in METRICS.items()},
            "train_s": round(self.seconds, 2),
            "img_s": round(self.images / self.seconds, 3),
            "total_s": round(self.total_s, 2),
            "eval_s": round(self.eval_s, 2),
            "first_loss": self.losses[0],
            "final_loss": statistics.fmean(tail),  # mean of the last tenth of the steps
            "first_batch": self.first_batch,
        }


def weights_fingerprint(net: torch.nn.Module) -> float:
    return float(sum(v.double().sum() for v in net.state_dict().values() if v.is_floating_point()))


def batch_fingerprint(images: list[torch.Tensor], targets: list[dict]) -> dict[str, Any]:
    return {"image_ids": [int(t["image_id"]) for t in targets],
            "sum": float(sum(i.double().sum() for i in images) + sum(t["boxes"].double().sum() for t in targets))}


class Probe(L.Callback):
    """The Lightning arm's record: weights at the start, the first batch, every step's loss."""

    def __init__(self, device: torch.device) -> None:
        self.result = ArmResult()
        self.device = device

    def on_train_start(self, trainer, pl_module) -> None:
        self.result.init_weights = weights_fingerprint(pl_module.net)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.result.first_batch is None:
            self.result.first_batch = batch_fingerprint(*batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.result.step_done(float(outputs["loss"]), len(batch[0]), self.device)


def lightning_arm(fcfg: DictConfig, net: Detector, dm: L.LightningDataModule, device: torch.device,
                  seed: int) -> ArmResult:
    """``pyramidlab-train``'s path: the builders' module, callbacks, loggers and Trainer; fit."""
    module = B.build_module(fcfg, net)
    probe = Probe(device)
    loggers = LG.build_loggers(fcfg)
    trainer = B.build_trainer(fcfg, lightning_callbacks(fcfg) + [probe], loggers)
    L.seed_everything(seed, workers=True, verbose=False)  # the RNG state the plain arm starts from too
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        LG.finish_loggers(loggers)
    sync(device)
    probe.result.total_s = time.perf_counter() - start
    if len(probe.result.losses) != fcfg.trainer.max_steps:
        raise RuntimeError(f"the Lightning arm stopped after {len(probe.result.losses)} of "
                           f"{fcfg.trainer.max_steps} steps")
    return probe.result


def plain_arm(fcfg: DictConfig, net: Detector, dm: L.LightningDataModule, device: torch.device,
              seed: int) -> ArmResult:
    """torchvision's reference loop for ``trainer.max_steps`` steps on the same DataModule."""
    steps = int(fcfg.trainer.max_steps)
    res = ArmResult()
    L.seed_everything(seed, workers=True, verbose=False)
    start = time.perf_counter()
    loader = seed_workers(dm.train_dataloader())
    step = PlainStep(fcfg, net, device, steps, len(loader))
    res.init_weights = weights_fingerprint(net)
    batches = cycle_batches(loader)
    with _progress(transient=True) as progress:
        task = progress.add_task("plain loop", total=steps)
        for k in range(steps):
            images, targets = to_device(next(batches), device)
            if k == 0:
                res.first_batch = batch_fingerprint(images, targets)
            res.step_done(step(images, targets), len(images), device)
            progress.advance(task)
    res.total_s = time.perf_counter() - start
    batches.close()  # ends the DataLoader iterator (its persistent workers end with the loader)
    return res


def evaluate(fcfg: DictConfig, net: Detector, dm: L.LightningDataModule) -> tuple[dict[str, float], float]:
    """COCO metrics of ``net`` as it is (the last weights) on the DataModule's test split, by
    ``DetectionModule``'s test step: the evaluator ``make train`` reports with. Same call for both arms."""
    module = B.build_module(fcfg, net)
    bars = [c for c in lightning_callbacks(fcfg) if isinstance(c, ProgressBar)]
    trainer = B.build_trainer(fcfg, bars, [])
    start = time.perf_counter()
    trainer.test(module, datamodule=dm, verbose=False)
    if not module.evaluation.test_metrics:
        raise ValueError(f"data.test_split={dm.test_split}: no annotations to evaluate the convergence section on")
    return {k: float(v) for k, v in module.evaluation.test_metrics.items()}, time.perf_counter() - start


def schedule_steps(cfg: DictConfig, per_epoch: int, max_steps: int | None) -> int:
    """``max_steps``, else the recipe's whole schedule: ``trainer.max_epochs`` × ``per_epoch`` (capped by
    ``trainer.max_steps`` when set), the number of steps ``pyramidlab-train`` takes."""
    if max_steps is not None:
        return max_steps
    t = cfg.trainer
    limit = t.get("limit_train_batches")
    if limit is not None and float(limit) != 1.0:
        raise ValueError(f"trainer.limit_train_batches={limit}: the convergence section trains whole epochs; "
                         "shorten it with bench.convergence.max_steps=N instead")
    epochs = t.get("max_epochs")
    cap = t.get("max_steps")
    total = epochs * per_epoch if epochs is not None and epochs > 0 else None
    if cap is not None and cap > 0:
        total = cap if total is None else min(total, cap)
    if total is None:
        raise ValueError("the recipe sets neither trainer.max_epochs nor trainer.max_steps; set "
                         "bench.convergence.max_steps=N")
    return int(total)


def agree_steps(a: list[float], b: list[float], rel: float = 1e-5) -> int:
    """How many leading steps both arms' losses agree to ``rel`` (all of them when the arms train alike
    to rounding; CPU kernels are deterministic, so on CPU they should)."""
    n = 0
    while n < min(len(a), len(b)) and math.isclose(a[n], b[n], rel_tol=rel, abs_tol=rel):
        n += 1
    return n


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm the mean ± std over seeds; the paired difference lightning − plain; the fairness checks.
    A metric that is -1 in any run (COCO's "no object of this size in the split") is None."""
    out: dict[str, Any] = {}
    for k in METRICS:
        defined = all(r[arm][k] >= 0 for r in runs for arm in ARMS)
        for arm in ARMS:
            out[f"{k}_{arm}"], out[f"{k}_{arm}_std"] = _mean_std([r[arm][k] for r in runs]) if defined else (None, None)
        diffs = [r["lightning"][k] - r["plain"][k] for r in runs]
        out[f"{k}_diff"], out[f"{k}_diff_std"] = _mean_std(diffs) if defined else (None, None)
    for arm in ARMS:
        out[f"{arm}_s"] = round(statistics.fmean(r[arm]["train_s"] for r in runs), 2)
        out[f"{arm}_img_s"] = round(statistics.fmean(r[arm]["img_s"] for r in runs), 3)
        out[f"{arm}_total_s"] = round(statistics.fmean(r[arm]["total_s"] for r in runs), 2)
        out[f"final_loss_{arm}"] = statistics.fmean(r[arm]["final_loss"] for r in runs)
    out["first_loss_abs_diff"] = max(r["first_loss_abs_diff"] for r in runs)
    out["loss_agree_steps"] = min(r["loss_agree_steps"] for r in runs)
    out["same_init_weights"] = all(r["same_init_weights"] for r in runs)
    out["same_first_batch"] = all(r["same_first_batch"] for r in runs)
    return out


def run_convergence(cfg: DictConfig, b: DictConfig, device: torch.device) -> dict[str, Any]:
    """Both arms for every seed of ``b.convergence.seeds``; the ``convergence`` entry of bench.json."""
    c = b.convergence
    ccfg = copy.deepcopy(cfg)
    with open_dict(ccfg):
        if c.eval_images is not None:
            ccfg.data.max_val_images = c.eval_images  # also caps the test split
    resolve_num_classes(ccfg.data)
    dm = None
    runs: list[dict[str, Any]] = []
    fcfg = None
    for i, seed in enumerate(c.seeds):
        L.seed_everything(seed, workers=True, verbose=False)
        net = CK.build_net(ccfg)
        nets = {"lightning": net, "plain": copy.deepcopy(net)}  # the same initial weights for both arms
        if dm is None:
            dm = B.build_datamodule(ccfg.data, net.with_masks)
            dm.prepare_data()
            dm.setup("fit")
            per_epoch = len(dm.train_dataloader())
            steps = schedule_steps(ccfg, per_epoch, c.max_steps)
            if steps < 2:
                raise ValueError(f"the recipe's schedule is {steps} step: the convergence section times steps 2 "
                                 "to N; set bench.convergence.max_steps >= 2")
            fcfg = training_config(ccfg, device, steps, per_epoch)
        results: dict[str, ArmResult] = {}
        order = ARMS if i % 2 == 0 else ARMS[::-1]  # alternate: neither arm always runs first
        for arm in order:
            console.print(f"[bold]convergence seed {seed}: {arm}, {steps} steps")
            train = lightning_arm if arm == "lightning" else plain_arm
            res = train(fcfg, nets[arm], dm, device, seed)
            res.metrics, res.eval_s = evaluate(fcfg, nets[arm], dm)
            console.print(f"  {res.total_s:.1f} s, steps 2-{steps}: {res.images / res.seconds:.2f} images/s, "
                          f"bbox AP {100 * res.metrics['bbox/AP']:.1f}")
            results[arm] = res
            gc.collect()
        lit, plain = results["lightning"], results["plain"]
        runs.append({
            "seed": seed,
            "lightning": lit.entry(),
            "plain": plain.entry(),
            "first_loss_abs_diff": abs(lit.losses[0] - plain.losses[0]),
            "loss_agree_steps": agree_steps(lit.losses, plain.losses),
            "same_init_weights": lit.init_weights == plain.init_weights,
            "same_first_batch": lit.first_batch["image_ids"] == plain.first_batch["image_ids"]
            and math.isclose(lit.first_batch["sum"], plain.first_batch["sum"], rel_tol=1e-9),
        })
    assert fcfg is not None and dm is not None
    t = fcfg.trainer
    return {
        **summarize(runs),
        "seeds": list(c.seeds),
        "steps": steps,
        "steps_from": "recipe" if c.max_steps is None else "bench.convergence.max_steps",
        "batches_per_epoch": per_epoch,
        "batch_size": int(fcfg.data.batch_size),
        "eval_split": dm.test_split,
        "eval_images": len(dm.test_dataset),
        "eval_checkpoint": "last",
        "precision": str(t.precision),
        "optimizer": OmegaConf.to_container(fcfg.optim.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(fcfg.optim.scheduler, resolve=True),
        "gradient_clip_val": t.get("gradient_clip_val"),
        "gradient_clip_algorithm": t.get("gradient_clip_algorithm") or "norm",
        "runs": runs,
    }
