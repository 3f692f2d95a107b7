"""COCO-style evaluation: a torchmetrics mAP wrapper, results-JSON export and a pycocotools cross-check.

Conventions shared by everything in this module:

* Boxes are XYXY in ORIGINAL image pixels (the detector's output mapped back through the resize), never in the
  network's input resolution.
* ``labels`` are contiguous class indices ``0..K-1``; ``category_ids[label]`` is the dataset's original
  (non-contiguous) COCO category id. Only exported results JSON carries original ids.
* Metric dicts are flat, ``"{iou_type}/{name}"`` with ``name`` in :data:`METRIC_NAMES`, values in ``[0, 1]``
  exactly as pycocotools reports them, including ``-1`` for "undefined" (e.g. no ground truth in a size
  bucket).

The AP itself is never reimplemented here: :class:`CocoEvaluator` delegates to
``torchmetrics.detection.MeanAveragePrecision`` (faster_coco_eval or pycocotools inside), and
:func:`evaluate_results_with_pycocotools` runs the stock ``COCO.loadRes`` + ``COCOeval`` on a results list.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.table import Table
from torchmetrics.detection import MeanAveragePrecision

# faster-coco-eval logs its whole 12-line summary at INFO on every compute(); the metrics
# are returned (and tabulated by the entry points), so keep only its warnings.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)

__all__ = [
    "BACKENDS",
    "IOU_TYPES",
    "METRIC_NAMES",
    "CocoEvaluator",
    "coco_results",
    "evaluate_results_with_pycocotools",
    "metrics_table",
    "write_json_atomic",
]

BACKENDS = ("faster_coco_eval", "pycocotools")
IOU_TYPES = ("bbox", "segm")

# Our short names in the order of COCOeval.stats (the 12 numbers `summarize()` prints).
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# torchmetrics' key (without the "{iou_type}_" prefix it adds when several iou types are evaluated) ->
# our name. Assumes the default max_detection_thresholds [1, 10, 100]: other values make the pycocotools
# backend report -1.
_TM_KEYS = {
    "map": "AP",
    "map_50": "AP50",
    "map_75": "AP75",
    "map_small": "APs",
    "map_medium": "APm",
    "map_large": "APl",
    "mar_1": "AR1",
    "mar_10": "AR10",
    "mar_100": "AR100",
    "mar_small": "ARs",
    "mar_medium": "ARm",
    "mar_large": "ARl",
}

_TABLE_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# The thresholds exactly as pycocotools' Params builds them (float64 np.linspace). torchmetrics' defaults come
# from torch.linspace, i.e. float32-rounded (0.55 -> 0.5500000119, 0.3 -> 0.3000000119): an IoU or a recall
# landing exactly on a threshold (k/n recalls do so routinely) is then binned differently from pycocotools
# and AP moves in the 3rd decimal (measured up to 2.6e-3 on small cases).
_COCO_IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True).tolist()
_COCO_REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True).tolist()


def _binarize_masks(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Masks as a bool tensor (N, H, W).

    Accepts (N, H, W) or torchvision Mask R-CNN's (N, 1, H, W); bool/integer masks are taken as they are
    (non-zero = foreground), floating-point masks are soft probabilities thresholded at ``threshold``.
    """
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W) or (N, 1, H, W), got {tuple(masks.shape)}")
    if masks.dtype == torch.bool:
        return masks
    if masks.is_floating_point():
        return masks > threshold
    return masks != 0


class CocoEvaluator(torch.nn.Module):
    """COCO box/mask AP accumulated over an epoch; a thin wrapper over torchmetrics' ``MeanAveragePrecision``.

    It is an ``nn.Module`` holding the torchmetrics metric as a child, so Lightning moves it to the right
    device and torchmetrics gathers the accumulated state across DDP ranks inside :meth:`compute`.

    Args:
        iou_types: subset of ``("bbox", "segm")``.
        backend: ``"faster_coco_eval"`` (default, ~10x faster) or ``"pycocotools"``.
        category_ids: original dataset category id of each contiguous label (``category_ids[label]``).
            Optional; when given, labels are checked to be in range and per-class keys use the original ids.
        class_metrics: also report per-class AP as ``"{iou_type}/AP_per_class/{category_id}"`` (slower:
            torchmetrics re-runs the evaluation once per class).
        mask_threshold: threshold applied to floating-point (soft) predicted masks.
    """

    def __init__(
        self,
        iou_types: Sequence[str] = ("bbox",),
        backend: str = "faster_coco_eval",
        category_ids: list[int] | None = None,
        *,
        class_metrics: bool = False,
        mask_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if isinstance(iou_types, str):
            iou_types = (iou_types,)
        iou_types = tuple(iou_types)
        if backend not in BACKENDS:
            raise ValueError(f"Unknown COCO evaluation backend {backend!r}; choose one of {BACKENDS}")
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad or not iou_types or len(set(iou_types)) != len(iou_types):
            raise ValueError(
                f"iou_types must be a non-empty subset of {IOU_TYPES} without repeats, got {iou_types}"
            )
        self.iou_types = tuple(t for t in IOU_TYPES if t in iou_types)
        self.backend = backend
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.class_metrics = class_metrics
        self.mask_threshold = mask_threshold
        # "segm" alone is evaluated together with "bbox": torchmetrics' segm-only path drops every image that
        # has no ground-truth mask from the COCO dataset it builds, so detections on images without objects
        # are silently ignored instead of counted as false positives (checked with torchmetrics 1.9). With
        # "bbox" also enabled every image is kept. Boxes are required inputs anyway; the bbox numbers are
        # simply not reported unless asked for.
        self._tm_iou_types = ("bbox", "segm") if "segm" in self.iou_types else ("bbox",)
        self.metric = MeanAveragePrecision(
            box_format="xyxy",
            iou_type=self._tm_iou_types,
            iou_thresholds=_COCO_IOU_THRS,
            rec_thresholds=_COCO_REC_THRS,
            backend=backend,
            class_metrics=class_metrics,
        )
        # The COCO protocol keeps the 100 top-scoring detections per image, exactly as pycocotools does on a
        # results file; more detections per image is normal for detectors, not a user error.
        self.metric.warn_on_many_detections = False
        self._num_updates = 0

    def _check_labels(self, labels: torch.Tensor, what: str) -> None:
        if self.category_ids is None or labels.numel() == 0:
            return
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= len(self.category_ids):
            raise ValueError(
                f"{what} labels must be contiguous indices in [0, {len(self.category_ids) - 1}], "
                f"got range [{lo}, {hi}]"
            )

    @torch.no_grad()
    def update(
        self, preds: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> None:
        """Accumulate one batch.

        Args:
            preds: one dict per image: ``boxes`` (N, 4) float XYXY in original pixels, ``scores`` (N,),
                ``labels`` (N,) int in ``0..K-1``; with segm also ``masks`` (N, H0, W0) bool/uint8 at original
                size (float (N, H0, W0) or (N, 1, H0, W0) soft masks are thresholded at ``mask_threshold``).
            targets: one dict per image: ``boxes`` (M, 4) XYXY original pixels, ``labels`` (M,),
                ``iscrowd`` (M,) and ``area`` (M,) (COCO's annotation ``area``; if missing or 0 the box area,
                or with segm the mask area, is used), with segm also ``masks`` (M, H0, W0).
        """
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions but {len(targets)} targets")
        want_masks = "segm" in self._tm_iou_types
        tm_preds, tm_targets = [], []
        for p, t in zip(preds, targets):
            p_boxes = p["boxes"].detach().float().reshape(-1, 4)
            t_boxes = t["boxes"].detach().float().reshape(-1, 4)
            p_labels = p["labels"].detach().long().reshape(-1)
            t_labels = t["labels"].detach().long().reshape(-1)
            self._check_labels(p_labels, "predicted")
            self._check_labels(t_labels, "target")
            tp: dict[str, torch.Tensor] = {
                "boxes": p_boxes,
                "scores": p["scores"].detach().float().reshape(-1),
                "labels": p_labels,
            }
            tt: dict[str, torch.Tensor] = {
                "boxes": t_boxes,
                "labels": t_labels,
                "iscrowd": t["iscrowd"].detach().long().reshape(-1)
                if "iscrowd" in t
                else torch.zeros_like(t_labels),
                "area": t["area"].detach().float().reshape(-1)
                if "area" in t
                else torch.zeros(len(t_labels), device=t_labels.device),
            }
            if want_masks:
                tp["masks"] = _binarize_masks(p["masks"].detach(), self.mask_threshold)
                tt["masks"] = _binarize_masks(t["masks"].detach(), 0.5)
            tm_preds.append(tp)
            tm_targets.append(tt)
        self.metric.update(tm_preds, tm_targets)
        self._num_updates += 1

    def compute(self) -> dict[str, float]:
        """Flat metrics ``{"bbox/AP": ..., "bbox/AP50": ..., ...}`` for each enabled iou type.

        Keys per iou type ``t``: ``t/AP``, ``t/AP50``, ``t/AP75``, ``t/APs``, ``t/APm``, ``t/APl``, ``t/AR1``,
        ``t/AR10``, ``t/AR100``, ``t/ARs``, ``t/ARm``, ``t/ARl`` (plus ``t/AP_per_class/{category_id}`` with
        ``class_metrics``). Values are pycocotools' numbers, -1 where COCO leaves them undefined.
        """
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self._num_updates == 0 and not distributed:
            # Nothing accumulated: everything is undefined. (Under DDP every rank must enter torchmetrics'
            # compute, which gathers the other ranks' states, so no shortcut there.)
            return {f"{t}/{n}": -1.0 for t in self.iou_types for n in METRIC_NAMES}
        raw = self.metric.compute()
        out: dict[str, float] = {}
        multi = len(self._tm_iou_types) > 1
        for t in self.iou_types:
            prefix = f"{t}_" if multi else ""
            for tm_key, name in _TM_KEYS.items():
                out[f"{t}/{name}"] = float(raw[prefix + tm_key])
            if self.class_metrics:
                per_class = raw[prefix + "map_per_class"].reshape(-1).tolist()
                classes = raw["classes"].reshape(-1).tolist()
                if len(per_class) == len(classes):  # torchmetrics returns [-1] when no image was evaluated
                    for label, ap in zip(classes, per_class):
                        cid = self.category_ids[label] if self.category_ids is not None else label
                        out[f"{t}/AP_per_class/{cid}"] = float(ap)
        return out

    def reset(self) -> None:
        """Drop everything accumulated (call at the start of each evaluation epoch)."""
        self.metric.reset()
        self._num_updates = 0


def coco_results(
    preds: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    *,
    with_masks: bool = False,
    mask_threshold: float = 0.5,
    box_decimals: int | None = 2,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Detections in the COCO results format (what test-dev / ``COCO.loadRes`` expect).

    Args:
        preds: one dict per image: ``boxes`` (N, 4) XYXY in original pixels, ``scores`` (N,), ``labels``
            (N,) in ``0..K-1``; with ``with_masks`` also ``masks`` (N, H0, W0) bool/uint8, or float
            (N, H0, W0) / (N, 1, H0, W0) soft masks (thresholded at ``mask_threshold``).
        image_ids: original COCO image id of each entry of ``preds``.
        category_ids: original category id per contiguous label.
        box_decimals: round box coordinates to this many decimals (keeps test-dev files small); None keeps
            them.

    Returns:
        ``(bbox_results, segm_results)``: lists of
        ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` and
        ``{"image_id", "category_id", "segmentation": {"size": [H0, W0], "counts": str}, "score"}``
        (the latter empty unless ``with_masks``). Segm entries carry no ``bbox`` on purpose: ``loadRes``
        would otherwise take the box area for the size buckets instead of the mask area.
    """
    if len(preds) != len(image_ids):
        raise ValueError(f"got {len(preds)} predictions but {len(image_ids)} image ids")
    cat_lut = [int(c) for c in category_ids]
    bbox_results: list[dict[str, Any]] = []
    segm_results: list[dict[str, Any]] = []
    for p, image_id in zip(preds, image_ids):
        image_id = int(image_id)
        # float64 so that x2 - x1 loses nothing before rounding.
        boxes = p["boxes"].detach().cpu().double().reshape(-1, 4).numpy()
        scores = p["scores"].detach().cpu().float().reshape(-1).tolist()
        labels = p["labels"].detach().cpu().long().reshape(-1).tolist()
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {image_id}: boxes/scores/labels lengths differ")
        xywh = boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]
        if box_decimals is not None:
            xywh = np.round(xywh, box_decimals)
        cats = [cat_lut[label] for label in labels]
        for box, score, cat in zip(xywh.tolist(), scores, cats):
            bbox_results.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": score})
        if with_masks and len(labels):
            masks = _binarize_masks(p["masks"].detach(), mask_threshold).cpu().numpy()
            if len(masks) != len(labels):
                raise ValueError(f"image {image_id}: {len(masks)} masks for {len(labels)} detections")
            # pycocotools wants (H, W, N) uint8 in Fortran order.
            rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
            for rle, score, cat in zip(rles, scores, cats):
                segm = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
                segm_results.append(
                    {"image_id": image_id, "category_id": cat, "segmentation": segm, "score": score}
                )
    return bbox_results, segm_results


def write_json_atomic(path: str | os.PathLike[str], obj: Any, **json_kwargs: Any) -> Path:
    """Serialise ``obj`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    Readers (and a crash mid-write) only ever see the old file or the complete new one. Extra keyword
    arguments go to ``json.dump``. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, **json_kwargs)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _fmt_percent(value: float | None) -> str:
    if value is None or value < 0:
        return "–"
    return f"{100.0 * value:.1f}"


def metrics_table(metrics: Mapping[str, float], title: str = "COCO metrics") -> Table:
    """A rich table of flat COCO metrics: one row per iou type present (bbox, segm), columns AP, AP50, AP75,
    APs, APm, APl in percent with one decimal as in papers; -1 (undefined) and missing values show as "–"."""
    table = Table(title=title)
    table.add_column("type", style="bold")
    for col in _TABLE_COLUMNS:
        table.add_column(col, justify="right")
    for t in IOU_TYPES:
        if not any(k.startswith(f"{t}/") for k in metrics):
            continue
        table.add_row(t, *(_fmt_percent(metrics.get(f"{t}/{c}")) for c in _TABLE_COLUMNS))
    return table


def _load_coco_gt(ann_file_or_coco: str | os.PathLike[str] | COCO | Mapping[str, Any]) -> COCO:
    if isinstance(ann_file_or_coco, COCO):
        return ann_file_or_coco
    coco = COCO()
    if isinstance(ann_file_or_coco, Mapping):
        coco.dataset = copy.deepcopy(dict(ann_file_or_coco))
    else:
        with open(ann_file_or_coco, encoding="utf-8") as f:
            coco.dataset = json.load(f)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate_results_with_pycocotools(
    ann_file_or_coco: str | os.PathLike[str] | COCO | Mapping[str, Any],
    results: Sequence[Mapping[str, Any]] | str | os.PathLike[str],
    iou_type: str = "bbox",
) -> dict[str, float]:
    """Stock pycocotools evaluation (``COCO.loadRes`` + ``COCOeval``) of a COCO results list.

    An independent check of the whole export path (original image/category ids, XYWH boxes, original pixels)
    that shares no code with :class:`CocoEvaluator`.

    Args:
        ann_file_or_coco: ground truth: annotation JSON path, a ``pycocotools.coco.COCO`` or a dataset dict.
        results: list of result dicts as produced by :func:`coco_results`, or a path to such a JSON file.
        iou_type: ``"bbox"`` or ``"segm"``.

    Returns:
        ``{"{iou_type}/AP": ..., ...}`` with the same names as :meth:`CocoEvaluator.compute`.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    gt = _load_coco_gt(ann_file_or_coco)
    if isinstance(results, str | os.PathLike):
        with open(results, encoding="utf-8") as f:
            results = json.load(f)
    # loadRes writes area/id/bbox (numpy) into the dicts it gets: work on a copy so the caller's list stays
    # JSON-serialisable and unchanged.
    results = copy.deepcopy(list(results))
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            dt = gt.loadRes(results)
        else:
            # loadRes indexes results[0]; no detections at all is still a valid (all-zero) submission.
            dt = COCO()
            dt.dataset = {
                "images": list(gt.dataset["images"]),
                "categories": copy.deepcopy(gt.dataset["categories"]),
                "annotations": [],
            }
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {f"{iou_type}/{name}": float(v) for name, v in zip(METRIC_NAMES, ev.stats)}
