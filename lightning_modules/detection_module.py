"""DetectionModule: the LightningModule that trains and evaluates any assembled detector."""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
from torch import Tensor

from detection.detectors import Detector
from lightning_modules.detection_eval import DetectionEvaluation
from lightning_modules.optim import build_scheduler, check_finite, check_scheduler, iteration_budget


class DetectionModule(L.LightningModule):
    """Trains a :class:`~detection.detectors.Detector` and evaluates it with COCO metrics.

    Args:
        net: the assembled detector (built from config before this module).
        optimizer: a partial ``torch.optim`` constructor (``optimizer(params)``).
        scheduler: ``name`` (``step | cosine | constant``), ``warmup_iters``,
            ``warmup_ratio``, ``milestones`` (epochs, for ``step``), ``gamma``,
            ``final_ratio`` (for ``cosine``). Stepped every optimizer step.
        eval_backend: ``hotcoco`` (default), ``faster_coco_eval`` or ``pycocotools``.
        category_ids: original dataset category id of each contiguous label (for the
            detections file); the datamodule provides it at fit/test time if None.
        tta: test-time augmentation of the test step (``eval.tta``; see
            :func:`~lightning_modules.detection_eval.tta_settings`): ``scales`` (shorter sides),
            ``flip``, ``iou_threshold``, ``max_detections``, ``max_size``. None or neither scales
            nor flip: plain evaluation.

    Evaluation is ``self.evaluation`` (:class:`~lightning_modules.detection_eval.DetectionEvaluation`):
    the test metrics, detections and forward times are read from there after ``trainer.test``.
    """

    def __init__(
        self,
        net: Detector,
        optimizer: functools.partial,
        scheduler: dict | None = None,
        eval_backend: str = "hotcoco",
        category_ids: list[int] | None = None,
        tta: dict | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_cfg = check_scheduler(scheduler)
        self.evaluation = DetectionEvaluation(net.with_masks, net.num_classes, eval_backend, category_ids, tta)
        self.run_config: dict | None = None  # resolved config, stored in checkpoints

    def setup(self, stage: str) -> None:
        self.evaluation.setup(getattr(self.trainer, "datamodule", None) if self._trainer is not None else None)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.net(images, targets)
        loss = sum(losses.values())
        check_finite(f"epoch {self.current_epoch}, step {self.global_step}", losses)
        bs = len(images)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        # the detached terms ride along for callbacks (curves) without a metrics lookup
        return {"loss": loss, "terms": {k: v.detach() for k, v in losses.items()}}

    # ---------------------------------------------------------------- evaluation
    def validation_step(self, batch, batch_idx: int) -> None:
        self.evaluation.validation_step(self.net, batch)

    def on_validation_epoch_end(self) -> None:
        self.evaluation.on_validation_epoch_end(self)

    def test_step(self, batch, batch_idx: int) -> None:
        self.evaluation.test_step(self.net, batch)

    def on_test_epoch_start(self) -> None:
        self.evaluation.on_test_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.evaluation.on_test_epoch_end(self)

    # ------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory([p for p in self.net.parameters() if p.requires_grad])
        scheduler = build_scheduler(optimizer, self.scheduler_cfg, *iteration_budget(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["pyramidlab_config"] = self.run_config
        self.evaluation.on_save_checkpoint(checkpoint)
