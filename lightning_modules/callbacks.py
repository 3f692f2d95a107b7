"""Training-layer callbacks: plots people would rather see than read; a resume fix."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

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
    first batch. At ``on_train_start`` the loops are restored; when the run restarts in the
    middle of an epoch, the pending state is loaded and the loader iterator, made before it
    arrived, is made again. ``build_trainer`` adds this callback to every trainer.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        pending = fit_loop._combined_loader_states_to_load
        if fit_loop.restarted_mid_epoch and pending and fit_loop._data_fetcher is not None:
            fit_loop._load_combined_loader_states()
            iter(fit_loop._data_fetcher)
