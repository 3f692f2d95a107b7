"""pyramidlab-train: seed, data, model, callbacks, loggers, trainer; fit; test the best checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from detection.atomic import write_json_atomic
from lightning_modules import builders as B
from lightning_modules import checkpoints as CK
from lightning_modules import hydra_callbacks as H
from lightning_modules import loggers as LG
from lightning_modules import outputs as OUT
from lightning_modules.callbacks import check_resume
from lightning_modules.config_checks import resolve_num_classes
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


@dataclass
class FitResult:
    """What :func:`fit_and_test` leaves behind: the trainer (still holding the process group), the best
    checkpoint (None when none was written), the test metrics (empty without test) and the figures
    written next to them in ``metrics.json`` (parameters, fit/test seconds, checkpoint, ...)."""

    trainer: L.Trainer
    best: str | None
    metrics: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


def fit_and_test(
    cfg: DictConfig,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    job_type: str,
    test: bool,
    extra: dict[str, Any],
    resume: str | None = None,
    after_fit: Callable[[L.Trainer], dict[str, Any]] | None = None,
) -> FitResult:
    """The loop every training entry point shares (pyramidlab-train, each pyramidlab-srfgan stage).

    Callbacks and loggers from ``cfg``; fit (from ``resume`` if given); ``after_fit(trainer)`` may add
    figures (the GAN pipeline saves its final checkpoint there); with ``test``, test the checkpoint
    ``eval.checkpoint`` names — ``best`` by val AP (the weights in memory when there is none, e.g.
    fast_dev_run) or ``last``, the final weights — on the datamodule's test split and, on rank 0,
    write ``metrics.json`` (with ``eval_checkpoint`` and ``eval_split``) + detections into
    ``cfg.paths.output_dir`` and print the table. ``extra["checkpoint"]`` becomes the tested
    checkpoint file. Loggers are finished in every case, a failed run's W&B run marked failed.
    """
    output_dir = cfg.paths.output_dir
    resolved = OUT.resolved_config(cfg)
    # stored in every checkpoint (pyramidlab_config): pyramidlab-eval and later SRF stages rebuild from it
    module.run_config = resolved
    callbacks = B.build_callbacks(cfg)
    loggers = LG.build_loggers(cfg, job_type=job_type)
    exit_code = 1  # until the run completes: a failed job's W&B run is marked failed
    try:
        trainer = B.build_trainer(cfg, callbacks, loggers)
        LG.log_config(loggers, resolved)
        start = time.perf_counter()
        if resume:
            check_resume(module, resume)  # one line naming the file and the mismatching parts
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        extra = {**extra, "fit_seconds": round(time.perf_counter() - start, 1)}
        extra.update(getattr(datamodule, "data_counts", dict)())  # data/skipped_images, data/dropped_boxes
        if after_fit is not None:
            extra.update(after_fit(trainer))
        if trainer.is_global_zero and (info := LG.wandb_info(loggers)):
            extra["wandb"] = info  # where the sweep report logs its table
        cb = trainer.checkpoint_callback
        best = cb.best_model_path if cb is not None else ""
        best = best if best and Path(best).is_file() else None
        # eval.checkpoint=last: the final weights of the fixed schedule (the papers' protocol); best:
        # the checkpoint chosen on val (the weights in memory when there is none, e.g. fast_dev_run)
        which = str((cfg.get("eval") or {}).get("checkpoint", "best"))
        if which not in ("best", "last"):
            raise ValueError(f"eval.checkpoint={which!r}: expected best or last")
        tested = best if which == "best" else None
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        final = extra.get("checkpoint") or (str(last) if last.is_file() else None)  # after_fit may name one
        extra["checkpoint"] = tested or final
        extra["eval_checkpoint"] = "best" if tested else ("last" if which == "last" else "final (no best checkpoint)")
        metrics: dict[str, float] = {}
        if test:
            extra["eval_split"] = _test_split(datamodule)
            start = time.perf_counter()
            # verbose=False: one metrics table, ours in percent (not Lightning's 0-1 one as well)
            trainer.test(module, datamodule=datamodule, ckpt_path=tested, weights_only=True, verbose=False)
            extra["test_seconds"] = round(time.perf_counter() - start, 1)
            extra.update(getattr(datamodule, "data_counts", dict)())  # now with the test split's
            metrics = {k: float(v) for k, v in module.evaluation.test_metrics.items()}
            if trainer.is_global_zero:
                paths = OUT.write_outputs(output_dir, module, extra)
                OUT.report(module, paths, extra["checkpoint"])
        exit_code = 0
        return FitResult(trainer, best, metrics, extra)
    finally:
        LG.finish_loggers(loggers, exit_code=exit_code)


def _test_split(datamodule: L.LightningDataModule) -> str | None:
    """The split the test metrics come from (written beside them in metrics.json and reports)."""
    return getattr(datamodule, "test_split", None)


def train(cfg: DictConfig, job_type: str = "train") -> dict[str, float]:
    """Fit, then test the best checkpoint; returns the test metrics (``bbox/AP`` … in 0–1).

    With ``test=false`` it returns the best validation ``val/bbox/AP`` instead (when a
    checkpoint callback monitors it). Rank 0 writes ``metrics.json`` in both cases.
    """
    OUT.print_config(cfg, "pyramidlab-train")
    if cfg.get("seed") is not None:  # `if cfg.seed` would skip seed=0
        L.seed_everything(cfg.seed, workers=True)
    resume = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    resolve_num_classes(cfg.data)  # data.num_classes: null -> the annotation file's (the CLI did it already)
    net = CK.build_net(cfg)
    datamodule = B.build_datamodule(cfg.data, net.with_masks)
    module = B.build_module(cfg, net)
    test = bool(cfg.get("test"))
    result = fit_and_test(
        cfg, module, datamodule, job_type=job_type, test=test, extra=OUT.params_entry(net), resume=resume
    )
    if test:
        return result.metrics
    cb = result.trainer.checkpoint_callback
    metrics: dict[str, float] = {}
    if cb is not None and cb.monitor == "val/bbox/AP" and cb.best_model_score is not None:
        metrics = {"val/bbox/AP": float(cb.best_model_score)}
    if result.trainer.is_global_zero:
        write_json_atomic(
            Path(cfg.paths.output_dir) / "metrics.json",
            {"status": "completed", **metrics, **result.extra, "checkpoint": result.best},
        )
    return metrics


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
