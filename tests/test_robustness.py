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


def test_config_types_are_checked_at_composition_naming_key_and_type(tmp_path, monkeypatch, restore_logging, capsys):
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


def test_hints_only_for_keys_that_do_not_exist(tmp_path, monkeypatch, restore_logging, capsys):
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
