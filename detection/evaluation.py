"""COCO-style evaluation: an epoch accumulator over faster-coco-eval / pycocotools, results-JSON export and a
pycocotools cross-check.

Conventions shared by everything in this module:

* Boxes are XYXY in ORIGINAL image pixels (the detector's output mapped back through the resize), never in the
  network's input resolution.
* ``labels`` are contiguous class indices ``0..K-1``; ``category_ids[label]`` is the dataset's original
  (non-contiguous) COCO category id. Only exported results JSON carries original ids.
* Metric dicts are flat, ``"{iou_type}/{name}"`` with ``name`` in :data:`METRIC_NAMES`, values in ``[0, 1]``
  exactly as pycocotools reports them, including ``-1`` for "undefined" (e.g. no ground truth in a size
  bucket).

The AP itself is never reimplemented here: :class:`CocoEvaluator` hands COCO datasets built from its
accumulated rows to faster-coco-eval's or pycocotools' ``COCOeval``. The tests check it against stock
``COCO.loadRes`` + ``COCOeval`` on the results file :func:`coco_results` writes (``tests/coco_oracle.py``).
Atomic file writes live in ``detection/atomic.py``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from rich.table import Table

# faster-coco-eval logs its whole 12-line summary at INFO on every compute(); the metrics
# are returned (and tabulated by the entry points), so keep only its warnings.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)

__all__ = [
    "BACKENDS",
    "IOU_TYPES",
    "METRIC_NAMES",
    "CocoEvaluator",
    "coco_results",
    "load_coco_gt",
    "metrics_table",
    "results_xywh",
]

BACKENDS = ("faster_coco_eval", "pycocotools", "hotcoco")
IOU_TYPES = ("bbox", "segm")

# Our short names in the order of COCOeval.stats (the 12 numbers `summarize()` prints).
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

_TABLE_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# The thresholds exactly as pycocotools' Params builds them (float64 np.linspace), set explicitly on both
# backends. (torchmetrics' defaults, which an earlier version went through, come from torch.linspace, i.e. float32-rounded (0.55 -> 0.5500000119, 0.3 -> 0.3000000119): an IoU or a recall
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


def results_xywh(boxes: np.ndarray, decimals: int | None) -> np.ndarray:
    """XYXY boxes (N, 4) float64 -> the ``[x, y, w, h]`` written to the results file, rounded to ``decimals``.

    One function for the results file (:func:`coco_results`) and :class:`CocoEvaluator`, so that the metrics
    are computed on exactly the boxes that are written: on small objects, 2-decimal rounding moves single
    IoUs across a threshold (an AP75 difference of 2.6 points was measured on a 20-image set before this).
    """
    xywh = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    xywh[:, 2:] -= xywh[:, :2]
    if decimals is not None:
        xywh = np.round(xywh, decimals)
    return xywh


def _rles(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Compressed RLEs of (N, H, W) bool masks, as COCO stores segmentations."""
    if len(masks) == 0:
        return []
    m = masks.cpu().numpy()
    m = m.view(np.uint8) if m.dtype == np.bool_ else m.astype(np.uint8)
    # pycocotools wants (H, W, N) uint8 in Fortran order, which is (N, W, H) in C order: one transposing
    # copy (4x faster than asfortranarray of the (H, W, N) view plus astype: 0.036 s against 0.14 s for
    # 100 masks of 480 x 640)
    return mask_util.encode(np.ascontiguousarray(m.transpose(0, 2, 1)).transpose(2, 1, 0))


class CocoEvaluator(torch.nn.Module):
    """COCO box/mask AP accumulated over an epoch, evaluated by faster-coco-eval (default), pycocotools or hotcoco.

    ``update`` keeps each batch as NumPy rows on the CPU (masks run-length encoded at once, as COCO
    stores them); ``compute`` gathers every DDP rank's rows, builds the COCO ground-truth and detection
    datasets from them in one pass and hands both to the backend's ``COCOeval``. The AP itself is never
    computed here.

    Two sources of ground truth:

    * ``ground_truth`` (an annotation file, its dict, or a ``pycocotools.coco.COCO``): the annotations of
      the file itself (crowd regions, polygons and RLEs, ``area``, original image and category ids), for
      the images seen by ``update`` (identified by the targets' ``image_id``). With detections rounded to
      ``box_decimals`` as :func:`coco_results` writes them, the metrics are those pycocotools computes from
      the written results file against the annotation file (restricted to the images evaluated; every
      image in a full pass). An image seen twice (DDP pads the last batch by repeating images) counts once.
    * otherwise the targets: ``boxes``/``labels``/``iscrowd``/``area`` (and ``masks``) of each image,
      images numbered in update order. Images that DistributedSampler repeats count twice.

    It stays an ``nn.Module`` (Lightning keeps it with the model) but holds no tensors: states are CPU
    arrays, gathered with ``torch.distributed.all_gather_object`` inside :meth:`compute`, which every
    rank must call.

    Args:
        iou_types: subset of ``("bbox", "segm")``.
        backend: ``"faster_coco_eval"`` (default), ``"pycocotools"`` or ``"hotcoco"``: same inputs, same numbers.
        category_ids: original dataset category id of each contiguous label (``category_ids[label]``).
            Optional; when given, labels are checked to be in range and per-class keys use the original ids.
            With ``ground_truth`` it defaults to the file's sorted category ids.
        class_metrics: also report per-class AP as ``"{iou_type}/AP_per_class/{category_id}"``, read from
            the same evaluation's precision array (area "all", 100 detections).
        mask_threshold: threshold applied to floating-point (soft) predicted masks.
        box_decimals: detection boxes (XYWH) are rounded to this many decimals before evaluation, as
            :func:`coco_results` writes them (None: unrounded).
        ground_truth: see above; also settable later with :meth:`set_ground_truth`.
    """

    def __init__(
        self,
        iou_types: Sequence[str] = ("bbox",),
        backend: str = "faster_coco_eval",
        category_ids: list[int] | None = None,
        *,
        class_metrics: bool = False,
        mask_threshold: float = 0.5,
        box_decimals: int | None = 2,
        ground_truth: str | os.PathLike[str] | COCO | Mapping[str, Any] | None = None,
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
        self.box_decimals = box_decimals
        self.ground_truth: COCO | None = None
        if ground_truth is not None:
            self.set_ground_truth(ground_truth)
        self.reset()

    def set_ground_truth(self, ground_truth: str | os.PathLike[str] | COCO | Mapping[str, Any] | None) -> None:
        """Evaluate against this annotation file (path, dict or ``COCO``; kept by reference, never modified).

        None returns to ground truth from the targets. Sets :attr:`category_ids` to the file's sorted ids
        unless they were given, in which case they must be the same.
        """
        if ground_truth is None:
            self.ground_truth = None
            return
        gt = load_coco_gt(ground_truth)
        file_ids = sorted(int(c) for c in gt.cats)
        if self.category_ids is not None and list(self.category_ids) != file_ids:
            raise ValueError(
                f"category_ids {self.category_ids} differ from the ground truth's category ids {file_ids}"
            )
        self.category_ids = file_ids
        self.ground_truth = gt

    def _check_labels(self, labels: np.ndarray, what: str) -> None:
        if self.category_ids is None or labels.size == 0:
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
            targets: one dict per image. With ``ground_truth``: ``image_id`` (the file's id) is all that is
                read. Otherwise: ``boxes`` (M, 4) XYXY original pixels, ``labels`` (M,), ``iscrowd`` (M,) and
                ``area`` (M,) (COCO's annotation ``area``; if missing or 0 the box area, or with segm the mask
                area, is used), with segm also ``masks`` (M, H0, W0).
        """
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions but {len(targets)} targets")
        want_masks = "segm" in self.iou_types
        from_file = self.ground_truth is not None
        self._dets.append(self._detection_rows(preds))
        for p, t in zip(preds, targets):
            image, num_dets = float(self._num_images), p["scores"].numel()
            if from_file:
                if "image_id" not in t:
                    raise ValueError(
                        "targets need 'image_id' (the annotation file's image id) when the evaluator's "
                        "ground truth is an annotation file"
                    )
                self._image_ids.append(int(t["image_id"]))
            else:
                t_boxes = t["boxes"].detach().reshape(-1, 4).cpu().double().numpy()
                t_labels = t["labels"].detach().reshape(-1).cpu().numpy()
                m = len(t_labels)
                crowd = t["iscrowd"].detach().reshape(-1).cpu().double().numpy() if "iscrowd" in t else np.zeros(m)
                area = t["area"].detach().reshape(-1).cpu().double().numpy() if "area" in t else np.zeros(m)
                self._check_labels(t_labels, "target")
                # [image, x, y, w, h, label, iscrowd, area]
                t_xywh = results_xywh(t_boxes, None)
                self._gts.append(np.column_stack([np.full(m, image), t_xywh, t_labels, crowd, area]))
            if want_masks:
                p_masks = _binarize_masks(p["masks"].detach(), self.mask_threshold)
                if len(p_masks) != num_dets:
                    raise ValueError(
                        f"image {self._num_images}: {len(p_masks)} predicted masks for {num_dets} "
                        "detections: expected one mask per box"
                    )
                self._det_rles.extend(_rles(p_masks))
                if not from_file:
                    t_masks = _binarize_masks(t["masks"].detach(), 0.5)
                    if len(t_masks) != m:
                        raise ValueError(
                            f"image {self._num_images}: {len(t_masks)} target masks for {m} objects: "
                            "expected one mask per box"
                        )
                    self._gt_rles.extend(_rles(t_masks))
                    # pycocotools' annToRLE reads the image's height and width for every segmentation
                    self._sizes.append(tuple(int(v) for v in t_masks.shape[-2:]))
            self._num_images += 1

    def _detection_rows(self, preds: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
        """Rows ``[image, x, y, w, h, score, label]`` of a batch (N, 7) float64: XYWH as pycocotools' loadRes
        reads it (float32 would move IoUs that sit exactly on a threshold), rounded as the results file is,
        scores as the float32 values it holds. One conversion per batch, not per image (per-image tensor
        calls were most of ``update``'s time once the backend is hotcoco)."""
        counts = [(p["boxes"].numel() // 4, p["scores"].numel(), p["labels"].numel()) for p in preds]
        for k, (nb, ns, nl) in enumerate(counts):
            if not nb == ns == nl:
                raise ValueError(
                    f"prediction {self._num_images + k}: {nb} boxes, {ns} scores, {nl} labels: "
                    "expected one of each per detection"
                )
        if not preds:
            return np.zeros((0, 7))
        boxes = torch.cat([p["boxes"].detach().reshape(-1, 4).cpu() for p in preds]).double().numpy()
        scores = torch.cat([p["scores"].detach().reshape(-1).cpu().float() for p in preds]).double().numpy()
        labels = torch.cat([p["labels"].detach().reshape(-1).cpu().long() for p in preds]).numpy()
        self._check_labels(labels, "predicted")
        rows = np.empty((len(scores), 7))  # filled in place: column_stack was a third of update's time
        rows[:, 0] = np.repeat(np.arange(self._num_images, self._num_images + len(preds)), [c[1] for c in counts])
        rows[:, 1:5] = results_xywh(boxes, self.box_decimals)
        rows[:, 5] = scores
        rows[:, 6] = labels
        return rows

    def _gathered(self) -> tuple[np.ndarray, np.ndarray, list, list, list, list, int]:
        """This rank's rows, or every rank's under DDP with images renumbered globally."""
        dets = np.concatenate(self._dets) if self._dets else np.zeros((0, 7))
        gts = np.concatenate(self._gts) if self._gts else np.zeros((0, 8))
        local = (dets, gts, self._det_rles, self._gt_rles, self._sizes, self._image_ids, self._num_images)
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        offset, all_dets, all_gts, det_rles, gt_rles, sizes, image_ids = 0, [], [], [], [], [], []
        for d, g, dr, gr, sz, ids, n in parts:
            d, g = d.copy(), g.copy()
            d[:, 0] += offset
            g[:, 0] += offset
            all_dets.append(d)
            all_gts.append(g)
            det_rles.extend(dr)
            gt_rles.extend(gr)
            sizes.extend(sz)
            image_ids.extend(ids)
            offset += n
        return (np.concatenate(all_dets), np.concatenate(all_gts), det_rles, gt_rles, sizes, image_ids, offset)

    def compute(self) -> dict[str, float]:
        """Flat metrics ``{"bbox/AP": ..., "bbox/AP50": ..., ...}`` for each enabled iou type.

        Keys per iou type ``t``: ``t/AP``, ``t/AP50``, ``t/AP75``, ``t/APs``, ``t/APm``, ``t/APl``, ``t/AR1``,
        ``t/AR10``, ``t/AR100``, ``t/ARs``, ``t/ARm``, ``t/ARl`` (plus ``t/AP_per_class/{category_id}`` with
        ``class_metrics``). Values are the backend's numbers, -1 where COCO leaves them undefined.
        """
        start = time.perf_counter()
        dets, gts, det_rles, gt_rles, sizes, image_ids, num_images = self._gathered()
        self.timings = {"gather_s": time.perf_counter() - start, "datasets_s": 0.0, "cocoeval_s": 0.0}
        if num_images == 0:
            return {f"{t}/{n}": -1.0 for t in self.iou_types for n in METRIC_NAMES}
        with _gc_paused():
            start = time.perf_counter()
            if self.ground_truth is not None:
                gt_dataset, dt_for = _file_datasets(
                    self.ground_truth, self.category_ids, dets, det_rles, image_ids, self.iou_types,
                    copy_anns=self.backend != "hotcoco",
                )
                gt_for = dict.fromkeys(self.iou_types, gt_dataset)
            else:
                segm = "segm" in self.iou_types
                labels = np.union1d(dets[:, 6], gts[:, 5]).astype(np.int64).tolist()
                gt_for, dt_for = {}, {}
                for t in self.iou_types:
                    gt_for[t] = _gt_dataset_from_rows(
                        gts, num_images, t, gt_rles if segm else None, sizes if segm else None, labels
                    )
                    dt_for[t] = _det_columns(dets, det_rles if t == "segm" else None, None, None, t)
            self.timings["datasets_s"] = time.perf_counter() - start
            out: dict[str, float] = {}
            for t in self.iou_types:
                stats, per_class = _run_cocoeval(self.backend, gt_for[t], dt_for[t], t, self.timings)
                out.update({f"{t}/{name}": float(v) for name, v in zip(METRIC_NAMES, stats)})
                if self.class_metrics:
                    for cat, ap in per_class.items():
                        # from a file the category ids are already the original ones
                        cid = cat if self.ground_truth is not None else (
                            self.category_ids[cat] if self.category_ids is not None else cat
                        )
                        out[f"{t}/AP_per_class/{cid}"] = ap
            return out

    def reset(self) -> None:
        """Drop everything accumulated (call at the start of each evaluation epoch)."""
        self._dets: list[np.ndarray] = []
        self._gts: list[np.ndarray] = []
        self._det_rles: list[dict[str, Any]] = []
        self._gt_rles: list[dict[str, Any]] = []
        self._sizes: list[tuple[int, int]] = []
        self._image_ids: list[int] = []
        self._num_images = 0
        # seconds of the last compute(): gathering rows, building the COCO datasets and the backend's
        # COCO objects, and the backend's evaluate + accumulate + summarize
        self.timings: dict[str, float] = {}


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic GC off while COCO datasets are built and evaluated.

    Both backends make a few Python dicts per detection (~100k per 500 images), none of them in cycles;
    the collector runs every 700 allocations and its full passes walk every object the process holds,
    which in a training process is a lot. Measured with pyramidlab-bench after its training sections:
    faster-coco-eval's 500 images x 100 detections took 0.62 s before this (one run) and 0.32 s after.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _rle_areas(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """Pixel areas of compressed RLEs. pycocotools' ``mask.area`` on a list builds its output with
    ``np.array((n,), dtype=np.uint8)`` and raises OverflowError (NumPy 2) beyond 255 masks, so the list
    goes through in chunks of 255."""
    out = np.zeros(len(rles), dtype=np.float64)
    for i in range(0, len(rles), 255):
        out[i : i + 255] = mask_util.area(list(rles[i : i + 255]))
    return out


def _rle_boxes(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """``[x, y, w, h]`` of each RLE's mask, as ``COCO.loadRes`` adds it to a segm result (N, 4)."""
    if not rles:
        return np.zeros((0, 4))
    return np.asarray(mask_util.toBbox(list(rles)), dtype=np.float64).reshape(-1, 4)


class _Detections(NamedTuple):
    """Detections as columns (what ``COCO.loadRes`` would make of the results file, without dicts).

    ``image_ids``/``category_ids`` (N,) int64 (the ids the ground truth uses), ``boxes`` (N, 4) XYWH float64,
    ``scores`` (N,), ``areas`` (N,) (box area for bbox, mask area for segm), ``rles`` N compressed RLEs or None.
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    areas: np.ndarray
    rles: list[dict[str, Any]] | None


def _det_columns(
    dets: np.ndarray,
    det_rles: list[dict[str, Any]] | None,
    image_lut: np.ndarray | None,
    cat_lut: np.ndarray | None,
    iou_type: str,
) -> _Detections:
    """Columns of the evaluator's detection rows; ``image_lut``/``cat_lut`` map row indices to ids (None:
    images 1..N, categories = labels)."""
    img = dets[:, 0].astype(np.int64)
    lab = dets[:, 6].astype(np.int64)
    img = image_lut[img] if image_lut is not None else img + 1
    cat = cat_lut[lab] if cat_lut is not None else lab
    boxes = dets[:, 1:5]
    if iou_type == "segm":
        areas = _rle_areas(det_rles)
        boxes = _rle_boxes(det_rles)  # loadRes takes a segm result's box from its mask
    else:
        areas = dets[:, 3] * dets[:, 4]
        det_rles = None
    return _Detections(img, cat, boxes, dets[:, 5], areas, det_rles)


def _gt_dataset_from_rows(
    gts: np.ndarray,
    num_images: int,
    iou_type: str,
    gt_rles: list[dict[str, Any]] | None,
    sizes: list[tuple[int, int]] | None,
    labels: Sequence[int],
) -> dict[str, Any]:
    """COCO ground-truth dataset (what ``COCO.dataset`` holds) from the evaluator's target rows.

    Images are numbered 1..num_images, categories are ``labels`` (those of the targets and detections). Ground-truth ``area`` is the
    annotation's when positive, else the mask area when masks are evaluated (COCO's annotation area is the
    mask's, and COCO uses it for the size buckets of both iou types), else the box area.
    """
    if sizes is not None:
        images = [{"id": i + 1, "height": h, "width": w} for i, (h, w) in enumerate(sizes)]
    else:
        images = [{"id": i + 1} for i in range(num_images)]
    g_img = (gts[:, 0].astype(np.int64) + 1).tolist()
    g_box = gts[:, 1:5].tolist()
    g_lab = gts[:, 5].astype(np.int64).tolist()
    g_crowd = gts[:, 6].astype(np.int64).tolist()
    g_area = gts[:, 7].copy()
    missing = g_area <= 0
    if missing.any():
        if gt_rles is not None:
            idx = np.flatnonzero(missing)
            g_area[idx] = _rle_areas([gt_rles[i] for i in idx])
        else:
            g_area[missing] = gts[missing, 3] * gts[missing, 4]
    g_area = g_area.tolist()
    gt_anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": z}
        for k, (i, c, b, a, z) in enumerate(zip(g_img, g_lab, g_box, g_area, g_crowd))
    ]
    if iou_type == "segm":
        for ann, rle in zip(gt_anns, gt_rles):
            ann["segmentation"] = rle
    categories = [{"id": int(c), "name": str(int(c))} for c in labels]
    return {"images": images, "annotations": gt_anns, "categories": categories}


def _file_datasets(
    gt: COCO,
    category_ids: Sequence[int],
    dets: np.ndarray,
    det_rles: list[dict[str, Any]],
    image_ids: Sequence[int],
    iou_types: Sequence[str],
    copy_anns: bool = True,
) -> tuple[dict[str, Any], dict[str, _Detections]]:
    """The annotation file's ground truth for the images evaluated, and the detections on them.

    An image id seen more than once (DDP repeats images to even out the ranks) keeps its first
    occurrence. Annotations are shallow copies with ``copy_anns`` (pycocotools' and faster-coco-eval's
    COCOeval write ``ignore`` into them, and pycocotools replaces polygons by RLEs in place; hotcoco copies
    them into its own structures and needs none); a missing ``iscrowd`` is 0 and a missing ``area`` the box area,
    as the data loader takes them (pycocotools itself would raise on either).
    """
    first: dict[int, int] = {}
    for index, image_id in enumerate(image_ids):
        first.setdefault(int(image_id), index)
    unknown = [i for i in first if i not in gt.imgs]
    if unknown:
        raise ValueError(
            f"image_id {unknown[0]} (and {len(unknown) - 1} more) is not in the ground-truth annotation file"
        )
    image_lut = np.asarray(list(image_ids), dtype=np.int64)
    if len(first) < len(image_lut):
        keep = np.zeros(len(image_lut), dtype=bool)
        keep[list(first.values())] = True
        rows = keep[dets[:, 0].astype(np.int64)]
        dets = dets[rows]
        if det_rles:
            det_rles = [r for r, k in zip(det_rles, rows.tolist()) if k]
    ids = sorted(first)
    anns = []
    for image_id in ids:
        for a in gt.imgToAnns.get(image_id, []):
            if copy_anns or "iscrowd" not in a or "area" not in a:
                a = dict(a)
                a.setdefault("iscrowd", 0)
                if "area" not in a:
                    a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
            anns.append(a)
    gt_dataset = {
        "images": [gt.imgs[i] for i in ids],
        "annotations": anns,
        "categories": list(gt.dataset.get("categories", [])),
    }
    cat_lut = np.asarray(list(category_ids), dtype=np.int64)
    det_cols = {
        t: _det_columns(dets, det_rles if t == "segm" else None, image_lut, cat_lut, t) for t in iou_types
    }
    return gt_dataset, det_cols


def _dt_dataset(gt_dataset: dict[str, Any], d: _Detections) -> dict[str, Any]:
    """A detection dataset (``COCO.dataset``) with the fields ``COCO.loadRes`` adds: ids from 1, ``area``,
    ``iscrowd`` 0 (for the dict-based backends)."""
    dt_anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "score": s, "area": a, "iscrowd": 0}
        for k, (i, c, b, s, a) in enumerate(
            zip(d.image_ids.tolist(), d.category_ids.tolist(), d.boxes.tolist(), d.scores.tolist(), d.areas.tolist())
        )
    ]
    if d.rles is not None:
        for ann, rle in zip(dt_anns, d.rles):
            ann["segmentation"] = rle
    return {"images": list(gt_dataset["images"]), "annotations": dt_anns, "categories": gt_dataset["categories"]}


def _hotcoco_dt(gt: Any, d: _Detections) -> Any:
    """hotcoco's detection COCO straight from columns (no dict per detection): ``load_res`` on an
    ``[image_id, x, y, w, h, score, category_id]`` array, then the mask areas for segm."""
    rows = np.column_stack([d.image_ids, d.boxes, d.scores, d.category_ids]).astype(np.float64)
    if len(rows) == 0:
        # load_res of nothing: an empty dataset over the same images and categories
        ds = gt.dataset
        import hotcoco

        return hotcoco.COCO({"images": ds["images"], "annotations": [], "categories": ds["categories"]})
    dt = gt.load_res(rows, segmentation=d.rles) if d.rles is not None else gt.load_res(rows)
    if d.rles is not None:
        dt.update_anns(ids=np.arange(1, len(rows) + 1), area=d.areas)
    return dt


def _run_cocoeval(
    backend: str, gt_dataset: dict[str, Any], dets: _Detections, iou_type: str, timings: dict | None = None
) -> tuple[list[float], dict[int, float]]:
    """``COCOeval`` of the backend on a ground-truth dataset and detection columns: the 12 stats and AP
    per category id.

    Per-category AP is COCO's AP restricted to one category, read from ``eval["precision"]`` (area "all",
    the last maxDets) exactly as ``summarize`` averages it: the mean over IoU and recall thresholds of the
    entries that are not -1, or -1 when there are none.
    """
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # all three print progress and the summary
        if backend == "hotcoco":
            import hotcoco

            gt = hotcoco.COCO(gt_dataset)
            dt = _hotcoco_dt(gt, dets)
            ev = hotcoco.COCOeval(gt, dt, iou_type)
        else:
            if backend == "pycocotools":
                from pycocotools.coco import COCO as Coco
                from pycocotools.cocoeval import COCOeval as Eval
            else:
                from faster_coco_eval import COCO as Coco
                from faster_coco_eval import COCOeval_faster as Eval
            gt, dt = Coco(), Coco()
            gt.dataset, dt.dataset = gt_dataset, _dt_dataset(gt_dataset, dets)
            gt.createIndex()
            dt.createIndex()
            ev = Eval(gt, dt, iouType=iou_type)
        built = time.perf_counter()
        ev.params.iouThrs = np.array(_COCO_IOU_THRS, dtype=np.float64)
        ev.params.recThrs = np.array(_COCO_REC_THRS, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if timings is not None:
        # the backend's COCO objects (indexing, our detection columns into its format) count as ours
        timings["datasets_s"] = timings.get("datasets_s", 0.0) + built - start
        timings["cocoeval_s"] = timings.get("cocoeval_s", 0.0) + time.perf_counter() - built
    per_class: dict[int, float] = {}
    precision = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[int(cat)] = float(p.mean()) if p.size else -1.0
    return [float(v) for v in ev.stats], per_class


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
        xywh = results_xywh(boxes, box_decimals)
        cats = [cat_lut[label] for label in labels]
        for box, score, cat in zip(xywh.tolist(), scores, cats):
            bbox_results.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": score})
        if with_masks and len(labels):
            masks = _binarize_masks(p["masks"].detach(), mask_threshold).cpu().numpy()
            if len(masks) != len(labels):
                raise ValueError(f"image {image_id}: {len(masks)} masks for {len(labels)} detections")
            rles = _rles(torch.from_numpy(masks))
            for rle, score, cat in zip(rles, scores, cats):
                segm = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
                segm_results.append(
                    {"image_id": image_id, "category_id": cat, "segmentation": segm, "score": score}
                )
    return bbox_results, segm_results


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


def load_coco_gt(ann_file_or_coco: str | os.PathLike[str] | COCO | Mapping[str, Any]) -> COCO:
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
