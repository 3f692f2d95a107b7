"""The test oracle for ``detection.evaluation``: stock pycocotools on a COCO results list.

It shares no code with :class:`detection.evaluation.CocoEvaluator` (only the ground-truth loader, which
pycocotools' own ``COCO`` would do the same way), so the tests compare the evaluator and the results
file it writes against what an unmodified ``COCO.loadRes`` + ``COCOeval`` computes. Only tests use it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.evaluation import IOU_TYPES, METRIC_NAMES, load_coco_gt


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
    gt = load_coco_gt(ann_file_or_coco)
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
