"""Backbones, necks and detector assembly: shapes, keys, frozen stages, parameter counts."""

from __future__ import annotations

import functools
from collections import OrderedDict

import pytest
import torch

from detection.backbones import ResNetBody
from detection.detectors import build_detector, level_strides, parameter_summary
from detection.necks import FPN, PAFPN, Interpolate
from lightning_modules.summary import summarize
from tests.conftest import compose_cfg


def _feats(channels, h=37, w=53):
    # odd sizes on purpose: each level is ceil(previous / 2), like a ResNet body
    out = OrderedDict()
    for i, c in enumerate(channels):
        out[str(i)] = torch.rand(1, c, h, w)
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


@pytest.mark.parametrize("neck_cls", [FPN, PAFPN])
@pytest.mark.parametrize(
    "extra,keys", [("p6p7_c5", ["0", "1", "2", "p6", "p7"]), ("p6p7_p5", ["0", "1", "2", "p6", "p7"]),
                   ("maxpool", ["0", "1", "2", "pool"]), ("none", ["0", "1", "2"])]
)
def test_neck_keys_and_shapes(neck_cls, extra, keys):
    feats = _feats([32, 64, 128])
    neck = neck_cls([32, 64, 128], 16, extra_levels=extra)
    out = neck(feats)
    assert list(out) == keys and neck.num_levels == len(keys)
    for k, v in feats.items():
        assert out[k].shape == (1, 16, *v.shape[-2:])
    for a, b in zip(list(out.values()), list(out.values())[1:]):
        assert b.shape[-1] == (a.shape[-1] + 1) // 2 or b.shape[-1] == a.shape[-1] // 2 + 0


def test_p6_source_differs_between_c5_and_p5():
    c5 = FPN([32, 64], 16, extra_levels="p6p7_c5").extra_block
    p5 = FPN([32, 64], 16, extra_levels="p6p7_p5").extra_block
    assert c5.p6.in_channels == 64 and not c5.use_P5
    assert p5.p6.in_channels == 16 and p5.use_P5


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_upsampler_is_pluggable(mode):
    feats = _feats([8, 8])
    neck = FPN([8, 8], 8, upsample=mode, extra_levels="none")
    assert isinstance(neck.upsample, Interpolate) and neck.upsample.mode == mode
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, x, size):
            calls.append(tuple(size))
            return torch.nn.functional.interpolate(x, size=tuple(size))

    FPN([8, 8], 8, upsample=Spy(), extra_levels="none")(feats)
    assert calls == [tuple(feats["0"].shape[-2:])]


def test_bad_neck_options_name_the_key():
    with pytest.raises(ValueError, match="neck.upsample='lanczos'"):
        FPN([8], 8, upsample="lanczos")
    with pytest.raises(ValueError, match="neck.extra_levels='p8'"):
        FPN([8], 8, extra_levels="p8")


def test_backbone_frozen_stages_and_norm_eval():
    body = ResNetBody("resnet18", return_layers=[2, 3, 4], frozen_stages=1, norm_eval=True)
    frozen = [n for n, p in body.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("body.conv1", "body.bn1", "body.layer1")) for n in frozen)
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith("body.layer2"))
    body.train()
    bns = [m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    free = ResNetBody("resnet18", frozen_stages=0, norm_eval=False).train()
    assert all(p.requires_grad for p in free.parameters())
    assert all(m.training for m in free.modules() if isinstance(m, torch.nn.BatchNorm2d))
    fb = ResNetBody("resnet18", norm="frozen_bn", frozen_stages=0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fb.modules())


def test_backbone_local_weights_roundtrip_and_mismatch(tmp_path):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    body = ResNetBody("resnet18", frozen_stages=0, weights_path=str(tmp_path / "r18.pth"))
    assert torch.equal(body.body.layer4[0].conv1.weight, src.layer4[0].conv1.weight)
    with pytest.raises(ValueError, match="do not fit"):
        ResNetBody("resnet50", weights_path=str(tmp_path / "r18.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ResNetBody("resnet18", weights_path=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="backbone.arch='vgg'"):
        ResNetBody("vgg")


def test_fixed_stride_anchors_match_torchvision_and_need_no_128_padding():
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from detection.detectors import FixedStrideAnchorGenerator

    assert level_strides([8, 16, 32], "p6p7_c5") == [8, 16, 32, 64, 128]
    sizes, ratios, strides = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5, [8, 16, 32, 64, 128]
    grids = [(112, 160), (56, 80), (28, 40), (14, 20), (7, 10)]  # an 896 x 1280 padded batch
    feats = [torch.zeros(1, 1, *g) for g in grids]
    # padded to 128 torchvision's inferred strides are exact: both generators must agree there
    ref = AnchorGenerator(sizes, ratios)(ImageList(torch.zeros(1, 3, 896, 1280), [(800, 1216)]), feats)[0]
    fixed = FixedStrideAnchorGenerator(sizes, ratios, strides)
    ours = fixed(ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)]), feats)[0]
    assert torch.equal(ref, ours)
    # padded to 32 only (800 x 1216), torchvision would infer P7's stride as 800 // 7 = 114
    wrong = AnchorGenerator(sizes, ratios)(ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)]), feats)[0]
    assert not torch.equal(wrong, ours)
    det = build_detector(
        "retinanet", functools.partial(ResNetBody, "resnet18", frozen_stages=0),
        functools.partial(FPN, out_channels=16, extra_levels="p6p7_c5"), num_classes=3,
    )
    assert det.model.transform.size_divisible == 32 and det.model.anchor_generator.strides == strides
    det.eval()
    with torch.inference_mode():
        out = det([torch.rand(3, 100, 150)])
    assert set(out[0]) >= {"boxes", "scores", "labels"}


@pytest.mark.parametrize("name", ["faster_rcnn", "mask_rcnn"])
def test_rcnn_label_offset_roundtrip(name):
    # R-CNNs reserve label 0 for background: the wrapper shifts labels in and out.
    det = build_detector(
        name, functools.partial(ResNetBody, "resnet18", frozen_stages=0),
        functools.partial(FPN, out_channels=16, extra_levels="maxpool"), num_classes=2,
        return_layers=[1, 2, 3, 4], extra_levels="maxpool", anchor_scale=8, scales_per_octave=1,
        mask_head_channels=16,
    )
    assert det.label_offset == 1 and det.model.roi_heads.box_predictor.cls_score.out_features == 3
    img = torch.rand(3, 64, 64)
    tgt = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    if name == "mask_rcnn":
        tgt["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
        tgt["masks"][0, 4:40, 4:40] = 1
    det.train()
    losses = det([img], [tgt])
    assert all(torch.isfinite(v) for v in losses.values())
    det.eval()
    with torch.inference_mode():
        out = det([img])
    assert out[0]["labels"].numel() == 0 or int(out[0]["labels"].max()) <= 1


def test_neck_level_mismatch_is_reported():
    with pytest.raises(ValueError, match="levels"):
        build_detector(
            "retinanet", functools.partial(ResNetBody, "resnet18", frozen_stages=0),
            functools.partial(FPN, out_channels=16, extra_levels="none"), num_classes=3, extra_levels="p6p7_c5",
        )


@pytest.mark.parametrize(
    "detector,neck,expected",
    [("retinanet", "fpn", 37.74), ("mask_rcnn", "fpn", 44.18), ("retinanet", "smsl_fpn", 38.72),
     ("mask_rcnn", "smsl_fpn", 45.15)],
)
def test_paper_parameter_counts(tmp_path, detector, neck, expected):
    """MMDetection's count: trainable parameters, stem + layer1 frozen, 80 classes (SMSL Table 2)."""
    cfg = compose_cfg("summary", [f"detector={detector}", "backbone=resnet50", f"neck={neck}", "data=coco",
                                  "data.root=/nonexistent"], tmp_path)
    s = summarize(cfg)
    assert abs(s["params_trainable"] / 1e6 - expected) < 0.005, s["params_trainable"]
    assert s["params_trainable"] == s["backbone"]["trainable"] + s["neck"]["trainable"] + s["head"]["trainable"]


def test_smsl_adds_its_own_parameters_only(tmp_path):
    base = ["detector=retinanet", "backbone=resnet50", "data=coco", "data.root=/x"]
    a = summarize(compose_cfg("summary", base + ["neck=fpn"], tmp_path))
    b = summarize(compose_cfg("summary", base + ["neck=smsl_fpn"], tmp_path))
    assert b["params_trainable"] - a["params_trainable"] == 977_376
    assert b["head"] == a["head"] and b["backbone"] == a["backbone"]


def test_summary_counts_match_parameter_summary():
    det = build_detector(
        "fcos", functools.partial(ResNetBody, "resnet18", frozen_stages=1),
        functools.partial(PAFPN, out_channels=32, extra_levels="p6p7_p5"), num_classes=4, extra_levels="p6p7_p5",
        anchor_scale=1, scales_per_octave=1, aspect_ratios=[1.0],
    )
    s = parameter_summary(det)
    assert s["params_total"] == sum(p.numel() for p in det.parameters())
    assert s["params_trainable"] < s["params_total"]  # stem + layer1 frozen


def _fcos_regression_loss(reg_bias_init: float) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    det = build_detector(
        "fcos", functools.partial(ResNetBody, "resnet18", frozen_stages=1),
        functools.partial(PAFPN, out_channels=32, extra_levels="p6p7_p5"), num_classes=4, extra_levels="p6p7_p5",
        anchor_scale=1, scales_per_octave=1, aspect_ratios=[1.0], reg_bias_init=reg_bias_init,
    )
    det.train()
    images = [torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 60.0, 90.0], [70.0, 10.0, 86.0, 22.0]]),
                "labels": torch.tensor([1, 2])}]
    loss = det.model(images, targets)["bbox_regression"]
    loss.backward()
    return loss.item(), det.model.head.regression_head.bbox_reg.bias.grad.clone()


def test_fcos_boxes_start_open_with_reg_bias_init():
    # torchvision's zero bias starts every box as a point: GIoU loss ~1 with a vanishing gradient
    # (FCOS + PAFPN never left it in 3 of 6 embedded runs); a positive start gives boxes an area
    closed, _ = _fcos_regression_loss(0.0)
    opened, grad = _fcos_regression_loss(1.0)
    assert closed > 0.95
    assert opened < closed - 0.1
    assert grad.abs().min() > 0  # every distance gets a gradient through the open ReLU


def test_fcos_and_centermask_configs_set_reg_bias_init(tmp_path):
    from lightning_modules.checkpoints import build_net

    for detector in ("fcos", "centermask"):
        cfg = compose_cfg("train", [f"detector={detector}", "backbone=resnet18", "detector.reg_bias_init=0.5"],
                          tmp_path)
        det = build_net(cfg, backbone_weights=False)
        assert torch.all(det.model.head.regression_head.bbox_reg.bias == 0.5)
    assert compose_cfg("train", ["detector=fcos"], tmp_path).detector.reg_bias_init == 1.0
