"""Bad data, bad configs and interrupted runs: each case a clear one-line error or a counted skip.

One test per case of the robustness issue; the data cases use the tiny hand-built COCO
folder (``tests/coco_fixture.py``), the run cases the tiny shapes dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detection.data.coco import CocoDetection, read_coco_json
from lightning_modules.datamodule import DetectionDataModule
from tests.coco_fixture import _make_coco
from tests.conftest import compose_cfg


def _coco(tmp_path: Path, edit=None) -> Path:
    """The fixture COCO folder (split ``s``), its JSON changed by ``edit(data)``."""
    root = _make_coco(tmp_path / "coco")
    ann = root / "annotations" / "instances_s.json"
    if edit is not None:
        data = json.loads(ann.read_text())
        edit(data)
        ann.write_text(json.dumps(data))
    return root


def _dm(root: Path, **kw) -> DetectionDataModule:
    args = dict(root=str(root), num_classes=3, name="coco", train_split="s", val_split="s", min_size=32,
                max_size=48, batch_size=2, num_workers=0)
    return DetectionDataModule(**{**args, **kw})


# ------------------------------------------------------------------- 1. duplicate ids
def test_duplicate_image_and_annotation_ids_are_errors_naming_file_and_ids(tmp_path):
    def dup_images(d):
        d["images"][1]["id"] = d["images"][0]["id"]  # two files share image id 11

    root = _coco(tmp_path, dup_images)
    with pytest.raises(ValueError, match=r"instances_s\.json: duplicated image ids 11;"):
        CocoDetection(root, "s")

    def dup_anns(d):
        d["annotations"][2]["id"] = d["annotations"][5]["id"] = 101

    root = _coco(tmp_path / "b", dup_anns)
    with pytest.raises(ValueError, match=r"instances_s\.json: duplicated annotation ids 101;"):
        CocoDetection(root, "s", train=False)


# ---------------------------------------------------------------- 2. empty eval split
def test_empty_eval_split_is_an_error_before_training_naming_split_and_file(tmp_path):
    (tmp_path / "coco").mkdir()
    root = _coco(tmp_path)
    empty = root / "annotations" / "instances_v.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": json.loads(
        (root / "annotations" / "instances_s.json").read_text())["categories"]}))
    (root / "v").mkdir()
    dm = _dm(root, val_split="v")
    with pytest.raises(ValueError, match=r"data.val_split=v: no images to use in .*instances_v\.json: its 'images' "
                                         r"list is empty"):
        dm.setup("fit")
    # every image cut by the limit: named too
    with pytest.raises(ValueError, match=r"data.val_split=s: .*instances_s\.json: the image limit"):
        _dm(root, max_val_images=0).setup("validate")


# ---------------------------------------------------------------- 6. truncated JSON
def test_truncated_or_non_json_annotation_file_names_the_file(tmp_path):
    root = _coco(tmp_path)
    ann = root / "annotations" / "instances_s.json"
    ann.write_text(ann.read_text()[:200])
    with pytest.raises(ValueError, match=r"annotation file .*instances_s\.json is not valid JSON \(truncated or "
                                         r"corrupt\?\): .* at line 1 column"):
        CocoDetection(root, "s")
    ann.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"instances_s\.json is not COCO format: expected a JSON object with an "
                                         r"'images' list"):
        read_coco_json(ann)


# ------------------------------------------------------------- 7. no training sample
def test_empty_or_fully_degenerate_train_split_names_split_file_and_reason(tmp_path):
    def degenerate(d):
        for a in d["annotations"]:
            a["bbox"] = [1, 1, 0, 5]  # zero width everywhere

    dm = _dm(_coco(tmp_path, degenerate))
    with pytest.raises(ValueError, match=r"data.train_split=s: no images to use in .*instances_s\.json: none of its "
                                         r"5 images has a usable training box \(6 boxes dropped"):
        dm.setup("fit")

    def no_images(d):
        d["images"], d["annotations"] = [], []

    with pytest.raises(ValueError, match=r"data.train_split=s: .*its 'images' list is empty"):
        _dm(_coco(tmp_path / "b", no_images)).setup("fit")


# ------------------------------------------------------------- 8. RLE size mismatch
def test_rle_size_different_from_the_image_names_the_annotation(tmp_path):
    def wrong_size(d):
        d["annotations"][5]["segmentation"]["size"] = [40, 30]  # image 13 is 30 x 40 (h x w)

    ds = CocoDetection(_coco(tmp_path, wrong_size), "s", train=False, with_masks=True)
    with pytest.raises(ValueError, match=r"annotation id 106 in .*instances_s\.json: RLE segmentation size \[40, 30\] "
                                         r"differs from its image 13's \[height, width\] = \[30, 40\]"):
        ds[ds.ids.index(13)]


# -------------------------------------------- issue 17: num_classes, per-split files
def test_num_classes_null_reads_the_file_and_a_disagreeing_value_names_both(tmp_path):
    from lightning_modules.datamodule import num_classes_from_files

    root = _coco(tmp_path)
    cfg = {"root": str(root), "train_split": "s", "val_split": "s", "num_classes": None}
    assert num_classes_from_files(cfg) == 3
    dm = _dm(root, num_classes=None)
    dm.setup("fit")
    assert dm.train_dataset.num_classes == 3
    with pytest.raises(ValueError, match=r"instances_s\.json has 3 categories but data.num_classes=5 was expected"):
        _dm(root, num_classes=5).setup("fit")


def test_coco_data_reads_its_number_of_classes_by_default(tmp_path):
    """`data=coco` with any COCO-format dataset: no data.num_classes needed; without a file, COCO's 80."""
    from lightning_modules.config_checks import prepare_config
    from lightning_modules.summary import summarize

    root = _coco(tmp_path)
    cfg = compose_cfg("train", ["data=coco", "data.train_split=s", "data.val_split=s", "backbone=resnet18"],
                      tmp_path / "a", root)
    assert cfg.data.num_classes is None and prepare_config(cfg).data.num_classes == 3
    paper = compose_cfg("summary", ["data=coco", "data.root=/nonexistent", "backbone=resnet18"], tmp_path / "b")
    assert summarize(paper)["num_classes"] == 80


def test_ann_file_and_img_dir_per_split_and_an_images_only_test_file(tmp_path):
    """COCO test-dev's layout: ``annotations/image_info_test-dev2017.json`` (no "annotations" key)
    with images in ``test2017/``; train/val keep COCO's names."""
    root = _coco(tmp_path)
    data = json.loads((root / "annotations" / "instances_s.json").read_text())
    info = {k: v for k, v in data.items() if k != "annotations"}
    (root / "annotations" / "image_info_test-dev2017.json").write_text(json.dumps(info))
    (root / "s").rename(root / "test2017")
    (root / "s").symlink_to(root / "test2017")
    dm = _dm(root, test_split="test-dev2017",
             ann_file={"test": "annotations/image_info_test-dev2017.json"}, img_dir={"test": "test2017"})
    dm.setup("test")
    ds = dm.test_dataset
    assert ds.ann_file.name == "image_info_test-dev2017.json" and ds.img_dir.name == "test2017"
    assert len(ds) == 5 and ds.num_classes == 3
    images, targets = next(iter(dm.test_dataloader()))
    assert len(images) == 2 and all(len(t["boxes"]) == 0 for t in targets)
    with pytest.raises(ValueError, match=r"data.ann_file has keys \['tst'\]"):
        _dm(root, ann_file={"tst": "x.json"})


# ------------------------------------------------------ run-level cases through the CLI code
from lightning_modules import train as T  # noqa: E402
from tests.test_sweeps import SMALL, restore_logging, run_main  # noqa: E402,F401


def test_config_types_are_checked_at_composition_naming_key_and_type(tmp_path, monkeypatch, restore_logging, capsys):  # noqa: F811
    """Case 9 and 13: one line naming the key and the expected type; the traceback only in train.log."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for bad, expected, extra in (
        ("trainer.max_epochs=abc", "trainer.max_epochs=abc: expected int or null", ["debug=fdr"]),
        ("optim.optimizer.lr=abc", "optim.optimizer.lr=abc: expected float", []),
    ):
        run_dir = tmp_path / bad.split("=")[0]
        assert run_main(monkeypatch, T.main, [*SMALL, *extra, bad, f"hydra.run.dir={run_dir}"]) == 1
        err = capsys.readouterr().err
        assert f"TypeError: {expected}" in err
        assert "Traceback" not in err and f"full traceback in {run_dir / 'train.log'}" in err
        log = (run_dir / "train.log").read_text()
        assert "Traceback (most recent call last)" in log and expected in log
        assert json.loads((run_dir / "metrics.json").read_text())["error"].startswith(f"TypeError: {expected}")


def test_hints_only_for_keys_that_do_not_exist(tmp_path, monkeypatch, restore_logging, capsys):  # noqa: F811
    """Case 11: a required ``???`` value is no unknown key, and Hydra's "+key" advice is not printed."""
    common = ["debug=fdr", f"paths.log_dir={tmp_path}"]
    assert run_main(monkeypatch, T.main, [*common, "data=coco", "logger=csv"]) == 1
    err = capsys.readouterr().err
    assert "Missing mandatory value: data.root" in err and "is not a key" not in err
    assert run_main(monkeypatch, T.main, [*common, "data=coco", "data.roots=/x"]) == 1
    err = capsys.readouterr().err
    assert "data.roots is not a key of the config: did you mean data.root?" in err
    assert "To append to your config use +" not in err


def test_paths_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """Case 5: the embedded dataset under $PYRAMIDLAB_DATA (default the user cache); a relative data.root is
    made absolute against where the command started, so checkpoints store a path that resolves elsewhere."""
    from hydra import compose, initialize_config_dir

    from lightning_modules.config_checks import prepare_config
    from tests.conftest import CONF_DIR

    monkeypatch.setenv("PYRAMIDLAB_DATA", str(tmp_path / "machine"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        assert compose("train").data.root == str(tmp_path / "machine" / "shapes")
        monkeypatch.delenv("PYRAMIDLAB_DATA")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        assert compose("train").data.root == str(tmp_path / "cache" / "pyramidlab" / "shapes")
        monkeypatch.chdir(tmp_path)
        cfg = compose("train", ["data=coco", "data.root=rel/coco"])
    prepare_config(cfg)
    assert cfg.data.root == str(tmp_path / "rel" / "coco")


# ------------------------------------------------------------------ interrupted runs
RUN = SMALL + [
    # one epoch of 8 batches (16 images, 2 per batch): every kill lands inside it
    "neck.out_channels=16", "seed=0", "trainer.deterministic=true", "trainer.max_epochs=1",
    "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "test=false",
    "optim=adamw", "callbacks.last_checkpoint.every_n_epochs=null", "callbacks.last_checkpoint.every_n_train_steps=1",
    "~callbacks.model_checkpoint", "~callbacks.rich_progress_bar", "~callbacks.plot_curves",
]


def _losses(run_dir: Path) -> dict[int, str]:
    import csv

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {int(r["step"]): r["train/loss"] for r in rows}


@pytest.fixture
def deterministic():
    yield
    torch.use_deterministic_algorithms(False)  # trainer.deterministic=true sets it for the process


def test_kill_9_three_times_then_resume_same_weights_and_full_history(tmp_path, shapes_root, deterministic):
    """kill -9 at a random moment three times, then ckpt_path=last: the final weights of a run that never
    stopped, every step's loss once in csv/metrics.csv, one TensorBoard folder, last.ckpt at the last step."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from lightning_modules.checkpoints import load_checkpoint
    from tests.conftest import compose_cfg

    T.train(compose_cfg("train", RUN, tmp_path / "straight", shapes_root))
    straight = load_checkpoint(tmp_path / "straight" / "out" / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == 8  # case 4: the end of training is saved

    run_dir = tmp_path / "killed"
    exe = str(Path(sys.executable).parent / "pyramidlab-train")
    args = [exe, *RUN, f"data.root={shapes_root}", f"hydra.run.dir={run_dir}", "logger=[csv,tensorboard]"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    rng = random.Random(0)
    for kill, after_step in enumerate((1, 3, 5)):
        proc = subprocess.Popen(args + (["ckpt_path=last"] if kill else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if max(_losses(run_dir), default=-1) >= after_step:
                    break
            except (FileNotFoundError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        time.sleep(rng.uniform(0, 0.5))  # anywhere in the next step, a checkpoint write included
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = subprocess.run(args + ["ckpt_path=last"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    resumed = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 8
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert _losses(run_dir) == _losses(tmp_path / "straight" / "out")  # every step once, the same values
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # one folder, appended to
    assert not [p for p in (run_dir / "tensorboard").iterdir() if p.is_dir()]
    metrics = json.loads((run_dir / "metrics.json").read_text())  # counted skips, per split
    assert metrics["data/skipped_images"] == {"train": 0, "val": 0} and "train" in metrics["data/dropped_boxes"]



class _Crash(RuntimeError):
    pass


def test_crash_between_a_steps_checkpoint_and_its_log_row_keeps_the_row(tmp_path, shapes_root, deterministic,
                                                                       monkeypatch):
    """Lightning writes a batch's log row after that batch's checkpoint: a run killed in between resumes
    past the batch, so the row must travel in the checkpoint (CI lost step 2's loss this way under load)."""
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    from lightning_modules.checkpoints import load_checkpoint
    from tests.conftest import compose_cfg

    run = RUN + ["trainer.limit_train_batches=4"]
    real = _LoggerConnector.update_train_step_metrics
    lost: dict[str, float] = {}

    def crash_at_step_2(self):
        if self.trainer.fit_loop.epoch_loop._batches_that_stepped == 2:  # checkpoint of batch 2 on disk
            lost.update({k: float(v) for k, v in self.metrics["log"].items()})  # the row it was about to write
            raise _Crash("killed before step 2's row")
        return real(self)

    monkeypatch.setattr(_LoggerConnector, "update_train_step_metrics", crash_at_step_2)
    with pytest.raises(_Crash):
        T.train(compose_cfg("train", run, tmp_path, shapes_root))
    assert sorted(_losses(tmp_path / "out")) == [0, 1]
    assert load_checkpoint(tmp_path / "out" / "checkpoints" / "last.ckpt")["global_step"] == 3
    torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(_LoggerConnector, "update_train_step_metrics", real)
    T.train(compose_cfg("train", run + ["ckpt_path=last"], tmp_path, shapes_root))
    losses = _losses(tmp_path / "out")  # every step once
    assert sorted(losses) == [0, 1, 2, 3]
    assert float(losses[2]) == lost["train/loss"]


@pytest.mark.parametrize("stops", [(4,), (4, 6)], ids=["epoch_end", "epoch_end_then_inside"])
def test_resume_at_an_epoch_end_keeps_the_random_state(tmp_path, shapes_root, deterministic, monkeypatch, stops):
    """A crash right after an epoch-end checkpoint (the first batch of the next epoch), resumed, crashed again
    inside that epoch and resumed: the weights of the run that never stopped. Lightning never applied the
    loader state saved at an epoch end, so the augmentation's random state was lost (weights off by 0.38)."""
    import lightning as L

    from lightning_modules import builders as B
    from lightning_modules.checkpoints import load_checkpoint

    class CrashAfter(L.Callback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.step:  # the checkpoints of step `self.step` are on disk
                raise _Crash(f"crash after step {self.step}")

    # 3 epochs of 4 batches; random flips drawn from the process RNG (num_workers=0)
    run = [o for o in RUN if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=3",
                                                                        "trainer.limit_train_batches=4"]
    T.train(compose_cfg("train", run, tmp_path / "straight", shapes_root))
    straight = load_checkpoint(tmp_path / "straight" / "out" / "checkpoints" / "last.ckpt")
    real = B.build_callbacks
    for i, step in enumerate(stops):
        monkeypatch.setattr(B, "build_callbacks", lambda c, step=step: real(c) + [CrashAfter(step)])
        with pytest.raises(_Crash):
            T.train(compose_cfg("train", run + (["ckpt_path=last"] if i else []), tmp_path / "crashed", shapes_root))
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(B, "build_callbacks", real)
    T.train(compose_cfg("train", run + ["ckpt_path=last"], tmp_path / "crashed", shapes_root))
    resumed = load_checkpoint(tmp_path / "crashed" / "out" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == straight["global_step"] == 12
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert _losses(tmp_path / "crashed" / "out") == _losses(tmp_path / "straight" / "out")

# ------------------------------------------------------------- 12. GroupNorm at a 1x1 level
@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_group_norm_heads_train_on_one_image_with_a_1x1_level(tmp_path, detector):
    """A 32-wide GN head, one 128-px image (P7 is 1x1): GroupNorm keeps 2 channels per group."""
    from lightning_modules.checkpoints import build_net
    from tests.conftest import compose_cfg

    over = ["backbone=resnet18", "backbone.frozen_stages=0", f"detector={detector}", "neck.out_channels=32",
            "data.num_classes=3"] + (["detector.head_norm=gn"] if detector == "retinanet" else [])
    net = build_net(compose_cfg("train", over, tmp_path)).train()
    gns = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert gns and all(m.num_channels // m.num_groups >= 2 for m in gns)
    img = torch.rand(3, 128, 128)
    target = {"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([1])}
    losses = net([img], [target])
    assert all(torch.isfinite(v) for v in losses.values())


# -------------------------------------------------- checkpoints: refused, or not written
def test_resume_from_a_truncated_foreign_or_code_running_checkpoint_is_refused(tmp_path, shapes_root):
    """Case 10 and the checkpoint faults: one line naming the file (and the mismatching parts); the
    pickled code never runs."""
    from lightning_modules.checkpoints import build_net
    from tests.conftest import compose_cfg

    over = SMALL + ["neck.out_channels=16", "trainer.max_epochs=1", "test=false"]
    other = build_net(compose_cfg("train", SMALL + ["neck.out_channels=32"], tmp_path / "o", shapes_root))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in other.state_dict().items()}, "epoch": 0,
                "global_step": 1}, foreign)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(foreign.read_bytes()[:4096])
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(str(marker))}, evil)

    for path, expected in (
        (foreign, rf"ckpt_path: {foreign} does not match the configured architecture — wrong shape: "),
        (truncated, rf"ckpt_path: cannot load {truncated} as a weights-only checkpoint"),
        (evil, rf"ckpt_path: cannot load {evil} as a weights-only checkpoint"),
    ):
        with pytest.raises(ValueError, match=expected) as e:
            T.train(compose_cfg("train", over + [f"ckpt_path={path}"], tmp_path / path.stem, shapes_root))
        assert "\n" not in str(e.value)
    assert not marker.exists()


class _RunsCode:
    """Unpickling this calls ``open(path, "w")``: a checkpoint that would run code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_previous_one(tmp_path, shapes_root, monkeypatch):
    """A full disk while last.ckpt is written: the error names the file, the previous last.ckpt still loads.
    (An unwritable folder cannot be made for root, which runs these tests: the full disk is simulated.)"""
    import errno

    from fsspec.implementations.local import LocalFileOpener

    from lightning_modules import builders as B
    from lightning_modules.checkpoints import load_checkpoint
    from tests.conftest import compose_cfg

    class FullDiskAfterFirstSave(B.L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:  # last.ckpt of step 1 is on disk: now the disk is full
                def write(self, data):
                    if not str(self.path).endswith(".ckpt"):  # the loggers' files still fit
                        return LocalFileOpener_write(self, data)
                    LocalFileOpener_write(self, data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device")

                monkeypatch.setattr(LocalFileOpener, "write", write)

    LocalFileOpener_write = LocalFileOpener.write
    real = B.build_callbacks
    monkeypatch.setattr(B, "build_callbacks", lambda c: real(c) + [FullDiskAfterFirstSave()])
    over = RUN[:]  # every_n_train_steps=1
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    with pytest.raises(OSError, match=rf"cannot write checkpoint {last}: No space left on device; the previous"):
        T.train(compose_cfg("train", over, tmp_path, shapes_root))
    monkeypatch.setattr(LocalFileOpener, "write", LocalFileOpener_write)
    assert load_checkpoint(last)["global_step"] == 1
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind


# --------------------------------------------------------- 3. W&B resumes the same run
def test_wandb_resumes_the_run_found_in_the_run_folder(tmp_path):
    from lightning_modules.hydra_callbacks import previous_wandb_id
    from tests.conftest import compose_cfg

    assert previous_wandb_id(str(tmp_path)) is None
    (tmp_path / "wandb" / "offline-run-20261130_050000-abc123").mkdir(parents=True)
    (tmp_path / "wandb" / "run-20261130_060000-def456").mkdir()
    (tmp_path / "wandb" / "latest-run").symlink_to(tmp_path / "wandb" / "run-20261130_060000-def456")
    assert previous_wandb_id(str(tmp_path)) == "def456"  # the newest
    cfg = compose_cfg("train", ["logger=wandb", f"paths.output_dir={tmp_path}"], tmp_path / "c")
    assert cfg.logger.wandb.id == "def456" and cfg.logger.wandb.resume == "allow"


# ------------------------------------------------------------ counted, visible skips
def test_skipped_images_are_counted_per_split_and_named_once(tmp_path, caplog):
    """Unreadable images with skip_bad_images: counted once per image across epochs and DataLoader
    worker processes (shared memory), named once in the log; dropped boxes counted per split."""
    root = _coco(tmp_path)
    (root / "s" / "gray.png").write_bytes(b"not a png")
    dm = _dm(root, skip_bad_images=True, aspect_ratio_grouping=False)
    dm.setup("fit")
    with caplog.at_level("WARNING"):
        for _ in range(2):  # two epochs in this process
            for _ in dm.train_dataloader():
                pass
    assert sum("gray.png" in r.getMessage() for r in caplog.records) == 1
    counts = dm.data_counts()
    assert counts["data/skipped_images"] == {"train": 1, "val": 0}
    assert counts["data/dropped_boxes"] == {"train": 1, "val": 1}  # the zero-width box of image 12
    workers = _dm(root, skip_bad_images=True, num_workers=1, persistent_workers=False)
    workers.setup("validate")
    for _ in workers.val_dataloader():
        pass
    assert workers.data_counts()["data/skipped_images"] == {"val": 1}  # seen from the worker process


def test_a_killed_sweep_job_is_marked_in_the_report(tmp_path):
    """A job killed before writing metrics.json (kill -9, a scheduler's time limit) is a failed row."""
    from lightning_modules.report import write_sweep_report

    for num, seed, metrics in ((0, 1, {"status": "completed", "bbox/AP": 0.25}), (1, 2, None)):
        job = tmp_path / f"{num}_seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
        if metrics is not None:
            (job / "metrics.json").write_text(json.dumps(metrics))
    result = write_sweep_report(tmp_path, wandb=False)
    assert result.jobs == 2 and len(result.failed) == 1
    report = (tmp_path / "report.md").read_text()
    assert "failed" in report and "no metrics.json: the job did not finish (killed, timed out or running)" in report
