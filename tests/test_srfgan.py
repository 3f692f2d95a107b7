"""SRF-GAN (srfgan/ and lightning_modules/srfgan_module.py): modules, losses, stages, checkpoints, bad input."""

from __future__ import annotations

import copy
import functools
import math
import shutil
from collections import OrderedDict
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from detection.backbones import ResNetBody
from detection.detectors import build_detector
from detection.necks import FPN, PAFPN
from lightning_modules import checkpoints as CK
from lightning_modules import outputs as OUT
from lightning_modules import srfgan_module as SM
from lightning_modules.checkpoints import build_net as build_detector_from_config
from lightning_modules.checkpoints import load_checkpoint
from lightning_modules.detection_module import DetectionModule
from lightning_modules.srfgan_figure import SRFFeatureFigure, write_figure
from lightning_modules.srfgan_module import SRFExtractorModule, SRFGANModule, gan_optimizer_steps
from lightning_modules.srfgan_pipeline import (
    build_stage1_module,
    build_stage2_module,
    load_target_network,
    prepare_target_net,
)
from lightning_modules.summary import summarize
from lightning_modules.train import train
from smsl import smsl_after
from srfgan import (
    FeaturePatchDiscriminator,
    Generator,
    SRFNeck,
    TargetNetwork,
    degrade,
    degrade_images,
    discriminator_loss,
    downsample_nearest,
    generator_of,
    l1_loss,
    level_pairs,
    load_generator_state,
    pair_levels,
    scale_targets,
    srf_loss,
    srf_neck,
)
from tests.conftest import TINY, compose_cfg

DETECTORS = ["retinanet", "fcos", "faster_rcnn", "mask_rcnn"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast as two, and immune to OpenMP barrier stalls when the
    two cores are shared with other jobs (measured: ResNet-18 fwd+bwd at 96 px, 0.13 s vs 3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def srf_overrides(neck: str = "srf_fpn") -> list[str]:
    """A tiny SRF neck: 32 channels (FCOS' GroupNorm(32) needs >= 32), a 1-block 8-wide generator."""
    return [f"neck={neck}", "neck.out_channels=32", "neck.generator.num_blocks=1", "neck.generator.mid_channels=8"]


def detector_overrides(detector: str) -> list[str]:
    return [f"detector={detector}"] + (["detector.mask_head_channels=16"] if detector == "mask_rcnn" else [])


# as pyramidlab-srfgan mounts it (pipeline=srfgan adds the recipe's stage schedules)
SRF_CFG = ["+srfgan@srf=default", "pipeline=srfgan", "srf.discriminator.channels=[8,8,8]"]


def load_generator(net, path):
    """G of a stage-1/2 checkpoint into ``net``'s SRF neck, as stage 2 and stage 3 (reuse=G) load it."""
    return load_generator_state(net, load_checkpoint(path, "srf.ckpt.stage1")["state_dict"], str(path), "srf.ckpt.stage1")


# ------------------------------------------------------------------------------- models, losses
def test_generator_parameter_count_and_shapes_with_odd_sizes():
    # Sec. 3.1 at C = 256: 3x3 conv, 5 residual blocks (2 convs + 2 BN), conv block (+BN), 6x6 deconv, 1x1.
    conv3, bn = 256 * 256 * 9 + 256, 2 * 256
    expected = conv3 + 5 * (2 * conv3 + 2 * bn) + (conv3 + bn) + (256 * 256 * 36 + 256) + (256 * 256 + 256)
    assert _count(Generator(256)) == expected == 9_511_936  # the paper: "+10M"
    assert _count(Generator(256, num_blocks=2, mid_channels=64)) < 0.6e6  # the light generator
    g = Generator(8, num_blocks=2).eval()
    x = torch.randn(2, 8, 13, 19)
    assert g(x).shape == (2, 8, 26, 38)
    for size in [(26, 38), (25, 37), (26, 37), (25, 38), (7, 11), (40, 60)]:  # crops, then any size by resizing
        assert g(x, size).shape == (2, 8, *size)
    full = g(x)
    torch.testing.assert_close(g(x, (25, 37)), full[..., :25, :37])  # odd sizes are a crop of the x2 map
    with pytest.raises(ValueError, match="4 channels, expected 8"):
        g(torch.randn(1, 4, 3, 3), (6, 6))


def test_generator_residual_is_bilinear_when_the_body_is_silenced():
    g = Generator(4, num_blocks=1).eval()
    torch.nn.init.zeros_(g.tail.weight)
    torch.nn.init.zeros_(g.tail.bias)
    x = torch.randn(1, 4, 5, 7)
    torch.testing.assert_close(g(x, (10, 14)), F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


def test_discriminator_shapes_and_parameter_count():
    assert _count(FeaturePatchDiscriminator(256)) == (
        (256 * 9 * 512 + 512 + 2 * 512) + (512 * 9 * 1024 + 1024 + 2 * 1024) + (1024 * 9 * 1024 + 1024 + 2 * 1024) + 1025
    )
    d = FeaturePatchDiscriminator(8, channels=(4, 4, 4))
    for h, w in [(13, 19), (1, 1), (26, 37)]:
        assert d(torch.randn(2, 8, h, w)).shape == (2, 1, h, w)  # one logit per feature pixel


def test_discriminator_widths_follow_the_pyramid_from_config(tmp_path):
    # srf.discriminator.channels: null = 2C, 4C, 4C: the paper's 512/1024/1024 at C = 256, and
    # 1/4 of them on the CPU recipe's 64-channel pyramid; an explicit list pins them
    node = compose_cfg("train", ["+srfgan@srf=default"], tmp_path).srf.discriminator
    assert instantiate(node)(in_channels=256).channels == [512, 1024, 1024]
    assert instantiate(node)(in_channels=64).channels == [128, 256, 256]
    pinned = compose_cfg("train", ["+srfgan@srf=default", "srf.discriminator.channels=[512,1024,1024]"], tmp_path)
    assert instantiate(pinned.srf.discriminator)(in_channels=64).channels == [512, 1024, 1024]


def test_losses_follow_equations_1_to_3():
    torch.manual_seed(0)
    sr = [torch.randn(2, 3, 6, 8), torch.randn(2, 3, 3, 4)]
    tr = [torch.randn(2, 3, 6, 8), torch.randn(2, 3, 3, 4)]
    d = FeaturePatchDiscriminator(3, channels=(4, 4, 4))
    # Eq. 2, first term: per level mean over C, H, W (and batch), summed over levels
    assert torch.allclose(l1_loss(sr, tr), sum((a - b).abs().mean() for a, b in zip(sr, tr)))
    loss = srf_loss(sr, tr, d, adv_weight=0.5)
    logits = [d(x) for x in sr]
    adv = sum(-torch.log(torch.sigmoid(z)).mean() for z in logits)  # -log D(G(P^lr)) per pixel
    torch.testing.assert_close(loss.adv, adv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.total, loss.l1 + 0.5 * loss.adv)
    real = [d(x) for x in tr]
    eq1 = sum(-(torch.log(torch.sigmoid(r)).mean() + torch.log(1 - torch.sigmoid(f)).mean()) for r, f in zip(real, logits))
    torch.testing.assert_close(discriminator_loss(real, logits), eq1, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="level 1"):
        l1_loss(sr, [tr[0], tr[1][..., :2]])


def test_adversarial_gradient_reaches_the_generator_and_leaves_d_untouched():
    torch.manual_seed(0)
    g, d = Generator(4, num_blocks=1), FeaturePatchDiscriminator(4, channels=(4, 4, 4))
    x, target = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 10, 12)
    d.requires_grad_(False)  # what toggle_optimizer does in the G step
    d_state = copy.deepcopy(d.state_dict())
    srf_loss([g(x, (10, 12))], [target], d).adv.backward()
    grads = [p.grad for p in g.parameters()]
    assert all(gr is not None for gr in grads) and sum(float(gr.abs().sum()) for gr in grads) > 0
    assert g.head[0].weight.grad.abs().sum() > 0  # through D, through the tail, back to G's first conv
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in d_state.items())  # BN buffers too


def test_degradation_modes_and_target_scaling():
    x = torch.rand(2, 3, 64, 96)
    assert degrade(x).shape == (2, 3, 32, 48)
    torch.testing.assert_close(degrade(x, mode="bilinear"), F.avg_pool2d(x, 2))  # 2x2 mean at s = 0.5
    assert torch.equal(degrade(x, mode="nearest"), x[..., ::2, ::2])
    assert degrade(x[0], mode="bicubic").shape == (3, 32, 48)
    im = torch.rand(3, 61, 90)
    lr = degrade_images([im], mode="bicubic")
    assert lr[0].shape == (3, 30, 45) and 0 <= float(lr[0].min()) and float(lr[0].max()) <= 1
    masks = torch.zeros(1, 61, 90, dtype=torch.uint8)
    masks[0, 10:40, 20:60] = 1
    t = {"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0]]), "masks": masks, "size": torch.tensor([61, 90]),
         "orig_boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "labels": torch.tensor([2])}
    (s,) = scale_targets([t], [im], lr)
    torch.testing.assert_close(s["boxes"], torch.tensor([[10.0, 10.0 * 30 / 61, 30.0, 40.0 * 30 / 61]]))
    assert s["masks"].shape == (1, 30, 45) and s["masks"].dtype == torch.uint8 and s["masks"].sum() > 0
    assert s["size"].tolist() == [30, 45] and torch.equal(s["orig_boxes"], t["orig_boxes"])
    with pytest.raises(ValueError, match="srf.degradation='lanczos'"):
        degrade(x, mode="lanczos")


def test_level_matching_pairs():
    # Eq. 3 (same): M's level i vs F's level i; Table 7 (different): M's P3-P5 vs F's P2-P4
    assert pair_levels([4, 8, 16, 32], [4, 8, 16, 32], "same") == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert pair_levels([4, 8, 16, 32], [4, 8, 16, 32], "different") == [(8, 4), (16, 8), (32, 16)]
    # Table 3: a Mask R-CNN extractor (P2-P5) against a RetinaNet F (P3-P5): the shared levels
    assert pair_levels([4, 8, 16, 32], [8, 16, 32], "same") == [(8, 8), (16, 16), (32, 32)]
    ext = OrderedDict([(8, torch.randn(1, 4, 12, 16)), (16, torch.randn(1, 4, 6, 8))])
    tgt_tr = OrderedDict([(4, torch.randn(1, 4, 50, 66)), (8, torch.randn(1, 4, 25, 33)), (16, torch.randn(1, 4, 13, 17))])
    sr, tr = level_pairs(ext, tgt_tr, pair_levels(list(ext), list(tgt_tr), "same"))
    assert [t.shape[-2:] for t in tr] == [(12, 16), (6, 8)]
    assert torch.equal(tr[0], downsample_nearest(tgt_tr[8])[..., :12, :16])  # Eq. 3: nearest down of F's same level
    # different: the SAME extractor tensors (M's pyramid, not G's raw output), F's finer level on the
    # same (low-resolution) image, brought to M's size by the same nearest down-sampling
    tgt_lr = OrderedDict([(4, torch.randn(1, 4, 25, 33)), (8, torch.randn(1, 4, 13, 17))])
    sr_d, tr_d = level_pairs(ext, tgt_lr, pair_levels(list(ext), list(tgt_lr), "different"))
    assert sr_d[0] is not None and torch.equal(sr_d[0], sr[0]) and torch.equal(sr_d[1], sr[1])
    assert torch.equal(tr_d[0], downsample_nearest(tgt_lr[4])[..., :12, :16])
    assert torch.equal(tr_d[1], downsample_nearest(tgt_lr[8])[..., :6, :8])
    with pytest.raises(ValueError, match=r"target stride 32"):
        level_pairs(OrderedDict([(32, torch.randn(1, 4, 2, 2))]), tgt_tr, [(32, 32)])


# ----------------------------------------------------------------------------------------- neck
def test_srf_neck_shares_one_generator_keeps_keys_and_interpolation_axis():
    base = functools.partial(FPN, out_channels=8, extra_levels="maxpool")
    neck = srf_neck([4, 8, 16, 32], base, generator=functools.partial(Generator, num_blocks=1))
    assert isinstance(neck, SRFNeck) and isinstance(neck.generator, Generator) and neck.num_top_down == 4
    feats = OrderedDict((str(i), torch.randn(1, c, 37 >> i, 53 >> i)) for i, c in enumerate([4, 8, 16, 32]))
    calls = []
    handle = neck.generator.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape[-2:])))
    out = neck(feats)
    handle.remove()
    assert list(out) == ["0", "1", "2", "3", "pool"]  # RoI keys + the RPN's pool level
    assert calls == [(9, 13), (18, 26), (37, 53)]  # one generator, every top-down level, odd sizes exact
    assert [m for m in neck.modules() if isinstance(m, Generator)] == [neck.generator]
    # Table 5's axis: upsample=nearest is exactly FPN with the same weights
    nn_neck = srf_neck([4, 8, 16, 32], base, upsample="nearest")
    plain = base(in_channels_list=[4, 8, 16, 32])
    plain.load_state_dict(nn_neck.base.state_dict())
    assert nn_neck.generator is None and all(torch.equal(a, b) for a, b in zip(nn_neck(feats).values(), plain(feats).values()))
    # works inside SMSL too, and with PAFPN
    wrapped = srf_neck([4, 8], functools.partial(smsl_after, base=functools.partial(FPN, out_channels=8, extra_levels="none"), reduction=2),
                       generator={"num_blocks": 1})
    assert wrapped.generator is not None and len(wrapped(OrderedDict(list(feats.items())[:2]))) == 2
    assert srf_neck([4, 8], functools.partial(PAFPN, out_channels=8, extra_levels="none"), generator={"num_blocks": 0}).generator
    with pytest.raises(ValueError, match="neck.upsample='lanczos'"):
        srf_neck([4], base, upsample="lanczos")


def test_summary_srf_fpn_adds_about_10m_parameters(tmp_path):
    base = ["detector=retinanet", "backbone=resnet50", "data=coco", "data.root=/x"]
    fpn = summarize(compose_cfg("summary", base + ["neck=fpn"], tmp_path))
    srf = summarize(compose_cfg("summary", base + ["neck=srf_fpn"], tmp_path))
    light = summarize(compose_cfg("summary", base + ["neck=srf_fpn_light"], tmp_path))
    nn_axis = summarize(compose_cfg("summary", base + ["neck=srf_fpn", "neck.upsample=nearest"], tmp_path))
    assert abs(fpn["params_trainable"] / 1e6 - 37.743) < 0.001
    assert 9.0e6 <= srf["params_trainable"] - fpn["params_trainable"] == 9_511_936 <= 10.6e6
    assert srf["neck"]["type"] == "SRFNeck" and srf["head"] == fpn["head"] and srf["backbone"] == fpn["backbone"]
    assert 0 < light["params_trainable"] - fpn["params_trainable"] < 0.6e6
    assert nn_axis["params_trainable"] == fpn["params_trainable"]


@pytest.mark.parametrize("neck", ["srf_fpn", "srf_pafpn"])
@pytest.mark.parametrize("detector", DETECTORS)
def test_fast_dev_run_srf_necks_through_pyramidlab_train(tmp_path, shapes_root, monkeypatch, detector, neck):
    over = TINY + detector_overrides(detector) + srf_overrides(neck) + ["debug=fdr", "data.min_size=64", "data.max_size=80"]
    cfg = compose_cfg("train", over, tmp_path, shapes_root)
    calls = []
    build_net = CK.build_net

    def spy_build(c):
        net = build_net(c)
        generator_of(net).register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
        return net

    monkeypatch.setattr(CK, "build_net", spy_build)
    metrics = train(cfg)
    assert 0.0 <= metrics["bbox/AP"] <= 1.0 and ("segm/AP" in metrics) == (detector == "mask_rcnn")
    steps = 3 if "rcnn" in detector else 2  # top-down x2 steps: P5->P4->P3(->P2)
    assert calls and len(calls) % steps == 0  # one shared G on every top-down step (train, val, test)


# ------------------------------------------------------------------------- stage 1, tiny and fast
class _Images(Dataset):
    """Random (3, H, W) images of varying odd/even sizes, targets unused by stage 1."""

    def __init__(self, n: int = 4) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, 61 + 8 * (i % 2), 75, generator=g), {}


def _loader(n: int = 4) -> DataLoader:
    return DataLoader(_Images(n), batch_size=2, collate_fn=lambda b: ([x[0] for x in b], [x[1] for x in b]))


def _tiny_target(channels: int = 16) -> TargetNetwork:
    """F from an untrained ResNet-18 RetinaNet (P3-P5 top-down levels)."""
    torch.manual_seed(0)
    det = build_detector(
        "retinanet", functools.partial(ResNetBody, "resnet18", frozen_stages=0),
        functools.partial(FPN, out_channels=channels, extra_levels="p6p7_c5"), num_classes=3,
    )
    return TargetNetwork.from_detector(det)


def _tiny_module(**kw) -> SRFGANModule:
    sgd = functools.partial(torch.optim.SGD, lr=1e-2, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(1)
    return SRFGANModule(
        _tiny_target(), Generator(16, num_blocks=1, mid_channels=8), FeaturePatchDiscriminator(16, channels=(8, 8, 8)),
        sgd, sgd, {"name": "step", "warmup_iters": 3, "milestones": [1], "gamma": 0.5}, **kw,
    )


def _trainer(root: Path, iterations: int, **kw) -> L.Trainer:
    kw.setdefault("logger", False)
    return L.Trainer(
        default_root_dir=str(root), max_steps=gan_optimizer_steps(iterations), accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )


def _snapshot(m: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_d_step_changes_only_d_and_g_step_changes_only_g(tmp_path):
    module = _tiny_module()
    seen = {}
    d_step, g_step = module.discriminator_step, module.generator_step

    def spy_d(real, fake):
        g0, d0 = _snapshot(module.generator), _snapshot(module.discriminator)
        out = d_step(real, fake)
        seen["d"] = (_changed(g0, _snapshot(module.generator)), _changed(d0, _snapshot(module.discriminator)))
        return out

    def spy_g(real, fake, *a, **k):
        g0, d0 = _snapshot(module.generator), _snapshot(module.discriminator)
        out = g_step(real, fake, *a, **k)
        seen["g"] = (_changed(g0, _snapshot(module.generator)), _changed(d0, _snapshot(module.discriminator)))
        return out

    module.discriminator_step, module.generator_step = spy_d, spy_g
    f0 = _snapshot(module.target)
    _trainer(tmp_path, 1).fit(module, _loader(2))
    assert seen["d"] == (False, True)  # D step: G untouched (parameters and BN buffers), D updated
    assert seen["g"] == (True, False)  # G step: G updated, D untouched (its BN statistics too)
    assert not _changed(f0, _snapshot(module.target)) and not module.target.training  # F frozen, in eval


def test_checkpoint_roundtrip_of_both_optimizers_and_schedulers(tmp_path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", every_n_train_steps=gan_optimizer_steps(1),
                              enable_version_counter=False)
    module = _tiny_module()
    loggers = [CSVLogger(tmp_path, name="csv", version=""), TensorBoardLogger(tmp_path, name="tb", version="")]
    trainer = _trainer(tmp_path, 3, callbacks=[ckpt_cb, SRFFeatureFigure()], logger=loggers, val_check_interval=2,
                       check_val_every_n_epoch=None, limit_val_batches=1)
    trainer.fit(module, _loader(4), _loader(2))
    assert trainer.global_step == 6  # 3 iterations, 2 optimizer steps each
    assert sorted(p.name for p in (tmp_path / "srf_features").glob("*.png")) == ["step00000002.png"]  # Fig. 2
    assert b"val/srf_features" in next((tmp_path / "tb").glob("events.out.*")).read_bytes()
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2
    assert [s["last_epoch"] for s in ckpt["lr_schedulers"]] == [3, 3]  # stepped once per iteration
    for saved, opt in zip(ckpt["optimizer_states"], module.optimizers()):
        live = opt.optimizer.state_dict()
        assert saved["param_groups"][0]["lr"] == live["param_groups"][0]["lr"] == pytest.approx(1e-2 * 0.5)
        for k, v in live["state"].items():
            assert torch.equal(saved["state"][k]["momentum_buffer"], v["momentum_buffer"])
    assert ckpt["srfgan"]["stage"] == 1 and ckpt["srfgan"]["generator"]["mid_channels"] == 8

    restored = {}

    class Capture(Callback):
        def on_train_start(self, trainer, pl_module):
            restored["opt"] = [copy.deepcopy(o.optimizer.state_dict()) for o in pl_module.optimizers()]
            restored["sch"] = [s.state_dict()["last_epoch"] for s in pl_module.lr_schedulers()]

    resumed = _tiny_module()
    trainer = _trainer(tmp_path / "resumed", 5, callbacks=[Capture()])
    trainer.fit(resumed, _loader(4), ckpt_path=tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert restored["sch"] == [3, 3] and trainer.global_step == 10
    for saved, live in zip(ckpt["optimizer_states"], restored["opt"]):
        assert saved["param_groups"][0]["lr"] == live["param_groups"][0]["lr"]
        for k, v in saved["state"].items():
            assert torch.equal(v["momentum_buffer"], live["state"][k]["momentum_buffer"])


def test_bf16_mixed_training_step_on_cpu(tmp_path):
    module = _tiny_module()
    g0 = _snapshot(module.generator)
    trainer = _trainer(tmp_path, 1, precision="bf16-mixed")
    trainer.fit(module, _loader(2))
    m = trainer.callback_metrics
    assert all(math.isfinite(float(m[f"train/{k}"])) for k in ("l1", "adv", "d_loss", "d_acc_real", "d_acc_fake"))
    assert _changed(g0, _snapshot(module.generator))


def test_nan_loss_stops_stage_with_a_named_message_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    calls = []

    def poisoned(sr, tr, d, adv_weight):
        out = srf_loss(sr, tr, d, adv_weight)
        calls.append(1)
        if len(calls) == 3:  # the third iteration's G step
            return out._replace(l1=out.l1 * float("nan"), total=out.total * float("nan"))
        return out

    monkeypatch.setattr(SM, "srf_loss", poisoned)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="last", every_n_train_steps=2, enable_version_counter=False)
    module = _tiny_module()
    with pytest.raises(FloatingPointError, match=r"stage 1 \(SRF-GAN\): non-finite loss at step 2 .*: l1 = \[nan\]") as e:
        _trainer(tmp_path, 5, callbacks=[ckpt_cb]).fit(module, _loader(8))
    assert "\n" not in str(e.value)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # the two good iterations
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    _tiny_module().load_state_dict(ckpt["state_dict"])


# ---------------------------------------------------------------------- the stages on real configs
def _stage0_checkpoint(cfg, path: Path) -> Path:
    """A stage-0 checkpoint as pyramidlab-train writes it (``net.*`` weights + the resolved config),
    without spending a training run on it (pyramidlab-srfgan's own tests train stage 0 for real)."""
    resolved = OUT.resolved_config(cfg)
    net = build_detector_from_config(resolved)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "pyramidlab_config": resolved,
                "epoch": 0, "global_step": 1}, path)
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory, shapes_root):
    """Stage 0 (a Faster R-CNN with NN-FPN: F on P2-P5, as the paper's Mask R-CNN FPN), then stage 1
    for two iterations from the composed config, validated once."""
    tmp = tmp_path_factory.mktemp("srf_stages")
    cfg0 = compose_cfg("train", TINY + ["detector=faster_rcnn", "neck=fpn", "neck.out_channels=32"], tmp / "s0", shapes_root)
    stage0 = _stage0_checkpoint(cfg0, tmp / "stage0.ckpt")
    cfg1 = compose_cfg("train", TINY + ["detector=faster_rcnn", *srf_overrides(), *SRF_CFG, "data.min_size=64",
                                        "data.max_size=80"], tmp / "s1", shapes_root)
    module = build_stage1_module(cfg1, stage0)
    dm = instantiate(cfg1.data, with_masks=False, _convert_="all")
    trainer = _trainer(tmp / "s1", 2, limit_train_batches=2, limit_val_batches=1, callbacks=[SRFFeatureFigure()])
    trainer.fit(module, datamodule=dm)
    stage1 = tmp / "s1" / "stage1.ckpt"
    trainer.save_checkpoint(stage1)
    yield {"tmp": tmp, "root": shapes_root, "stage0": stage0, "stage1": stage1, "module1": module}
    shutil.rmtree(tmp, ignore_errors=True)


def test_stage1_from_config_logs_and_writes_the_figure(stages):
    m = stages["module1"]
    assert m.trainer.global_step == 4 and m.target.strides == [4, 8, 16, 32]
    assert {"train/l1", "train/adv", "train/d_loss", "train/d_acc_real", "train/d_acc_fake", "val/l1"} <= set(m.trainer.callback_metrics)
    assert list((stages["tmp"] / "s1" / "srf_features").glob("step*.png"))
    ckpt = torch.load(stages["stage1"], weights_only=True)
    assert ckpt["pyramidlab_config"]["neck"]["generator"]["mid_channels"] == 8


def test_fig2_image_reaches_wandb_and_the_run_dir(tmp_path):
    """The stage-1 comparison image goes to srf_features/ and, as media, into an offline W&B run."""
    import types

    import numpy as np
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="pyramidlab-test")
    module = types.SimpleNamespace(
        global_step=6, trainer=types.SimpleNamespace(default_root_dir=str(tmp_path)), loggers=[logger]
    )
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    try:
        path = write_figure(module, image, "srf/features")
    finally:
        logger.experiment.finish()
    assert path == tmp_path / "srf_features" / "step00000003.png"  # 6 optimizer steps = 3 GAN iterations
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/images/srf/features_*.png"))
    assert len(media) == 1 and media[0].stat().st_size > 0


def _run_stage2(stages: dict, detector: str, matching: str) -> dict:
    """A stage-2 fast_dev_run from the composed config (G and D from stage 1); what M saw and logged."""
    tmp = stages["tmp"] / f"s2_{detector}_{matching}"
    over = TINY + detector_overrides(detector) + srf_overrides() + SRF_CFG + [
        f"srf.level_matching={matching}", "data.min_size=64", "data.max_size=80"]
    cfg = compose_cfg("train", over, tmp, stages["root"])
    module = build_stage2_module(cfg, stages["stage0"], stages["stage1"])
    s1 = torch.load(stages["stage1"], weights_only=True)["state_dict"]
    loaded = (torch.equal(module.generator.head[0].weight, s1["generator.head.0.weight"])
              and torch.equal(module.discriminator.classifier.weight, s1["discriminator.classifier.weight"]))
    seen: dict = {"in": [], "net": []}
    degrade_batch, forward = module.degrade_batch, module.net.forward

    def spy_degrade(batch):
        seen["in"].append([tuple(im.shape[-2:]) for im in batch[0]])
        return degrade_batch(batch)

    def spy_forward(images, targets=None):
        seen["net"].append([tuple(im.shape[-2:]) for im in images])
        return forward(images, targets)

    module.degrade_batch, module.net.forward = spy_degrade, spy_forward
    trainer = L.Trainer(default_root_dir=str(tmp), fast_dev_run=True, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=instantiate(cfg.data, with_masks=module.net.with_masks, _convert_="all"))
    path = tmp / "stage2.ckpt"
    trainer.save_checkpoint(path)
    return {"loaded": loaded, "seen": seen, "metrics": dict(trainer.callback_metrics), "trainer": trainer, "path": path}


@pytest.fixture(scope="module")
def stage2_mask_rcnn(stages) -> dict:
    return _run_stage2(stages, "mask_rcnn", "same")


def _check_stage2(run: dict) -> None:
    assert run["loaded"]  # G and D re-used from stage 1 (Sec. 5.1)
    # train + val batch: M always sees the 0.5x images
    assert run["seen"]["net"] == [[(h // 2, w // 2) for h, w in sizes] for sizes in run["seen"]["in"]]
    assert len(run["seen"]["net"]) == 2
    for k in ("train/loss", "train/l1", "train/adv", "train/d_loss", "train/d_acc_real", "val/l1", "val/bbox/AP"):
        assert k in run["metrics"] and math.isfinite(float(run["metrics"][k])), k
    assert run["trainer"].global_step == 2  # one iteration: a D step and an M step
    ckpt = torch.load(run["path"], weights_only=True)
    assert ckpt["srfgan"]["stage"] == 2 and len(ckpt["optimizer_states"]) == 2 and "pyramidlab_config" in ckpt


def test_stage2_extractor_fast_dev_run_mask_rcnn_same_levels(stage2_mask_rcnn):
    _check_stage2(stage2_mask_rcnn)
    assert "train/loss_mask" in stage2_mask_rcnn["metrics"]  # masks scaled to the 0.5x image


def test_stage2_extractor_fast_dev_run_retinanet_different_levels(stages):
    _check_stage2(_run_stage2(stages, "retinanet", "different"))


def test_stage3_reuse_generator_or_extractor_and_freeze(stages, stage2_mask_rcnn, tmp_path):
    cfg = compose_cfg("train", TINY + ["detector=retinanet", *srf_overrides()], tmp_path, stages["root"])
    s1 = torch.load(stages["stage1"], weights_only=True)["state_dict"]
    net = build_detector_from_config(cfg)
    assert prepare_target_net(net, "G", stages["stage1"]) == {"reuse": "G"}
    gen = generator_of(net)
    assert all(torch.equal(v, s1[f"generator.{k}"]) for k, v in gen.state_dict().items())

    # reuse=M from the Mask R-CNN extractor (P2-P5) into RetinaNet (P3-P7): body, G and P3-P5 by stride
    s2 = torch.load(stage2_mask_rcnn["path"], weights_only=True)["state_dict"]
    net = build_detector_from_config(cfg)
    info = prepare_target_net(net, "M", stage2_mask_rcnn["path"], freeze=True)
    left = info["left_at_init"]
    assert info["matched_strides"] == [8, 16, 32]  # Table 3: the levels both have
    own = net.backbone.state_dict()
    src = "net.model.backbone."
    assert torch.equal(own["body.body.layer4.1.conv2.weight"], s2[src + "body.body.layer4.1.conv2.weight"])
    assert torch.equal(own["neck.base.lateral_convs.0.weight"], s2[src + "neck.base.lateral_convs.1.weight"])  # C3
    assert torch.equal(own["neck.base.output_convs.2.weight"], s2[src + "neck.base.output_convs.3.weight"])  # P5
    assert left and all(k.startswith("neck.base.extra_block.") for k in left)  # P6/P7 convs: RetinaNet's own
    gen = generator_of(net)
    net.train()
    assert not gen.training and not any(p.requires_grad for p in gen.parameters())  # Table 4's FR
    module = DetectionModule(net, functools.partial(torch.optim.SGD, lr=0.01))
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert not trainable & {id(p) for p in gen.parameters()} and module.net is net


def test_bad_checkpoints_and_mismatches_fail_in_one_line(stages, tmp_path):
    def one_line(exc_type, match, fn, *args):
        with pytest.raises(exc_type, match=match) as e:
            fn(*args)
        assert "\n" not in str(e.value)

    one_line(FileNotFoundError, "nope.ckpt", load_target_network, tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    one_line(ValueError, "cannot load .*junk.ckpt", load_target_network, tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    one_line(ValueError, "bare.ckpt has no pyramidlab_config", load_target_network, tmp_path / "bare.ckpt")
    s0 = str(stages["stage0"])
    # wrong channels: the stage-0 FPN has 32, this run's SRF neck 16
    cfg = compose_cfg("train", TINY + ["detector=faster_rcnn", *srf_overrides(), "neck.out_channels=16", *SRF_CFG],
                      tmp_path / "c16", stages["root"])
    one_line(ValueError, f"{s0}: F's levels have 32 channels but the generator has 16", build_stage1_module, cfg, s0)
    # Table 3 across heads: a RetinaNet F (P3-P5) supervises a Mask R-CNN extractor (P2-P5) on the
    # levels both have; with level_matching=different no pair is left when F has only P5
    rcfg = compose_cfg("train", TINY + ["detector=retinanet", "neck=fpn", "neck.out_channels=32"], tmp_path / "r", stages["root"])
    _stage0_checkpoint(rcfg, tmp_path / "retina0.ckpt")
    net = build_detector_from_config(rcfg)
    mcfg = compose_cfg("train", TINY + detector_overrides("mask_rcnn") + srf_overrides() + SRF_CFG, tmp_path / "m", stages["root"])
    assert build_stage2_module(mcfg, tmp_path / "retina0.ckpt", None).pairs == [(8, 8), (16, 16), (32, 32)]
    # a generator configured differently from the stage-1 one
    gcfg = compose_cfg("train", TINY + ["detector=retinanet", *srf_overrides(), "neck.generator.mid_channels=4"], tmp_path / "g",
                       stages["root"])
    one_line(ValueError, r"stage1.ckpt does not match.*head.0.weight: checkpoint \(8, 32, 3, 3\) vs configured \(4, 32, 3, 3\)",
             load_generator, build_detector_from_config(gcfg), stages["stage1"])
    one_line(ValueError, "holds no SRF generator", load_generator, build_detector_from_config(gcfg), s0)
    one_line(ValueError, "not a stage-2", prepare_target_net, build_detector_from_config(gcfg), "M", stages["stage1"])
    one_line(ValueError, "has no SRF generator; use an SRF neck", generator_of, net)
    one_line(ValueError, "srf.reuse='X'", prepare_target_net, net, "X", None)
    with pytest.raises(ValueError, match="srf.level_matching='across'"):
        SRFExtractorModule(build_detector_from_config(gcfg), _tiny_target(32), FeaturePatchDiscriminator(32, (8, 8, 8)),
                           functools.partial(torch.optim.SGD, lr=0.1), level_matching="across")


def test_released_rrdb_generator_is_selectable_and_counts_like_the_release(tmp_path):
    """neck.generator.kind=rrdb: the authors' released generator (RRDB, no BN, 3x3 out, ~7.8 M)."""
    from srfgan import RRDBGenerator, build_generator

    g = build_generator(256, kind="rrdb")
    assert isinstance(g, RRDBGenerator) and not any(isinstance(m, torch.nn.BatchNorm2d) for m in g.modules())
    assert abs(_count(g) / 1e6 - 7.71) < 0.01
    assert g.tail.kernel_size == (3, 3)
    small = build_generator(8, kind="rrdb", num_blocks=1, mid_channels=8, growth_channels=4)
    assert small(torch.rand(2, 8, 7, 9), size=(13, 18)).shape == (2, 8, 13, 18)
    with pytest.raises(ValueError, match="neck.generator.kind='esrgan'"):
        build_generator(8, kind="esrgan")
    cfg = compose_cfg("train", TINY + ["neck=srf_fpn", "neck.out_channels=32", "neck.generator.kind=rrdb",
                                       "neck.generator.num_blocks=1", "neck.generator.mid_channels=8"], tmp_path)
    assert isinstance(generator_of(build_detector_from_config(cfg)), RRDBGenerator)


def test_neck_contract_every_neck_and_transfer_between_neck_shapes():
    """detection.necks.Neck: out_channels / num_levels / num_top_down on every neck; the FPN inside a
    wrapping neck is found by pyramid_of; an SRF-FPN extractor initialises an SMSL-after-SRF-FPN target."""
    from detection.necks import Neck, pyramid_of
    from srfgan import transfer_extractor

    base = functools.partial(FPN, out_channels=8)
    necks = {
        "fpn": base(in_channels_list=[4, 8, 16], extra_levels="p6p7_c5"),
        "smsl": smsl_after([4, 8, 16], base, reduction=2, extra_levels="p6p7_c5"),
        "srf": srf_neck([4, 8, 16], base, generator={"num_blocks": 1}, extra_levels="p6p7_c5"),
        "smsl_srf": srf_neck([4, 8, 16], functools.partial(smsl_after, base=base, reduction=2),
                             generator={"num_blocks": 1}, extra_levels="p6p7_c5"),
    }
    for name, neck in necks.items():
        assert isinstance(neck, Neck), name
        assert (neck.out_channels, neck.num_levels, neck.num_top_down) == (8, 5, 3), name
    # G is the FPN's upsampler from construction (passed as upsample=, not swapped in afterwards)
    assert pyramid_of(necks["smsl_srf"]).upsample is necks["smsl_srf"].generator is not None

    def detector(neck_factory):
        return build_detector("retinanet", functools.partial(ResNetBody, "resnet18", frozen_stages=0),
                              neck_factory, num_classes=3, extra_levels="p6p7_c5")

    src = detector(functools.partial(srf_neck, base=functools.partial(FPN, out_channels=32), generator={"num_blocks": 1}))
    dst = detector(functools.partial(srf_neck, base=functools.partial(smsl_after, base=functools.partial(FPN, out_channels=32),
                                                                      reduction=2), generator={"num_blocks": 1}))
    state = {f"net.model.{k}": v for k, v in src.model.state_dict().items()}
    matched, left = transfer_extractor(dst, state, [8, 16, 32], "src", "srf.ckpt.stage2")
    assert matched == [8, 16, 32] and left and all(".smsl." in k for k in left)  # SMSL: the target's own
    own = dst.backbone.state_dict()
    assert torch.equal(own["neck.base.base.lateral_convs.1.weight"], src.backbone.state_dict()["neck.base.lateral_convs.1.weight"])
    assert torch.equal(generator_of(dst).head[0].weight, generator_of(src).head[0].weight)


def test_a_bad_stage2_scheduler_names_its_own_key():
    """Stage 2's scheduler error names the key it came from (srf.stage2.scheduler), not optim.scheduler."""
    opt = functools.partial(torch.optim.Adam, lr=1e-4)
    with pytest.raises(ValueError, match=r"^srf\.stage2\.scheduler\.name='bogus' is not known"):
        SM.SRFExtractorModule(net=None, target=None, discriminator=None, optimizer=opt, scheduler={"name": "bogus"})
