"""The run's loggers: built from ``cfg.logger`` (W&B runs named and grouped per sweep job), and a CSV
logger that keeps a resumed run's history (Lightning's CSVLogger deletes it)."""

from __future__ import annotations

import csv
import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig

from detection.atomic import atomic_path

__all__ = ["ResumableCSVLogger", "build_loggers", "finish_loggers", "log_config", "wandb_info", "wandb_mode"]

log = logging.getLogger("pyramidlab")


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer without "Previous log files ... will be deleted": an existing
    ``metrics.csv`` is appended to, its header kept (a new column rewrites the file, as upstream)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def rows(self) -> int:
        """Data rows in the file (after writing what is buffered)."""
        self.save()
        if not self._fs.isfile(self.metrics_file_path):
            return 0
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            return max(sum(1 for _ in csv.reader(f)) - 1, 0)

    def has_row(self, step: int, metrics: dict) -> bool:
        """Whether a data row of ``step`` holds a value for any key of ``metrics``."""
        self.save()
        if not self._fs.isfile(self.metrics_file_path):
            return False
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            return any(_step(r) == step and any(r.get(k) for k in metrics) for r in csv.DictReader(f))

    def truncate(self, n: int, step: int) -> None:
        """Keep the first ``n`` data rows and later ones whose step is below ``step``: a resumed run
        drops what the interrupted one logged after its checkpoint for steps it trains again
        (``n = step = 0`` starts a fresh log)."""
        self.save()
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
        keep = [r for i, r in enumerate(rows) if i < n or _step(r) < step]
        if len(keep) == len(rows):
            return
        with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(keep)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume in the same run folder.

    The number of rows written when a checkpoint is saved travels in the checkpoint
    (``RestoreTrainLoaderState`` records it); the resumed run cuts the file back to it and
    appends, so ``csv/metrics.csv`` holds every step once. Same arguments as ``CSVLogger``.
    """

    def __init__(self, *args: Any, flush_logs_every_n_steps: int = 1, **kwargs: Any) -> None:
        # Every row reaches the file when it is logged (CSVLogger's default keeps 100 steps in memory,
        # so a kill -9 took every row since the last checkpoint's flush with it). The row of the batch a
        # checkpoint was saved in comes after it; it travels in the checkpoint (RestoreTrainLoaderState).
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment  # other DDP ranks get a dummy, as with CSVLogger
    def experiment(self) -> _KeepingWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]


# ------------------------------------------------------------------ building them from the config
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
    from lightning_modules.hydra_callbacks import current_sweep_id

    sweep = current_sweep_id()
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
