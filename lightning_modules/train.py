"""pyramidlab-train: seed, data, model, callbacks, loggers, trainer; fit; test the best checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from lightning_modules import builders as B
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


def train(cfg: DictConfig) -> dict[str, float]:
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
    loggers = B.build_loggers(cfg)
    trainer = B.build_trainer(cfg, callbacks, loggers)
    try:
        B.log_config(loggers, resolved)
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        fit_s = time.perf_counter() - start
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
                extra = {
                    **B.params_entry(net),
                    "fit_seconds": round(fit_s, 1),
                    "test_seconds": round(test_s, 1),
                    "checkpoint": ckpt,
                }
                paths = B.write_outputs(output_dir, module, extra)
                B.report(module, paths, ckpt)
        return metrics
    finally:
        B.finish_loggers(loggers)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # Returned to Hydra sweepers (Optuna optimises it).
    return metrics.get("bbox/AP")


if __name__ == "__main__":
    main()
