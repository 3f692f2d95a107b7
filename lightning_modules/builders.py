"""Instantiate the pieces of a run from a composed Hydra config; shared by the entry points."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from detection.detectors import Detector, parameter_summary
from detection.evaluation import metrics_table, write_json_atomic
from lightning_modules.detection_module import DetectionModule

log = logging.getLogger("pyramidlab")
console = Console()


def build_net(cfg: DictConfig) -> Detector:
    """detector(backbone=partial body, neck=partial neck) -> Detector."""
    for group in ("detector", "backbone", "neck"):
        if cfg.get(group) is None:
            raise ValueError(f"config group {group!r} is empty; choose one with {group}=NAME")
    backbone = instantiate(cfg.backbone)
    neck = instantiate(cfg.neck)
    return instantiate(cfg.detector, backbone=backbone, neck=neck)


def build_datamodule(data_cfg: DictConfig, with_masks: bool) -> L.LightningDataModule:
    # _convert_="all": plain containers, so saved hyper-parameters load with weights_only.
    return instantiate(data_cfg, with_masks=with_masks, _convert_="all")


def build_module(cfg: DictConfig, net: Detector) -> DetectionModule:
    return DetectionModule(
        net,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
        eval_backend=cfg.eval.backend,
    )


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    node = cfg.get("callbacks") or {}
    return [instantiate(c) for c in node.values() if c is not None and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list[Logger]:
    node = cfg.get("logger") or {}
    return [instantiate(c) for c in node.values() if c is not None and "_target_" in c]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    tcfg = cfg.trainer
    if tcfg.get("accelerator") == "gpu" and not torch.cuda.is_available():
        raise ValueError(
            "trainer.accelerator=gpu but no CUDA device is visible; use trainer=cpu (or trainer=ddp_cpu for "
            "two CPU processes)"
        )
    if tcfg.get("accelerator") == "cpu" and str(tcfg.get("precision")) in ("16", "16-mixed"):
        # Lightning would silently switch to bf16-mixed: that changes the experiment.
        raise ValueError(
            f"trainer.precision={tcfg.precision} is not available on CPU; choose 32, bf16-mixed or bf16-true"
        )
    return instantiate(tcfg, callbacks=callbacks, logger=loggers or False)


def print_config(cfg: DictConfig, title: str = "config") -> None:
    """Print the composed config as a tree, one branch per top-level group."""
    tree = Tree(f"[bold]{title}")
    for key, value in cfg.items():
        branch = tree.add(f"[bold cyan]{key}")
        text = OmegaConf.to_yaml(value, resolve=False) if isinstance(value, DictConfig) else str(value)
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    console.print(tree)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def log_config(loggers: list[Logger], cfg: dict) -> None:
    for lg in loggers:
        lg.log_hyperparams(cfg)


def finish_loggers(loggers: list[Logger]) -> None:
    """End each W&B run so the next job of a multirun gets its own (PITFALLS)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            if wandb.run is not None:
                wandb.finish()


def write_outputs(output_dir: str | Path, module: DetectionModule, extra: dict[str, Any]) -> dict[str, Path]:
    """metrics.json + detections_{bbox,segm}.json in COCO results format, atomically."""
    out = Path(output_dir)
    paths = {"metrics": out / "metrics.json", "detections_bbox": out / "detections_bbox.json"}
    metrics = {k: float(v) for k, v in module.test_metrics.items()}
    # median forward time per image over test batches (batch = data.val_batch_size; the
    # papers' "Time" is batch-1 latency on a GPU: see the benchmark for that figure)
    timing = {"time_ms": round(module.test_time_ms, 2), "time_batch_size": module.test_batch_size}
    write_json_atomic(paths["metrics"], {**metrics, **timing, **extra})
    write_json_atomic(paths["detections_bbox"], module.test_results["bbox"])
    if module.net.with_masks:
        paths["detections_segm"] = out / "detections_segm.json"
        write_json_atomic(paths["detections_segm"], module.test_results["segm"])
    return paths


def report(module: DetectionModule, paths: dict[str, Path], ckpt: str | None) -> None:
    console.print(metrics_table(module.test_metrics))
    if ckpt:
        console.print(f"checkpoint:       {ckpt}")
    for name, p in paths.items():
        console.print(f"{name + ':':<18}{p}")


def params_entry(net: Detector) -> dict[str, Any]:
    s = parameter_summary(net)
    return {"params_total": s["params_total"], "params_trainable": s["params_trainable"]}


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without executing pickled code (``weights_only``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file; say which
        raise ValueError(f"ckpt_path: cannot load {path} as a weights-only checkpoint: {e}".splitlines()[0]) from e


def load_net_state(net: torch.nn.Module, state: dict, source: str) -> None:
    """Load ``state`` (keys ``net.*`` of a DetectionModule checkpoint) naming mismatching parts."""
    state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        def parts(keys: list[str]) -> list[str]:
            return sorted({".".join(k.removeprefix("model.").split(".")[:3]) for k in keys})

        detail = "; ".join(
            f"{what}: {parts(keys)[:6]}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape))
            if keys
        )
        raise ValueError(f"checkpoint {source} does not match the configured architecture — {detail}")
    net.load_state_dict(state)
