"""pyramidlab-srfgan end to end: stages 0 -> 3 and Table 4's report, reruns, stage selection, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from tests.conftest import SHAPES_GEN

EXE = Path(sys.executable).parent / "pyramidlab-srfgan"
# tiny everything: 32-channel pyramid (the GN head needs multiples of 32), one residual block in G, 96-128 px images
TINY = ["debug=fdr", "neck.out_channels=32", "neck.generator.num_blocks=1", "data.min_size=96",
        "data.max_size=128", "data.val_batch_size=2", "data.batch_size=2", "logger=csv", *SHAPES_GEN]


def run(args: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([str(EXE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, shapes_root):
    """Every stage from a local "ImageNet" weights file (here: a seeded random ResNet-18) with the stem
    and layer1 frozen, the papers' start point: every stage must start from the file."""
    tmp = tmp_path_factory.mktemp("srfgan")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp / "r18.pth")
    run_dir = tmp / "run"
    proc = run([f"hydra.run.dir={run_dir}", f"data.root={shapes_root}", f"backbone.weights_path={tmp / 'r18.pth'}",
                "backbone.frozen_stages=1", *TINY], tmp)
    yield run_dir, proc, shapes_root, tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_every_stage_starts_from_the_backbone_weights_file(pipeline_run):
    run_dir, _, _, tmp = pipeline_run
    stem = torch.load(tmp / "r18.pth", weights_only=True)["conv1.weight"]
    keys = {"stage0": "net.model.backbone.body.body.conv1.weight",  # the detector with NN-FPN (F)
            "stage1": "target.backbone.body.body.conv1.weight",  # F inside the GAN stage
            "stage2": "net.model.backbone.body.body.conv1.weight",  # the extractor M (trained from the file)
            "stage3_A2": "net.model.backbone.body.body.conv1.weight",
            "stage3_A5": "net.model.backbone.body.body.conv1.weight"}
    for folder, key in keys.items():
        ckpt = json.loads((run_dir / folder / "stage.json").read_text())["final_checkpoint"]
        assert torch.equal(torch.load(ckpt, weights_only=True)["state_dict"][key], stem), folder


def test_rerun_skips_finished_stages(pipeline_run):
    run_dir, _, shapes_root, tmp = pipeline_run
    before = (run_dir / "stage2" / "stage.json").stat().st_mtime_ns
    proc = run([f"hydra.run.dir={run_dir}", f"data.root={shapes_root}", *TINY], tmp)
    assert proc.stdout.count("skipped") + proc.stderr.count("skipped") >= 6
    assert (run_dir / "stage2" / "stage.json").stat().st_mtime_ns == before


def test_stage_selection_reuses_external_checkpoints(pipeline_run):
    run_dir, _, shapes_root, tmp = pipeline_run
    other = tmp / "only_stage3"
    f0 = json.loads((run_dir / "stage0" / "stage.json").read_text())["checkpoint"]
    g1 = json.loads((run_dir / "stage1" / "stage.json").read_text())["checkpoint"]
    run([f"hydra.run.dir={other}", f"data.root={shapes_root}", "stages=[3]", "variants=[A2]",
         f"srf.ckpt.stage0={f0}", f"srf.ckpt.stage1={g1}", *TINY], tmp)
    rows = {r["variant"]: r for r in csv.DictReader((other / "report.csv").open())}
    assert rows["A2"]["status"] == "ok"
    assert not (other / "stage0").exists()


def test_missing_stage_output_is_one_clear_line_before_training(tmp_path, shapes_root):
    proc = run([f"hydra.run.dir={tmp_path / 'r'}", f"data.root={shapes_root}", "stages=[1]", *TINY], tmp_path, ok=False)
    assert proc.returncode != 0
    assert "stage 0 output missing" in proc.stderr and "srf.ckpt.stage0=FILE" in proc.stderr
    proc = run([f"hydra.run.dir={tmp_path / 'r2'}", f"data.root={shapes_root}", "stages=[1]",
                f"srf.ckpt.stage0={tmp_path / 'nope.ckpt'}", *TINY], tmp_path, ok=False)
    assert "srf.ckpt.stage0=" in proc.stderr and "no such file" in proc.stderr
    assert not (tmp_path / "r2" / "stage1" / "checkpoints").exists()
