"""CenterMask: the box-scale level rule, spatial attention, the mask on a hand-built box, training, fdr."""

from __future__ import annotations

import functools
import json
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection.roi_heads import maskrcnn_loss

from detection.backbones import ResNetBody
from detection.detectors import build_detector
from detection.detectors.centermask import LevelRoIAlign, SpatialAttention, centermask_levels
from detection.necks import FPN
from lightning_modules.train import train
from tests.conftest import TINY, compose_cfg, small_neck
from tests.test_cascade import FDR


def tiny_centermask(num_classes: int = 2, **kw):
    return build_detector(
        "centermask", functools.partial(ResNetBody, "resnet18", frozen_stages=0),
        functools.partial(FPN, out_channels=32, extra_levels="p6p7_p5"), num_classes=num_classes,
        extra_levels="p6p7_p5", anchor_scale=1, scales_per_octave=1, aspect_ratios=[1.0], mask_head_channels=8, **kw,
    )


def test_level_rule_is_centermask_eq1():
    # 64 x 64 input (A = 4096), levels P3..P5: k = ceil(5 - log2(A / A_box)), clamped
    boxes = torch.tensor([[0, 0, 64, 64], [0, 0, 64, 32], [0, 0, 32, 32], [0, 0, 45, 45], [0, 0, 4, 4],
                          [10, 10, 26, 26]], dtype=torch.float)
    levels = centermask_levels([boxes], [(64, 64)], 3, 5)
    assert levels.tolist() == [2, 1, 0, 1, 0, 0]  # P5, P4, P3, P4 (ratio 2.02 -> ceil(3.98)), P3 (clamped), P3
    # the input area is each image's own: the same box on a 4x larger image drops a level
    assert centermask_levels([boxes[1:2], boxes[1:2]], [(64, 64), (128, 128)], 3, 5).tolist() == [1, 0]


def test_roi_align_pools_from_the_chosen_level():
    feats = OrderedDict((str(i), torch.full((1, 2, 64 // s, 64 // s), float(i + 1))) for i, s in enumerate((8, 16, 32)))
    pool = LevelRoIAlign(["0", "1", "2"], [8, 16, 32], output_size=14)
    boxes = torch.tensor([[0, 0, 64, 64], [0, 0, 64, 32], [8, 8, 24, 24.0]])
    out = pool(feats, [boxes], [(64, 64)])
    assert out.shape == (3, 2, 14, 14)
    assert out.mean((1, 2, 3)).tolist() == pytest.approx([3.0, 2.0, 1.0])
    assert pool(feats, [boxes[:0]], [(64, 64)]).shape == (0, 2, 14, 14)


def test_spatial_attention_by_hand():
    sam = SpatialAttention()
    x = torch.randn(2, 5, 6, 6)
    with torch.no_grad():
        sam.conv.weight.zero_()
        sam.conv.bias.zero_()
        assert torch.allclose(sam(x), 0.5 * x)  # sigmoid(0) = 0.5 everywhere
        sam.conv.weight[0, 1, 1, 1] = 2.0  # centre tap on the channel-max map
        sam.conv.bias.fill_(-1.0)
        expected = x * torch.sigmoid(2.0 * x.amax(1, keepdim=True) - 1.0)
        assert torch.allclose(sam(x), expected, atol=1e-6)


def test_mask_of_a_hand_built_box():
    """The SAG-Mask branch learns the left half of a hand-built box; pasted, it stays inside the box."""
    torch.manual_seed(0)
    model = tiny_centermask().model
    feats = OrderedDict((str(i), torch.randn(1, 32, 64 // s, 64 // s)) for i, s in enumerate((8, 16, 32)))
    box = torch.tensor([[8.0, 16.0, 56.0, 48.0]])
    gt = torch.zeros(1, 64, 64)
    gt[0, 16:48, 8:32] = 1  # left half of the box
    label = torch.tensor([1])
    opt = torch.optim.Adam(model.mask_head.parameters(), lr=1e-2)
    for _ in range(80):
        logits = model.mask_head(model.mask_pool(feats, [box], [(64, 64)]))
        loss = maskrcnn_loss(logits, [box], [gt], [label], [torch.tensor([0])])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.15
    det = [{"boxes": box, "labels": label, "scores": torch.ones(1)}]
    model.eval()  # the transform pastes masks into the image in eval mode only
    with torch.no_grad():
        model.add_masks(feats, det, [(64, 64)])
        assert det[0]["masks"].shape == (1, 1, 28, 28)
        pasted = model.transform.postprocess(det, [(64, 64)], [(64, 64)])[0]["masks"][0, 0]
    pred = pasted > 0.5
    iou = (pred & gt[0].bool()).sum() / (pred | gt[0].bool()).sum()
    assert iou > 0.8
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[14:50, 6:58] = False  # torchvision pastes with one pixel of padding round the box
    assert float(pasted[outside].max()) == 0.0


def test_training_uses_fcos_positives_and_gt_boxes_as_mask_rois():
    det = tiny_centermask(mask_rois_per_image=5)
    det.train()
    seen = []
    det.model.mask_pool.register_forward_pre_hook(lambda m, args: seen.append([b.clone() for b in args[1]]))
    img = torch.rand(3, 160, 160)  # P7 2x2: GroupNorm(32, 32) needs more than one value per group
    tgt = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0], [30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([0, 1]),
           "masks": torch.zeros(2, 160, 160, dtype=torch.uint8)}
    tgt["masks"][0, 4:40, 4:40] = 1
    tgt["masks"][1, 20:60, 30:60] = 1
    losses = det([img], [tgt])
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    rois = seen[0][0]
    assert 2 < len(rois) <= 5 + 2 and torch.equal(rois[-2:], tgt["boxes"])  # capped positives, then the gt
    losses["loss_mask"].backward()
    assert det.model.mask_head.attention.conv.weight.grad.abs().sum() > 0
    det.eval()
    with torch.inference_mode():
        out = det([img])[0]
    assert out["masks"].shape[1:] == (1, 160, 160) and len(out["masks"]) == len(out["boxes"])


def test_bad_option_value_names_its_key():
    with pytest.raises(ValueError, match="detector.mask_rois_per_image=0"):
        tiny_centermask(mask_rois_per_image=0)


@pytest.mark.parametrize("neck", ["fpn", "smsl_fpn", "srf_fpn"])
def test_fast_dev_run(tmp_path, shapes_root, neck):
    over = TINY + ["detector=centermask", "detector.mask_head_channels=16"] + small_neck(neck) + FDR
    if neck == "srf_fpn":
        over += ["neck.generator.num_blocks=1", "neck.generator.mid_channels=16"]
    metrics = train(compose_cfg("train", over, tmp_path, shapes_root))
    assert 0.0 <= metrics["bbox/AP"] <= 1.0 and 0.0 <= metrics["segm/AP"] <= 1.0
    segm = json.loads((tmp_path / "out" / "detections_segm.json").read_text())
    assert isinstance(segm, list)
