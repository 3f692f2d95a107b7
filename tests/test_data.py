"""Tests for detection.data (shapes generator, COCO dataset, transforms, batching) and the DataModule."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from detection.data import (
    BadImageError,
    CocoDetection,
    GroupedBatchSampler,
    aspect_ratio_group_ids,
    build_transforms,
    collate_fn,
    ensure_shapes,
    generate_shapes,
    num_categories_in,
)
from detection.data import shapes as shapes_mod
from tests.coco_fixture import CATS, _make_coco, _rle_mask  # noqa: F401

SMALL = {"num_train": 12, "num_val": 6, "image_size": 96, "seed": 3}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_shapes(tmp_path_factory.mktemp("shapes") / "ds", **SMALL)


# ------------------------------------------------------------------------------------ shapes
def test_shapes_layout_and_categories(shapes_root: Path) -> None:
    for split, n in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        ann = shapes_root / "annotations" / f"instances_{split}.json"
        coco = COCO(str(ann))
        assert len(coco.imgs) == n
        cat_ids = sorted(coco.cats)
        assert len(cat_ids) >= 8
        assert cat_ids != list(range(cat_ids[0], cat_ids[0] + len(cat_ids))), "ids must be non-contiguous"
        assert all(c["supercategory"] == "shape" for c in coco.cats.values())
        assert len({c["name"] for c in coco.cats.values()}) == len(cat_ids)
        assert len(coco.anns) >= n  # every image has at least one object
        for info in coco.imgs.values():
            with Image.open(shapes_root / split / info["file_name"]) as im:
                assert im.size == (info["width"], info["height"])
                assert max(im.size) == SMALL["image_size"]
                assert min(im.size) >= 0.75 * SMALL["image_size"] - 1
        for a in coco.anns.values():
            x, y, w, h = a["bbox"]
            info = coco.imgs[a["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= info["width"] + 0.01 and y + h <= info["height"] + 0.01
            assert a["iscrowd"] == 0 and a["area"] > 0
            poly = np.asarray(a["segmentation"][0]).reshape(-1, 2)
            assert len(poly) >= 3
            # the polygon is the amodal shape the bbox was computed from
            np.testing.assert_allclose(poly.min(0), [x, y], atol=0.02)
            np.testing.assert_allclose(poly.max(0), [x + w, y + h], atol=0.03)
            assert coco.annToMask(a).sum() > 0


def test_shapes_deterministic_for_seed(tmp_path: Path) -> None:
    kw = {"num_train": 3, "num_val": 2, "image_size": 64}
    a = generate_shapes(tmp_path / "a", seed=7, **kw)
    b = generate_shapes(tmp_path / "b", seed=7, **kw)
    c = generate_shapes(tmp_path / "c", seed=8, **kw)
    for split in ("train", "val"):
        rel = f"annotations/instances_{split}.json"
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
        assert (a / rel).read_bytes() != (c / rel).read_bytes()
    img = "train/000000000001.jpg"
    assert (a / img).read_bytes() == (b / img).read_bytes()
    assert not list(tmp_path.glob(".*tmp*")), "temporary generation dirs must not be left behind"


def test_shapes_all_coco_size_buckets_and_both_orientations(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "s", num_train=0, num_val=40, image_size=256, seed=0)
    d = json.loads((root / "annotations" / "instances_val.json").read_text())
    areas = np.array([a["area"] for a in d["annotations"]])
    assert (areas < 32**2).sum() > 0
    assert ((areas >= 32**2) & (areas < 96**2)).sum() > 0
    assert (areas >= 96**2).sum() > 0
    portrait = [i["width"] < i["height"] for i in d["images"]]
    assert any(portrait) and not all(portrait)
    assert len({a["category_id"] for a in d["annotations"]}) == 8


def test_ensure_shapes_reuses_and_regenerates(tmp_path: Path) -> None:
    kw = {"num_train": 2, "num_val": 2, "image_size": 48, "seed": 1}
    root = ensure_shapes(tmp_path / "ds", **kw)
    meta = root / "shapes_meta.json"
    ann = root / "annotations" / "instances_val.json"
    m0, a0 = meta.stat().st_mtime_ns, ann.stat().st_mtime_ns
    ensure_shapes(root, **kw)
    assert (meta.stat().st_mtime_ns, ann.stat().st_mtime_ns) == (m0, a0)
    ensure_shapes(root, **{**kw, "num_val": 3})
    assert json.loads(meta.read_text())["num_val"] == 3
    assert len(json.loads(ann.read_text())["images"]) == 3


def test_shapes_refuses_foreign_dir_and_interrupt_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    foreign = tmp_path / "mydata"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="mydata"):
        ensure_shapes(foreign, num_train=1, num_val=1, image_size=48)
    assert (foreign / "keep.txt").exists()

    calls = {"n": 0}
    real = shapes_mod._render_image

    def flaky(rng, p):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(rng, p)

    monkeypatch.setattr(shapes_mod, "_render_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes(tmp_path / "ds", num_train=4, num_val=1, image_size=48)
    assert not (tmp_path / "ds").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata"]


# ---------------------------------------------------------------------- hand-built COCO dir
@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return _make_coco(tmp_path / "coco")


def _by_id(ds: CocoDetection) -> dict[int, tuple[torch.Tensor, dict]]:
    return {t["image_id"]: (img, t) for img, t in (ds[i] for i in range(len(ds)))}


def test_coco_train_targets(coco_root: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        ds = CocoDetection(coco_root, "s", train=True)
    assert ds.category_ids == [1, 5, 10] and ds.cat_to_label == {1: 0, 5: 1, 10: 2}
    assert ds.class_names == ["a", "b", "c"]
    assert num_categories_in(ds.ann_file) == 3
    assert ds.ids == [11, 12, 13, 14]  # empty image 15 dropped for training
    assert (ds.num_clamped_boxes, ds.num_dropped_boxes) == (1, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "instances_s.json" in warnings[0]
    assert "1 boxes clamped" in warnings[0] and "1 boxes dropped" in warnings[0]

    items = _by_id(ds)
    for img, t in items.values():
        assert img.dtype == torch.float32 and img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1
        assert tuple(img.shape[1:]) == tuple(t["size"].tolist()) == tuple(t["orig_size"].tolist())
        assert t["labels"].dtype == torch.int64 and t["iscrowd"].dtype == torch.int64
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape == (len(t["labels"]), 4)
        assert "orig_boxes" not in t
    t11 = items[11][1]
    assert t11["labels"].tolist() == [1, 2]  # crowd (id 103) dropped; 5 -> 1, 10 -> 2
    assert t11["iscrowd"].tolist() == [0, 0]
    torch.testing.assert_close(t11["boxes"], torch.tensor([[2.0, 3, 12, 11], [30, 10, 40, 15]]))
    assert t11["area"].tolist() == [80.0, 100.0]  # COCO's area, not the clamped box's
    assert items[12][1]["labels"].tolist() == [0]  # zero-width box dropped
    assert items[13][0].shape == (3, 30, 40) and items[14][0].shape == (3, 40, 30)
    # grayscale decodes to three identical channels
    gray = items[12][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_coco_eval_targets_and_masks(coco_root: Path) -> None:
    ds = CocoDetection(coco_root, "s", train=False, with_masks=True)
    assert ds.ids == [11, 12, 13, 14, 15]
    items = _by_id(ds)
    t11 = items[11][1]
    assert t11["labels"].tolist() == [1, 2, 0] and t11["iscrowd"].tolist() == [0, 0, 1]
    assert t11["masks"].dtype == torch.uint8 and t11["masks"].shape == (3, 30, 40)
    assert torch.equal(t11["masks"][2], torch.from_numpy(_rle_mask()))  # uncompressed RLE (crowd)
    torch.testing.assert_close(t11["orig_boxes"], t11["boxes"])
    assert torch.equal(t11["orig_masks"], t11["masks"])
    assert torch.equal(items[13][1]["masks"][0], torch.from_numpy(_rle_mask()))  # compressed RLE
    m12 = items[12][1]["masks"]  # polygon
    assert m12.shape == (1, 40, 30) and 150 <= int(m12.sum()) <= 260
    assert m12[0, 15, 10] == 1 and m12[0, 2, 2] == 0
    t15 = items[15][1]  # image without annotations kept for eval, with empty targets
    assert t15["boxes"].shape == (0, 4) and t15["masks"].shape == (0, 30, 40)


def test_transforms_resize_and_flip(coco_root: Path) -> None:
    ev = CocoDetection(
        coco_root,
        "s",
        train=False,
        with_masks=True,
        transforms=build_transforms(False, min_size=60, max_size=1000),
    )
    img, t = ev[0]  # image 11, 40x30 -> scale 2
    assert img.shape == (3, 60, 80) and t["size"].tolist() == [60, 80] and t["orig_size"].tolist() == [30, 40]
    torch.testing.assert_close(t["boxes"], 2 * t["orig_boxes"])
    assert t["masks"].shape == (3, 60, 80) and t["orig_masks"].shape == (3, 30, 40)
    assert int(t["masks"][2].sum()) == 4 * int(t["orig_masks"][2].sum())
    assert not isinstance(t["boxes"], torch.nn.Parameter) and type(t["boxes"]) is torch.Tensor

    # max_size caps the long side: 40x30 with min 60 / max 70 -> 70x52
    capped = CocoDetection(coco_root, "s", train=False, transforms=build_transforms(False, 60, 70))
    assert max(capped[0][0].shape[1:]) == 70

    tr = CocoDetection(
        coco_root,
        "s",
        train=True,
        with_masks=True,
        transforms=build_transforms(True, min_size=60, max_size=1000, flip_prob=1.0),
    )
    img, t = tr[0]
    assert img.shape == (3, 60, 80)
    expected = torch.tensor([[2.0, 3, 12, 11], [30, 10, 40, 15]]) * 2
    expected[:, [0, 2]] = 80 - expected[:, [2, 0]]
    torch.testing.assert_close(t["boxes"], expected)
    assert t["masks"][0, 10, 80 - 10] == 1 and t["masks"][0, 10, 10] == 0  # mask flipped with the box


def test_degenerate_boxes_removed_with_all_per_box_fields(tmp_path: Path) -> None:
    # a 1 px wide box shrinks below 1 px at scale 0.5: it must go together with its label/area/mask
    root = _make_coco(
        tmp_path / "c",
        extra_anns=[
            {
                "id": 200,
                "image_id": 11,
                "category_id": 1,
                "bbox": [20, 20, 1, 5],
                "area": 5,
                "iscrowd": 0,
                "segmentation": [[20, 20, 21, 20, 21, 25, 20, 25]],
            }
        ],
    )
    ds = CocoDetection(
        root,
        "s",
        train=True,
        with_masks=True,
        transforms=build_transforms(True, min_size=15, max_size=1000, flip_prob=0.0),
    )
    img, t = ds[0]
    assert img.shape == (3, 15, 20)
    assert t["labels"].tolist() == [1, 2]
    n = len(t["labels"])
    assert t["boxes"].shape == (n, 4) and t["iscrowd"].shape == (n,) and t["area"].tolist() == [80.0, 100.0]
    assert t["masks"].shape == (n, 15, 20)
    # eval keeps it: targets stay 1:1 with the COCO ground truth
    ev = CocoDetection(root, "s", train=False, transforms=build_transforms(False, 15, 1000))
    assert len(ev[0][1]["labels"]) == 4


def test_corrupt_image_names_file_and_can_be_skipped(coco_root: Path, caplog) -> None:
    bad = coco_root / "s" / "gray.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    ds = CocoDetection(coco_root, "s")
    with pytest.raises(BadImageError, match="gray.png") as ei:
        ds[1]
    assert str(bad) in str(ei.value) and isinstance(ei.value, RuntimeError)

    skip = CocoDetection(coco_root, "s", skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        assert skip[1] is None
    assert any("gray.png" in r.getMessage() and "1 so far" in r.getMessage() for r in caplog.records)
    images, targets = collate_fn([skip[0], skip[1], skip[2]])
    assert len(images) == len(targets) == 2
    assert [t["image_id"] for t in targets] == [11, 13]
    loader = DataLoader(skip, batch_size=4, collate_fn=collate_fn)
    assert sum(len(b[0]) for b in loader) == 3


def test_unknown_category_and_missing_files(tmp_path: Path) -> None:
    root = _make_coco(
        tmp_path / "c",
        extra_anns=[
            {"id": 999, "image_id": 11, "category_id": 42, "bbox": [1, 1, 3, 3], "area": 9, "iscrowd": 0}
        ],
    )
    with pytest.raises(ValueError, match=r"annotation id 999 .*category_id 42.*instances_s\.json"):
        CocoDetection(root, "s")
    with pytest.raises(FileNotFoundError) as ei:
        CocoDetection(root, "val2017")
    msg = str(ei.value)
    assert str(root / "annotations" / "instances_val2017.json") in msg and "\n" not in msg
    assert "DIR/val2017/" in msg
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CocoDetection(tmp_path / "nowhere", "s")
    (root / "annotations" / "instances_t.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="image directory not found"):
        CocoDetection(root, "t")


# ------------------------------------------------------------------------------- batching
def test_grouped_batch_sampler_single_group_and_exact_len() -> None:
    rng = np.random.default_rng(0)
    group_ids = rng.integers(0, 2, 23).tolist()
    torch.manual_seed(0)
    for drop_last in (False, True):
        gbs = GroupedBatchSampler(RandomSampler(range(23)), group_ids, 4, drop_last=drop_last)
        batches = list(gbs)
        assert len(batches) == len(gbs) == (5 if drop_last else 6)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))
        if not drop_last:
            assert sorted(flat) == list(range(23))
        mixed = [b for b in batches if len({group_ids[i] for i in b}) > 1]
        assert len(mixed) <= 1  # at most num_groups - 1 leftover batches mix groups
        assert all(batches.index(b) >= len(batches) - 2 for b in mixed)  # and only at the end
        assert all(len(b) == 4 for b in batches[:-1])

    # one group only: every batch pure, partial batch at the end
    gbs = GroupedBatchSampler(SequentialSampler(range(10)), [1] * 10, 4)
    assert [len(b) for b in gbs] == [4, 4, 2] and len(gbs) == 3


def test_grouped_batch_sampler_rebuilt_by_lightning() -> None:
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    data = list(range(20))
    group_ids = [i % 2 for i in range(20)]
    gbs = GroupedBatchSampler(RandomSampler(data), group_ids, 3)
    rebuilt = GroupedBatchSampler(SequentialSampler(data), gbs.group_ids, gbs.batch_size, gbs.drop_last)
    assert list(rebuilt)[0] == [0, 2, 4]

    # the path Lightning takes to inject a DistributedSampler (DataLoader built inside a hook)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler, "sampler"):
        dl = DataLoader(data, batch_sampler=GroupedBatchSampler(RandomSampler(data), group_ids, 3))
    lens = []
    for rank in (0, 1):
        new = _update_dataloader(dl, DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True))
        bs = new.batch_sampler
        assert isinstance(bs, GroupedBatchSampler) and isinstance(bs.sampler, DistributedSampler)
        assert bs.group_ids == group_ids and bs.batch_size == 3
        batches = list(bs)
        lens.append(len(batches))
        assert len(batches) == len(bs) == math.ceil(10 / 3)
    assert lens[0] == lens[1]  # equal batch counts on every rank: DDP cannot hang


def test_aspect_ratio_group_ids(coco_root: Path) -> None:
    ds = CocoDetection(coco_root, "s", train=False)
    assert aspect_ratio_group_ids(ds) == [1, 0, 1, 0, 1]  # 40x30 landscape, 30x40 portrait
    sub = torch.utils.data.Subset(ds, [1, 2])
    assert aspect_ratio_group_ids(sub) == [0, 1]


# ------------------------------------------------------------------------------ datamodule
def _dm(root: Path, **kw):
    from lightning_modules.datamodule import DetectionDataModule

    args = dict(
        root=str(root),
        name="shapes",
        num_classes=8,
        train_split="train",
        val_split="val",
        min_size=64,
        max_size=96,
        batch_size=2,
        num_workers=0,
        generate=SMALL,
    )
    args.update(kw)
    return DetectionDataModule(**args)


def test_datamodule_fit_batches(shapes_root: Path) -> None:
    dm = _dm(shapes_root, max_val_images=4)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.category_ids == [1, 2, 3, 5, 7, 8, 11, 13]
    assert dm.class_names[0] == "circle" and len(dm.class_names) == 8
    assert isinstance(dm.coco, COCO) and len(dm.val_dataset) == 4
    train_dl = dm.train_dataloader()
    assert isinstance(train_dl.batch_sampler, GroupedBatchSampler)
    assert len(train_dl) == math.ceil(SMALL["num_train"] / 2)
    images, targets = next(iter(train_dl))
    assert len(images) == len(targets) == 2
    for img, t in zip(images, targets):
        assert img.dtype == torch.float32 and img.shape[0] == 3 and min(img.shape[1:]) == 64
        assert t["labels"].min() >= 0 and t["labels"].max() < 8
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
        assert (t["boxes"][:, [2]] <= img.shape[2]).all() and (t["boxes"][:, [3]] <= img.shape[1]).all()
    val_images, val_targets = next(iter(dm.val_dataloader()))
    assert len(val_images) == 2 and "orig_boxes" in val_targets[0]
    assert [t["image_id"] for t in val_targets] == dm.val_dataset.ids[:2]


def test_datamodule_generates_and_checks_num_classes(tmp_path: Path) -> None:
    dm = _dm(tmp_path / "gen", num_classes=80, aspect_ratio_grouping=False)
    with pytest.raises(ValueError, match=r"instances_train\.json has 8 categories but data.num_classes=80"):
        dm.setup("fit")  # generates (root missing), then checks
    assert (tmp_path / "gen" / "shapes_meta.json").exists()
    dm = _dm(tmp_path / "gen", aspect_ratio_grouping=False, test_split="train", max_val_images=3)
    dm.setup("test")
    assert dm.val_dataset is None and len(dm.test_dataset) == 3 and not dm.test_dataset.train
    assert dm.test_coco is dm.test_dataset.coco
    images, _ = next(iter(dm.test_dataloader()))
    assert len(images) == 2
