"""pyramidlab-train: seed, data, model, callbacks, loggers, trainer; fit; test the best checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from detection.evaluation import write_json_atomic
from lightning_modules import builders as B
from lightning_modules import hydra_callbacks as H
from lightning_modules.paths import CONF_DIR


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``last`` means ``<run dir>/checkpoints/last.ckpt``; anything else must be a file."""
    if ckpt_path in (None, ""):
        return None
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if not path.is_file():
        hint = " (pass hydra.run.dir=<the run to resume> with ckpt_path=last)" if ckpt_path == "last" else ""
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {path}{hint}")
    return str(path)


def train(cfg: DictConfig, job_type: str = "train") -> dict[str, float]:
    """Fit, then test the best checkpoint; returns the test metrics (``bbox/AP`` … in 0–1).

    With ``test=false`` it returns the best validation ``val/bbox/AP`` instead (when a
    checkpoint callback monitors it). Rank 0 writes ``metrics.json`` in both cases.
    """
    B.print_config(cfg, "pyramidlab-train")
    if cfg.get("seed") is not None:  # `if cfg.seed` would skip seed=0
        L.seed_everything(cfg.seed, workers=True)
    output_dir = cfg.paths.output_dir
    resume = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    net = B.build_net(cfg)
    datamodule = B.build_datamodule(cfg.data, net.with_masks)
    module = B.build_module(cfg, net)
    resolved = B.resolved_config(cfg)
    module.run_config = resolved
    callbacks = B.build_callbacks(cfg)
    loggers = B.build_loggers(cfg, job_type=job_type)
    exit_code = 1  # until the run completes: a failed job's W&B run is marked failed
    try:
        trainer = B.build_trainer(cfg, callbacks, loggers)
        B.log_config(loggers, resolved)
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        fit_s = time.perf_counter() - start
        extra = {**B.params_entry(net), "fit_seconds": round(fit_s, 1)}
        if trainer.is_global_zero and (info := B.wandb_info(loggers)):
            extra["wandb"] = info  # where the sweep report logs its table
        metrics: dict[str, float] = {}
        if cfg.get("test"):
            ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if not ckpt or not Path(ckpt).is_file():
                ckpt = None  # fast_dev_run / no validation: test the weights in memory
            start = time.perf_counter()
            trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
            test_s = time.perf_counter() - start
            metrics = dict(module.test_metrics)
            if trainer.is_global_zero:
                extra.update({"test_seconds": round(test_s, 1), "checkpoint": ckpt})
                paths = B.write_outputs(output_dir, module, extra)
                B.report(module, paths, ckpt)
        else:
            cb = trainer.checkpoint_callback
            if cb is not None and cb.monitor == "val/bbox/AP" and cb.best_model_score is not None:
                metrics = {"val/bbox/AP": float(cb.best_model_score)}
            if trainer.is_global_zero:
                checkpoint = cb.best_model_path if cb is not None else None
                write_json_atomic(
                    Path(output_dir) / "metrics.json",
                    {"status": "completed", **metrics, **extra, "checkpoint": checkpoint or None},
                )
        exit_code = 0
        return metrics
    finally:
        B.finish_loggers(loggers, exit_code=exit_code)


def objective(metrics: dict[str, float] | None) -> float | None:
    """What a sweeper optimises: test ``bbox/AP`` of the best checkpoint on ``data.test_split``
    (the val split unless set), or the best ``val/bbox/AP`` with ``test=false``; None if failed."""
    if metrics is None:
        return None
    value = metrics.get("bbox/AP", metrics.get("val/bbox/AP"))
    return None if value is None else float(value)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    # A failing job is recorded and, in a multirun, returns None (see run_guarded).
    return objective(H.run_guarded(train, cfg))


def main() -> None:
    """Console script ``pyramidlab-train``."""
    H.main_with_hints(hydra_main, "train")


if __name__ == "__main__":
    main()
