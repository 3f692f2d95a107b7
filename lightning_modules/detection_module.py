"""DetectionModule: the LightningModule that trains and evaluates any assembled detector."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from detection.detectors import Detector
from detection.evaluation import CocoEvaluator, coco_results
from detection.tta import merge_views, to_original_coords, tta_views, view_image
from lightning_modules.optim import build_scheduler, check_finite, check_scheduler, iteration_budget


def tta_settings(tta: Mapping[str, Any] | None, data_max_size: int | None) -> dict[str, Any] | None:
    """The module's ``tta`` argument from the ``eval.tta`` config node; None when TTA is off.

    ``eval.tta.max_size`` null means ``data.max_size`` (the loader's longer-side cap). Errors
    name the ``eval.tta.*`` key.
    """
    if not tta or not (tta.get("scales") or tta.get("flip")):
        return None
    unknown = sorted(set(tta) - {"scales", "flip", "iou_threshold", "max_detections", "max_size"})
    if unknown:
        raise ValueError(f"eval.tta: unknown keys {unknown}; expected scales, flip, iou_threshold, "
                         "max_detections, max_size")
    scales = tta.get("scales")
    if scales is not None and (isinstance(scales, str | int) or not isinstance(scales, Sequence)):
        raise ValueError(f"eval.tta.scales={scales!r}: expected a list of shorter sides, e.g. [600,800,1000]")
    out = {
        "scales": list(scales or []),
        "flip": bool(tta.get("flip", False)),
        "iou_threshold": float(tta.get("iou_threshold", 0.5)),
        "max_detections": int(tta.get("max_detections", 100)),
        "max_size": tta.get("max_size") if tta.get("max_size") is not None else data_max_size,
    }
    if not 0 < out["iou_threshold"] <= 1:
        raise ValueError(f"eval.tta.iou_threshold={out['iou_threshold']}: expected a value in (0, 1]")
    if out["max_detections"] < 1:
        raise ValueError(f"eval.tta.max_detections={out['max_detections']}: expected a positive number")
    try:
        tta_views(out["scales"], out["flip"], out["max_size"])
    except ValueError as e:
        raise ValueError(f"eval.tta.{e}") from None
    return out


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
        tta: test-time augmentation of the test step (``eval.tta``; see :func:`tta_settings`):
            ``scales`` (shorter sides), ``flip``, ``iou_threshold``, ``max_detections``,
            ``max_size``. None or neither scales nor flip: plain evaluation.
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
        iou_types = ("bbox", "segm") if net.with_masks else ("bbox",)
        self.val_evaluator = CocoEvaluator(iou_types=iou_types, backend=eval_backend)
        self.test_evaluator = CocoEvaluator(iou_types=iou_types, backend=eval_backend)
        self.category_ids = category_ids
        self.tta = dict(tta) if tta and (tta.get("scales") or tta.get("flip")) else None
        self.tta_views = tta_views(self.tta.get("scales"), bool(self.tta.get("flip")), self.tta.get("max_size")) \
            if self.tta else None
        self.test_results: dict[str, list] = {"bbox": [], "segm": []}
        self.test_metrics: dict[str, float] = {}
        self.test_annotated = True  # False: the test split's file lists images only (COCO test-dev): no metrics
        self.test_times_ms: list[float] = []  # model forward per image (incl. pre/post-processing)
        self.test_time_ms = float("nan")
        self.test_batch_size = 0
        self.run_config: dict | None = None  # resolved config, stored in checkpoints

    def setup(self, stage: str) -> None:
        # Original category ids of the data being used (the datamodule is set up first):
        # results files must carry them, not the contiguous labels.
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        ids = getattr(dm, "category_ids", None)
        if ids:
            if len(ids) != self.net.num_classes:
                raise ValueError(
                    f"the dataset has {len(ids)} categories but the detector was built for {self.net.num_classes}"
                )
            self.category_ids = list(ids)
        # metrics against the annotation file itself, as pycocotools scores the written results file
        for ev, ds in ((self.val_evaluator, getattr(dm, "val_dataset", None)),
                       (self.test_evaluator, getattr(dm, "test_dataset", None))):
            if getattr(ds, "coco", None) is not None:
                ev.set_ground_truth(ds.coco)
        test_ds = getattr(dm, "test_dataset", None)
        if getattr(test_ds, "coco", None) is not None:
            # an images-only file (COCO test-dev) has nothing to score against: AP would be -1
            self.test_annotated = len(test_ds.coco.anns) > 0

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
    def _predict_tta(self, images: list[Tensor], targets: list[dict]) -> list[dict]:
        """Every image in every TTA view (one batch per view), merged per image in original pixels."""
        cfg, views = self.tta, self.tta_views
        per_view, sizes = [], []
        for view in views:
            inputs = [
                view_image(img, tuple(int(v) for v in t["orig_size"]), view, cfg.get("max_size"))
                for img, t in zip(images, targets)
            ]
            per_view.append(self.net(inputs))
            sizes.append([tuple(x.shape[-2:]) for x in inputs])
        return [
            merge_views(
                [pv[i] for pv in per_view], [sz[i] for sz in sizes], views, tuple(int(v) for v in t["orig_size"]),
                self.net.with_masks, iou_threshold=float(cfg.get("iou_threshold", 0.5)),
                max_detections=int(cfg.get("max_detections", 100)),
            )
            for i, t in enumerate(targets)
        ]

    def _predict_original(self, batch, timed: bool = False, tta: bool = False) -> tuple[list[dict], list[dict]]:
        images, targets = batch
        if timed and images[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        # with TTA the time covers all views and the merge (already in file pixels)
        preds = self._predict_tta(images, targets) if tta else self.net(images)
        if timed:
            if images[0].is_cuda:
                torch.cuda.synchronize()
            self.test_times_ms.append(1000 * (time.perf_counter() - start) / len(images))
            self.test_batch_size = max(self.test_batch_size, len(images))
        if not tta:
            preds = [to_original_coords(p, t, self.net.with_masks) for p, t in zip(preds, targets)]
        gts = []
        for t in targets:
            gt = {"boxes": t["orig_boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"], "area": t["area"],
                  "image_id": t["image_id"]}
            if self.net.with_masks:
                gt["masks"] = t["orig_masks"].bool()
            gts.append(gt)
        return preds, gts

    def validation_step(self, batch, batch_idx: int) -> None:
        preds, gts = self._predict_original(batch)
        self.val_evaluator.update(preds, gts)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_evaluator.compute()
        self.val_evaluator.reset()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=False)
        if "bbox/AP" in metrics:
            self.log("val/AP", metrics["bbox/AP"], prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        preds, gts = self._predict_original(batch, timed=True, tta=self.tta is not None)
        self.test_evaluator.update(preds, gts)
        category_ids = self.category_ids or list(range(self.net.num_classes))
        image_ids = [int(t["image_id"]) for t in batch[1]]
        bbox, segm = coco_results(
            [{k: v.cpu() for k, v in p.items()} for p in preds], image_ids, category_ids,
            with_masks=self.net.with_masks,
        )
        self.test_results["bbox"].extend(bbox)
        self.test_results["segm"].extend(segm)

    def on_test_epoch_start(self) -> None:
        self.test_results = {"bbox": [], "segm": []}
        self.test_times_ms = []
        self.test_evaluator.reset()

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self.test_evaluator.compute() if self.test_annotated else {}
        self.test_evaluator.reset()
        self.log_dict({f"test/{k}": v for k, v in self.test_metrics.items()})
        self.test_results = {k: merge_rank_results(_gather_lists(v)) for k, v in self.test_results.items()}
        times = self.test_times_ms[1:] or self.test_times_ms  # the first batch warms up
        self.test_time_ms = statistics.median(times) if times else float("nan")

    # ------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory([p for p in self.net.parameters() if p.requires_grad])
        scheduler = build_scheduler(optimizer, self.scheduler_cfg, *iteration_budget(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["pyramidlab_config"] = self.run_config
        if self.category_ids is not None:
            checkpoint["category_ids"] = list(self.category_ids)


def _gather_lists(items: list) -> list[list]:
    """Every DDP rank's python list, in rank order (``[items]`` when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [items]
    gathered: list[list] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, items)
    return gathered


def merge_rank_results(parts: list[list[dict]]) -> list[dict]:
    """Concatenate per-rank COCO results; an image seen by an earlier rank keeps that rank's entries only.

    ``DistributedSampler`` pads the last round with images other ranks also evaluate; their
    detections would be written twice (the evaluation server would count the copies as false
    positives). Padding never repeats an image on the same rank, so rank order decides.
    """
    out: list[dict] = []
    seen: set[int] = set()
    for part in parts:
        out.extend(d for d in part if d["image_id"] not in seen)
        seen |= {d["image_id"] for d in part}
    return out
