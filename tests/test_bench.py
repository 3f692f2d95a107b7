"""pyramidlab-bench: a tiny bench through the real composed config writes every key of issue 6."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.bench import bench, group_options
from tests.conftest import compose_cfg

# Small everything: two necks on one detector at 128 px, a handful of steps, a small eval set.
TINY_BENCH = [
    "bench.detectors=[retinanet]",
    "bench.necks=[fpn,smsl_fpn]",
    "bench.size=[128,128]",
    "bench.backbone=resnet18",
    "bench.warmup=1",
    "bench.repeats=2",
    "bench.neck_repeats=2",
    "bench.framework.rounds=2",
    "bench.framework.warmup_steps=1",
    "bench.framework.steps=2",
    "bench.eval.images=16",
    "bench.eval.detections_per_image=20",
    "bench.eval.repeats=1",
    "bench.eval.coco.images=6",  # the COCO-sized case's path on 6 generated images
    "bench.eval.coco.image_size=[60,80]",
    "bench.eval.coco.mask_size=[30,40]",
    # one intra-op thread: on a loaded CI machine two spin-waiting OpenMP threads can be 10x slower
    "bench.threads=1",
    # the fixture's parameters: the default ones would regenerate the shared tiny dataset at 800 + 200 images
    "data.generate={num_train:16,num_val:8,image_size:128,seed:0}",
    "data.num_workers=0",
    "data.batch_size=2",
    "data.min_size=96",
    "data.max_size=128",
    "neck.out_channels=32",
    "logger=csv",
]

NECK_ROW = {"detector", "neck", "params_trainable", "params_total", "ms_median", "ms_min", "ms_max", "ratio_vs_fpn"}
# the ratio's spread across repeats: per-repeat ratios, quartiles, standard error of the median
SPREAD = {"_repeats", "_q25", "_q75", "_sem"}
EXTRA_ROW = {"detections"} | {"ratio_vs_fpn" + k for k in SPREAD}
# the neck-isolated ratio: every neck alone on the same body features
ISOLATED_ROW = {"neck_ms_median", "neck_extra_ms", "ratio_vs_fpn_neck", "ratio_vs_fpn_neck_sem"}
CPU_ROW = {"cpu_ms_median", "ratio_vs_fpn_cpu"} | {"ratio_vs_fpn_cpu" + k for k in SPREAD}


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, shapes_root):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = compose_cfg("bench", TINY_BENCH, tmp, shapes_root)
    threads = torch.get_num_threads()
    results = bench(cfg)
    yield tmp / "out", results, threads
    shutil.rmtree(tmp, ignore_errors=True)


def test_tiny_bench_writes_every_key(tiny_bench):
    out, results, _ = tiny_bench
    saved = json.loads((out / "bench.json").read_text())
    assert saved == json.loads(json.dumps(results))  # what was returned is what was written

    rows = {r["neck"]: r for r in saved["necks"]}
    assert set(rows) == {"fpn", "smsl_fpn"}
    on_cpu = saved["device"]["device"] == "cpu"
    for r in rows.values():
        assert set(r) == NECK_ROW | EXTRA_ROW | ISOLATED_ROW | (CPU_ROW if on_cpu else set())
        assert r["detector"] == "retinanet" and r["neck_ms_median"] > 0 and r["ratio_vs_fpn_neck_sem"] >= 0
        # 1 + the neck's extra time over the whole reference model's
        assert r["ratio_vs_fpn_neck"] == pytest.approx(1 + r["neck_extra_ms"] / rows["fpn"]["ms_median"], abs=2e-4)
        assert len(r["ratio_vs_fpn_repeats"]) == 2 and r["ratio_vs_fpn_q25"] <= r["ratio_vs_fpn_q75"]
        assert r["ratio_vs_fpn_sem"] >= 0
        assert 0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"]
        assert r["params_total"] >= r["params_trainable"] > 0
    assert rows["fpn"]["ratio_vs_fpn"] == 1.0 and rows["fpn"].get("ratio_vs_fpn_cpu", 1.0) == 1.0
    assert rows["fpn"]["ratio_vs_fpn_neck"] == 1.0 and rows["fpn"]["neck_extra_ms"] == 0
    assert rows["smsl_fpn"]["ratio_vs_fpn"] > 0
    # SMSL adds parameters to the same detector (+0.98M at C=256, L=5, r=8 in the paper)
    assert rows["smsl_fpn"]["params_trainable"] > rows["fpn"]["params_trainable"]

    f = saved["framework"]
    assert f["lightning_img_s"] > 0 and f["plain_img_s"] > 0
    assert f["ratio"] == pytest.approx(f["plain_img_s"] / f["lightning_img_s"], rel=1e-3)
    assert len(f["lightning_img_s_rounds"]) == len(f["plain_img_s_rounds"]) == 2
    assert f["ratio_cpu"] > 0 and f["lightning_cpu_ms_per_img"] > 0
    assert "validation" in f["lightning_arm"]["excluded"]
    # where a step's time goes: the phases are measured parts of the step (forward and backward dominate)
    ph = f["plain_phase_ms"]
    assert set(ph) == {"data", "forward", "backward", "optimizer", "other"}
    assert ph["forward"] > 0 and ph["backward"] > 0 and ph["optimizer"] > 0 and ph["data"] >= 0
    assert sum(v for k, v in ph.items() if k != "other") <= f["plain_step_ms"] * 1.01
    assert "Where a plain-loop step" in (tiny_bench[0] / "bench.md").read_text()

    d = saved["data"]
    assert d["loader_img_s"] > 0 and d["step_img_s"] > 0 and 0 <= d["loader_wait_frac"] < 1

    e = saved["eval"]
    assert e["pycocotools_s"] > 0 and e["faster_coco_eval_s"] > 0 and e["hotcoco_s"] > 0
    assert 0 < e["ap_pycocotools"] < 1  # jittered true positives among false positives: mid-range
    assert e["ap_faster"] == pytest.approx(e["ap_pycocotools"], abs=1e-6)
    assert e["ap_hotcoco"] == pytest.approx(e["ap_pycocotools"], abs=1e-6)
    assert e["speedup_fastest"] == pytest.approx(e["pycocotools_s"] / e[f"{e['fastest']}_s"])
    for prof in e["profile"].values():  # where the time goes: ours (update, datasets) and the backend's
        assert prof["update_s"] > 0 and prof["datasets_s"] > 0 and prof["cocoeval_s"] > 0
    c = e["coco"]
    assert c["images"] == 6 and set(c["bbox"]["backends"]) == {"pycocotools", "faster_coco_eval", "hotcoco"}
    for t in ("bbox", "segm"):
        aps = [r["ap"] for r in c[t]["backends"].values()]
        assert 0 < aps[0] < 1 and max(aps) - min(aps) < 1e-6
    assert e["images"] == 16 and e["detections"] == 16 * 20
    lib = e["library"]  # the libraries alone, on the same detections as a COCO results list
    assert lib["pycocotools_s"] > 0 and lib["faster_coco_eval_s"] > 0
    assert lib["ap_faster"] == pytest.approx(lib["ap_pycocotools"], abs=1e-6)
    assert lib["ap_pycocotools"] == pytest.approx(e["ap_pycocotools"], abs=1e-3)  # boxes rounded to 0.01 px

    dev = saved["device"]
    assert dev["torch"] and dev["torch_threads"] >= 1 and dev["cpu"]
    assert saved["gpu"] is None or all(r["speedup_vs_fp32"] > 0 for r in saved["gpu"])
    assert {t["what"] for t in saved["targets"]} >= {"retinanet smsl_fpn / fpn latency"}
    smsl = next(t for t in saved["targets"] if t["what"] == "retinanet smsl_fpn / fpn latency")
    assert smsl["measure"] == "neck-isolated" and smsl["value"] == rows["smsl_fpn"]["ratio_vs_fpn_neck"]


def test_tiny_bench_markdown_has_tables_and_command(tiny_bench):
    out, _, _ = tiny_bench
    md = (out / "bench.md").read_text()
    assert md.count("| detector | neck |") == 1 and "| retinanet | smsl_fpn |" in md
    assert "pyramidlab-bench" in md and "bench.necks=[fpn,smsl_fpn]" in md
    for title in ("## Framework", "## Data", "## COCO evaluation", "## Targets"):
        assert title in md
    assert not list(out.glob(".bench.*.tmp"))  # atomic writes leave no temp files behind


def test_bench_leaves_torch_threads_as_found(tiny_bench):
    _, results, threads = tiny_bench
    assert results["device"]["torch_threads"] == 1  # bench.threads=1 while it ran
    assert torch.get_num_threads() == threads  # process-wide setting restored


def test_sections_narrow_a_run(tmp_path, shapes_root):
    cfg = compose_cfg("bench", TINY_BENCH + ["bench.sections=[eval]", "bench.eval.split=val"], tmp_path, shapes_root)
    results = bench(cfg)
    assert results["necks"] is None and results["framework"] is None and results["data"] is None
    assert results["eval"]["split"] == "val" and results["eval"]["images"] == 8  # the whole tiny val split


@pytest.mark.parametrize(
    "override,key,value,group",
    [
        ("bench.necks=[fpn,no_such_neck]", "bench.necks", "no_such_neck", "neck"),
        ("bench.detectors=[yolo]", "bench.detectors", "yolo", "detector"),
    ],
)
def test_unknown_name_is_one_line_with_choices(tmp_path, override, key, value, group):
    cfg = compose_cfg("bench", [override], tmp_path)
    with pytest.raises(ValueError) as e:
        bench(cfg)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and repr(value) in msg and f"conf/{group}/" in msg
    assert all(choice in msg for choice in group_options(group))


def test_bad_section_and_size_name_their_key(tmp_path):
    for override, key in (("bench.sections=[necks,speed]", "bench.sections"), ("bench.size=[800]", "bench.size"),
                          ("bench.repeats=0", "bench.repeats")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            bench(compose_cfg("bench", [override], tmp_path))


def test_console_script_rejects_unknown_neck(tmp_path):
    """The installed entry point, from another directory: fails fast, before building anything."""
    script = Path(sys.executable).parent / "pyramidlab-bench"
    assert script.is_file(), f"{script} missing: install the project (`make install`)"
    cmd = [str(script), "bench.necks=[fpn,srf_nope]", f"paths.log_dir={tmp_path / 'runs'}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "bench.necks: unknown neck 'srf_nope'" in out.stderr and "smsl_fpn" in out.stderr


def test_serialized_records_hold_the_loader_records(tmp_path):
    """Records in one NumPy buffer (detection/data/serialize.py): the same items as the dict they replace,
    read without a Python object per record, and the loader's items unchanged (masks from polygons and RLE)."""
    import numpy as np

    from detection.data.coco import CocoDetection
    from detection.data.serialize import SerializedList, SerializedRecords
    from tests.coco_fixture import _make_coco

    items = [{"a": np.arange(k), "s": "x" * k} for k in range(5)]
    sl = SerializedList(items)
    assert len(sl) == 5 and sl[-1]["s"] == "xxxx" and (sl[3]["a"] == np.arange(3)).all()
    with pytest.raises(IndexError):
        sl[5]
    rec = SerializedRecords({7: {"v": 1}, 3: {"v": 2}})
    assert list(rec) == [3, 7] and rec[7] == {"v": 1} and 5 not in rec and 3 in rec
    with pytest.raises(KeyError):
        rec[5]
    root = _make_coco(tmp_path / "coco")
    ds = CocoDetection(root, "s", train=False, with_masks=True)
    assert isinstance(ds._anns, SerializedRecords) and len(ds._anns) == 5
    for index in range(len(ds)):
        _, t = ds[index]
        # masks decoded from the stored segmentations equal pycocotools' annToMask of the file
        for k, aid in enumerate(ds._anns[t["image_id"]]["ann_ids"].tolist()):
            assert (t["masks"][k].numpy() == ds.coco.annToMask(ds.coco.anns[aid])).all()


def test_data_scale_section_measures_both_record_layouts(tmp_path, shapes_root):
    over = TINY_BENCH + [
        "bench.sections=[data_scale]", "bench.data_scale.images=60", "bench.data_scale.annotations=400",
        "bench.data_scale.batches=6", "bench.data_scale.warmup_batches=2", "bench.data_scale.num_workers=2",
        f"bench.data_scale.cache_dir={tmp_path / 'cache'}", "bench.data_scale.legacy=false",
        "bench.data_scale.image_size=[48,64]",
        # the loader at its own settings against a training step on what it yields, in miniature
        "bench.data_scale.speed={num_workers:2,batch_size:2,batches:3,warmup_batches:1,min_size:64,max_size:96,"
        "step_steps:1,step_warmup:0}",
    ]
    results = bench(compose_cfg("bench", over, tmp_path, shapes_root))
    d = results["data_scale"]
    assert set(d["variants"]) == {"serialized"}  # (legacy=true adds "dict": one more process, same code)
    for v in d["variants"].values():
        assert v["annotations"] == 400 and v["parse_index_s"] >= 0 and v["peak_rss_mb"] > 0
        assert v["workers_pss_start_mb"] > 0 and v["loader_img_s"] > 0 and v["num_workers"] == 2
    assert d["images"] <= 60 and "COCO-scale loader" in json.dumps(results["targets"])
    sp = d["variants"]["serialized"]["speed"]
    assert sp["loader_img_s"] == d["loader_coco_img_s"] > 0 and sp["min_size"] == 64 and d["step_coco_img_s"] > 0
    h, w = sp["image_hw"]  # the step is timed at the size the loader's transforms produced
    assert (min(h, w) == 64 and max(h, w) <= 96) or max(h, w) == 96
    assert d["loader_over_step_coco"] == pytest.approx(d["loader_coco_img_s"] / d["step_coco_img_s"], rel=0.01)
    ratio = next(t for t in results["targets"] if t["what"].startswith("COCO-scale loader / training step"))
    assert ratio["value"] == d["loader_over_step_coco"] and ratio["met"] == (ratio["value"] >= 1)
