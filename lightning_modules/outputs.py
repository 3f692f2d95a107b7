"""What a run prints and writes at its end: the config tree, metrics.json and the COCO results files,
the metrics table, the parameter counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from detection.atomic import write_json_atomic
from detection.detectors import Detector, parameter_summary
from detection.evaluation import metrics_table
from lightning_modules import hydra_callbacks as H
from lightning_modules.console import echo_to_log, show_config

console = Console()


def print_config(cfg: DictConfig, title: str = "config") -> None:
    """Print the composed config, resolved, as a tree (once per run: a sweep prints it when it starts);
    also into the log file (``train.log``)."""
    show_config(cfg, title, console, in_multirun=H.in_multirun())


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


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
