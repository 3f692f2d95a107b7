"""pyramidlab-bench's ``eval`` section: the three COCO backends end to end, and a COCO-sized case.

Every backend runs through :class:`~detection.evaluation.CocoEvaluator` exactly as training and testing
run it (``update`` batch by batch, then ``compute``, against the annotation file's ground truth), on the
same synthetic detections; the repeats are interleaved so drift hits every backend alike. Two cases:

- the data split's first ``bench.eval.images`` images (500 of the shapes train split by default),
  ``bench.eval.detections_per_image`` detections each, bbox;
- a COCO-sized case (``bench.eval.coco.images`` images, 5,000 by default, COCO val2017's size) on a
  generated COCO-like annotation set (polygons, crowd regions, images without objects, 80 non-contiguous
  category ids), bbox and segm; masks at ``bench.eval.coco.mask_size`` (smaller than COCO's images so that
  the run fits a CPU: our RLE encoding scales with the pixels, the backends with the detections).
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from omegaconf import DictConfig
from pycocotools.coco import COCO

from detection.evaluation import BACKENDS, CocoEvaluator, coco_results
from lightning_modules import builders as B
from lightning_modules.bench.common import _progress

# Synthetic predictions: the share of GT objects detected, how often a detection of a GT object gets
# another class, and the score ranges that make true positives outrank most false positives, so AP lands
# mid-range where a backend disagreement would show.
DETECTED = 0.9
WRONG_CLASS = 0.1
TP_SCORES = (0.3, 1.0)
FP_SCORES = (0.0, 0.6)
# COCO val2017: 36,781 annotations on 5,000 images, 80 of the ids 1..90, ~1 % crowd, 48 images empty
COCO_OBJECTS_PER_IMAGE = 7.4
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def synthetic_coco(num_images: int, size: tuple[int, int], seed: int) -> dict[str, Any]:
    """A COCO-like annotation dict: ``num_images`` images of ``size`` (H, W), Poisson(7.4) objects each
    (1 % of images empty), sides log-uniform from 4 px to 80 % of the image (COCO's small / medium / large
    mix), octagon polygons, 1 % crowd regions as RLE, COCO's 80 category ids."""
    rng = np.random.default_rng(seed)
    h, w = size
    images, anns = [], []
    for i in range(num_images):
        image_id = 100_000 + 7 * i
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id:012d}.jpg"})
        n = 0 if rng.random() < 0.01 else int(rng.poisson(COCO_OBJECTS_PER_IMAGE))
        sides = np.exp(rng.uniform(np.log(4), np.log(0.8 * min(h, w)), (n, 2)))
        xy = rng.uniform(0, 1, (n, 2)) * ([w, h] - sides)
        for (x, y), (bw, bh) in zip(xy.tolist(), sides.tolist()):
            ann = {"id": len(anns) + 1, "image_id": image_id, "bbox": [x, y, bw, bh],
                   "category_id": int(COCO_CATEGORY_IDS[rng.integers(len(COCO_CATEGORY_IDS))])}
            if rng.random() < 0.01:
                m = np.zeros((h, w), dtype=np.uint8, order="F")
                m[int(y) : int(np.ceil(y + bh)), int(x) : int(np.ceil(x + bw))] = 1
                rle = mask_util.encode(m)
                ann.update(iscrowd=1, area=float(mask_util.area(rle)),
                           segmentation={"size": [h, w], "counts": rle["counts"].decode("ascii")})
            else:
                cx, cy, a = x + bw / 2, y + bh / 2, np.linspace(0, 2 * np.pi, 9)[:-1]
                poly = np.stack([cx + bw / 2 * np.cos(a), cy + bh / 2 * np.sin(a)], 1).ravel()
                ann.update(iscrowd=0, area=float(bw * bh * 0.7071), segmentation=[poly.round(2).tolist()])
            anns.append(ann)
    cats = [{"id": c, "name": str(c), "supercategory": "x"} for c in COCO_CATEGORY_IDS]
    return {"images": images, "annotations": anns, "categories": cats}


def synthetic_predictions(
    gt: COCO, image_ids: list[int], per_image: int, jitter: float, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Detections (original pixels, contiguous labels over ``gt``'s sorted category ids) for ``image_ids``.

    Each GT object is detected with probability ``DETECTED`` by a box shifted and scaled by up to
    ``jitter`` of its size (another class with probability ``WRONG_CLASS``); random boxes of random
    classes fill each image up to ``per_image`` detections. Scores are random (TP_SCORES, FP_SCORES).
    """
    rng = np.random.default_rng(seed)
    cat_to_label = {c: i for i, c in enumerate(sorted(gt.cats))}
    k = len(cat_to_label)
    preds = []
    for img_id in image_ids:
        info = gt.imgs[img_id]
        w, h = float(info["width"]), float(info["height"])
        anns = gt.imgToAnns.get(img_id, [])
        xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        gt_labels = np.asarray([cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        hit = rng.random(len(anns)) < DETECTED
        tp = xywh[hit]
        tp_centre = tp[:, :2] + tp[:, 2:] / 2 + rng.uniform(-jitter, jitter, tp[:, 2:].shape) * tp[:, 2:]
        tp_size = tp[:, 2:] * (1 + rng.uniform(-jitter, jitter, tp[:, 2:].shape))
        tp_boxes = np.concatenate([tp_centre - tp_size / 2, tp_centre + tp_size / 2], axis=1)
        tp_labels = np.where(rng.random(len(tp)) < WRONG_CLASS, rng.integers(0, k, len(tp)), gt_labels[hit])
        n_fp = max(0, per_image - len(tp))
        fp_xy = rng.uniform(0, 1, (n_fp, 2)) * [w, h]
        fp_wh = rng.uniform(0.02, 0.5, (n_fp, 2)) * [w, h]
        fp_boxes = np.concatenate([fp_xy, fp_xy + fp_wh], axis=1)
        boxes = np.concatenate([tp_boxes, fp_boxes])[:per_image]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        scores = np.concatenate([rng.uniform(*TP_SCORES, len(tp)), rng.uniform(*FP_SCORES, n_fp)])[:per_image]
        labels = np.concatenate([tp_labels, rng.integers(0, k, n_fp)])[:per_image]
        preds.append({
            "boxes": torch.from_numpy(boxes).float(),
            "scores": torch.from_numpy(scores).float(),
            "labels": torch.from_numpy(labels).long(),
        })
    return preds


def box_masks(pred: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) bool masks: each detection's box at the image size ``size`` with a corner cut off
    (so mask IoU is not box IoU), what a mask head pastes into the image."""
    h, w = size
    masks = torch.zeros(len(pred["boxes"]), h, w, dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(pred["boxes"].tolist()):
        y1, x1 = int(y1), int(x1)
        y2, x2 = max(int(np.ceil(y2)), y1 + 1), max(int(np.ceil(x2)), x1 + 1)
        masks[k, y1:y2, x1:x2] = True
        masks[k, y1 : y1 + (y2 - y1) // 3, x1 : x1 + (x2 - x1) // 3] = False
    return masks


def time_evaluator(
    backend: str, gt: COCO, preds: list[dict], image_ids: list[int], iou_types: tuple[str, ...], chunk: int,
    mask_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """One end-to-end run (update batch by batch + compute) of CocoEvaluator with ``backend``.

    Masks (segm) are drawn per batch outside the timed region: a detector hands them over ready.
    Returns total seconds, the AP of each iou type, and the profile: ``update_s`` (rows, RLE encoding),
    ``gather_s``, ``datasets_s`` (COCO datasets and the backend's COCO objects: our part),
    ``cocoeval_s`` (the backend's evaluate + accumulate + summarize).
    """
    ev = CocoEvaluator(iou_types, backend=backend, ground_truth=gt)
    update_s = 0.0
    for i in range(0, len(preds), chunk):
        batch = preds[i : i + chunk]
        if mask_size is not None:
            batch = [{**p, "masks": box_masks(p, mask_size)} for p in batch]
        targets = [{"image_id": t} for t in image_ids[i : i + chunk]]
        start = time.perf_counter()
        ev.update(batch, targets)
        update_s += time.perf_counter() - start
    start = time.perf_counter()
    metrics = ev.compute()
    compute_s = time.perf_counter() - start
    return {
        "s": update_s + compute_s,
        "ap": {t: metrics[f"{t}/AP"] for t in iou_types},
        "profile": {"update_s": update_s, **ev.timings},
    }


def library_eval(library: str, gt: dict[str, Any], results: list[dict[str, Any]]) -> float:
    """COCO bbox AP of ``results`` with the library alone: ``COCO`` + ``loadRes`` + COCOeval's
    evaluate / accumulate / summarize, as a script on a results JSON would run it."""
    if library == "hotcoco":
        import hotcoco

        with contextlib.redirect_stdout(io.StringIO()):
            coco = hotcoco.COCO(gt)
            ev = hotcoco.COCOeval(coco, coco.loadRes(results), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return float(ev.stats[0])
    if library == "pycocotools":
        from pycocotools.coco import COCO as Coco
        from pycocotools.cocoeval import COCOeval as Eval
    else:
        from faster_coco_eval import COCO as Coco
        from faster_coco_eval import COCOeval_faster as Eval
    with contextlib.redirect_stdout(io.StringIO()):  # they print progress and the summary
        coco = Coco()
        coco.dataset = gt
        coco.createIndex()
        ev = Eval(coco, coco.loadRes(results), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def _median_profile(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {k: round(statistics.median(r["profile"][k] for r in runs), 4) for k in runs[0]["profile"]}


def _interleaved(
    backends: tuple[str, ...], repeats: int, run: Any, progress: Any, task: Any, what: str
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    for r in range(repeats):
        order = backends if r % 2 == 0 else backends[::-1]
        for backend in order:
            progress.update(task, description=f"eval: {what} {backend} {r + 1}/{repeats}")
            out[backend].append(run(backend))
            progress.advance(task)
    return out


def run_eval(ds: Any, b: DictConfig, chunk: int, progress: Any) -> dict[str, Any]:
    """The eval section: see the module docstring. ``ds``: the CocoDetection whose annotation file is the
    ground truth of the first case; ``chunk``: images per ``update`` (the val batch size)."""
    e = b.eval
    backends = tuple(BACKENDS)
    gt: COCO = ds.coco
    ids = ds.ids[: e.images]
    preds = synthetic_predictions(gt, ids, e.detections_per_image, e.jitter, b.seed)
    n_coco = int(e.coco.images) if e.get("coco") else 0
    coco_backends = tuple(e.coco.backends) if n_coco else ()
    task = progress.add_task("eval", total=e.repeats * len(backends) * 2 + len(coco_backends) * 2)
    runs = _interleaved(backends, e.repeats, lambda k: time_evaluator(k, gt, preds, ids, ("bbox",), chunk),
                        progress, task, f"{len(ids)} images")
    # the libraries alone on the same detections as a results list (a script's path): built once,
    # copied untimed (loadRes and COCOeval write into the dicts they get)
    results, _ = coco_results(preds, ids, ds.category_ids)
    id_set = set(ids)
    gt_dict = {
        "images": [gt.imgs[i] for i in ids],
        "annotations": [a for a in gt.dataset["annotations"] if a["image_id"] in id_set],
        "categories": gt.dataset["categories"],
    }

    def alone(k: str) -> dict[str, Any]:
        g, r = copy.deepcopy(gt_dict), copy.deepcopy(results)
        start = time.perf_counter()
        ap = library_eval(k, g, r)
        return {"s": time.perf_counter() - start, "ap": ap}

    lib = _interleaved(backends, e.repeats, alone, progress, task, "library alone")
    secs = {k: statistics.median(r["s"] for r in runs[k]) for k in backends}
    ap = {k: runs[k][0]["ap"]["bbox"] for k in backends}
    lib_s = {k: statistics.median(r["s"] for r in lib[k]) for k in backends}
    fastest = min(secs, key=secs.get)
    out: dict[str, Any] = {
        "pycocotools_s": secs["pycocotools"],
        "faster_coco_eval_s": secs["faster_coco_eval"],
        "hotcoco_s": secs["hotcoco"],
        "ap_pycocotools": ap["pycocotools"],
        "ap_faster": ap["faster_coco_eval"],
        "ap_hotcoco": ap["hotcoco"],
        "speedup": secs["pycocotools"] / secs["faster_coco_eval"],
        "speedup_hotcoco": secs["pycocotools"] / secs["hotcoco"],
        "fastest": fastest,
        "speedup_fastest": secs["pycocotools"] / secs[fastest],
        "ap_abs_diff": max(abs(ap[k] - ap["pycocotools"]) for k in backends),
        "images": len(preds),
        "detections": sum(len(p["scores"]) for p in preds),
        "split": str(ds.split),
        **{f"{k}_s_repeats": [round(r["s"], 4) for r in runs[k]] for k in backends},
        "profile": {k: _median_profile(runs[k]) for k in backends},
        "library": {
            **{f"{k}_s": lib_s[k] for k in backends},
            "speedup": lib_s["pycocotools"] / lib_s["faster_coco_eval"],
            "speedup_hotcoco": lib_s["pycocotools"] / lib_s["hotcoco"],
            "ap_pycocotools": lib["pycocotools"][0]["ap"],
            "ap_faster": lib["faster_coco_eval"][0]["ap"],
            "ap_hotcoco": lib["hotcoco"][0]["ap"],
        },
    }
    if n_coco:
        out["coco"] = run_coco_sized(e.coco, b.seed, chunk, coco_backends, progress, task)
    return out


def run_coco_sized(
    c: DictConfig, seed: int, chunk: int, backends: tuple[str, ...], progress: Any, task: Any
) -> dict[str, Any]:
    """The COCO-sized case: generated ground truth, ``c.detections_per_image`` detections per image;
    bbox at the images' size, segm with masks at ``c.mask_size``; one run per backend and iou type."""
    start = time.perf_counter()
    size = tuple(int(v) for v in c.image_size)
    mask_size = tuple(int(v) for v in c.mask_size)
    out: dict[str, Any] = {"images": int(c.images), "detections_per_image": int(c.detections_per_image),
                           "image_size": list(size), "mask_size": list(mask_size)}
    for iou_type, hw in (("bbox", size), ("segm", mask_size)):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = synthetic_coco(int(c.images), hw, seed)
            gt.createIndex()
        ids = sorted(gt.imgs)
        preds = synthetic_predictions(gt, ids, int(c.detections_per_image), 0.1, seed)
        if iou_type == "bbox":
            out["annotations"] = len(gt.dataset["annotations"])
        rows: dict[str, Any] = {}
        for backend in backends:
            progress.update(task, description=f"eval: COCO-sized {iou_type} {backend}")
            m = mask_size if iou_type == "segm" else None
            rows[backend] = time_evaluator(backend, gt, preds, ids, (iou_type,), chunk, m)
            rows[backend]["ap"] = rows[backend]["ap"][iou_type]
            rows[backend]["profile"] = {k: round(v, 4) for k, v in rows[backend]["profile"].items()}
            progress.advance(task)
        fastest = min(rows, key=lambda k: rows[k]["s"])
        entry: dict[str, Any] = {"backends": rows, "fastest": fastest}
        if "pycocotools" in rows:
            entry["speedup_fastest"] = rows["pycocotools"]["s"] / rows[fastest]["s"]
            entry["ap_abs_diff"] = max(abs(r["ap"] - rows["pycocotools"]["ap"]) for r in rows.values())
        out[iou_type] = entry
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def run_section(cfg: DictConfig, b: DictConfig) -> dict[str, Any]:
    """The eval section on the ground truth of ``bench.eval.split`` (train or val of ``cfg.data``)."""
    dm = B.build_datamodule(cfg.data, with_masks=False)
    dm.prepare_data()
    dm.setup("fit")
    ds = dm.train_dataset if b.eval.split == "train" else dm.val_dataset
    with _progress() as progress:
        # updated batch by batch, as validation does
        return run_eval(ds, b, int(cfg.data.val_batch_size), progress)
