"""pyramidlab-predict ckpt_path=FILE input=IMAGE_OR_DIR: draw a checkpoint's detections on any images.

The detector is rebuilt from the resolved config stored in the checkpoint (as ``pyramidlab-eval``
does); no annotation file is read. For every image the run folder gets ``images/<stem>.png``
(boxes, class names and scores, masks for Mask R-CNN, in the image's own pixels) and the whole
run ``detections_bbox.json`` (``detections_segm.json``): COCO results format, ``image_id`` =
the image's position in ``images.json`` (file name, height, width per id).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_modules import hydra_callbacks as H
from lightning_modules.paths import CONF_DIR

log = logging.getLogger("pyramidlab")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class LoadedDetector:
    """A detector rebuilt from a pyramidlab checkpoint, in eval mode.

    ``config``: the checkpoint's resolved run config; ``category_ids[label]``: the dataset's
    category id of each contiguous label; ``class_names[label]``: its name.
    """

    net: Any  # detection.detectors.Detector
    config: DictConfig
    category_ids: list[int]
    class_names: list[str]


def class_names_of(stored: DictConfig, category_ids: list[int]) -> list[str]:
    """Category names from the training annotation file when it is still readable, else ``class <id>``.

    Checkpoints carry category ids only; predicting on a machine without the dataset still works.
    """
    import json

    data = stored.get("data") or {}
    root = data.get("root")
    split = data.get("train_split") or "train"
    ann = data.get("ann_file")
    path = Path(str(ann)) if ann else Path(str(root)) / "annotations" / f"instances_{split}.json" if root else None
    names: dict[int, str] = {}
    if path is not None and path.is_file():
        try:
            names = {int(c["id"]): str(c.get("name", c["id"])) for c in json.loads(path.read_text())["categories"]}
        except (ValueError, KeyError, TypeError) as e:
            log.warning(f"class names: cannot read categories from {path} ({e}); using ids")
    return [names.get(int(c), f"class {c}") for c in category_ids]


def load_detector(
    ckpt_path: str | Path, device: str = "cpu", overrides: dict[str, Any] | None = None
) -> LoadedDetector:
    """Rebuild the detector of a pyramidlab checkpoint and load its weights.

    Args:
        ckpt_path: a ``pyramidlab-train`` / ``pyramidlab-srfgan`` detector checkpoint.
        device: where the net goes.
        overrides: ``detector.<key>`` values replacing the stored ones before the build
            (e.g. ``{"score_thresh": 0.0}``).
    """
    from lightning_modules import checkpoints as CK

    ckpt = CK.load_checkpoint(ckpt_path)
    if "pyramidlab_config" not in ckpt:
        raise ValueError(f"{ckpt_path}: not a pyramidlab checkpoint (no stored config)")
    stored = OmegaConf.create(ckpt["pyramidlab_config"])
    missing = [k for k in ("detector", "backbone", "neck") if stored.get(k) is None]
    if missing:
        raise ValueError(f"{ckpt_path}: the stored config has no {', '.join(missing)}: not a detector checkpoint")
    model_cfg = OmegaConf.create({k: stored[k] for k in ("detector", "backbone", "neck")})
    with open_dict(model_cfg):
        # no pretrained file is needed: the checkpoint holds every weight
        if "weights_path" in model_cfg.backbone:
            model_cfg.backbone.weights_path = None
        for k, v in (overrides or {}).items():
            model_cfg.detector[k] = v
    net = CK.build_net(model_cfg)
    CK.load_net_state(net, ckpt["state_dict"], str(ckpt_path))
    net.eval().to(device)
    ids = ckpt.get("category_ids") or list(range(net.num_classes))
    return LoadedDetector(net, stored, [int(i) for i in ids], class_names_of(stored, ids))


def image_files(source: str | Path) -> list[Path]:
    """One image file, or the image files of a folder (not recursive), sorted by name."""
    path = Path(str(source)).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"input={source}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    raise FileNotFoundError(f"input={source}: no such file or folder")


def read_rgb(path: Path):
    """(3, H, W) uint8 RGB, whatever the file's mode (gray, RGBA, palette)."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"input: cannot read {path} as an image: {e}".splitlines()[0]) from e


def predict_image(net, image, min_size: int | list[int], max_size: int, device: str = "cpu") -> dict:
    """Detections of one (3, H0, W0) uint8 image in its own pixels.

    The image is resized as evaluation resizes (``build_transforms(train=False)``, the
    checkpoint's ``data.min_size`` / ``data.max_size``). Returns ``boxes`` (N, 4) XYXY,
    ``scores`` (N,), ``labels`` (N,) in ``0..K-1`` and, for mask models, ``masks`` (N, H0, W0) bool.
    """
    import torch
    from torchvision import tv_tensors

    from detection.data.coco import build_transforms
    from detection.tta import to_original_coords

    h0, w0 = image.shape[-2:]
    x, _ = build_transforms(False, min_size, max_size)(tv_tensors.Image(image), {})
    with torch.inference_mode():
        pred = net([x.to(device)])[0]
    target = {"size": x.shape[-2:], "orig_size": (h0, w0)}
    return {k: v.cpu() for k, v in to_original_coords(pred, target, net.with_masks).items()}


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Draw and record the detections of ``cfg.ckpt_path`` on ``cfg.input``; returns the written paths."""
    import torch
    from torchvision.io import write_png

    from detection.atomic import write_json_atomic
    from detection.evaluation import coco_results
    from lightning_modules import outputs as OUT
    from lightning_modules.visualize import draw_detections

    threshold = float(cfg.score_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"score_threshold={threshold}: expected a score in [0, 1]")
    files = image_files(cfg.input)  # before the model: a wrong path fails at once
    device = str(cfg.device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device}: no CUDA device is visible; use device=cpu")
    OUT.print_config(OmegaConf.create({k: cfg[k] for k in cfg if k not in ("paths",)}), "pyramidlab-predict")
    # the model's own score filter must not hide what the user asked to see
    loaded = load_detector(cfg.ckpt_path, device, {"score_thresh": threshold,
                                                   "detections_per_img": int(cfg.max_detections)})
    data = loaded.config.data
    min_size = cfg.min_size if cfg.min_size is not None else data.min_size
    max_size = cfg.max_size if cfg.max_size is not None else data.max_size
    min_size = OmegaConf.to_container(min_size) if OmegaConf.is_list(min_size) else int(min_size)

    out = Path(cfg.paths.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with_masks = loaded.net.with_masks
    bbox: list[dict] = []
    segm: list[dict] = []
    images: list[dict] = []
    counts = 0
    stems = [p.stem for p in files]
    for image_id, path in enumerate(files):
        image = read_rgb(path)
        pred = predict_image(loaded.net, image, min_size, int(max_size), device)
        keep = pred["scores"] >= threshold
        pred = {k: v[keep] for k, v in pred.items()}
        counts += len(pred["scores"])
        drawn = draw_detections(image, pred, loaded.class_names, mask_alpha=float(cfg.mask_alpha),
                                box_width=int(cfg.box_width))
        name = path.stem if stems.count(path.stem) == 1 else path.name.replace(".", "_")  # a.jpg + a.png
        write_png(drawn, str(out / "images" / f"{name}.png"))
        b, s = coco_results([pred], [image_id], loaded.category_ids, with_masks=with_masks)
        bbox += b
        segm += s
        images.append({"id": image_id, "file_name": str(path), "height": int(image.shape[1]),
                       "width": int(image.shape[2])})
    paths = {
        "images": out / "images",
        "detections_bbox": write_json_atomic(out / "detections_bbox.json", bbox),
        "images_index": write_json_atomic(out / "images.json", images),
    }
    if with_masks:
        paths["detections_segm"] = write_json_atomic(out / "detections_segm.json", segm)
    OUT.console.print(f"{len(files)} images, {counts} detections with score >= {threshold:g}")
    for key, p in paths.items():
        OUT.console.print(f"{key + ':':<18}{p}")
    return paths


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    H.run_guarded(predict, cfg)


def main() -> None:
    """Console script ``pyramidlab-predict``."""
    H.main_with_hints(hydra_main, "predict")


if __name__ == "__main__":
    main()
