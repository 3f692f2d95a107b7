"""SRF-GAN's ablation tables as one command each (`pyramidlab-srfgan experiment=srfgan/tableN`), at
debug=fdr on the tiny embedded data: one report row per table row, shared stages trained once."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SHAPES_GEN

EXE = Path(sys.executable).parent / "pyramidlab-srfgan"
TINY = ["debug=fdr", "neck.out_channels=32", "neck.generator.num_blocks=1", "neck.generator.mid_channels=8",
        "srf.discriminator.channels=[8,8,8]", "data.min_size=64", "data.max_size=96", "data.val_batch_size=2",
        "data.batch_size=2", "logger=csv", "backbone.frozen_stages=0", "callbacks=none", *SHAPES_GEN]
# callbacks=none: no curves / validation images / checkpoints per job (a fast_dev_run keeps none anyway);
# stage 1 still gets its Fig. 2 callback from the pipeline


def run_table(name: str, tmp: Path, root: Path, *extra: str) -> tuple[Path, list[dict], str]:
    out = tmp / name
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = [str(EXE), f"experiment=srfgan/{name}", f"data.root={root}", *TINY, *extra]
    args.append(f"hydra.sweep.dir={out}" if name != "table5" else f"hydra.run.dir={out}")
    proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "report.csv").open()))
    return out, rows, proc.stdout + proc.stderr


def trained(path: Path) -> int:
    """How many times a stage trained in this sweep: one stage.json per folder that trained it."""
    return len(list(path.rglob("stage.json")))


@pytest.mark.parametrize("name", ["table1", "table3"])
def test_tables_that_reuse_one_extractor_across_target_detectors(tmp_path, shapes_root, name):
    out, rows, _ = run_table(name, tmp_path, shapes_root)
    assert all(r["status"] == "ok" for r in rows), rows
    if name == "table1":  # detector x {NN, G, M}
        assert len(rows) == 9
        assert {(r["detector"], r["variants"]) for r in rows} == {
            (d, v) for d in ("retinanet", "faster_rcnn", "mask_rcnn") for v in ("[NN]", "[A2]", "[A5]")}
        shared = sorted(p.name for p in (out / "shared").iterdir())
        assert shared == ["stage0", "stage1", "stage2_mask_rcnn"]  # F, G, M trained once for all rows
    else:  # baseline + one row per extractor head, per target detector
        assert len(rows) == 6
        shared = sorted(p.name for p in (out / "shared").iterdir())
        assert shared == ["stage0", "stage1", "stage2_mask_rcnn", "stage2_retinanet"]
        # a Mask R-CNN extractor (P2-P5) against F on P2-P5, then into a RetinaNet target (P3-P7): matched by stride
        s2 = json.loads((out / "shared" / "stage2_mask_rcnn" / "stage.json").read_text())
        assert torch.load(s2["final_checkpoint"], weights_only=True)["srfgan"]["strides"] == [4, 8, 16, 32]
        (job,) = [p for p in out.iterdir() if p.name.endswith("retinanet_from_mask_rcnn")]
        assert json.loads((job / "stage3_A5" / "stage.json").read_text())["transfer"]["matched_strides"] == [8, 16, 32]
        s2r = json.loads((out / "shared" / "stage2_retinanet" / "stage.json").read_text())  # P3-P5 vs F's P3-P5
        assert torch.load(s2r["final_checkpoint"], weights_only=True)["srfgan"]["pairs"] == [[8, 8], [16, 16], [32, 32]]
    # no job trained a stage of its own other than its stage 3
    for job in (p for p in out.iterdir() if (p / ".hydra").is_dir()):
        assert [p.name for p in job.iterdir() if p.name.startswith("stage")] == [
            json.loads((job / "metrics.json").read_text())["folder"]]


@pytest.mark.parametrize(("name", "rows_expected", "shared"), [
    ("table5", ["A1", "BL", "BC", "A5"], None),
    ("table6", ["nearest", "bicubic", "bilinear"], ["stage0"]),
    ("table7", ["different", "same"], ["stage0", "stage1"]),
])
def test_single_detector_tables(tmp_path, shapes_root, name, rows_expected, shared):
    out, rows, _ = run_table(name, tmp_path, shapes_root, "detector=retinanet")
    assert all(r["status"] == "ok" for r in rows), rows
    key = {"table5": "variant", "table6": "srf.degradation", "table7": "srf.level_matching"}[name]
    assert [r[key] for r in rows] == rows_expected
    # the report says which weights and images its numbers come from (the embedded data: best by val, on test)
    assert "checkpoint on split `test`" in (out / "report.md").read_text()
    if shared:
        assert sorted(p.name for p in (out / "shared").iterdir()) == shared
        assert trained(out / "shared") == len(shared)
    if name == "table7":  # the same command again finishes the sweep: both jobs completed, so both skipped
        before = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
        _, again, log = run_table(name, tmp_path, shapes_root, "detector=retinanet")
        assert "2 jobs, 2 skip, 0 resume, 0 start" in log and again == rows
        assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == before
    if name == "table5":  # BL/BC train the detector with a fixed interpolation: FPN's parameters, no G
        params = {r["variant"]: float(r["params [M]"]) for r in rows}
        assert params["A1"] == params["BL"] == params["BC"] < params["A5"]
