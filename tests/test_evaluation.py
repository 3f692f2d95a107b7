"""Tests for detection.evaluation: known AP values, agreement with stock pycocotools, export helpers."""

from __future__ import annotations

import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from rich.console import Console

from detection.atomic import atomic_path, write_json_atomic
from detection.evaluation import (
    METRIC_NAMES,
    CocoEvaluator,
    coco_results,
    metrics_table,
)
from tests.coco_oracle import evaluate_results_with_pycocotools

BACKENDS = ("faster_coco_eval", "pycocotools", "hotcoco")
# Both paths end in float64 COCOeval stats; 1e-6 (above the float32 rounding of a value
# in [0, 1], ~6e-8) is far below any change one detection makes on these small cases.
TOL = 1e-6
# COCO's 101 recall thresholds 0.00, 0.01, ..., 1.00 (AP is the mean interpolated precision over them).
N_REC = 101

H, W = 64, 80  # image size used by the hand-built cases


# ----------------------------------------------------------------------------------------------- helpers


def _pred(boxes, scores, labels, masks=None):
    d = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32).reshape(-1),
        "labels": torch.tensor(labels, dtype=torch.int64).reshape(-1),
    }
    if masks is not None:
        d["masks"] = masks
    return d


def _target(boxes, labels, iscrowd=None, area=None, masks=None):
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes_t)
    if area is None:  # like a COCO file whose area is the box area
        area = ((boxes_t[:, 2] - boxes_t[:, 0]) * (boxes_t[:, 3] - boxes_t[:, 1])).tolist()
    d = {
        "boxes": boxes_t,
        "labels": torch.tensor(labels, dtype=torch.int64).reshape(-1),
        "iscrowd": torch.tensor(iscrowd if iscrowd is not None else [0] * n, dtype=torch.int64),
        "area": torch.tensor(area, dtype=torch.float32).reshape(-1),
    }
    if masks is not None:
        d["masks"] = masks
    return d


def _box_masks(boxes, h=H, w=W):
    """(N, h, w) bool masks filling each integer XYXY box."""
    m = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        m[i, int(y1) : int(y2), int(x1) : int(x2)] = True
    return m


def _gt_dataset(targets, image_ids, category_ids, h=H, w=W):
    """A COCO annotation dict (original ids, XYWH boxes) describing ``targets``, for the pycocotools path."""
    images = [{"id": int(i), "height": h, "width": w} for i in image_ids]
    anns = []
    for t, image_id in zip(targets, image_ids):
        masks = t.get("masks")
        for k in range(len(t["labels"])):
            x1, y1, x2, y2 = t["boxes"][k].tolist()
            ann = {
                "id": len(anns) + 1,  # COCOeval needs ids >= 1
                "image_id": int(image_id),
                "category_id": int(category_ids[int(t["labels"][k])]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(t["area"][k]),
                "iscrowd": int(t["iscrowd"][k]),
            }
            if masks is not None:
                rle = mask_util.encode(np.asfortranarray(masks[k].numpy().astype(np.uint8)))
                ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            anns.append(ann)
    cats = [{"id": int(c), "name": str(c)} for c in category_ids]
    return {"images": images, "annotations": anns, "categories": cats}


def _evaluate(preds, targets, backend="faster_coco_eval", iou_types=("bbox",), **kw):
    ev = CocoEvaluator(iou_types=iou_types, backend=backend, **kw)
    ev.update(preds, targets)
    return ev.compute()


def _reference(preds, targets, category_ids=(1,), iou_type="bbox", image_ids=None):
    """Stock pycocotools on the exported results JSON (the independent path)."""
    image_ids = list(image_ids) if image_ids is not None else [100 + i for i in range(len(preds))]
    gt = _gt_dataset(targets, image_ids, category_ids)
    bbox_res, segm_res = coco_results(
        preds, image_ids, category_ids, with_masks=iou_type == "segm", box_decimals=None
    )
    return evaluate_results_with_pycocotools(gt, segm_res if iou_type == "segm" else bbox_res, iou_type)


def _assert_close(actual: dict, expected: dict, keys):
    for k in keys:
        assert actual[k] == pytest.approx(expected[k], abs=TOL), (k, actual[k], expected[k])


BOX_A = [10, 10, 40, 40]  # 30x30 = 900 px: "small" (< 32^2)
BOX_B = [45, 20, 75, 60]  # 30x40 = 1200 px: "medium"
FAR_BOX = [0, 50, 8, 62]  # overlaps neither


# ------------------------------------------------------------------------------------------ known values


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_give_ap_1(backend):
    preds = [_pred([BOX_A, BOX_B], [0.9, 0.8], [0, 1]), _pred([BOX_B], [0.7], [1])]
    targets = [_target([BOX_A, BOX_B], [0, 1]), _target([BOX_B], [1])]
    m = _evaluate(preds, targets, backend)
    assert set(m) == {f"bbox/{n}" for n in METRIC_NAMES}
    for k in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/AR100"):
        assert m[k] == pytest.approx(1.0, abs=TOL)
    ref = _reference(preds, targets, category_ids=[1, 2])
    _assert_close(m, ref, m.keys())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_of_two_missed(backend):
    # Two GT of one class, one detected perfectly, the other missed: precision is 1 up to recall 0.5 and
    # recall never exceeds 0.5, so interpolated precision is 1 at the 51 thresholds 0.00..0.50 and 0 at the
    # other 50: AP = 51/101 = 0.504950... at every IoU threshold. AR = 0.5.
    preds = [_pred([BOX_A], [0.9], [0])]
    targets = [_target([BOX_A, BOX_B], [0, 0])]
    m = _evaluate(preds, targets, backend)
    for k in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
        assert m[k] == pytest.approx(51 / N_REC, abs=TOL)
    assert m["bbox/AR100"] == pytest.approx(0.5, abs=TOL)
    ref = _reference(preds, targets)
    # stock pycocotools (float64 throughout) agrees with the hand value
    assert ref["bbox/AP"] == pytest.approx(51 / N_REC, abs=1e-12)
    _assert_close(m, ref, m.keys())


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positive_ranked_above_true_positive(backend):
    # One GT; detections sorted by score: FP (0.9) then TP (0.8). PR points: (R=0, P=0), (R=1, P=0.5).
    # Interpolated precision (max precision at recall >= r) is 0.5 for every r in [0, 1] -> AP = 0.5.
    targets = [_target([BOX_A], [0])]
    fp_first = [_pred([FAR_BOX, BOX_A], [0.9, 0.8], [0, 0])]
    m = _evaluate(fp_first, targets, backend)
    assert m["bbox/AP"] == pytest.approx(0.5, abs=TOL)
    _assert_close(m, _reference(fp_first, targets), m.keys())
    # Control: the same two detections with the TP ranked first lose nothing -> AP = 1.
    tp_first = [_pred([FAR_BOX, BOX_A], [0.8, 0.9], [0, 0])]
    assert _evaluate(tp_first, targets, backend)["bbox/AP"] == pytest.approx(1.0, abs=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_detection_on_crowd_region_is_ignored(backend):
    person = [4, 4, 24, 24]
    crowd = [30, 10, 78, 62]  # large crowd region
    inside = [40, 20, 60, 40]  # IoU with the crowd box 400/2496 < 0.5, but fully inside it
    preds = [_pred([inside, person], [0.95, 0.9], [0, 0])]
    # With iscrowd=1 COCO's crowd IoU is intersection / area(detection) = 1: the detection matches the crowd
    # region and is ignored (neither TP nor FP); the crowd GT is not counted as missed either -> AP = 1.
    crowd_t = [_target([person, crowd], [0, 0], iscrowd=[0, 1])]
    m = _evaluate(preds, crowd_t, backend)
    assert m["bbox/AP"] == pytest.approx(1.0, abs=TOL)
    _assert_close(m, _reference(preds, crowd_t), m.keys())
    # Control with iscrowd=0: the region is an ordinary GT the detection does not match (IoU < 0.5), so it is
    # a FP ranked first and one of two GT is missed: PR points (R=0, P=0), (R=0.5, P=0.5) -> interpolated
    # precision 0.5 at the 51 thresholds 0.00..0.50, 0 above -> AP = 0.5 * 51/101.
    plain_t = [_target([person, crowd], [0, 0], iscrowd=[0, 0])]
    m_plain = _evaluate(preds, plain_t, backend)
    assert m_plain["bbox/AP"] == pytest.approx(0.5 * 51 / N_REC, abs=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_detection_on_image_without_gt_is_a_false_positive(backend):
    # Image 0: one GT detected (score 0.8). Image 1: no GT, one detection of the same class (0.9).
    # Image 2: neither GT nor detections. Ranked: FP, TP -> AP = 0.5 (as in the FP-first case).
    preds = [_pred([BOX_A], [0.8], [0]), _pred([BOX_B], [0.9], [0]), _pred([], [], [])]
    targets = [_target([BOX_A], [0]), _target([], []), _target([], [])]
    m = _evaluate(preds, targets, backend)
    assert m["bbox/AP"] == pytest.approx(0.5, abs=TOL)
    _assert_close(m, _reference(preds, targets), m.keys())


@pytest.mark.parametrize("backend", BACKENDS)
def test_size_buckets_follow_annotation_area(backend):
    # Box area 60*50 = 3000 px would be "medium", but the annotation's area (the segment, 800 px) is "small":
    # COCO buckets by the annotation area, so APs is defined (1.0) and the empty buckets are -1.
    box = [10, 10, 70, 60]
    preds = [_pred([box], [0.9], [0])]
    targets = [_target([box], [0], area=[800.0])]
    m = _evaluate(preds, targets, backend)
    assert m["bbox/APs"] == pytest.approx(1.0, abs=TOL)
    assert m["bbox/APm"] == -1.0
    assert m["bbox/APl"] == -1.0
    assert m["bbox/ARm"] == -1.0
    _assert_close(m, _reference(preds, targets), m.keys())
    # Without the area field the box area is used -> medium bucket instead.
    no_area = [{k: v for k, v in targets[0].items() if k != "area"}]
    m2 = _evaluate(preds, no_area, backend)
    assert m2["bbox/APs"] == -1.0
    assert m2["bbox/APm"] == pytest.approx(1.0, abs=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_exactly_on_thresholds_match_pycocotools(backend):
    # torchmetrics' default thresholds are float32-rounded (0.55 -> 0.5500000119, 0.3 -> 0.3000000119);
    # CocoEvaluator passes pycocotools' float64 ones, so values landing exactly on a threshold agree.
    # IoU exactly 110/200 = 0.55: a match at IoU thresholds 0.50 and 0.55 only -> AP = 2/10 (float32
    # thresholds would give 1/10).
    preds = [_pred([[0, 0, 11, 10]], [0.9], [0])]
    targets = [_target([[0, 0, 20, 10]], [0])]
    m = _evaluate(preds, targets, backend)
    assert m["bbox/AP"] == pytest.approx(0.2, abs=TOL)
    _assert_close(m, _reference(preds, targets), m.keys())
    # Recall exactly 3/10: ten GT, the three top-scored detections hit, then one FP. Precision is 1 at the
    # 31 recall thresholds 0.00..0.30 (0.30 included) and 0 above -> AP = 31/101 (float32: 30/101).
    gt_boxes = [[8 * k, 0, 8 * k + 6, 6] for k in range(10)]
    preds = [_pred([*gt_boxes[:3], [0, 40, 6, 46]], [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0])]
    targets = [_target(gt_boxes, [0] * 10)]
    m = _evaluate(preds, targets, backend)
    assert m["bbox/AP"] == pytest.approx(31 / N_REC, abs=TOL)
    _assert_close(m, _reference(preds, targets), m.keys())


# ----------------------------------------------------------------------------- agreement with pycocotools


def _random_case(seed=0, n_images=12, n_classes=3, with_masks=False, scale=1):
    """Jittered copies of GT plus random false positives, with crowds, empty images and all-FP images.

    Integer coordinates: exact in float32 and in the JSON, so both paths see identical boxes. ``scale``
    multiplies all coordinates (2 puts some boxes in the "large" bucket; masks need scale 1).
    """
    g = torch.Generator().manual_seed(seed)

    def rand_box():
        x1 = int(torch.randint(0, W - 14, (1,), generator=g))
        y1 = int(torch.randint(0, H - 14, (1,), generator=g))
        bw = int(torch.randint(10, W - x1 + 1, (1,), generator=g))
        bh = int(torch.randint(10, H - y1 + 1, (1,), generator=g))
        return [scale * x1, scale * y1, scale * (x1 + bw), scale * (y1 + bh)]

    preds, targets = [], []
    for i in range(n_images):
        n_gt = 0 if i % 5 == 4 else int(torch.randint(1, 5, (1,), generator=g))
        gt_boxes = [rand_box() for _ in range(n_gt)]
        gt_labels = torch.randint(0, n_classes, (n_gt,), generator=g).tolist()
        crowd = [1 if (i % 3 == 0 and k == 0) else 0 for k in range(n_gt)]
        p_boxes, p_labels = [], []
        for b, lab in zip(gt_boxes, gt_labels):
            if float(torch.rand(1, generator=g)) < 0.8:
                d = torch.randint(-2, 3, (4,), generator=g).tolist()
                jb = [min(max(v + dv, 0), scale * lim) for v, dv, lim in zip(b, d, (W, H, W, H))]
                if jb[2] > jb[0] + 1 and jb[3] > jb[1] + 1:
                    p_boxes.append(jb)
                    wrong_class = float(torch.rand(1, generator=g)) > 0.85
                    p_labels.append((lab + 1) % n_classes if wrong_class else lab)
        for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
            p_boxes.append(rand_box())
            p_labels.append(int(torch.randint(0, n_classes, (1,), generator=g)))
        # distinct scores: ties would make the ranking depend on insertion order
        scores = (torch.randperm(1000, generator=g)[: len(p_boxes)].float() / 1000 + 1e-3).tolist()
        area = None
        gt_masks = p_masks = None
        if with_masks:
            gt_masks = _box_masks(gt_boxes)
            # cut a corner off predicted masks so mask IoU differs from box IoU
            p_masks = _box_masks(p_boxes)
            for m in p_masks:
                ys, xs = torch.nonzero(m, as_tuple=True)
                if len(ys):
                    m[ys.min() : ys.min() + 3, xs.min() : xs.min() + 3] = False
            area = gt_masks.flatten(1).sum(1).float().tolist()
        preds.append(_pred(p_boxes, scores, p_labels, masks=p_masks))
        targets.append(_target(gt_boxes, gt_labels, iscrowd=crowd, area=area, masks=gt_masks))
    return preds, targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_stock_pycocotools_on_results_json_with_noncontiguous_ids(backend, tmp_path):
    category_ids = [1, 3, 7]
    image_ids = [1000 + 7 * i for i in range(16)]
    preds, targets = _random_case(seed=0, n_images=16, scale=2)
    m = _evaluate(preds, targets, backend, category_ids=category_ids)
    # a non-trivial case, with all three size buckets, so agreement means something
    assert all(0.05 < m[f"bbox/{k}"] < 0.95 for k in ("AP", "APs", "APm", "APl"))
    # The full export path: results JSON on disk with original ids, XYWH, rounded boxes.
    bbox_res, _ = coco_results(preds, image_ids, category_ids)
    assert {r["category_id"] for r in bbox_res} <= set(category_ids)
    res_file = write_json_atomic(tmp_path / "results.json", bbox_res)
    ann_file = write_json_atomic(tmp_path / "gt.json", _gt_dataset(targets, image_ids, category_ids))
    ref = evaluate_results_with_pycocotools(ann_file, res_file, "bbox")
    assert set(ref) == set(m)
    _assert_close(m, ref, m.keys())


@pytest.mark.parametrize("backend", BACKENDS)
def test_segm_matches_stock_pycocotools(backend):
    category_ids = [2, 5, 9]
    preds, targets = _random_case(seed=3, n_images=8, with_masks=True)
    m = _evaluate(preds, targets, backend, iou_types=("bbox", "segm"), category_ids=category_ids)
    assert 0.05 < m["segm/AP"] < 0.95
    assert m["segm/AP"] != pytest.approx(m["bbox/AP"], abs=1e-3)  # masks differ from boxes on purpose
    _assert_close(m, _reference(preds, targets, category_ids, "segm"), [f"segm/{n}" for n in METRIC_NAMES])
    _assert_close(m, _reference(preds, targets, category_ids, "bbox"), [f"bbox/{n}" for n in METRIC_NAMES])


# -------------------------------------------------------------------------------------------------- segm


@pytest.mark.parametrize("backend", BACKENDS)
def test_segm_perfect_masks_give_ap_1(backend):
    boxes = [BOX_A, BOX_B]
    masks = _box_masks(boxes)
    preds = [_pred(boxes, [0.9, 0.8], [0, 0], masks=masks.to(torch.uint8))]  # uint8 masks accepted too
    targets = [_target(boxes, [0, 0], masks=masks)]
    m = _evaluate(preds, targets, backend, iou_types=("segm",))
    assert set(m) == {f"segm/{n}" for n in METRIC_NAMES}  # only what was asked for
    assert m["segm/AP"] == pytest.approx(1.0, abs=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segm_only_counts_detections_on_images_without_gt(backend):
    # torchmetrics' segm-only mode drops images without GT masks, hiding this FP (it would report 1.0);
    # CocoEvaluator evaluates boxes alongside to keep every image. Same ranking as the box case -> 0.5.
    preds = [
        _pred([BOX_A], [0.8], [0], masks=_box_masks([BOX_A])),
        _pred([BOX_B], [0.9], [0], masks=_box_masks([BOX_B])),
    ]
    targets = [
        _target([BOX_A], [0], masks=_box_masks([BOX_A])),
        _target([], [], masks=torch.zeros(0, H, W, dtype=torch.bool)),
    ]
    m = _evaluate(preds, targets, backend, iou_types=("segm",))
    assert m["segm/AP"] == pytest.approx(0.5, abs=TOL)
    _assert_close(m, _reference(preds, targets, iou_type="segm"), m.keys())


def test_soft_masks_are_thresholded():
    soft = _box_masks([BOX_A]).float() * 0.7 + 0.2  # 0.9 inside, 0.2 outside
    preds = [_pred([BOX_A], [0.9], [0], masks=soft[:, None])]  # Mask R-CNN's (N, 1, H, W)
    targets = [_target([BOX_A], [0], masks=_box_masks([BOX_A]))]
    assert _evaluate(preds, targets, iou_types=("segm",))["segm/AP"] == pytest.approx(1.0, abs=TOL)
    # threshold above 0.9 leaves empty masks -> no match
    m = _evaluate(preds, targets, iou_types=("segm",), mask_threshold=0.95)
    assert m["segm/AP"] == pytest.approx(0.0, abs=TOL)


def test_segm_results_rle_round_trip_and_json():
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, H, W, generator=g) > 0.6  # irregular masks
    pred = _pred([BOX_A, BOX_B, FAR_BOX], [0.9, 0.5, 0.3], [0, 1, 0], masks=masks)
    bbox_res, segm_res = coco_results([pred], [42], [4, 11], with_masks=True)
    assert len(bbox_res) == len(segm_res) == 3
    segm_res = json.loads(json.dumps(segm_res))  # JSON-serialisable, and survives the round trip
    for k, r in enumerate(segm_res):
        assert r["image_id"] == 42
        assert r["category_id"] == [4, 11, 4][k]
        assert "bbox" not in r  # else loadRes would bucket masks by box area
        rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode("ascii")}
        assert r["segmentation"]["size"] == [H, W]
        np.testing.assert_array_equal(mask_util.decode(rle), masks[k].numpy().astype(np.uint8))


# -------------------------------------------------------------------------------------------- exporting


def test_coco_results_maps_ids_and_converts_boxes():
    preds = [
        _pred([[10.0, 20.0, 50.5, 80.25], [0.0, 0.0, 1.0, 2.0]], [0.75, 0.5], [2, 0]),
        _pred([], [], []),
        _pred([[1.123456, 2.0, 3.987654, 9.5]], [0.25], [1]),
    ]
    bbox_res, segm_res = coco_results(preds, [9, 10, 11], [1, 3, 7])
    assert segm_res == []
    assert bbox_res == [
        {"image_id": 9, "category_id": 7, "bbox": [10.0, 20.0, 40.5, 60.25], "score": 0.75},
        {"image_id": 9, "category_id": 1, "bbox": [0.0, 0.0, 1.0, 2.0], "score": 0.5},
        {"image_id": 11, "category_id": 3, "bbox": [1.12, 2.0, 2.86, 7.5], "score": 0.25},
    ]
    assert all(type(r["image_id"]) is int and type(r["category_id"]) is int for r in bbox_res)
    unrounded, _ = coco_results(preds[2:], [11], [1, 3, 7], box_decimals=None)
    assert unrounded[0]["bbox"][2] == pytest.approx(3.987654 - 1.123456, abs=1e-6)
    with pytest.raises(ValueError, match="image ids"):
        coco_results(preds, [9, 10], [1, 3, 7])


def test_pycocotools_path_accepts_empty_results():
    targets = [_target([BOX_A], [0])]
    ref = evaluate_results_with_pycocotools(_gt_dataset(targets, [5], [1]), [], "bbox")
    assert ref["bbox/AP"] == 0.0  # GT exists, nothing detected
    assert ref["bbox/APl"] == -1.0


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_json_atomic(path, {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # like open(), not mkstemp's 0600
    # json.dump fails halfway (after writing the first items) on the un-serialisable object
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": list(range(1000)), "b": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp file left behind
    write_json_atomic(path, [{"v": 2}], indent=2)
    assert json.loads(path.read_text()) == [{"v": 2}]



def test_atomic_path_replaces_only_on_success_and_only_where_asked(tmp_path):
    path = tmp_path / "final.ckpt"
    path.write_bytes(b"good")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"good"
    with atomic_path(path, replace=False) as tmp:  # a rank that must not write
        tmp.write_bytes(b"other rank")
    assert path.read_bytes() == b"good"
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.ckpt"]  # no temp file left in any case

# ------------------------------------------------------------------------------------ evaluator plumbing


def test_invalid_arguments():
    with pytest.raises(ValueError, match="cocoapi"):
        CocoEvaluator(backend="cocoapi")
    with pytest.raises(ValueError, match="keypoints"):
        CocoEvaluator(iou_types=("bbox", "keypoints"))
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_results_with_pycocotools({}, [], "keypoints")
    ev = CocoEvaluator(category_ids=[1, 3])
    with pytest.raises(ValueError, match="contiguous"):
        ev.update([_pred([BOX_A], [0.9], [3])], [_target([BOX_A], [0])])


def test_reset_and_accumulation_across_updates():
    ev = CocoEvaluator()
    assert all(v == -1.0 for v in ev.compute().values())  # nothing seen yet
    ev.update([_pred([FAR_BOX], [0.9], [0])], [_target([], [])])
    ev.update([_pred([BOX_A], [0.8], [0])], [_target([BOX_A], [0])])
    assert ev.compute()["bbox/AP"] == pytest.approx(0.5, abs=TOL)  # both batches counted
    ev.reset()
    ev.update([_pred([BOX_A], [0.8], [0])], [_target([BOX_A], [0])])
    assert ev.compute()["bbox/AP"] == pytest.approx(1.0, abs=TOL)  # the FP batch is gone


def test_class_metrics_use_original_ids():
    preds = [_pred([BOX_A, BOX_B], [0.9, 0.8], [0, 1])]
    targets = [_target([BOX_A, BOX_B], [0, 2])]  # class 1 predicted where class 2 is: both wrong
    m = _evaluate(preds, targets, category_ids=[1, 3, 7], class_metrics=True)
    assert m["bbox/AP_per_class/1"] == pytest.approx(1.0, abs=TOL)
    assert m["bbox/AP_per_class/7"] == pytest.approx(0.0, abs=TOL)
    assert m["bbox/AP_per_class/3"] == -1.0  # no GT of that class


def test_metrics_table_renders_percent_and_dash():
    metrics = {f"bbox/{n}": 51 / N_REC for n in METRIC_NAMES}
    metrics["bbox/APl"] = -1.0
    table = metrics_table(metrics, title="val")
    console = Console(record=True, width=120)
    console.print(table)
    text = console.export_text()
    assert "val" in text
    row = next(line for line in text.splitlines() if "bbox" in line)
    assert row.count("50.5") == 5 and "–" in row
    assert "segm" not in text
    assert [c.header for c in table.columns] == ["type", "AP", "AP50", "AP75", "APs", "APm", "APl"]


# ------------------------------------------------------------------------------------------ DDP gather


def _ddp_case():
    """Four images with masks: hits, a miss, a false positive on an image without objects."""
    boxes = [[BOX_A, BOX_B], [BOX_B], [], [BOX_A]]
    preds_boxes = [[BOX_A, FAR_BOX], [BOX_B], [FAR_BOX], [[12, 11, 41, 40]]]
    preds, targets = [], []
    for i, (gt, pb) in enumerate(zip(boxes, preds_boxes)):
        preds.append(_pred(pb, [0.9 - 0.1 * k - 0.05 * i for k in range(len(pb))], [0] * len(pb), _box_masks(pb)))
        targets.append(_target(gt, [0] * len(gt), masks=_box_masks(gt)))
    return preds, targets


def _ddp_worker(rank: int, world: int, port: int, backend: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        preds, targets = _ddp_case()
        ev = CocoEvaluator(iou_types=("bbox", "segm"), backend=backend)
        # rank r gets images r, r + world, ... (DistributedSampler's interleaving), two updates each
        mine = list(range(rank, len(preds), world))
        for i in mine:
            ev.update([preds[i]], [targets[i]])
        metrics = ev.compute()
        if rank == 0:
            with open(out, "w") as f:
                json.dump(metrics, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_ranks_are_gathered_before_evaluation(backend, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "metrics.json")
    mp.spawn(_ddp_worker, args=(2, port, backend, out), nprocs=2, join=True)
    with open(out) as f:
        gathered = json.load(f)
    preds, targets = _ddp_case()
    single = _evaluate(preds, targets, backend, iou_types=("bbox", "segm"))
    assert gathered.keys() == single.keys()
    _assert_close(gathered, single, single.keys())
    # and it is not rank 0's half alone
    half = _evaluate(preds[0::2], targets[0::2], backend, iou_types=("bbox", "segm"))
    assert any(abs(half[k] - single[k]) > 1e-3 for k in single)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segm_with_more_than_255_masks(backend):
    # pycocotools' mask.area overflows a uint8 beyond 255 masks in one call (NumPy 2): an epoch of
    # Mask R-CNN detections has thousands
    rng = np.random.default_rng(0)
    xy = rng.integers(0, 40, (300, 2))
    wh = rng.integers(4, 30, (300, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [W, H])], axis=1).tolist()
    preds = [_pred(boxes[i::3], rng.uniform(0.1, 1, 100).tolist(), [0] * 100, _box_masks(boxes[i::3])) for i in range(3)]
    gt_boxes = [[BOX_A, BOX_B], [BOX_B], [BOX_A]]
    targets = [_target(g, [0] * len(g), area=[0.0] * len(g), masks=_box_masks(g)) for g in gt_boxes]
    m = _evaluate(preds, targets, backend, iou_types=("segm",))
    ref_targets = [_target(g, [0] * len(g), area=_box_masks(g).sum((1, 2)).tolist(), masks=_box_masks(g)) for g in gt_boxes]
    ref = _reference(preds, ref_targets, iou_type="segm")
    _assert_close(m, ref, m.keys())


# ------------------------------------------------- metrics = pycocotools on the written results file (issue 12.8)

# Relative boxes (x1, y1, x2, y2 as fractions of the image) the stub detector below always predicts; the
# ground truth is built around them with sub-pixel jitter, so many IoUs sit near the 0.5..0.95 thresholds
# and a change of a box by 0.005 px moves AP75 (small objects: 3-12 px on a 48 x 64 image).
_REL = np.array(
    [[0.05 + 0.11 * (k % 8), 0.06 + 0.2 * (k // 8), 0.05 + 0.11 * (k % 8) + 0.05 + 0.01 * (k % 5),
      0.06 + 0.2 * (k // 8) + 0.07 + 0.015 * (k % 4)] for k in range(24)]
)
_CATS = [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}, {"id": 21, "name": "c"}]
_LABELS = np.arange(len(_REL)) % 3


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = int(v), 0
        n += 1
    runs.append(n)
    return {"size": list(mask.shape), "counts": runs}


def _small_object_coco(root, n_images=14, seed=0):
    """A COCO directory (split ``s``) built around :data:`_REL`: small objects with fractional polygon
    boxes, non-contiguous image and category ids, crowd regions (uncompressed RLE), three images without
    annotations, a box sticking out of the image (the loader clamps it) and a zero-width box (dropped)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    (root / "s").mkdir()
    images, anns = [], []
    for i in range(n_images):
        h, w = (48, 64) if i % 2 == 0 else (64, 48)
        image_id = 7 + 13 * i
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "s" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        if i % 5 == 3:
            continue  # no annotations
        for k, r in enumerate(_REL):
            if rng.random() < 0.35:
                continue
            x1, y1, x2, y2 = r * [w, h, w, h] + rng.normal(0, 0.35, 4)
            x1, y1 = max(x1, 0.0), max(y1, 0.0)
            lab = _LABELS[k] if rng.random() < 0.85 else (_LABELS[k] + 1) % 3
            poly = [x1, y1, x2, y1, x2, y2, x1, y2]
            anns.append({"image_id": image_id, "category_id": _CATS[lab]["id"], "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "segmentation": [[round(float(v), 2) for v in poly]]})
        if i % 4 == 0:  # a crowd region over the lower band
            m = np.zeros((h, w), dtype=np.uint8)
            m[h // 2 :, : w // 2] = 1
            anns.append({"image_id": image_id, "category_id": _CATS[i % 3]["id"], "iscrowd": 1,
                         "bbox": [0, h // 2, w // 2, h - h // 2], "area": float(m.sum()),
                         "segmentation": _uncompressed_rle(m)})
    anns.append({"image_id": 7, "category_id": 3, "iscrowd": 0, "bbox": [50.5, 3.2, 30.0, 6.1],
                 "area": 60.0, "segmentation": [[50.5, 3.2, 64, 3.2, 64, 9.3, 50.5, 9.3]]})
    anns.append({"image_id": 7, "category_id": 8, "iscrowd": 0, "bbox": [5.0, 5.0, 0.0, 4.0],
                 "area": 0.0, "segmentation": [[5, 5, 5, 9, 5.5, 9]]})
    for k, a in enumerate(anns):
        a["id"] = 1000 + 3 * k
    ann_file = root / "annotations" / "instances_s.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": _CATS}))
    return ann_file, images


class _StubDetector(torch.nn.Module):
    """Predicts :data:`_REL` on every image (in the input's pixels, as a detector does), box-filled soft
    masks, fixed scores: enough to exercise the test step, the results files and the metrics."""

    with_masks = True
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.scores = torch.linspace(0.95, 0.2, len(_REL))

    def forward(self, images, targets=None):
        out = []
        for img in images:
            h, w = img.shape[-2:]
            boxes = torch.tensor(_REL, dtype=torch.float32) * torch.tensor([w, h, w, h], dtype=torch.float32)
            masks = torch.zeros(len(boxes), 1, h, w)
            for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
                masks[k, 0, int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = 0.9
            out.append({"boxes": boxes, "scores": self.scores.clone(), "labels": torch.as_tensor(_LABELS),
                        "masks": masks})
        return out


def _stub_preds(images, seed=1):
    """Predictions in original pixels for each image entry: :data:`_REL` with fractional offsets and box masks."""
    g = np.random.default_rng(seed)
    preds = []
    for im in images:
        h, w = im["height"], im["width"]
        boxes = np.clip(_REL * [w, h, w, h] + g.normal(0, 0.2, _REL.shape), 0, [w, h, w, h])
        masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            masks[k, int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = True
        preds.append(_pred(boxes.tolist(), g.uniform(0.05, 1, len(boxes)).tolist(), _LABELS.tolist(), masks=masks))
    return preds


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_are_pycocotools_on_the_written_results_file(backend, tmp_path):
    ann_file, images = _small_object_coco(tmp_path / "coco")
    preds = _stub_preds(images)
    image_ids = [im["id"] for im in images]
    ev = CocoEvaluator(("bbox", "segm"), backend, ground_truth=ann_file)
    for b in range(0, len(preds), 4):  # in batches, like the test step
        ev.update(preds[b : b + 4], [{"image_id": i} for i in image_ids[b : b + 4]])
    m = ev.compute()
    bbox, segm = coco_results(preds, image_ids, ev.category_ids, with_masks=True)
    for t, res in (("bbox", bbox), ("segm", segm)):
        path = write_json_atomic(tmp_path / f"detections_{t}.json", res)
        ref = evaluate_results_with_pycocotools(ann_file, path, t)
        assert 0.05 < ref[f"{t}/AP"] < 0.95 and ref[f"{t}/APs"] > 0
        _assert_close(m, ref, [f"{t}/{n}" for n in METRIC_NAMES])
    # the case is sensitive to what is evaluated: unrounded boxes (what metrics.json used before) give
    # other numbers than the 2-decimal boxes of the file
    ev.box_decimals = None
    ev.reset()
    ev.update(preds, [{"image_id": i} for i in image_ids])
    unrounded = ev.compute()
    assert max(abs(unrounded[f"bbox/{n}"] - m[f"bbox/{n}"]) for n in METRIC_NAMES) > 1e-4


def test_test_step_metrics_equal_pycocotools_on_detections_files(tmp_path):
    """End to end: the test loop and write_outputs on a COCO directory; metrics.json must be what
    pycocotools computes from detections_{bbox,segm}.json against the annotation file (the loader's
    clamped / dropped boxes, crowd regions and empty images included)."""
    import functools

    import lightning as L

    from lightning_modules import outputs
    from lightning_modules.datamodule import DetectionDataModule
    from lightning_modules.detection_module import DetectionModule

    ann_file, _ = _small_object_coco(tmp_path / "coco")
    dm = DetectionDataModule(root=str(tmp_path / "coco"), num_classes=3, train_split="s", val_split="s",
                             min_size=72, max_size=96, batch_size=3, num_workers=0, with_masks=True)
    module = DetectionModule(_StubDetector(), functools.partial(torch.optim.SGD, lr=0.01))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.test(module, datamodule=dm, verbose=False)
    paths = outputs.write_outputs(tmp_path / "out", module, {})
    saved = json.loads(paths["metrics"].read_text())
    for t in ("bbox", "segm"):
        ref = evaluate_results_with_pycocotools(ann_file, paths[f"detections_{t}"], t)
        assert 0.05 < ref[f"{t}/AP"] < 0.95
        _assert_close(saved, ref, [f"{t}/{n}" for n in METRIC_NAMES])


# ------------------------------------------------------------------------- backend parity (issue 18)

_PARITY_CASES = {
    # name: (n_images, (H, W), box side range in px, crowd share, empty images, detections per image)
    "crowd": ((8, (60, 80), (4, 40), 0.3, 0, 12)),
    "empty_images": ((10, (60, 80), (4, 40), 0.0, 4, 10)),
    "tiny_boxes": ((8, (40, 40), (0.3, 4), 0.1, 1, 15)),
    "huge_boxes": ((3, (700, 1000), (250, 1000), 0.1, 1, 6)),
    "over_100_detections": ((3, (80, 100), (3, 60), 0.1, 0, 180)),
}


def _parity_case(name, seed=0):
    """A COCO ground-truth dict (non-contiguous image and category ids, polygons, uncompressed-RLE crowd
    regions) and predictions in original pixels: jittered ground truth and false positives with masks."""
    n_images, (h, w), (lo, hi), crowd_share, n_empty, n_dets = _PARITY_CASES[name]
    g = np.random.default_rng(seed)
    cat_ids = [2, 9, 40]
    images, anns, preds = [], [], []

    def box():
        bw, bh = np.exp(g.uniform(np.log(lo), np.log(hi), 2))
        bw, bh = min(bw, w), min(bh, h)
        x, y = g.uniform(0, w - bw), g.uniform(0, h - bh)
        return np.array([x, y, x + bw, y + bh])

    def mask_of(b):
        m = np.zeros((h, w), dtype=bool)
        x1, y1, x2, y2 = b
        m[int(y1) : max(int(np.ceil(y2)), int(y1) + 1), int(x1) : max(int(np.ceil(x2)), int(x1) + 1)] = True
        return m

    for i in range(n_images):
        image_id = 3 + 11 * i
        images.append({"id": image_id, "height": h, "width": w})
        gt_boxes = [] if i < n_empty else [box() for _ in range(int(g.integers(2, 9)))]
        labels = g.integers(0, 3, len(gt_boxes))
        for b, lab in zip(gt_boxes, labels):
            x1, y1, x2, y2 = b
            crowd = bool(g.random() < crowd_share)
            ann = {"id": 5 + 2 * len(anns), "image_id": image_id, "category_id": cat_ids[lab],
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(crowd)}
            if crowd:
                m = mask_of(b).astype(np.uint8)
                ann["segmentation"] = _uncompressed_rle(m)
                ann["area"] = float(m.sum())
            else:
                ann["segmentation"] = [[x1, y1, x2, y1, x2, y2, x1, y2]]
                ann["area"] = float((x2 - x1) * (y2 - y1))
            anns.append(ann)
        p_boxes, p_labels = [], []
        for b, lab in zip(gt_boxes, labels):
            if g.random() < 0.8:
                side = np.array([b[2] - b[0], b[3] - b[1]] * 2)
                p_boxes.append(np.clip(b + g.normal(0, 0.05, 4) * side, 0, [w, h, w, h]))
                p_labels.append(int(lab) if g.random() < 0.85 else int(lab + 1) % 3)
        n_tp = len(p_boxes)
        while len(p_boxes) < n_dets:
            p_boxes.append(box())
            p_labels.append(int(g.integers(0, 3)))
        p_boxes = np.array(p_boxes)
        p_boxes[:, 2:] = np.maximum(p_boxes[:, 2:], p_boxes[:, :2] + 0.01)
        masks = torch.from_numpy(np.stack([mask_of(b) for b in p_boxes]))
        # hits score higher on average than false positives, some of them below the 100th detection
        scores = np.concatenate([g.uniform(0.3, 1, n_tp), g.uniform(0.01, 0.7, len(p_boxes) - n_tp)])
        scores[:: 7] = 0.5  # ties: the order among equal scores must be the same in every backend
        preds.append(_pred(p_boxes.tolist(), scores.tolist(), p_labels, masks=masks))
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in cat_ids]}
    return gt, preds, [im["id"] for im in images]


@pytest.mark.parametrize("case", sorted(_PARITY_CASES))
def test_every_backend_matches_pycocotools_on_all_12_numbers(case):
    gt, preds, image_ids = _parity_case(case)
    bbox, segm = coco_results(preds, image_ids, [2, 9, 40], with_masks=True)
    ref = {**evaluate_results_with_pycocotools(gt, bbox, "bbox"), **evaluate_results_with_pycocotools(gt, segm, "segm")}
    assert ref["bbox/AP"] > 0.02 and ref["segm/AP"] > 0.01  # not a degenerate case
    for backend in BACKENDS:
        ev = CocoEvaluator(("bbox", "segm"), backend, ground_truth=gt)
        ev.update(preds, [{"image_id": i} for i in image_ids])
        m = ev.compute()
        assert set(m) == set(ref)
        for k in ref:
            assert m[k] == pytest.approx(ref[k], abs=TOL), (backend, k, m[k], ref[k])
