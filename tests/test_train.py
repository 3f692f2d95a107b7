"""End-to-end: the real composed config through train / eval / summary, kept tiny."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules import builders as B
from lightning_modules import checkpoints as CK
from lightning_modules.evaluate import evaluate
from lightning_modules.train import train
from tests.coco_fixture import _make_coco
from tests.conftest import TINY, compose_cfg, small_neck

DETECTORS = ["retinanet", "fcos", "faster_rcnn", "mask_rcnn"]
NECKS = ["fpn", "pafpn", "smsl_fpn", "smsl_pafpn"]
REPO = Path(__file__).resolve().parents[1]


def detector_overrides(detector: str) -> list[str]:
    out = [f"detector={detector}"]
    if detector == "mask_rcnn":
        out.append("detector.mask_head_channels=16")
    return out


@pytest.mark.parametrize("neck", NECKS)
@pytest.mark.parametrize("detector", DETECTORS)
def test_fast_dev_run_every_detector_and_neck(tmp_path, shapes_root, detector, neck):
    cfg = compose_cfg(
        "train", TINY + detector_overrides(detector) + small_neck(neck) + ["debug=fdr"], tmp_path, shapes_root
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["bbox/AP"] <= 1.0
    assert ("segm/AP" in metrics) == (detector == "mask_rcnn")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["bbox/AP"] == pytest.approx(metrics["bbox/AP"])
    assert saved["params_trainable"] > 0 and saved["time_ms"] > 0 and saved["time_batch_size"] == 2


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    """Train 2 short epochs on the edge-case COCO dir, then test the best checkpoint."""
    tmp = tmp_path_factory.mktemp("coco_run")
    root = _make_coco(tmp / "coco")
    over = TINY + detector_overrides("mask_rcnn") + small_neck("fpn") + [
        "data=coco", "data.num_classes=3", "data.train_split=s", "data.val_split=s", "data.min_size=64",
        "data.max_size=96", "trainer.max_epochs=2", "optim=adamw", "optim.scheduler.warmup_iters=2",
    ]
    cfg = compose_cfg("train", over, tmp, root)
    metrics = train(cfg)
    yield tmp, root, cfg, metrics
    shutil.rmtree(tmp, ignore_errors=True)


def test_train_then_eval_on_edge_case_coco(coco_run):
    tmp, root, cfg, metrics = coco_run
    out = tmp / "out"
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "checkpoints" / "best.ckpt").is_file()
    assert (out / "curves.png").stat().st_size > 10_000  # losses + val AP plot
    saved = json.loads((out / "metrics.json").read_text())
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert -1.0 <= saved[f"{t}/{k}"] <= 1.0
    dets = json.loads((out / "detections_bbox.json").read_text())
    segm = json.loads((out / "detections_segm.json").read_text())
    gt = json.loads((root / "annotations" / "instances_s.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    assert dets and segm, "an untrained detector still emits low-score detections"
    assert {d["category_id"] for d in dets} <= {1, 5, 10}  # original, non-contiguous ids
    assert {d["image_id"] for d in dets} <= set(sizes)  # including the image without annotations
    for d in dets:
        x, y, w, h = d["bbox"]
        W, H = sizes[d["image_id"]]
        assert 0 <= x <= W and 0 <= y <= H and x + w <= W + 0.01 and y + h <= H + 0.01  # original pixels
    assert all(isinstance(s["segmentation"]["counts"], str) for s in segm)
    assert tuple(segm[0]["segmentation"]["size"]) == sizes[segm[0]["image_id"]][::-1]

    # pyramidlab-eval on the checkpoint alone reproduces the test metrics of the training run
    eval_dir = tmp / "eval"
    ecfg = compose_cfg("eval", ["logger=csv", f"ckpt_path={out / 'checkpoints' / 'best.ckpt'}"], eval_dir)
    emetrics = evaluate(ecfg)
    assert emetrics["bbox/AP"] == pytest.approx(metrics["bbox/AP"], abs=1e-6)
    assert emetrics["segm/AP"] == pytest.approx(metrics["segm/AP"], abs=1e-6)
    assert json.loads((eval_dir / "out" / "detections_bbox.json").read_text()) == dets


def test_checkpoint_from_another_architecture_is_named(coco_run):
    tmp, _, cfg, _ = coco_run
    ckpt = CK.load_checkpoint(tmp / "out" / "checkpoints" / "last.ckpt")
    other = compose_cfg("train", TINY + ["detector=mask_rcnn", "detector.mask_head_channels=16", "neck=pafpn",
                                         "neck.out_channels=32", "data.num_classes=3"], tmp / "other")
    net = CK.build_net(other)
    with pytest.raises(ValueError, match="downsample_convs"):
        CK.load_net_state(net, ckpt["state_dict"], "last.ckpt")


def test_resume_continues_from_last_checkpoint(coco_run):
    tmp, root, cfg, _ = coco_run
    last = tmp / "out" / "checkpoints" / "last.ckpt"
    before = CK.load_checkpoint(last)
    over = TINY + detector_overrides("mask_rcnn") + small_neck("fpn") + [
        "data=coco", "data.num_classes=3", "data.train_split=s", "data.val_split=s", "data.min_size=64",
        "data.max_size=96", "trainer.max_epochs=3", "optim=adamw", "optim.scheduler.warmup_iters=2",
        f"ckpt_path={last}", "test=false",
    ]
    rcfg = compose_cfg("train", over, tmp / "resumed", root)
    train(rcfg)
    after = CK.load_checkpoint(tmp / "resumed" / "out" / "checkpoints" / "last.ckpt")
    assert before["epoch"] == 1 and after["epoch"] == 2
    assert after["global_step"] == before["global_step"] * 3 // 2


def test_bad_values_name_their_key(tmp_path, shapes_root):
    cfg = compose_cfg("train", TINY + ["optim.optimizer.lr=-0.1"], tmp_path, shapes_root)
    with pytest.raises(ValueError, match=r"optim.optimizer.lr=-0.1"):
        B.build_module(cfg, CK.build_net(cfg))
    cfg = compose_cfg("train", TINY + ["trainer.precision=16-mixed"], tmp_path, shapes_root)
    with pytest.raises(ValueError, match="16-mixed"):
        B.build_trainer(cfg, [], [])
    if not torch.cuda.is_available():
        cfg = compose_cfg("train", TINY + ["trainer=gpu"], tmp_path, shapes_root)
        with pytest.raises(ValueError, match="no CUDA device"):
            B.build_trainer(cfg, [], [])


def test_missing_coco_root_is_one_clear_line(tmp_path):
    cfg = compose_cfg("train", TINY + ["data=coco", "debug=fdr"], tmp_path, tmp_path / "no_such_coco")
    with pytest.raises(FileNotFoundError, match="no_such_coco") as e:
        train(cfg)
    assert "\n" not in str(e.value)


def test_resume_last_without_checkpoint_explains(tmp_path, shapes_root):
    cfg = compose_cfg("train", TINY + ["ckpt_path=last"], tmp_path, shapes_root)
    with pytest.raises(FileNotFoundError, match="hydra.run.dir"):
        train(cfg)


def test_wandb_offline_run_dir_holds_config_and_metrics(tmp_path, shapes_root, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    over = TINY + small_neck("fpn") + [
        "logger=wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "callbacks=none",
    ]
    train(compose_cfg("train", over, tmp_path, shapes_root))
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb >= 0.19 keeps an offline run in one binary protobuf log (run-*.wandb) until
    # `wandb sync`; keys and config values are stored as text inside its records. On a
    # loaded machine wandb.finish() can return before the service has written the last
    # records: wait for the run's exit record.
    from tests.test_sweeps import wandb_run

    wandb_run(runs[0])
    data = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"train/loss", b"val/bbox/AP", b"test/bbox/AP", b"resnet18", b"retinanet", b"shapes"):
        assert key in data, key
    import wandb

    assert wandb.run is None  # finished, so the next job of a sweep gets its own run


def _console_script(name: str) -> str:
    # `make install` puts the console scripts beside the interpreter running the tests
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{path} missing: install the project (`make install`) before running the tests"
    return str(path)


def test_summary_console_script_prints_json_and_rejects_unknown_keys(tmp_path):
    """The installed entry point, run from another directory, as a user would."""
    cmd = [_console_script("pyramidlab-summary"), "backbone=resnet18", "neck.out_channels=32"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["params_total"] > s["params_trainable"] > 0 and s["detector"] == "retinanet"
    bad = subprocess.run(cmd + ["neck.out_chanels=3"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "out_chanels" in bad.stderr


def test_train_console_script_fast_dev_run(tmp_path, shapes_root):
    cmd = [_console_script("pyramidlab-train"), *TINY, "debug=fdr", f"data.root={shapes_root}",
           f"paths.log_dir={tmp_path / 'runs'}", "neck.out_channels=32", "hydra.run.dir=" + str(tmp_path / "run")]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "metrics.json" in out.stdout and (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


def test_curves_follow_the_logged_validation(tmp_path, shapes_root, monkeypatch):
    """PlotCurves' AP points are the values logged at the same validation, not the previous one."""
    import csv

    from lightning_modules.callbacks import PlotCurves

    over = TINY + small_neck("fpn") + [
        "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "test=false",
    ]
    cfg = compose_cfg("train", over, tmp_path, shapes_root)
    plot = PlotCurves(str(tmp_path / "out"))
    monkeypatch.setattr(B, "build_callbacks", lambda c: [plot])
    train(cfg)
    rows = [r for r in csv.DictReader(open(tmp_path / "out" / "csv" / "metrics.csv")) if r.get("val/bbox/AP")]
    logged = [(int(r["step"]), round(100 * float(r["val/bbox/AP"]), 5)) for r in rows]
    plotted = [(step, round(v, 5)) for step, v in plot.ap["bbox/AP"]]
    assert len(plotted) == 2 and [v for _, v in plotted] == [v for _, v in logged]
    assert plot.losses["loss"] and (tmp_path / "out" / "curves.png").is_file()


def test_frozen_stages_and_norm_eval_hold_under_the_trainer(tmp_path, shapes_root):
    """Lightning never calls ``train()`` on the model at fit start (it keeps and restores each module's
    flag around validation): the frozen stem + layer1 BNs must already be in eval mode when the first
    training step runs, after the sanity validation, and with norm_eval every BN of the body."""
    import lightning as L

    seen: dict[str, list[bool]] = {}

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[key] = [m.training for m in pl_module.net.backbone.body.modules()
                         if isinstance(m, torch.nn.BatchNorm2d)]

    for key, norm_eval in (("frozen", "false"), ("norm_eval", "true")):
        cfg = compose_cfg("train", TINY + ["backbone.frozen_stages=1", f"backbone.norm_eval={norm_eval}",
                                           "+trainer.max_steps=1", "trainer.limit_val_batches=1",
                                           "trainer.num_sanity_val_steps=1"], tmp_path / key, shapes_root)
        net = CK.build_net(cfg)
        trainer = B.build_trainer(cfg, [Modes()], [])
        trainer.fit(B.build_module(cfg, net), datamodule=B.build_datamodule(cfg.data, net.with_masks))
    # ResNet-18: stem bn1 + 2 blocks x 2 BNs in layer1 = 5 frozen BNs, then 3 stages x (4 + 1 downsample)
    assert seen["frozen"] == [False] * 5 + [True] * 15
    assert seen["norm_eval"] == [False] * 20
