"""Multi-scale / flip testing (views, flip undo, merging, one-scale TTA == plain evaluation); COCO test-dev files."""

from __future__ import annotations

import json
import re
import shutil
import zipfile

import pytest
import torch

from detection.data.coco import build_transforms
from detection.tta import TTAView, merge_views, resized_size, tta_views, unflip, view_image
from lightning_modules import builders as B
from lightning_modules import checkpoints as CK
from lightning_modules.detection_eval import merge_rank_results
from lightning_modules.evaluate import evaluate
from lightning_modules.train import train
from tests.conftest import TINY, compose_cfg, small_neck


def _bright_box_detector(image: torch.Tensor) -> dict:
    """A hand-made 'detector': the bounding box (and mask) of the pixels brighter than 0.5."""
    fg = image[0] > 0.5
    ys, xs = fg.nonzero(as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    return {"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([2]), "masks": fg[None, None].float()}


def test_flip_is_undone_on_a_hand_made_case():
    # an 80 x 120 image with a bright block at x 10..40, y 20..50 (left half): mirrored, the
    # detector sees it at x 80..110; the merged result must put it back at x 10..40
    h0, w0 = 80, 120
    image = torch.zeros(3, h0, w0)
    image[:, 20:50, 10:40] = 1.0
    view = TTAView(None, True)
    x = view_image(image, (h0, w0), view)
    raw = _bright_box_detector(x)
    assert raw["boxes"].tolist() == [[80.0, 20.0, 110.0, 50.0]]  # the detector really saw a mirrored image
    out = merge_views([raw], [x.shape[-2:]], [view], (h0, w0), with_masks=True)
    assert out["boxes"].tolist() == [[10.0, 20.0, 40.0, 50.0]]
    assert torch.equal(out["masks"][0], image[0] > 0.5)
    # unflip on its own: x -> W - x for both corners, masks mirrored
    p = unflip({"boxes": torch.tensor([[0.0, 1.0, 30.0, 2.0]]), "masks": torch.eye(3)[None, None]}, width=100)
    assert p["boxes"].tolist() == [[70.0, 1.0, 100.0, 2.0]]
    assert torch.equal(p["masks"][0, 0], torch.eye(3).flip(-1))


def test_scales_and_flips_merge_back_to_one_box_in_file_pixels():
    h0, w0 = 80, 120
    image = torch.zeros(3, h0, w0)
    image[:, 20:50, 10:40] = 1.0
    views = tta_views([40, 80, 160], flip=True, max_size=1000)
    assert len(views) == 6
    preds, sizes = [], []
    for v in views:
        x = view_image(image, (h0, w0), v, max_size=1000)
        assert tuple(x.shape[-2:]) == {40: (40, 60), 80: (80, 120), 160: (160, 240)}[v.scale]
        preds.append(_bright_box_detector(x))
        sizes.append(x.shape[-2:])
    out = merge_views(preds, sizes, views, (h0, w0), with_masks=True)
    # six views of one object -> one detection after NMS, within a pixel of the truth
    assert len(out["boxes"]) == 1 and out["masks"].shape == (1, h0, w0)
    assert torch.allclose(out["boxes"][0], torch.tensor([10.0, 20.0, 40.0, 50.0]), atol=1.0)
    assert (out["masks"][0] == (image[0] > 0.5)).float().mean() > 0.98


def test_merge_is_per_class_sorted_capped_and_keeps_each_masks_view():
    views = [TTAView(None, False), TTAView(50, False)]
    a = {"boxes": torch.tensor([[0.0, 0, 40, 40], [60, 60, 90, 90]]), "scores": torch.tensor([0.6, 0.3]),
         "labels": torch.tensor([0, 0]), "masks": torch.zeros(2, 1, 100, 100)}
    a["masks"][1, :, 60:90, 60:90] = 1
    # the second view is half size: its box (1, 1, 21, 21) is (2, 2, 42, 42) in file pixels
    b = {"boxes": torch.tensor([[1.0, 1, 21, 21], [1.0, 1, 21, 21]]), "scores": torch.tensor([0.8, 0.7]),
         "labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 1, 50, 50)}
    b["masks"][0, :, 1:21, 1:21] = 1
    out = merge_views([a, b], [(100, 100), (50, 50)], views, (100, 100), with_masks=True)
    # same class overlapping: 0.8 (view 2) wins over 0.6 (view 1); other class at 0.7 stays
    assert out["scores"].tolist() == pytest.approx([0.8, 0.7, 0.3])
    assert out["labels"].tolist() == [0, 1, 0]
    assert out["boxes"][0].tolist() == [2.0, 2.0, 42.0, 42.0]
    assert out["masks"][0, 10, 10] and not out["masks"][0, 70, 70]  # view 2's mask, upsampled
    assert out["masks"][2, 70, 70] and not out["masks"][2, 10, 10]  # view 1's mask
    capped = merge_views([a, b], [(100, 100), (50, 50)], views, (100, 100), with_masks=False, max_detections=2)
    assert capped["scores"].tolist() == pytest.approx([0.8, 0.7])
    loose = merge_views([a, b], [(100, 100), (50, 50)], views, (100, 100), with_masks=False, iou_threshold=0.95)
    assert len(loose["scores"]) == 4


@pytest.mark.parametrize("hw", [(480, 640), (427, 640), (640, 359), (333, 500)])
def test_view_sizes_are_the_loaders(hw):
    # a view at scale S has exactly the size the eval loader produces with data.min_size=S
    for scale, max_size in ((800, 1333), (600, 1000), (1200, 1333)):
        t = build_transforms(False, scale, max_size)
        from torchvision import tv_tensors

        img, _ = t(tv_tensors.Image(torch.zeros(3, *hw, dtype=torch.uint8)), {})
        assert resized_size(hw, scale, max_size) == tuple(img.shape[-2:])


def test_bad_tta_settings_name_their_key(tmp_path, shapes_root):
    net = CK.build_net(compose_cfg("train", TINY + small_neck("fpn"), tmp_path, shapes_root))
    for over, msg in (
        (["eval.tta.scales=[96,-2]"], "eval.tta.scales"),
        (["eval.tta.flip=true", "eval.tta.iou_threshold=0"], "eval.tta.iou_threshold"),
        (["eval.tta.scales=96"], "eval.tta.scales"),
        (["eval.tta.scales=[96,128]"], "eval.tta.max_size=128: must be larger than every scale"),
    ):
        cfg = compose_cfg("train", TINY + small_neck("fpn") + over, tmp_path, shapes_root)
        with pytest.raises(ValueError, match=msg):
            B.build_module(cfg, net)
    cfg = compose_cfg("train", TINY + small_neck("fpn") + ["eval.tta.scales=[64,96]", "eval.tta.flip=true"],
                      tmp_path, shapes_root)
    module = B.build_module(cfg, net)
    assert module.evaluation.tta["max_size"] == 128 and len(module.evaluation.tta_views) == 4  # data.max_size; 2 scales x 2
    assert B.build_module(compose_cfg("train", TINY, tmp_path, shapes_root), module.net).evaluation.tta is None  # off by default


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory, shapes_root):
    """A one-step Mask R-CNN run (score threshold 0: an untrained detector still emits boxes)."""
    tmp = tmp_path_factory.mktemp("tta_run")
    over = TINY + small_neck("fpn") + [
        "detector=mask_rcnn", "detector.mask_head_channels=16", "detector.score_thresh=0.0",
        "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "optim=adamw", "optim.scheduler.warmup_iters=1",
    ]
    cfg = compose_cfg("train", over, tmp, shapes_root)
    metrics = train(cfg)
    yield tmp, metrics
    shutil.rmtree(tmp, ignore_errors=True)


def test_one_scale_without_flip_is_plain_evaluation_exactly(mask_run):
    tmp, metrics = mask_run
    out = tmp / "out"
    ckpt = out / "checkpoints" / "best.ckpt"
    plain_bbox = json.loads((out / "detections_bbox.json").read_text())
    plain_segm = json.loads((out / "detections_segm.json").read_text())
    assert len(plain_bbox) > 50 and len(plain_segm) == len(plain_bbox)
    ecfg = compose_cfg("eval", ["logger=csv", f"ckpt_path={ckpt}", "eval.tta.scales=[96]"], tmp / "tta1")
    tta = evaluate(ecfg)
    assert json.loads((tmp / "tta1" / "out" / "detections_bbox.json").read_text()) == plain_bbox
    assert json.loads((tmp / "tta1" / "out" / "detections_segm.json").read_text()) == plain_segm
    keys = [k for k in metrics if k.startswith(("bbox/", "segm/"))]
    assert "bbox/AP" in keys and "segm/AP" in keys
    assert {k: tta[k] for k in keys} == {k: metrics[k] for k in keys}


def test_multi_scale_flip_evaluation_merges_all_views(mask_run):
    tmp, _ = mask_run
    ckpt = tmp / "out" / "checkpoints" / "best.ckpt"
    over = ["logger=csv", f"ckpt_path={ckpt}", "eval.tta.scales=[64,96,112]", "eval.tta.flip=true",
            "eval.tta.max_detections=30", "trainer.limit_test_batches=1"]  # 2 images x 6 views
    metrics = evaluate(compose_cfg("eval", over, tmp / "tta6"))
    assert 0.0 <= metrics["bbox/AP"] <= 1.0 and 0.0 <= metrics["segm/AP"] <= 1.0
    dets = json.loads((tmp / "tta6" / "out" / "detections_bbox.json").read_text())
    per_image: dict[int, int] = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
        x, y, w, h = d["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 128.01 and y + h <= 128.01  # file pixels (128 px images)
    assert max(per_image.values()) == 30  # 6 views x up to 100 each, capped after NMS


def test_test_dev_images_only_writes_the_server_files_and_no_metrics(mask_run, shapes_root, capsys):
    # a tiny COCO test-dev layout: annotations/image_info_test-dev2017.json (images and
    # categories, no annotations key) with the images in test2017/
    tmp, _ = mask_run
    root = tmp / "coco_testdev"
    (root / "annotations").mkdir(parents=True)
    (root / "test2017").mkdir()
    val = json.loads((shapes_root / "annotations" / "instances_val.json").read_text())
    images = val["images"][:3]
    for im in images:
        shutil.copy(shapes_root / "val" / im["file_name"], root / "test2017" / im["file_name"])
    info = {"info": {"description": "tiny test-dev"}, "images": images, "categories": val["categories"]}
    (root / "annotations" / "image_info_test-dev2017.json").write_text(json.dumps(info))

    over = ["logger=csv", f"ckpt_path={tmp / 'out' / 'checkpoints' / 'best.ckpt'}", "eval.results_name=smsl-r50",
            "data.name=coco", f"data.root={root}", "data.test_split=test-dev2017",
            "data.ann_file.test=annotations/image_info_test-dev2017.json", "data.img_dir.test=test2017"]
    metrics = evaluate(compose_cfg("eval", over, tmp / "testdev"))
    out = tmp / "testdev" / "out"
    assert metrics == {}
    printed = capsys.readouterr().out
    # no metric printed as -1 (paths may contain "-1": pytest-1xx)
    assert "no metrics can be computed" in " ".join(printed.split()) and not re.search(r"(^|\s)-1(00)?(\.0+)?(\s|$)", printed)
    saved = json.loads((out / "metrics.json").read_text())
    assert not [k for k in saved if k.startswith(("bbox/", "segm/"))] and "images only" in saved["metrics"]
    for iou_type, folder in (("bbox", out), ("segm", out / "segm")):
        name = "detections_test-dev2017_smsl-r50_results.json"
        with zipfile.ZipFile(folder / name.replace(".json", ".zip")) as z:
            assert z.namelist() == [name]  # what the evaluation server reads
            dets = json.loads(z.read(name))
        assert dets == json.loads((out / f"detections_{iou_type}.json").read_text())
        assert dets and {d["image_id"] for d in dets} <= {im["id"] for im in images}
        assert ("segmentation" in dets[0]) == (iou_type == "segm") and ("bbox" in dets[0]) == (iou_type == "bbox")
    with pytest.raises(ValueError, match="eval.results_name"):
        evaluate(compose_cfg("eval", [*over, "eval.results_name=my_model"], tmp / "testdev_bad"))


def test_ddp_padding_repeats_are_written_once():
    # 5 images on 2 ranks: DistributedSampler pads rank 1 with image 1 again
    rank0 = [{"image_id": 1, "score": 0.9}, {"image_id": 1, "score": 0.2}, {"image_id": 3, "score": 0.5}]
    rank1 = [{"image_id": 2, "score": 0.7}, {"image_id": 4, "score": 0.1}, {"image_id": 1, "score": 0.9},
             {"image_id": 1, "score": 0.2}]
    merged = merge_rank_results([rank0, rank1])
    assert [(d["image_id"], d["score"]) for d in merged] == [(1, 0.9), (1, 0.2), (3, 0.5), (2, 0.7), (4, 0.1)]
    assert merge_rank_results([rank0]) == rank0
