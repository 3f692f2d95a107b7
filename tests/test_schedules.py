"""schedule=1x|2x|3x and the SMSL Table 3 preset, composed as the CLI composes them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONF_DIR

# COCO train2017 images, and Detectron2's schedules: (iterations, drop iterations) at 16 images per step
COCO_TRAIN_IMAGES = 118_287
DETECTRON2 = {"1x": (90_000, (60_000, 80_000)), "2x": (180_000, (120_000, 160_000)),
              "3x": (270_000, (210_000, 250_000))}
EXPECTED = {"1x": (12, [8, 11]), "2x": (24, [16, 22]), "3x": (37, [28, 34])}


def _compose(overrides: list[str], tmp: Path, hydra_cfg: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={tmp}", *overrides], return_hydra_config=hydra_cfg)


def _epochs(iters: int) -> float:
    return iters * 16 / COCO_TRAIN_IMAGES


@pytest.mark.parametrize("name", ["1x", "2x", "3x"])
def test_schedule_epochs_and_drops_follow_detectron2_iterations(tmp_path, name):
    epochs, drops = EXPECTED[name]
    iters, drop_iters = DETECTRON2[name]
    # the configs' epochs are Detectron2's iterations over COCO, rounded (1x: 12.2 -> 12, 8.1 -> 8, 10.8 -> 11)
    assert round(_epochs(iters)) == epochs and [round(_epochs(d)) for d in drop_iters] == drops
    for recipe in ("paper", "shapes_cpu"):
        cfg = _compose([f"recipe={recipe}", f"schedule={name}"], tmp_path)
        assert cfg.trainer.max_epochs == epochs
        assert cfg.optim.scheduler.name == "step"
        assert list(cfg.optim.scheduler.milestones) == drops and cfg.optim.scheduler.gamma == 0.1
    # the schedule changes the length, not the recipe's optimizer
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW"


def test_no_schedule_keeps_each_recipe_as_it_was(tmp_path):
    paper = _compose([], tmp_path)
    assert paper.get("schedule") is None
    assert paper.trainer.max_epochs == 12 and list(paper.optim.scheduler.milestones) == [8, 11]
    cpu = _compose(["recipe=shapes_cpu"], tmp_path)
    assert cpu.trainer.max_epochs == 5 and cpu.optim.scheduler.name == "cosine"
    shapes = _compose(["experiment=shapes_retinanet"], tmp_path)
    assert shapes.optim.scheduler.name == "cosine"
    with pytest.raises(Exception, match="4x"):
        _compose(["schedule=4x"], tmp_path)


def test_smsl_table3_preset_is_retinanet_r101_2x_scale_jitter_fpn_vs_smsl(tmp_path):
    cfg = _compose(["experiment=smsl/table3", "data.root=/coco"], tmp_path, hydra_cfg=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params.neck == "fpn,smsl_fpn"
    for neck in ("fpn", "smsl_fpn"):  # each job of the sweep
        job = _compose(["experiment=smsl/table3", "data.root=/coco", f"neck={neck}"], tmp_path)
        assert job.neck._target_ == {"fpn": "detection.necks.FPN", "smsl_fpn": "smsl.smsl_after"}[neck]
        assert job.data.name == "coco" and job.detector.name == "retinanet" and job.backbone.arch == "resnet101"
        assert job.trainer.max_epochs == 24 and list(job.optim.scheduler.milestones) == [16, 22]
        assert list(job.data.scale_jitter) == [640, 672, 704, 736, 768, 800]
        assert job.data.min_size == 800 and job.data.max_size == 1333  # tested at 800 x 1333
        assert job.optim.optimizer._target_ == "torch.optim.SGD"
