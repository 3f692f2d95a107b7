"""Paper-table presets: experiment=smsl/table1|table2 compose to the paper's rows and run as multiruns."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from detection.detectors import count_parameters
from lightning_modules import checkpoints as CK
from tests.conftest import CONF_DIR, SHAPES_GEN, compose_cfg


def sweep_params(experiment: str) -> dict[str, list[str]]:
    """The preset's own sweep, as Hydra's basic sweeper reads it (key -> values, in order)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    return {k: [v.strip() for v in str(p).split(",")] for k, p in cfg.hydra.sweeper.params.items()}


def rows(experiment: str) -> list[list[str]]:
    params = sweep_params(experiment)
    return [[f"{k}={v}" for k, v in zip(params, combo)] for combo in itertools.product(*params.values())]


def test_table1_rows_in_paper_order_and_parts(tmp_path):
    table = rows("smsl/table1")
    # LF, LF+CR, LF+GF, LF+GF+CR (SMSL Table 1)
    flags = [(r[1].endswith("true"), r[0].endswith("true")) for r in table]  # (CR, GF)
    assert flags == [(False, False), (True, False), (False, True), (True, True)]
    params = {}
    for row, (cr, gf) in zip(table, flags):
        cfg = compose_cfg("train", ["experiment=smsl/table1", *row], tmp_path)
        assert cfg.detector.name == "retinanet" and cfg.neck.channel_rescaling == cr and cfg.neck.global_feature == gf
        params[cr, gf] = count_parameters(CK.build_net(cfg).backbone.neck)
    # each component adds its own parameters, independently of the other
    assert params[True, True] - params[False, True] == params[True, False] - params[False, False] > 0
    assert params[True, True] - params[True, False] == params[False, True] - params[False, False] > 0


def test_table2_rows_are_the_papers_detector_neck_pairs(tmp_path):
    pairs = []
    for row in rows("smsl/table2"):
        cfg = compose_cfg("train", ["experiment=smsl/table2", *row], tmp_path)
        pairs.append((cfg.detector.name, cfg.neck._target_, cfg.neck.get("base", {}).get("_target_")))
    fpn, pafpn, smsl = "detection.necks.FPN", "detection.necks.PAFPN", "smsl.smsl_after"
    assert pairs == [
        ("retinanet", fpn, None), ("retinanet", pafpn, None), ("retinanet", smsl, fpn), ("retinanet", smsl, pafpn),
        ("mask_rcnn", fpn, None), ("mask_rcnn", smsl, fpn), ("cascade_rcnn", fpn, None), ("cascade_rcnn", smsl, fpn),
    ]


@pytest.mark.parametrize("experiment", ["smsl/table1", "smsl/table2"])
def test_presets_default_to_the_cpu_recipe_and_recipe_paper_restores_the_papers(tmp_path, experiment):
    small = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    assert (small.backbone.arch, small.neck.out_channels, small.optim.optimizer._target_) == (
        "resnet18", 64, "torch.optim.AdamW")
    paper = compose_cfg("train", [f"experiment={experiment}", "data=coco", "data.root=/coco", "recipe=paper"], tmp_path)
    assert (paper.backbone.arch, paper.backbone.frozen_stages, paper.neck.out_channels) == ("resnet50", 1, 256)
    assert (paper.optim.optimizer._target_, paper.data.min_size, paper.data.max_size) == ("torch.optim.SGD", 800, 1333)


def test_smsl_pyramid_width_is_set_once(tmp_path):
    cfg = compose_cfg("train", ["neck=smsl_pafpn", "neck.out_channels=48", "backbone=resnet18"], tmp_path)
    assert CK.build_net(cfg).backbone.out_channels == 48
    # the base has no width of its own in the config (one source: neck.out_channels); forcing one is an error
    bad = compose_cfg("train", ["neck=smsl_fpn", "+neck.base.out_channels=32", "backbone=resnet18"], tmp_path)
    with pytest.raises(Exception, match=r"neck.out_channels=256 but the base neck has out_channels=32"):
        CK.build_net(bad)


def test_table1_multirun_writes_one_metrics_file_per_row(tmp_path, shapes_root):
    """The preset through the installed CLI, as a user runs it (fast_dev_run per job)."""
    exe = Path(sys.executable).parent / "pyramidlab-train"
    sweep = tmp_path / "sweep"
    cmd = [str(exe), "experiment=smsl/table1", "debug=fdr", f"hydra.sweep.dir={sweep}", f"data.root={shapes_root}",
           "data.min_size=96", "data.max_size=128", "data.val_batch_size=2", "logger=csv", "neck.out_channels=32",
           *SHAPES_GEN]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert len(jobs) == 4
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert {"bbox/AP", "bbox/AP50", "bbox/APs", "params_trainable", "time_ms"} <= set(metrics)
        assert metrics["params_trainable"] > 0 and metrics["time_ms"] > 0
    counts = [json.loads((j / "metrics.json").read_text())["params_trainable"] for j in jobs]
    assert len(set(counts)) == 4  # four different necks
