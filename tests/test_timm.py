"""timm bodies (backbone=timm backbone.model_name=NAME): levels by stride, frozen stages / BN, local weights."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from detection.backbones import TimmBody
from lightning_modules.train import train
from tests.conftest import TINY, compose_cfg, small_neck
from tests.test_cascade import FDR

# two small timm families: a ResNet (top-level layer1..4) and a VoVNetV2 (nested stages.0..3)
MODELS = {"resnet10t": [64, 128, 256, 512], "ese_vovnet19b_slim_dw": [112, 256, 384, 512]}


@pytest.mark.parametrize("name", list(MODELS))
def test_levels_by_stride_and_frozen_stages(name):
    body = TimmBody(name, return_layers=[1, 2, 3, 4], frozen_stages=1)
    assert body.out_channels_list == MODELS[name] and body.strides == [4, 8, 16, 32]
    out = body(torch.rand(1, 3, 64, 96))
    assert list(out) == ["0", "1", "2", "3"]
    assert [tuple(v.shape) for v in out.values()] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(MODELS[name], (4, 8, 16, 32))
    ]
    three = TimmBody(name, return_layers=[2, 3, 4], frozen_stages=0)
    assert three.out_channels_list == MODELS[name][1:] and three.strides == [8, 16, 32]
    assert all(p.requires_grad for p in three.parameters())
    # frozen_stages=1: the stem and the stride-4 stage, nothing after it
    stage1 = "layer1" if name == "resnet10t" else "stages_0"
    children = dict(body.body.named_children())
    order = list(children)
    for child_name, child in children.items():
        frozen = order.index(child_name) <= order.index(stage1)
        assert all(p.requires_grad != frozen for p in child.parameters()), child_name
    body.train()
    assert not children[stage1].training and children[order[-1]].training


def test_frozen_bn_and_norm_eval():
    body = TimmBody("resnet10t", frozen_stages=0, norm="frozen_bn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    body = TimmBody("resnet10t", frozen_stages=0, norm_eval=True).train()
    bns = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)


def test_local_weights_of_the_full_model_fill_the_body(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("ese_vovnet19b_slim_dw", pretrained=False)
    path = tmp_path / "vovnet.pth"
    torch.save(full.state_dict(), path)
    body = TimmBody("ese_vovnet19b_slim_dw", weights_path=str(path), norm="frozen_bn")
    # nested 'stages.1...' keys of the file land in FeatureListNet's flattened 'stages_1...'
    src = full.state_dict()["stages.1.blocks.0.conv_reduction.conv.weight"]
    assert torch.equal(body.body.stages_1.blocks[0].conv_reduction.conv.weight, src)
    assert torch.equal(body.body.stages_1.blocks[0].conv_reduction.bn.running_var,
                       full.state_dict()["stages.1.blocks.0.conv_reduction.bn.running_var"])
    torch.save({k: v for k, v in full.state_dict().items() if not k.startswith("stages.3")}, path)
    with pytest.raises(ValueError, match=r"vovnet.pth do not fit.*stages_3"):
        TimmBody("ese_vovnet19b_slim_dw", weights_path=str(path))
    with pytest.raises(FileNotFoundError, match="backbone.weights_path"):
        TimmBody("resnet10t", weights_path=str(tmp_path / "none.pth"))


def test_bad_names_and_values_name_their_key():
    with pytest.raises(ValueError, match="backbone.model_name='resnet_no_such'"):
        TimmBody("resnet_no_such")
    with pytest.raises(ValueError, match="backbone.frozen_stages=5"):
        TimmBody("resnet10t", frozen_stages=5)


def test_presets_name_the_papers_backbones(tmp_path):
    assert compose_cfg("train", ["backbone=resnest101"], tmp_path).backbone.model_name == "resnest101e"
    assert compose_cfg("train", ["backbone=vovnet99"], tmp_path).backbone.model_name == "ese_vovnet99b"
    assert "ese_vovnet99b" in timm.list_models("*vovnet*") and timm.is_model("resnest101e")


def test_fast_dev_run_with_a_timm_body(tmp_path, shapes_root):
    over = TINY + ["backbone=timm", "backbone.model_name=resnet10t", "backbone.frozen_stages=0",
                   "detector=centermask", "detector.mask_head_channels=16"] + small_neck("fpn") + FDR
    metrics = train(compose_cfg("train", over, tmp_path, shapes_root))
    assert 0.0 <= metrics["segm/AP"] <= 1.0
