"""neck=smsl_srf_fpn: FPN with the SRF generator as its top-down upsampler, then SMSL; preset smsl_srf."""

from __future__ import annotations

import torch

from detection.detectors import count_parameters
from lightning_modules import checkpoints as CK
from lightning_modules.summary import summarize
from lightning_modules.train import train
from smsl import SMSLNeck
from srfgan import Generator
from srfgan.transfer import generator_of, load_generator_state
from tests.conftest import TINY, compose_cfg, small_neck
from tests.test_cascade import FDR
from tests.test_presets import rows

SMALL_G = ["neck.generator.num_blocks=1", "neck.generator.mid_channels=16"]


def test_parameters_are_fpn_plus_smsl_plus_generator(tmp_path):
    """R50 RetinaNet at 256 channels: smsl_srf_fpn = fpn + SMSL's 0.98 M + G's, to the parameter."""
    base = ["detector=retinanet", "backbone=resnet50", "data=coco", "data.root=/nonexistent"]
    s = {n: summarize(compose_cfg("summary", base + [f"neck={n}"], tmp_path)) for n in
         ("fpn", "smsl_fpn", "srf_fpn", "smsl_srf_fpn")}
    smsl = s["smsl_fpn"]["params_trainable"] - s["fpn"]["params_trainable"]
    g = s["srf_fpn"]["params_trainable"] - s["fpn"]["params_trainable"]
    assert smsl == 977_376  # SMSL Table 2: +0.98 M
    assert count_parameters(Generator(256, num_blocks=5)) == g  # the paper's G at C = 256
    assert s["smsl_srf_fpn"]["params_trainable"] == s["fpn"]["params_trainable"] + smsl + g
    assert s["smsl_srf_fpn"]["head"] == s["fpn"]["head"] and s["smsl_srf_fpn"]["backbone"] == s["fpn"]["backbone"]


def test_generator_upsamples_inside_fpn_and_smsl_follows(tmp_path):
    cfg = compose_cfg("train", TINY + small_neck("smsl_srf_fpn") + SMALL_G, tmp_path)
    net = CK.build_net(cfg)
    neck = net.backbone.neck
    gen = generator_of(net)
    assert isinstance(neck.base, SMSLNeck) and neck.generator is gen and neck.base.base.upsample is gen
    calls = []
    gen.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    smsl_in = []
    neck.base.smsl.register_forward_pre_hook(lambda m, args: smsl_in.append(len(args[0])))
    body = net.backbone.body(torch.rand(1, 3, 64, 96))
    out = neck(body)
    # C3..C5: G upsamples P5 -> P4 and P4 -> P3 once each, then SMSL sees every level (P3-P7)
    assert calls == [(1, 32, 4, 6), (1, 32, 8, 12)] and smsl_in == [5] and len(out) == 5


def test_stage3_reuses_a_stage1_generator(tmp_path):
    """``reuse=G``: stage 1's generator state (keys ``generator.*``) lands in the composed neck's G."""
    net = CK.build_net(compose_cfg("train", TINY + small_neck("smsl_srf_fpn") + SMALL_G, tmp_path))
    g1 = Generator(32, num_blocks=1, mid_channels=16)
    state = {f"generator.{k}": v + 1.0 for k, v in g1.state_dict().items() if v.is_floating_point()}
    state.update({f"generator.{k}": v for k, v in g1.state_dict().items() if not v.is_floating_point()})
    gen = load_generator_state(net, state, "stage1.ckpt", "srf.ckpt.stage1")
    for k, v in gen.state_dict().items():
        assert torch.equal(v, state[f"generator.{k}"])


def test_preset_rows_are_the_four_necks_on_retinanet(tmp_path):
    table = rows("smsl_srf")
    assert table == [["neck=fpn"], ["neck=smsl_fpn"], ["neck=srf_fpn"], ["neck=smsl_srf_fpn"]]
    for row in table:
        cfg = compose_cfg("train", ["experiment=smsl_srf", *row], tmp_path)
        assert cfg.detector.name == "retinanet" and cfg.backbone.arch == "resnet18" and cfg.neck.out_channels == 64


def test_fast_dev_run(tmp_path, shapes_root):
    over = TINY + ["detector=retinanet"] + small_neck("smsl_srf_fpn") + SMALL_G + FDR
    metrics = train(compose_cfg("train", over, tmp_path, shapes_root))
    assert 0.0 <= metrics["bbox/AP"] <= 1.0
