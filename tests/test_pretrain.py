"""pyramidlab-pretrain: crops of the training split only, a cache keyed by its settings, loaded by
``backbone.weights_path=embedded`` with the stem and layer1 frozen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from detection.data.coco import CocoDetection
from detection.data.crops import CropSampler
from tests.conftest import SHAPES_GEN, TINY, compose_cfg

# seconds, not minutes: a few steps of small crops
PRETRAIN_TINY = ["pretrain.steps=3", "pretrain.batch_size=8", "pretrain.crop_size=32", "pretrain.progress_bar=false"]


def test_crops_are_objects_or_clean_background(shapes_root: Path) -> None:
    ds = CocoDetection(shapes_root, "train", transforms=None, train=True)
    sampler = CropSampler(ds, ds.num_classes, crop_size=24, batch_size=64, object_fraction=0.5, seed=3)
    import numpy as np

    rng = np.random.default_rng(0)
    crops, labels = sampler.batch(rng)
    assert crops.shape == (64, 3, 24, 24) and 0.0 <= float(crops.min()) and float(crops.max()) <= 1.0
    assert set(labels.tolist()) <= set(range(-1, ds.num_classes + 1))
    assert (labels == ds.num_classes).any() and ((labels >= 0) & (labels < ds.num_classes)).any()
    # a background crop overlaps no box by more than max_background_iou; an object crop holds its box
    for _ in range(200):
        k = int(rng.integers(len(sampler.images)))
        box, label = sampler._crop_box(rng, k)
        iou = box_iou(torch.tensor([box]), sampler.boxes[k]) if len(sampler.boxes[k]) else torch.zeros(1, 1)
        if label == ds.num_classes:
            assert float(iou.max()) <= sampler.max_background_iou
        elif label >= 0:
            assert float(iou.max()) > 0.0


def test_pretrain_reads_only_the_training_split(shapes_root: Path, tmp_path: Path, monkeypatch) -> None:
    from lightning_modules import pretrain as P

    seen: list[str] = []
    real = CocoDetection.__init__

    def spy(self, root, split, **kw):
        seen.append(split)
        real(self, root, split, **kw)

    monkeypatch.setattr(CocoDetection, "__init__", spy)
    cfg = compose_cfg("pretrain", [*TINY, *PRETRAIN_TINY], tmp_path, data_root=shapes_root)
    out = tmp_path / "w.pth"
    info = P.pretrain(cfg, out)
    assert seen == ["train"], seen
    assert info["train_split"] == "train" and info["images"] == 16
    state = torch.load(out, weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith("fc.") for k in state)
    assert json.loads(out.with_suffix(".json").read_text())["ann_file"].endswith("instances_train.json")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    exe = str(Path(sys.executable).parent / f"pyramidlab-{args[0]}")
    return subprocess.run([exe, *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_embedded_weights_cached_and_loaded_frozen(shapes_root: Path, tmp_path: Path) -> None:
    from lightning_modules.pretrain import cache_path

    # make train's experiment: backbone.weights_path=embedded, stem + layer1 frozen
    common = [*TINY, *SHAPES_GEN, *PRETRAIN_TINY, "experiment=shapes_fcos", "backbone.frozen_stages=1",
              "backbone.norm_eval=true", f"paths.root_dir={tmp_path}"]
    cfg = compose_cfg("pretrain", common[:-1], tmp_path, data_root=shapes_root)
    assert cfg.backbone.weights_path == "embedded"
    path = cache_path(cfg)
    # another setting is another cache entry; the same settings, the same file
    assert cache_path(compose_cfg("pretrain", [*common[:-1], "pretrain.steps=4"], tmp_path,
                                  data_root=shapes_root)) != path
    assert cache_path(compose_cfg("pretrain", common[:-1], tmp_path, data_root=shapes_root)) == path

    first = _run(["pretrain", *common, f"hydra.run.dir={tmp_path / 'p1'}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"backbone weights: {path}" in first.stdout
    mtime = path.stat().st_mtime_ns
    # a training run with weights_path=embedded uses the cached file: not pretrained again
    run_dir = tmp_path / "t"
    train = _run(["train", *common, "debug=limit", "trainer.max_epochs=1", "test=false", f"hydra.run.dir={run_dir}"],
                 tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert path.stat().st_mtime_ns == mtime
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["pyramidlab_config"]["backbone"]["weights_path"] == str(path)
    pre = torch.load(path, weights_only=True)
    net = {k.split("backbone.body.body.", 1)[1]: v for k, v in ckpt["state_dict"].items() if "backbone.body.body." in k}
    # stem and layer1 frozen: still the pretrained values after training steps
    assert torch.equal(net["conv1.weight"], pre["conv1.weight"])
    assert torch.equal(net["layer1.0.conv1.weight"], pre["layer1.0.conv1.weight"])
    assert not torch.equal(net["layer4.1.conv2.weight"], pre["layer4.1.conv2.weight"])


def test_force_and_bad_steps(shapes_root: Path, tmp_path: Path) -> None:
    common = [*TINY, *SHAPES_GEN, *PRETRAIN_TINY, "experiment=shapes_retinanet", f"paths.root_dir={tmp_path}"]
    bad = _run(["pretrain", *common, "pretrain.steps=0", f"hydra.run.dir={tmp_path / 'b'}"], tmp_path)
    assert bad.returncode != 0 and "pretrain.steps=0" in bad.stderr


@pytest.mark.parametrize("value", ["embedded"])
def test_weights_path_embedded_without_settings_is_a_clear_error(value: str, tmp_path: Path, shapes_root) -> None:
    from omegaconf import open_dict

    from lightning_modules.pretrain import resolve_backbone_weights

    cfg = compose_cfg("train", [*TINY, f"backbone.weights_path={value}"], tmp_path, data_root=shapes_root)
    with open_dict(cfg):
        cfg.pretrain = None
    with pytest.raises(ValueError, match="backbone.weights_path=embedded needs"):
        resolve_backbone_weights(cfg)


def test_embedded_weights_on_first_use_generate_the_dataset_first(tmp_path: Path) -> None:
    """A fresh machine: neither the dataset nor the cache exists. The dataset is generated, then the
    body pretrained into ``<data.root>/pretrain/`` (keyed on the generated dataset's parameters)."""
    from lightning_modules.pretrain import cache_path, resolve_backbone_weights

    root = tmp_path / "fresh" / "shapes"
    cfg = compose_cfg("train", [*TINY, *PRETRAIN_TINY, "experiment=shapes_fcos"], tmp_path, data_root=root)
    resolve_backbone_weights(cfg)
    assert (root / "shapes_meta.json").is_file()
    path = Path(cfg.backbone.weights_path)
    assert path.is_file() and path.parent == root / "pretrain"
    cfg2 = compose_cfg("train", [*TINY, *PRETRAIN_TINY, "experiment=shapes_fcos"], tmp_path, data_root=root)
    assert cache_path(cfg2) == path  # the key read from the generated dataset: the next run finds it
