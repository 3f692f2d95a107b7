"""Training-layer callbacks: plots people would rather see than read; a resume fix."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lightning_modules.compat import (
    batches_that_stepped,
    pending_step_row,
    restore_loader_states,
    train_loaders,
)

log = logging.getLogger("pyramidlab")


class PlotCurves(L.Callback):
    """Plot training losses and validation AP to ``<dirpath>/curves.png`` (and W&B).

    Losses are smoothed over ``window`` logged steps; AP is plotted per validation in
    percent. Rank 0 only; redrawn after every validation so a killed run keeps a plot.

    Args:
        dirpath: folder of the PNG (the run dir).
        window: moving-average window for the loss curves, in logged steps.
    """

    def __init__(self, dirpath: str, window: int = 20) -> None:
        self.dirpath = Path(dirpath)
        self.window = window
        self.losses: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.ap: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(outputs, dict) or "loss" not in outputs:
            return
        step = trainer.global_step
        self.losses["loss"].append((step, float(outputs["loss"])))
        for k, v in outputs.get("terms", {}).items():
            self.losses[k].append((step, float(v)))

    def on_validation_end(self, trainer, pl_module) -> None:
        # not on_validation_epoch_end: callbacks run that hook before the module logs the
        # epoch's metrics, which would plot the previous validation's AP
        if trainer.sanity_checking:
            return
        for k in ("val/bbox/AP", "val/bbox/AP50", "val/segm/AP"):
            if k in trainer.callback_metrics:
                self.ap[k.removeprefix("val/")].append((trainer.global_step, 100 * float(trainer.callback_metrics[k])))
        if trainer.is_global_zero:
            self.plot(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.losses:
            path = self.plot(trainer)
            if path is not None:
                for lg in trainer.loggers:
                    if isinstance(lg, WandbLogger):
                        lg.log_image("curves", [str(path)])
                    elif isinstance(lg, TensorBoardLogger):
                        from torchvision.io import ImageReadMode, decode_image

                        image = decode_image(str(path), mode=ImageReadMode.RGB)
                        lg.experiment.add_image("curves", image, trainer.global_step, dataformats="CHW")

    def plot(self, trainer) -> Path | None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.losses:
            return None
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name, pts in sorted(self.losses.items()):
            steps, vals = zip(*pts)
            w = max(1, min(self.window, len(vals) // 5 or 1))
            smooth = [sum(vals[max(0, i - w + 1): i + 1]) / len(vals[max(0, i - w + 1): i + 1]) for i in range(len(vals))]
            # a one-point series has no line to draw: a marker keeps a short run's panel from looking empty
            a.plot(steps, smooth, label=name, lw=1.5 if name == "loss" else 1, marker="o" if len(vals) == 1 else None)
        a.set(xlabel="optimizer step", ylabel="loss", title="training losses (smoothed)", yscale="log")
        a.legend(fontsize=8)
        for name, pts in sorted(self.ap.items()):
            steps, vals = zip(*pts)
            b.plot(steps, vals, marker="o", label=name)
        b.set(xlabel="optimizer step", ylabel="AP (%)", title="validation COCO AP")
        if self.ap:
            b.legend(fontsize=8)
        b.grid(alpha=0.3)
        fig.tight_layout()
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / "curves.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)
        return path


class RestoreTrainLoaderState(L.Callback):
    """Hand a checkpoint's train-loader state to the loader when Lightning could not.

    Lightning restores a stateful train loader (``ResumableDataLoader``) in
    ``FitLoop.setup_data`` if the loops were already restored. A module whose
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (ours: per-step
    schedules) runs ``setup_data`` during strategy setup, before the loops are restored,
    and the loader state is then never loaded: the resumed epoch would restart from its
    first batch, and a run resumed at an epoch end would lose the saved random state. At
    ``on_train_start`` the loops are restored; when the run restarts inside an epoch or at its
    end, the pending state is loaded and the loader iterator, made before it arrived, is made
    again (``compat.restore_loader_states``). ``build_trainer`` adds this callback to every trainer.

    The other resume duties of every trainer live here too:

    - the history of a resumed run: the rows ``csv/metrics.csv`` held at each checkpoint are
      saved in it (this callback's state); the resumed run cuts the file back to them and
      appends (a run that does not resume starts a fresh file). Lightning writes a batch's row after
      that batch's checkpoints: a checkpoint saved inside a batch carries the row too, and the resumed
      run writes it if the interrupted one died before it did. TensorBoard's writer is
      reopened with ``purge_step`` = the resumed step, so the steps the interrupted run logged
      after its checkpoint are hidden, not drawn twice.
    """

    def __init__(self) -> None:
        self._csv_rows: dict[str, int] | None = None  # from the checkpoint resumed from
        self._csv_step = 0
        self._pending: dict | None = None  # the row of the checkpoint's batch, logged after it
        self._trainer: L.Trainer | None = None
        self._in_batch = False  # a checkpoint saved now is followed by its batch's log row

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._in_batch = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._in_batch = False

    def on_validation_start(self, trainer, pl_module) -> None:
        self._in_batch = False

    def state_dict(self) -> dict:
        trainer = self._trainer
        rows = {lg.log_dir: lg.experiment.rows() for lg in self._csv_loggers(trainer)}
        # the logged step of the first batch the resumed run will train: Lightning writes a batch's row
        # after the checkpoint callbacks of that batch ran
        step = batches_that_stepped(trainer) + int(self._in_batch) if trainer else 0
        state = {"csv_rows": rows, "csv_step": step}
        if trainer is not None and self._in_batch:
            row = pending_step_row(trainer)
            if row is not None:
                state["pending_row"] = {"step": step - 1, "epoch": trainer.current_epoch, "metrics": row}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._csv_rows = dict(state_dict.get("csv_rows") or {})
        self._csv_step = int(state_dict.get("csv_step", 0))
        self._pending = state_dict.get("pending_row")

    @staticmethod
    def _csv_loggers(trainer: L.Trainer | None) -> list:
        from lightning_modules.loggers import ResumableCSVLogger

        if trainer is None or not trainer.is_global_zero:
            return []
        return [lg for lg in trainer.loggers if isinstance(lg, ResumableCSVLogger)]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for dl in train_loaders(trainer):
            # an epoch cut short by limit_train_batches ends before the loader does: a checkpoint at its
            # last batch is an epoch end, not a resume point inside it
            dl._epoch_batches = trainer.num_training_batches
        restore_loader_states(trainer)
        resuming, rows = bool(trainer.ckpt_path), self._csv_rows or {}
        for lg in self._csv_loggers(trainer):
            if not resuming:
                lg.experiment.truncate(0, 0)
            elif lg.log_dir in rows:  # a checkpoint without the count: keep everything
                lg.experiment.truncate(rows[lg.log_dir], self._csv_step)
            pending = self._pending if resuming else None
            if pending and not lg.experiment.has_row(pending["step"], pending["metrics"]):
                # killed between the checkpoint and the row: the resumed run starts after this batch
                lg.log_metrics({**pending["metrics"], "epoch": pending["epoch"]}, step=pending["step"])
                lg.save()
        if resuming and trainer.is_global_zero:
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger) and lg._experiment is not None:
                    lg._experiment.close()
                    lg._experiment = None
                    lg._kwargs["purge_step"] = trainer.global_step
        self._csv_rows = self._pending = None


def check_resume(module: L.LightningModule, path: str) -> None:
    """Before resuming from ``path``: load it weights-only and strictly into ``module``.

    A truncated file, one that would run pickled code, or another architecture's checkpoint is
    one line naming the file (and the missing / unexpected / wrong-shape parts); Lightning's own
    "Error(s) in loading state_dict" names neither. Lightning loads the same weights again next.
    """
    from detection.state import load_prefixed_state
    from lightning_modules.checkpoints import load_checkpoint

    ckpt = load_checkpoint(path, "ckpt_path")
    load_prefixed_state(module, ckpt["state_dict"], "", str(path), "ckpt_path")


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes at the end of training and names the path when a write fails.

    Args:
        save_on_train_end: also save when training ends, if the last save was at an earlier
            step (``every_n_train_steps=5`` with 24 steps: Lightning's last save is step 20).
        Everything else: as ``ModelCheckpoint``.

    Lightning writes each file through an fsspec transaction (a temporary file moved into
    place), so a failed write leaves the previous checkpoint of that name as it was.
    """

    def __init__(self, *args, save_on_train_end: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.save_on_train_end = save_on_train_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A step-interval save that lands on an epoch's last batch is made at the epoch's end instead:
        # Lightning resumes cleanly from an epoch end, but a run resumed from a save inside the last
        # batch and saved again later continued with a whole extra epoch (seen with kill -9 tests).
        last = batch_idx + 1 >= trainer.num_training_batches
        n = self._every_n_train_steps
        self._deferred = bool(last and n and (trainer.global_step % n == 0))
        if not self._deferred:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if getattr(self, "_deferred", False) and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if self.monitor is None:
                self._save_none_monitor_checkpoint(trainer, candidates)
            else:
                self._save_topk_checkpoint(trainer, candidates)
        self._deferred = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_on_train_end and not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            if self.monitor is None:
                self._save_none_monitor_checkpoint(trainer, candidates)
            else:
                self._save_topk_checkpoint(trainer, candidates)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as e:
            reason = e.strerror or str(e).splitlines()[0]
            raise OSError(e.errno, f"cannot write checkpoint {filepath}: {reason}; the previous file there, if "
                                   "any, is unchanged") from e
