"""COCO evaluation of a detector inside a LightningModule: one object, held by every module that evaluates.

:class:`DetectionEvaluation` owns the validation and test evaluators, the test-time augmentation, the
test step's detections (for the results files), its per-image forward times and the category ids the
files carry. A module holds one as ``self.evaluation`` and forwards its Lightning hooks to it with its
own ``net`` (and its own batches: the SRF extractor evaluates on ↓s images), so detection training
(:class:`~lightning_modules.detection_module.DetectionModule`) and the SRF-GAN stage 2
(:class:`~lightning_modules.srfgan_module.SRFExtractorModule`) share evaluation by composition.
The entry points read the test outcome from ``module.evaluation``.
"""

from __future__ import annotations

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

__all__ = ["DetectionEvaluation", "merge_rank_results", "tta_settings"]


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


class DetectionEvaluation(torch.nn.Module):
    """Validation and test COCO metrics of a detector, its test detections and test forward times.

    An ``nn.Module`` without tensors (as its :class:`~detection.evaluation.CocoEvaluator` s), so Lightning
    keeps it with the model; it never holds the detector: every step is given the module's ``net``.

    Args:
        with_masks / num_classes: the detector's (``net.with_masks``, ``net.num_classes``).
        eval_backend: ``hotcoco`` (default), ``faster_coco_eval`` or ``pycocotools``.
        category_ids: original dataset category id of each contiguous label (for the detections file);
            the datamodule provides it at fit/test time if None.
        tta: test-time augmentation of the test step (``eval.tta``; see :func:`tta_settings`): ``scales``
            (shorter sides), ``flip``, ``iou_threshold``, ``max_detections``, ``max_size``. None or
            neither scales nor flip: plain evaluation.

    After a test epoch: ``test_metrics`` (flat ``{"bbox/AP": ...}``, empty for an images-only split),
    ``test_results`` (COCO results per iou type, every rank's), ``test_time_ms`` (median forward time
    per image, the first batch left out as warm-up) and ``test_batch_size``.
    """

    def __init__(
        self,
        with_masks: bool,
        num_classes: int,
        eval_backend: str = "hotcoco",
        category_ids: list[int] | None = None,
        tta: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.with_masks = bool(with_masks)
        self.num_classes = int(num_classes)
        iou_types = ("bbox", "segm") if with_masks else ("bbox",)
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

    def setup(self, datamodule: L.LightningDataModule | None) -> None:
        """Category ids and ground truth from the data being used (the datamodule is set up first)."""
        # results files must carry the original category ids, not the contiguous labels
        ids = getattr(datamodule, "category_ids", None)
        if ids:
            if len(ids) != self.num_classes:
                raise ValueError(
                    f"the dataset has {len(ids)} categories but the detector was built for {self.num_classes}"
                )
            self.category_ids = list(ids)
        # metrics against the annotation file itself, as pycocotools scores the written results file
        for ev, ds in ((self.val_evaluator, getattr(datamodule, "val_dataset", None)),
                       (self.test_evaluator, getattr(datamodule, "test_dataset", None))):
            if getattr(ds, "coco", None) is not None:
                ev.set_ground_truth(ds.coco)
        test_ds = getattr(datamodule, "test_dataset", None)
        if getattr(test_ds, "coco", None) is not None:
            # an images-only file (COCO test-dev) has nothing to score against: AP would be -1
            self.test_annotated = len(test_ds.coco.anns) > 0

    def _predict_tta(self, net: Detector, images: list[Tensor], targets: list[dict]) -> list[dict]:
        """Every image in every TTA view (one batch per view), merged per image in original pixels."""
        cfg, views = self.tta, self.tta_views
        per_view, sizes = [], []
        for view in views:
            inputs = [
                view_image(img, tuple(int(v) for v in t["orig_size"]), view, cfg.get("max_size"))
                for img, t in zip(images, targets)
            ]
            per_view.append(net(inputs))
            sizes.append([tuple(x.shape[-2:]) for x in inputs])
        return [
            merge_views(
                [pv[i] for pv in per_view], [sz[i] for sz in sizes], views, tuple(int(v) for v in t["orig_size"]),
                self.with_masks, iou_threshold=float(cfg.get("iou_threshold", 0.5)),
                max_detections=int(cfg.get("max_detections", 100)),
            )
            for i, t in enumerate(targets)
        ]

    def predict(self, net: Detector, batch, timed: bool = False, tta: bool = False) -> tuple[list[dict], list[dict]]:
        """``net``'s detections of a batch and its ground truth, both in original image pixels."""
        images, targets = batch
        if timed and images[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        # with TTA the time covers all views and the merge (already in file pixels)
        preds = self._predict_tta(net, images, targets) if tta else net(images)
        if timed:
            if images[0].is_cuda:
                torch.cuda.synchronize()
            self.test_times_ms.append(1000 * (time.perf_counter() - start) / len(images))
            self.test_batch_size = max(self.test_batch_size, len(images))
        if not tta:
            preds = [to_original_coords(p, t, self.with_masks) for p, t in zip(preds, targets)]
        gts = []
        for t in targets:
            gt = {"boxes": t["orig_boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"], "area": t["area"],
                  "image_id": t["image_id"]}
            if self.with_masks:
                gt["masks"] = t["orig_masks"].bool()
            gts.append(gt)
        return preds, gts

    # ------------------------------------------------------------------ the Lightning hooks' work
    def validation_step(self, net: Detector, batch) -> None:
        preds, gts = self.predict(net, batch)
        self.val_evaluator.update(preds, gts)

    def on_validation_epoch_end(self, module: L.LightningModule) -> None:
        """Compute and log ``val/{bbox,segm}/*`` and ``val/AP`` (the progress bar's) through ``module``."""
        metrics = self.val_evaluator.compute()
        self.val_evaluator.reset()
        module.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=False)
        if "bbox/AP" in metrics:
            module.log("val/AP", metrics["bbox/AP"], prog_bar=True)

    def test_step(self, net: Detector, batch) -> None:
        """Timed detections (with TTA when set), scored and kept in COCO results format."""
        preds, gts = self.predict(net, batch, timed=True, tta=self.tta is not None)
        self.test_evaluator.update(preds, gts)
        category_ids = self.category_ids or list(range(self.num_classes))
        image_ids = [int(t["image_id"]) for t in batch[1]]
        bbox, segm = coco_results(
            [{k: v.cpu() for k, v in p.items()} for p in preds], image_ids, category_ids,
            with_masks=self.with_masks,
        )
        self.test_results["bbox"].extend(bbox)
        self.test_results["segm"].extend(segm)

    def on_test_epoch_start(self) -> None:
        self.test_results = {"bbox": [], "segm": []}
        self.test_times_ms = []
        self.test_evaluator.reset()

    def on_test_epoch_end(self, module: L.LightningModule) -> None:
        """``test_metrics`` (logged as ``test/*`` through ``module``), every rank's results, ``test_time_ms``."""
        self.test_metrics = self.test_evaluator.compute() if self.test_annotated else {}
        self.test_evaluator.reset()
        module.log_dict({f"test/{k}": v for k, v in self.test_metrics.items()})
        self.test_results = {k: merge_rank_results(_gather_lists(v)) for k, v in self.test_results.items()}
        times = self.test_times_ms[1:] or self.test_times_ms  # the first batch warms up
        self.test_time_ms = statistics.median(times) if times else float("nan")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The category ids, which pyramidlab-eval writes into its detections files."""
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
