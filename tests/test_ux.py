"""A researcher's day: predict on image files, validation images, sweep resume, console, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules import checkpoints as CK
from lightning_modules import outputs as OUT
from tests.conftest import TINY, compose_cfg, small_neck

SHAPES_IDS = [1, 2, 3, 5, 7, 8, 11, 13]


def save_detector_checkpoint(tmp: Path, shapes_root: Path, overrides: list[str]) -> Path:
    """A pyramidlab checkpoint of an untrained tiny detector (what training stores: net.*, config, ids)."""
    cfg = compose_cfg("train", TINY + small_neck("fpn") + overrides, tmp, shapes_root)
    torch.manual_seed(0)
    net = CK.build_net(cfg)
    path = tmp / "tiny.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "pyramidlab_config": OUT.resolved_config(cfg), "category_ids": SHAPES_IDS}, path)
    return path


@pytest.fixture(scope="module")
def retinanet_ckpt(tmp_path_factory, shapes_root) -> Path:
    return save_detector_checkpoint(tmp_path_factory.mktemp("ckpt"), shapes_root, [])


# ------------------------------------------------------------------------------ predict
def test_predict_draws_every_image_and_writes_coco_results(tmp_path, shapes_root, retinanet_ckpt):
    from torchvision.io import decode_image

    from lightning_modules.predict import predict
    from lightning_modules.visualize import class_color

    src = shapes_root / "val"
    files = sorted(src.glob("*.jpg"))
    # threshold 0 and one detection per image: an untrained model still puts exactly one box on each
    cfg = compose_cfg("predict", [f"ckpt_path={retinanet_ckpt}", f"input={src}", "score_threshold=0.0",
                                  "max_detections=1", "box_width=1"], tmp_path)
    paths = predict(cfg)
    out = tmp_path / "out"
    written = sorted((out / "images").glob("*.png"))
    assert [p.stem for p in written] == [f.stem for f in files]
    dets = json.loads((out / "detections_bbox.json").read_text())
    index = json.loads((out / "images.json").read_text())
    assert [i["file_name"] for i in index] == [str(f) for f in files]
    assert sorted(d["image_id"] for d in dets) == list(range(len(files)))
    assert paths["detections_bbox"] == out / "detections_bbox.json"
    for det in dets:
        original = decode_image(str(files[det["image_id"]]))
        drawn = decode_image(str(written[det["image_id"]]))
        assert drawn.shape == original.shape  # drawn in the file's own pixels
        assert det["category_id"] in SHAPES_IDS and 0.0 <= det["score"] <= 1.0
        x, y, w, h = det["bbox"]
        # the box's left edge, halfway down, has the class colour (the label text sits inside the box)
        color = class_color(SHAPES_IDS.index(det["category_id"]))
        assert tuple(drawn[:, int(y + h / 2), int(x)].tolist()) == color


def test_predict_single_file_and_bad_input(tmp_path, retinanet_ckpt, shapes_root):
    from lightning_modules.predict import predict

    image = next((shapes_root / "val").glob("*.jpg"))
    cfg = compose_cfg("predict", [f"ckpt_path={retinanet_ckpt}", f"input={image}"], tmp_path)
    predict(cfg)
    assert (tmp_path / "out" / "images" / f"{image.stem}.png").is_file()
    cfg = compose_cfg("predict", [f"ckpt_path={retinanet_ckpt}", f"input={tmp_path / 'nope'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match="input=.*nope: no such file or folder"):
        predict(cfg)
    cfg = compose_cfg("predict", [f"ckpt_path={retinanet_ckpt}", f"input={image}", "score_threshold=2"], tmp_path)
    with pytest.raises(ValueError, match=r"score_threshold=2.0: expected a score in \[0, 1\]"):
        predict(cfg)


def test_draw_detections_masks_and_order():
    from lightning_modules.visualize import class_color, draw_detections

    image = torch.zeros(3, 40, 50, dtype=torch.uint8)
    masks = torch.zeros(2, 40, 50, dtype=torch.bool)
    masks[0, 30:35, 40:45] = True
    pred = {"boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0], [5.0, 5.0, 30.0, 25.0]]),
            "labels": torch.tensor([0, 3]), "scores": torch.tensor([0.9, 0.5]), "masks": masks}
    out = draw_detections(image, pred, ["a", "b", "c", "d"], box_width=1, mask_alpha=1.0)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert tuple(out[:, 32, 42].tolist()) == class_color(0)  # mask of label 0, opaque
    # the higher score is drawn last: where the two outlines cross, label 0's colour wins
    assert tuple(out[:, 20, 5].tolist()) == class_color(0)
    assert tuple(out[:, 25, 30].tolist()) == class_color(3)


# ------------------------------------------------------------------------ val images
def test_validation_images_to_run_dir_and_tensorboard(tmp_path, shapes_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_modules.train import train

    # debug=limit, one epoch of one batch (fast_dev_run would replace the loggers with a dummy)
    over = TINY + small_neck("fpn") + ["debug=limit", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                                       "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                                       "logger=tensorboard", "callbacks.val_images.num_images=2"]
    cfg = compose_cfg("train", over, tmp_path, shapes_root)
    train(cfg)
    pngs = sorted((tmp_path / "out" / "val_images").glob("step*.png"))
    assert len(pngs) == 1
    from torchvision.io import decode_image

    grid = decode_image(str(pngs[0]))
    # two rows (ground truth | predictions) of the resized val images: 96 px short side, <= 128 long
    assert grid.shape[0] == 3 and 2 * 96 <= grid.shape[1] <= 2 * 128 + 4 and grid.shape[2] >= 2 * 96
    events = sorted((tmp_path / "out").glob("**/events.out.tfevents.*"))
    assert events
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e), size_guidance={"images": 0})
        acc.Reload()
        tags |= set(acc.Tags()["images"])
    assert {"val/images/0", "val/images/1"} <= tags
    assert "curves" in tags  # the training curves figure reaches TensorBoard too


def test_validation_images_off_with_zero(tmp_path, shapes_root):
    from lightning_modules.train import train

    over = TINY + small_neck("fpn") + ["debug=fdr", "callbacks.val_images.num_images=0"]
    train(compose_cfg("train", over, tmp_path, shapes_root))
    assert not (tmp_path / "out" / "val_images").exists()
    assert OmegaConf.select(compose_cfg("train", [], tmp_path), "callbacks.val_images.num_images") == 4


# ------------------------------------------------------------------------------ debug
@pytest.mark.parametrize("debug", ["fdr", "limit", "profiler", "overfit"])
def test_debug_configs_write_to_runs_debug(tmp_path, debug):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", [f"debug={debug}"], return_hydra_config=True)
    assert cfg.hydra.run._get_node("dir")._value().startswith("${paths.log_dir}/debug/${task_name}/")
    assert cfg.hydra.sweep._get_node("dir")._value().startswith("${paths.log_dir}/debug/${task_name}/multirun_")
    assert cfg.data.num_workers == 0
    if debug == "limit":
        assert cfg.trainer.limit_train_batches == 3 and cfg.trainer.max_epochs == 2
    if debug == "profiler":
        assert cfg.trainer.profiler._target_.endswith("SimpleProfiler")


# ------------------------------------------------------------------------- sweep resume
def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (size, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _sweep_args(shapes_root: Path, tmp: Path, sweep: Path) -> list[str]:
    from tests.test_sweeps import SMALL

    # one epoch of one batch: real checkpoints (fast_dev_run writes none), in seconds
    return [*SMALL, "debug=limit", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "callbacks.val_images.num_images=0",
            "neck.out_channels=16", f"data.root={shapes_root}", f"paths.log_dir={tmp / 'runs'}",
            f"hydra.sweep.dir={sweep}"]


def test_rerun_of_a_sweep_skips_completed_resumes_and_starts(tmp_path, shapes_root, monkeypatch, capsys):
    import shutil

    from lightning_modules import train as T
    from tests.test_sweeps import read_csv, run_main

    sweep = tmp_path / "sweep"
    args = ["-m", *_sweep_args(shapes_root, tmp_path, sweep), "seed=1,2,3"]
    assert run_main(monkeypatch, T.main, args) == 0
    first = capsys.readouterr().out.splitlines()
    assert sum(line.strip() == "pyramidlab-train" for line in first) == 0  # the jobs do not print their config
    assert sum(line.startswith(f"sweep {sweep}") for line in first) == 1  # the sweep prints it, once
    jobs = {int(p.name.split("_")[0]): p for p in sweep.iterdir() if (p / ".hydra").is_dir()}
    assert sorted(jobs) == [0, 1, 2] and (jobs[1] / "checkpoints" / "last.ckpt").is_file()
    # job 1 "crashed" after its checkpoint; job 2 never started
    (jobs[1] / "metrics.json").unlink()
    shutil.rmtree(jobs[2])
    before = _snapshot(jobs[0])
    capsys.readouterr()

    assert run_main(monkeypatch, T.main, [*args, "hydra.callbacks.report.dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "3 jobs, 1 skip, 1 resume, 1 start" in out
    plan = {line.split()[1]: line.split()[2] for line in out.splitlines() if line.strip().startswith("job ")}
    assert plan == {"0": "skip", "1": "resume", "2": "start"}
    assert not jobs[2].exists() and not (jobs[1] / "metrics.json").exists()  # a dry run runs nothing

    assert run_main(monkeypatch, T.main, args) == 0
    assert _snapshot(jobs[0]) == before  # the completed job's folder is untouched
    resumed = OmegaConf.load(jobs[1] / ".hydra" / "overrides.yaml")
    assert "ckpt_path=last" in list(resumed)
    assert "Restored all states from the checkpoint" in (jobs[1] / "train.log").read_text()
    assert json.loads((jobs[1] / "metrics.json").read_text())["status"] == "completed"
    assert json.loads((jobs[2] / "metrics.json").read_text())["status"] == "completed"
    rows = read_csv(sweep / "report.csv")
    assert [(r["job"], r["status"], r["seed"]) for r in rows] == [("0", "ok", "1"), ("1", "ok", "2"), ("2", "ok", "3")]
    assert "ckpt_path" not in rows[0]  # the resume point is not a swept key

    # the same folder with another sweep is refused, naming the job and both override lists
    assert run_main(monkeypatch, T.main, ["-m", *_sweep_args(shapes_root, tmp_path, sweep), "seed=7,8"]) == 1
    assert "job 0" in capsys.readouterr().err


def test_submitit_sweep_and_its_resume(tmp_path, shapes_root, monkeypatch):
    """The SLURM path (submitit's job pickling, one process per job) through submitit's local executor."""
    from lightning_modules import train as T
    from tests.test_sweeps import read_csv, run_main

    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
            *_sweep_args(shapes_root, tmp_path, sweep), "seed=1,2"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two job processes share the CPU
    assert run_main(monkeypatch, T.main, args) == 0
    jobs = {int(p.name.split("_")[0]): p for p in sweep.iterdir() if (p / ".hydra").is_dir()}
    assert sorted(jobs) == [0, 1] and (sweep / ".submitit").is_dir()
    assert [r["status"] for r in read_csv(sweep / "report.csv")] == ["ok", "ok"]
    (jobs[1] / "metrics.json").unlink()
    before = _snapshot(jobs[0])
    assert run_main(monkeypatch, T.main, args) == 0
    assert _snapshot(jobs[0]) == before
    assert "ckpt_path=last" in list(OmegaConf.load(jobs[1] / ".hydra" / "overrides.yaml"))
    # Lightning's messages of a submitit job go to its stderr log
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.err"))
    assert logs.count("Restored all states from the checkpoint") == 1
    assert [r["status"] for r in read_csv(sweep / "report.csv")] == ["ok", "ok"]


# ------------------------------------------------------------------------------ console
@pytest.mark.parametrize("command", ["train", "eval", "predict", "srfgan", "export"])
def test_help_is_fast_says_what_and_lists_user_groups(command):
    import subprocess
    import sys
    import time

    exe = Path(sys.executable).parent / f"pyramidlab-{command}"
    start = time.perf_counter()
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-2000:]
    # target < 2 s; the bound is generous for a shared, loaded machine (the import of torch alone is ~3 s there)
    assert seconds < 6, f"--help took {seconds:.1f} s"
    lines = out.stdout.splitlines()
    assert lines[0] == f"pyramidlab-{command} [overrides]" and len(lines[2]) > 40  # then one paragraph
    i = lines.index("Most used overrides:")
    assert all(line.startswith("  ") and "=" in line for line in lines[i + 1:i + 6]) and lines[i + 6] == ""
    groups = [line.split(":")[0].strip() for line in lines if line.startswith("  ") and ":" in line[:18]]
    assert not {"hydra", "paths", "smsl_table2", "pipeline", "pipeline_recipe", "srfgan"} & set(groups)
    if command == "train":
        assert {"experiment", "detector", "neck", "debug"} <= set(groups)
        assert "smsl/table1" in out.stdout


def test_help_imports_neither_torch_nor_lightning():
    import subprocess
    import sys

    code = ("import sys; sys.argv = ['pyramidlab-train', '--help']\n"
            "from lightning_modules import cli\ncli.train()\n"
            "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout


def test_unknown_experiment_lists_every_preset(tmp_path, monkeypatch, capsys):
    from lightning_modules import cli

    monkeypatch.setattr("sys.argv", ["pyramidlab-train", "experiment=no_such", f"paths.log_dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        cli.train()
    assert e.value.code == 1
    err = capsys.readouterr().err
    hint = next(line for line in err.splitlines() if line.startswith("experiment=no_such is not a preset"))
    presets = cli.experiment_presets()
    assert "shapes_retinanet" in presets and "smsl/table1" in presets
    assert all(p in hint for p in presets)


def test_one_resolved_config_and_one_percent_table_also_in_train_log(tmp_path, shapes_root, monkeypatch, capsys):
    from lightning_modules import train as T
    from tests.test_sweeps import SMALL, run_main

    run_dir = tmp_path / "run"
    args = [*SMALL, "debug=limit", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "neck.out_channels=16",
            f"data.root={shapes_root}", f"paths.log_dir={tmp_path / 'runs'}", f"hydra.run.dir={run_dir}"]
    assert run_main(monkeypatch, T.main, args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert sum(line.strip() == "pyramidlab-train" for line in lines) == 1  # the tree's title, once
    flat = "".join(c for c in out if c not in " \n│")  # Rich wraps long lines at the terminal width
    assert f"output_dir:{run_dir}" in flat and "${" not in out  # resolved: real paths
    assert out.count("COCO metrics") == 1 and "DataLoader 0" not in out  # not Lightning's 0-1 table too
    assert "Tip:" not in out
    log = (run_dir / "train.log").read_text()
    assert f"output_dir: {run_dir}" in log and "COCO metrics" in log and "AP50" in log


# ------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def spread_ckpt(tmp_path_factory, shapes_root) -> Path:
    """A tiny RetinaNet whose class scores are spread out (random cls bias): an untrained one scores every
    anchor ~0.01, and detections tied in score are kept in an arbitrary order by any implementation."""
    tmp = tmp_path_factory.mktemp("spread")
    path = save_detector_checkpoint(tmp, shapes_root, [])
    ckpt = torch.load(path, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for k, v in ckpt["state_dict"].items():
        if k.endswith("cls_logits.bias"):
            ckpt["state_dict"][k] = v + 3 * torch.randn(v.shape, generator=gen)
        elif k.endswith("cls_logits.weight"):  # logits that depend on the image: no ties across positions
            ckpt["state_dict"][k] = 100 * v
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_runs_like_the_pytorch_model(tmp_path, spread_ckpt, shapes_root, fmt):
    from lightning_modules.export import export
    from lightning_modules.predict import load_detector

    image_file = next((shapes_root / "val").glob("*.jpg"))
    cfg = compose_cfg("export", [f"ckpt_path={spread_ckpt}", f"format={fmt}", f"input={image_file}"], tmp_path)
    record = export(cfg)
    saved = json.loads((tmp_path / "out" / "export.json").read_text())
    assert saved == record and Path(record["file"]).is_file()
    assert record["detections_exported"] == record["detections_pytorch"] > 0
    assert record["max_score_diff"] <= 1e-4 and record["matched"] == 1.0 and record["any_input_size"] is True
    # the file on its own, on an image of another size, against the PyTorch model
    loaded = load_detector(spread_ckpt)
    other = torch.rand(3, 112, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = loaded.net([other])[0]
    if fmt == "torchscript":
        boxes, scores, labels = torch.jit.load(record["file"])(other)
    else:
        import onnxruntime as ort

        boxes, scores, labels = (torch.from_numpy(a) for a in ort.InferenceSession(
            record["file"], providers=["CPUExecutionProvider"]).run(None, {"image": other.numpy()}))
    assert torch.allclose(scores, ref["scores"], atol=1e-4) and torch.equal(labels, ref["labels"])
    assert torch.allclose(boxes, ref["boxes"], atol=1e-2)


def _fake_job(sweep: Path, num: int, overrides: list[str]) -> Path:
    """A job folder as Hydra leaves it: .hydra/overrides.yaml and hydra.yaml with the job number."""
    job = sweep / f"{num}_{','.join(overrides)}"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), job / ".hydra" / "hydra.yaml")
    return job


def test_srfgan_sweep_plan_keeps_finished_stages_and_marks_completed_jobs(tmp_path):
    """pyramidlab-srfgan jobs: results per stage (stage.json), no top-level metrics.json of their own."""
    from types import SimpleNamespace

    from hydra.core.utils import JobStatus
    from hydra.types import RunMode

    from lightning_modules.hydra_callbacks import SweepReport, plan_sweep

    sweep = tmp_path / "sweep"
    expected = [["srf.adv_weight=0.001"], ["srf.adv_weight=0.01"], ["srf.adv_weight=0.1"]]
    done = _fake_job(sweep, 0, expected[0])
    half = _fake_job(sweep, 1, expected[1])
    (half / "stage0").mkdir()
    (half / "stage0" / "stage.json").write_text("{}")
    # the finished job: the callback writes its metrics.json when the job returns
    cfg = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(done)}}})
    SweepReport().on_job_end(cfg, SimpleNamespace(status=JobStatus.COMPLETED))
    assert json.loads((done / "metrics.json").read_text())["status"] == "completed"
    plan = plan_sweep(sweep, expected)
    assert [(p.num, p.action, p.extra) for p in plan] == [(0, "skip", []), (1, "resume", []), (2, "start", [])]
    assert "stage0" in plan[1].reason
    # a failed job keeps its error: on_job_end does not overwrite it
    failed = _fake_job(tmp_path / "other", 0, ["seed=1"])
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "error": "ValueError: x"}))
    cfg.hydra.runtime.output_dir = str(failed)
    SweepReport().on_job_end(cfg, SimpleNamespace(status=JobStatus.COMPLETED))
    assert json.loads((failed / "metrics.json").read_text())["status"] == "failed"


def test_validation_images_reach_wandb_with_box_layers(tmp_path, shapes_root, monkeypatch):
    from lightning_modules.train import train
    from tests.test_sweeps import wandb_records, wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    over = TINY + small_neck("fpn") + [
        "logger=wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "callbacks.val_images.num_images=2", "callbacks.val_images.score_threshold=0",
    ]
    train(compose_cfg("train", over, tmp_path, shapes_root))
    run = next((tmp_path / "out" / "wandb").glob("offline-run-*"))
    wandb_run(run)  # waits for the run's exit record
    # wandb stores a media value as one history item per field: val/images/_type, .../count, ...
    media = {}
    for rec in wandb_records(next(run.glob("run-*.wandb"))):
        if rec.WhichOneof("record_type") == "history":
            for i in rec.history.item:
                key = i.key or "/".join(i.nested_key)
                if key.startswith("val/images/"):
                    media[key.removeprefix("val/images/")] = json.loads(i.value_json)
    assert media["_type"] == "images/separated" and media["count"] == 2
    # one box layer of ground truth and one of predictions per image
    assert set(media["all_boxes"][0]) == {"ground_truth", "predictions"}


def test_model_summary_has_no_zero_flops(capsys):
    from lightning_modules.visualize import ModelSummary

    data = [(" ", ["0"]), ("Name", ["net"]), ("Type", ["Detector"]), ("Params", ["11.3 M"]), ("Mode", ["train"]),
            ("FLOPs", ["0"])]
    ModelSummary.summarize(data, 11_300_000, 11_200_000, 45.2, {"train": 118, "eval": 0}, 0)
    out = capsys.readouterr().out
    assert "Detector" in out and "Total params" in out and "FLOPs" not in out and "11.3 M" in out
    ModelSummary.summarize(data, 11_300_000, 11_200_000, 45.2, {"train": 118, "eval": 0}, 5_000_000)
    assert "FLOPs" in capsys.readouterr().out  # counted FLOPs stay
    assert ModelSummary(enabled=False)._max_depth == 0  # trainer.enable_model_summary=false turns it off
