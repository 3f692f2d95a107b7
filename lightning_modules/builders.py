"""Instantiate the pieces of a run from a composed Hydra config; shared by the entry points."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from detection.atomic import write_json_atomic
from detection.detectors import Detector, parameter_summary
from detection.evaluation import metrics_table
from lightning_modules import hydra_callbacks as H
from lightning_modules.callbacks import RestoreTrainLoaderState
from lightning_modules.checkpoints import build_net, load_checkpoint, load_net_state  # noqa: F401 - re-exported
from lightning_modules.console import echo_to_log, show_config
from lightning_modules.detection_eval import tta_settings
from lightning_modules.detection_module import DetectionModule
from lightning_modules.optim import build_optimizer

log = logging.getLogger("pyramidlab")
console = Console()


def build_datamodule(data_cfg: DictConfig, with_masks: bool) -> L.LightningDataModule:
    # _convert_="all": plain containers, so saved hyper-parameters load with weights_only.
    return instantiate(data_cfg, with_masks=with_masks, _convert_="all")


def build_module(cfg: DictConfig, net: Detector) -> DetectionModule:
    return DetectionModule(
        net,
        optimizer=build_optimizer(cfg),
        scheduler=OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
        eval_backend=cfg.eval.backend,
        tta=tta_settings(cfg.eval.get("tta"), cfg.data.max_size if cfg.get("data") else None),
    )


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    node = cfg.get("callbacks") or {}
    return [instantiate(c) for c in node.values() if c is not None and "_target_" in c]


def wandb_api_key_configured() -> bool:
    """An API key in ``WANDB_API_KEY`` or in ``~/.netrc`` (what ``wandb login`` writes) for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(configured: str | None) -> str | None:
    """The run's mode: the config's, else ``WANDB_MODE``'s (None: let wandb read it), else by API key.

    Passed to ``wandb.init`` per run, never through the environment: ``WandbLogger(offline=True)``
    sets ``WANDB_MODE`` for the whole process, which later jobs of a multirun inherit.
    """
    if configured:
        if configured not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.wandb.mode={configured}: expected online, offline, disabled or null")
        return configured
    if os.environ.get("WANDB_MODE"):
        return None
    if wandb_api_key_configured():
        return "online"
    log.warning("W&B: no API key (WANDB_API_KEY or `wandb login`): logging offline; upload later with "
                "`wandb sync <run dir>/wandb/offline-run-*`")
    return "offline"


def _wandb_kwargs(c: DictConfig, cfg: DictConfig, job_type: str | None) -> dict[str, Any]:
    """Run identity for a WandbLogger node: defaults that depend on where the job runs."""
    sweep = H.current_sweep_id()
    output_dir = cfg.get("paths", {}).get("output_dir")
    return {
        # one run per job, named like its folder; all jobs of a sweep share its id as group
        "name": c.get("name") or (Path(output_dir).name if output_dir else None),
        "group": c.get("group") or sweep,
        "job_type": job_type or c.get("job_type"),
        "mode": wandb_mode(c.get("mode")),
    }


def build_loggers(cfg: DictConfig, job_type: str | None = None) -> list[Logger]:
    """The loggers of ``cfg.logger``; ``job_type`` (the stage: train, eval, srfgan_stage1, ...) wins over the config's."""
    node = cfg.get("logger") or {}
    loggers: list[Logger] = []
    for c in node.values():
        if c is None or "_target_" not in c:
            continue
        if str(c._target_).endswith("WandbLogger"):
            loggers.append(instantiate(c, **_wandb_kwargs(c, cfg, job_type)))
        else:
            loggers.append(instantiate(c))
    return loggers


def wandb_info(loggers: list[Logger]) -> dict[str, Any] | None:
    """Where this job's W&B run lives (recorded in ``metrics.json`` for the sweep report); rank 0 only."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run = lg.experiment
            if not hasattr(run, "project"):  # rank > 0: a dummy experiment
                return None
            return {
                "project": run.project,
                "entity": run.entity or None,
                "group": run.group or None,
                "job_type": run.job_type,
                "id": run.id,
                "name": run.name,
                "mode": "offline" if run.offline else "online",
                "dir": str(run.dir),
            }
    return None


def _uses_ddp(tcfg: DictConfig) -> bool:
    return "ddp" in str(tcfg.get("strategy", "")) and "spawn" not in str(tcfg.get("strategy", ""))


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    tcfg = cfg.trainer
    if tcfg.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={tcfg.accelerator} but no CUDA device is visible; choose trainer=cpu, or "
            "trainer=ddp_cpu for two CPU processes"
        )
    if tcfg.get("accelerator") == "cpu" and str(tcfg.get("precision")) in ("16", "16-mixed"):
        # Lightning would silently switch to bf16-mixed: that changes the experiment.
        raise ValueError(
            f"trainer.precision={tcfg.precision} is not available on CPU; choose 32, bf16-mixed or bf16-true"
        )
    if tcfg.get("sync_batchnorm") and tcfg.get("accelerator") == "cpu":
        # torch's SyncBatchNorm runs on GPUs only; it would fail at the first forward
        raise ValueError("trainer.sync_batchnorm=true needs GPUs (trainer=ddp); set it false on CPU")
    if _uses_ddp(tcfg):
        H.install_ddp_child_command()
    # not a config choice: without it a mid-epoch resume silently replays the epoch's first batches
    callbacks = [*callbacks, RestoreTrainLoaderState()]
    return instantiate(tcfg, callbacks=callbacks, logger=loggers or False)


def print_config(cfg: DictConfig, title: str = "config") -> None:
    """Print the composed config, resolved, as a tree (once per run: a sweep prints it when it starts);
    also into the log file (``train.log``)."""
    show_config(cfg, title, console, in_multirun=H.in_multirun())


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def log_config(loggers: list[Logger], cfg: dict) -> None:
    for lg in loggers:
        lg.log_hyperparams(cfg)


def finish_loggers(loggers: list[Logger], exit_code: int = 0) -> None:
    """End each W&B run so the next job of a multirun gets its own (wandb keeps one run per process otherwise); exit_code 1 marks it failed."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=exit_code)


def write_outputs(output_dir: str | Path, module: L.LightningModule, extra: dict[str, Any]) -> dict[str, Path]:
    """metrics.json + detections_{bbox,segm}.json in COCO results format, atomically, from the test
    epoch of ``module.evaluation`` (a DetectionModule's or the SRF extractor's)."""
    ev = module.evaluation
    out = Path(output_dir)
    paths = {"metrics": out / "metrics.json", "detections_bbox": out / "detections_bbox.json"}
    metrics = {k: float(v) for k, v in ev.test_metrics.items()}
    # median forward time per image over test batches (batch = data.val_batch_size; the
    # papers' "Time" is batch-1 latency on a GPU: see the benchmark for that figure)
    timing = {"time_ms": round(ev.test_time_ms, 2), "time_batch_size": ev.test_batch_size}
    write_json_atomic(paths["metrics"], {"status": "completed", **metrics, **timing, **extra})
    write_json_atomic(paths["detections_bbox"], ev.test_results["bbox"])
    if ev.with_masks:
        paths["detections_segm"] = out / "detections_segm.json"
        write_json_atomic(paths["detections_segm"], ev.test_results["segm"])
    return paths


def report(module: L.LightningModule, paths: dict[str, Path], ckpt: str | None) -> None:
    table = metrics_table(module.evaluation.test_metrics)
    console.print(table)
    echo_to_log(table)
    if ckpt:
        console.print(f"checkpoint:       {ckpt}")
    for name, p in paths.items():
        console.print(f"{name + ':':<18}{p}")


def params_entry(net: Detector) -> dict[str, Any]:
    s = parameter_summary(net)
    return {"params_total": s["params_total"], "params_trainable": s["params_trainable"]}
