"""Cascade R-CNN / Cascade Mask R-CNN: per-stage targets, detached refinement, averaged scores, counts, fdr."""

from __future__ import annotations

import functools
from collections import OrderedDict

import pytest
import torch

from detection.backbones import ResNetBody
from detection.detectors import DETECTORS, build_detector
from detection.necks import FPN
from lightning_modules.summary import summarize
from lightning_modules.train import train
from tests.conftest import TINY, compose_cfg, small_neck

# fast_dev_run of the detector path only: the checkpoint and curve callbacks are tested elsewhere
# and the curves plot alone costs seconds per run
FDR = ["debug=fdr", "callbacks=none"]


def tiny_cascade(name: str = "cascade_rcnn", num_classes: int = 2, **kw):
    return build_detector(
        name, functools.partial(ResNetBody, "resnet18", frozen_stages=0),
        functools.partial(FPN, out_channels=16, extra_levels="maxpool"), num_classes=num_classes,
        return_layers=[1, 2, 3, 4], extra_levels="maxpool", anchor_scale=8, scales_per_octave=1,
        mask_head_channels=8, **kw,
    )


def _features(channels: int = 16, size: int = 64) -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    return OrderedDict((str(i), torch.randn(1, channels, size >> (i + 2), size >> (i + 2), generator=g))
                       for i in range(4))


def _box_with_iou(gt: torch.Tensor, iou: float) -> torch.Tensor:
    """A box of gt's height, shifted right so that its IoU with gt is ``iou``: w·(1-s)/(w·(1+s)) = iou."""
    x0, y0, x1, y1 = gt.tolist()
    shift = (x1 - x0) * (1 - iou) / (1 + iou)
    return torch.tensor([x0 + shift, y0, x1 + shift, y1])


def test_registry_names_the_new_detectors():
    assert {"cascade_rcnn", "cascade_mask_rcnn"} <= set(DETECTORS)
    with pytest.raises(ValueError, match="detector.stage_iou_thresholds is not an option of detector 'retinanet'"):
        build_detector("retinanet", None, None, 2, stage_iou_thresholds=[0.5])
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny_cascade(stage_iou_thresholds=[0.5, 0.6])


def test_stage_targets_follow_each_stages_iou_threshold_and_box_weights():
    heads = tiny_cascade().model.roi_heads
    gt = torch.tensor([[10.0, 10.0, 50.0, 40.0]])
    props = torch.stack([_box_with_iou(gt[0], iou) for iou in (0.55, 0.65, 0.75, 0.3)])
    from torchvision.ops import box_iou

    assert torch.allclose(box_iou(props, gt)[:, 0], torch.tensor([0.55, 0.65, 0.75, 0.3]), atol=1e-5)
    targets = [{"boxes": gt, "labels": torch.tensor([2])}]  # inside the R-CNN: label 2 = class 1
    per_stage = []
    for stage in heads.stages:
        boxes, matched, labels, reg = stage.select_training_samples([props.clone()], targets)
        # all 4 proposals + the gt appended as a proposal are kept (512 per image, 25 % positive)
        assert torch.equal(boxes[0][:4], props) and torch.equal(boxes[0][4], gt[0])
        per_stage.append((labels[0].tolist(), reg[0]))
    assert [lab for lab, _ in per_stage] == [[2, 2, 2, 0, 2], [0, 2, 2, 0, 2], [0, 0, 2, 0, 2]]  # IoU 0.5/0.6/0.7
    # box-coder weights (10,10,5,5) x 2 and x 3: the same geometry gives 2x and 3x the targets
    r0, r1, r2 = (reg for _, reg in per_stage)
    assert torch.allclose(r1, 2 * r0, atol=1e-5) and torch.allclose(r2, 3 * r0, atol=1e-5)
    assert r0[2, 0] < 0 and torch.allclose(r0[4], torch.zeros(4))  # shifted right -> negative dx; gt -> 0


def test_later_stage_losses_do_not_reach_earlier_stages():
    det = tiny_cascade()
    heads = det.model.roi_heads
    heads.train()
    gt = torch.tensor([[10.0, 10.0, 50.0, 40.0]])
    props = torch.stack([_box_with_iou(gt[0], iou) for iou in (0.55, 0.65, 0.75, 0.8, 0.3)])
    _, losses = heads(_features(), [props], [(64, 64)], [{"boxes": gt, "labels": torch.tensor([1])}])
    assert set(losses) == {f"loss_{k}_s{t}" for k in ("classifier", "box_reg") for t in range(3)}
    (losses["loss_classifier_s2"] + losses["loss_box_reg_s2"]).backward()
    assert all(p.grad is None for p in heads.stages[0].parameters())  # boxes refined by stage 0 are detached
    assert all(p.grad is None for p in heads.stages[1].parameters())
    assert heads.stages[2].box_predictor.bbox_pred.weight.grad.abs().sum() > 0


def test_scores_are_averaged_over_stages_and_boxes_come_from_the_last():
    det = tiny_cascade(num_classes=3, score_thresh=0.0)
    heads = det.model.roi_heads.eval()
    feats, shapes = _features(), [(64, 64)]
    prop = [torch.tensor([[8.0, 12.0, 40.0, 50.0]])]
    with torch.no_grad():
        boxes, probs = prop, []
        for t in range(3):
            logits, _, boxes = heads.run_stage(t, feats, boxes, shapes)
            probs.append(logits.softmax(-1))
        out, _ = heads(feats, prop, shapes)
    mean = torch.stack(probs).mean(0)[0, 1:]
    # one RoI, 3 classes, score threshold 0: one detection per class, all on the last stage's box
    order = mean.argsort(descending=True)
    assert torch.allclose(out[0]["scores"], mean[order], atol=1e-6)
    assert torch.equal(out[0]["labels"], order + 1)
    assert torch.allclose(out[0]["boxes"], boxes[0].expand(3, 4))
    assert not torch.allclose(probs[0], probs[2])  # the average is not any one stage's


def test_cascade_mask_rcnn_predicts_masks_and_learns_them():
    det = tiny_cascade("cascade_mask_rcnn")
    assert det.with_masks and det.label_offset == 1
    img = torch.rand(3, 64, 64)
    tgt = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
           "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}
    tgt["masks"][0, 4:40, 4:40] = 1
    det.train()
    losses = det([img], [tgt])
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
    det.eval()
    det.model.roi_heads.score_thresh = 0.0
    with torch.inference_mode():
        out = det([img])[0]
    assert len(out["boxes"]) > 0 and out["masks"].shape == (len(out["boxes"]), 1, 64, 64)
    assert int(out["labels"].max()) <= 1


@pytest.mark.parametrize("neck,expected", [("fpn", 69.17), ("smsl_fpn", 70.15)])
def test_paper_parameter_counts(tmp_path, neck, expected):
    """SMSL Table 2's Cascade R-CNN R50 rows: trainable parameters, stem + layer1 frozen, 80 classes."""
    cfg = compose_cfg("summary", ["detector=cascade_rcnn", "backbone=resnet50", f"neck={neck}", "data=coco",
                                  "data.root=/nonexistent"], tmp_path)
    s = summarize(cfg)
    assert abs(s["params_trainable"] / 1e6 - expected) < 0.005, s["params_trainable"]
    assert s["detector"] == "cascade_rcnn"


@pytest.mark.parametrize(
    "detector,neck", [("cascade_rcnn", "fpn"), ("cascade_rcnn", "smsl_fpn"), ("cascade_rcnn", "srf_fpn"),
                      ("cascade_mask_rcnn", "fpn")],
)
def test_fast_dev_run(tmp_path, shapes_root, detector, neck):
    over = TINY + [f"detector={detector}"] + small_neck(neck) + FDR
    if detector == "cascade_mask_rcnn":
        over.append("detector.mask_head_channels=16")
    if neck == "srf_fpn":
        over += ["neck.generator.num_blocks=1", "neck.generator.mid_channels=16"]
    metrics = train(compose_cfg("train", over, tmp_path, shapes_root))
    assert 0.0 <= metrics["bbox/AP"] <= 1.0
    assert ("segm/AP" in metrics) == (detector == "cascade_mask_rcnn")
    if detector == "cascade_mask_rcnn":
        assert (tmp_path / "out" / "detections_segm.json").is_file()


@pytest.mark.parametrize(
    "detector,neck", [("cascade_mask_rcnn", "pafpn"), ("centermask", "smsl_pafpn"), ("cascade_mask_rcnn", "srf_pafpn"),
                      ("centermask", "srf_fpn_light"), ("centermask", "smsl_srf_fpn")],
)
def test_every_neck_trains_one_step_and_predicts(tmp_path, detector, neck):
    """The necks the fdr runs do not cover (each once, detectors alternating to keep the suite fast):
    one loss + backward, then one prediction (no data needed)."""
    from lightning_modules import checkpoints as CK

    over = TINY + [f"detector={detector}", "detector.mask_head_channels=8"] + small_neck(neck)
    if "srf" in neck:
        over += ["neck.generator.num_blocks=1", "neck.generator.mid_channels=8"]
    net = CK.build_net(compose_cfg("train", over, tmp_path))
    img = torch.rand(3, 160, 160)  # P7 2x2 for centermask's GroupNorm(32) head
    tgt = {"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0]]), "labels": torch.tensor([1]),
           "masks": torch.zeros(1, 160, 160, dtype=torch.uint8)}
    tgt["masks"][0, 20:120, 10:90] = 1
    net.train()
    losses = net([img], [tgt])
    sum(losses.values()).backward()
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
    net.eval()
    with torch.inference_mode():
        out = net([img])[0]
    assert out["masks"].shape[1:] == (1, 160, 160) and len(out["masks"]) == len(out["boxes"])
