"""Loggers that keep a resumed run's history (Lightning's CSVLogger deletes it)."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from detection.atomic import atomic_path

__all__ = ["ResumableCSVLogger"]


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

    @property
    @rank_zero_experiment  # other DDP ranks get a dummy, as with CSVLogger
    def experiment(self) -> _KeepingWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]
