"""recipe=paper means the papers' settings: what the composed configs hold, checked against the text.

SRF-GAN Sec. 5.1 (stage schedules in iterations of 16 images), the detectors' base learning rates,
SMSL Sec. 4.5 (two-stage rows at 640 x 640 with a linearly scaled lr), and which checkpoint and
split the reported numbers come from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_modules.optim import build_optimizer
from lightning_modules.srfgan_pipeline import stage_config
from tests.conftest import CONF_DIR, TINY, compose_cfg

COCO = ["data=coco", "data.root=/coco"]


def srfgan_paper(tmp_path: Path, *extra: str):
    return compose_cfg("srfgan", ["recipe=paper", *COCO, "detector=mask_rcnn", *extra], tmp_path)


def test_srfgan_paper_schedule_is_section_5_1(tmp_path):
    cfg = srfgan_paper(tmp_path)
    s1, s2 = cfg.srf.stage1, cfg.srf.stage2
    # "150k iterations ... a learning rate of 0.001, and decay it by a factor of 0.1 at 120k iterations"
    assert s1.iterations == 150_000 and list(s1.scheduler.milestone_iters) == [120_000] and s1.scheduler.gamma == 0.1
    assert s1.optimizer_g.lr == s1.optimizer_d.lr == 0.001
    assert s1.optimizer_g.momentum == 0.9 and s1.optimizer_g.weight_decay == 1e-4
    # "270k iterations with a mini-batch including 16 target images ... 0.02 ... at 210k and 250k"
    assert s2.iterations == 270_000 and list(s2.scheduler.milestone_iters) == [210_000, 250_000]
    assert s2.optimizer.lr == s2.optimizer_d.lr == 0.02
    # stage 3 (and stage 0): the detector's own schedule, 1x = 12 epochs, 3x = 37
    assert cfg.srf.stage3.max_epochs is None and cfg.trainer.max_epochs == 12
    assert srfgan_paper(tmp_path, "schedule=3x").trainer.max_epochs == 37


def test_srfgan_paper_iterations_and_lrs_scale_with_the_batch(tmp_path):
    # 2 images per step instead of 16: 8x the iterations and milestones, 1/8 of every lr
    cfg = srfgan_paper(tmp_path, "data.batch_size=2")
    s1 = stage_config(cfg, tmp_path / "s1", "stage1")
    assert s1.trainer.max_steps == 2 * 1_200_000 and s1.trainer.max_epochs == -1  # 2 optimizer steps per iteration
    assert list(s1.srf.stage1.scheduler.milestone_iters) == [960_000]
    assert build_optimizer(s1, s1.srf.stage1.optimizer_g, "srf.stage1.optimizer_g").keywords["lr"] == pytest.approx(0.001 / 8)
    s2 = stage_config(cfg, tmp_path / "s2", "stage2")
    assert list(s2.srf.stage2.scheduler.milestone_iters) == [1_680_000, 2_000_000]
    assert build_optimizer(s2, s2.srf.stage2.optimizer_d, "srf.stage2.optimizer_d").keywords["lr"] == pytest.approx(0.02 / 8)
    # 16 images (8 GPUs x 2): the paper's numbers exactly
    full = stage_config(srfgan_paper(tmp_path, "data.batch_size=16"), tmp_path / "f", "stage2")
    assert full.trainer.max_steps == 2 * 270_000 and list(full.srf.stage2.scheduler.milestone_iters) == [210_000, 250_000]
    s3 = stage_config(cfg, tmp_path / "s3", "stage3")
    assert s3.trainer.max_epochs == 12


def test_srfgan_paper_settings_in_cfg_job():
    """`pyramidlab-srfgan recipe=paper data=coco data.root=DIR detector=mask_rcnn --cfg job` shows the numbers."""
    exe = Path(sys.executable).parent / "pyramidlab-srfgan"
    proc = subprocess.run([str(exe), "recipe=paper", *COCO, "detector=mask_rcnn", "--cfg", "job"],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    srf = OmegaConf.create(proc.stdout).srf
    assert (srf.stage1.iterations, srf.stage2.iterations) == (150_000, 270_000)
    assert (srf.stage1.optimizer_g.lr, srf.stage2.optimizer.lr, srf.stage2.optimizer_d.lr) == (0.001, 0.02, 0.02)


def test_srfgan_cpu_recipe_keeps_epoch_lengths(tmp_path):
    cfg = compose_cfg("srfgan", [], tmp_path)
    assert [cfg.srf[f"stage{i}"].max_epochs for i in range(4)] == [3, 2, 2, 3]
    assert stage_config(cfg, tmp_path / "s", "stage1").trainer.max_epochs == 2


def test_srfgan_finetune_recipe_is_make_trains_with_the_cpu_stage_lengths(tmp_path):
    """make srfgan: the target detectors (A1, stage 3) train exactly as make train's detector does."""
    cfg = compose_cfg("srfgan", ["recipe=shapes_finetune", "detector=fcos"], tmp_path)
    assert [cfg.srf[f"stage{i}"].max_epochs for i in range(4)] == [3, 2, 2, 3]
    train = compose_cfg("train", ["experiment=shapes_fcos"], tmp_path)
    for stage in ("stage0", "stage3"):
        s = stage_config(cfg, tmp_path / stage, stage)
        assert s.trainer.max_epochs == train.trainer.max_epochs == 3
        assert s.backbone.weights_path == "embedded" and s.backbone.frozen_stages == 1
        assert s.data.batch_size == train.data.batch_size and s.optim.optimizer.lr == train.optim.optimizer.lr


@pytest.mark.parametrize(("detector", "lr"), [("retinanet", 0.01), ("fcos", 0.01), ("faster_rcnn", 0.02),
                                              ("mask_rcnn", 0.02), ("cascade_rcnn", 0.02),
                                              ("cascade_mask_rcnn", 0.02), ("centermask", 0.01)])
def test_each_detector_carries_its_base_lr_at_recipe_paper(tmp_path, detector, lr):
    cfg = compose_cfg("train", ["recipe=paper", *COCO, f"detector={detector}", "data.batch_size=16"], tmp_path)
    assert cfg.detector.base_lr == lr and cfg.optim.optimizer.lr == lr
    assert build_optimizer(cfg).keywords["lr"] == pytest.approx(lr)  # 16 images: unscaled
    # 8 images: linearly scaled (SMSL Sec. 4.5)
    half = compose_cfg("train", ["recipe=paper", *COCO, f"detector={detector}", "data.batch_size=8"], tmp_path)
    assert build_optimizer(half).keywords["lr"] == pytest.approx(lr / 2)


def test_every_detector_config_has_a_base_lr():
    for path in sorted(Path(CONF_DIR, "detector").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        inherits = [d for d in cfg.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        assert "base_lr" in cfg or inherits, path.name


@pytest.mark.parametrize("row", ["mask_rcnn_fpn", "mask_rcnn_smsl_fpn", "cascade_rcnn_fpn", "cascade_rcnn_smsl_fpn"])
def test_smsl_table2_two_stage_rows_at_640_with_scaled_lr(tmp_path, row):
    cfg = compose_cfg("train", ["experiment=smsl/table2", f"+smsl_table2={row}", "recipe=paper", *COCO,
                                "data.batch_size=4"], tmp_path)
    assert (cfg.data.min_size, cfg.data.max_size) == (640, 640)
    assert build_optimizer(cfg).keywords["lr"] == pytest.approx(0.02 * 4 / 16)
    retina = compose_cfg("train", ["experiment=smsl/table2", "+smsl_table2=retinanet_fpn", "recipe=paper", *COCO],
                         tmp_path)
    assert (retina.data.min_size, retina.data.max_size, retina.optim.optimizer.lr) == (800, 1333, 0.01)


def test_selection_and_reporting_never_share_a_split(tmp_path, shapes_root):
    """Embedded data: best by val, reported on the third split `test`. recipe=paper: the last weights."""
    from lightning_modules.train import train

    assert compose_cfg("train", ["recipe=paper", *COCO], tmp_path).eval.checkpoint == "last"
    cfg = compose_cfg("train", TINY + ["experiment=shapes_retinanet", "neck.out_channels=32", "trainer.max_epochs=1",
                                       "trainer.limit_train_batches=2", "trainer.limit_val_batches=2"],
                      tmp_path, shapes_root)
    assert cfg.data.test_split == "test" and cfg.eval.checkpoint == "best"
    train(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_split"] == "test" and metrics["eval_checkpoint"] == "best"
    assert metrics["checkpoint"].endswith("best.ckpt")
    def images(split: str) -> set:
        return {(im["id"], im["file_name"]) for im in
                json.loads((shapes_root / "annotations" / f"instances_{split}.json").read_text())["images"]}

    test, val, train_ = images("test"), images("val"), images("train")
    assert len(test) == 8 and not {i for i, _ in test} & {i for i, _ in val | train_}
