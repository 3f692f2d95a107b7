"""Embedded synthetic detection dataset ("shapes"), written in real COCO format.

No data can be downloaded on the machines this project runs on, so the framework ships a
generator for a small, fast, but deliberately COCO-like dataset:

* 8 shape categories with NON-contiguous ids (1, 2, 3, 5, 7, 8, 11, 13), so the
  original-id -> contiguous-label mapping is exercised on every run, exactly as with COCO.
  Each category has its own hue (jittered saturation / brightness, see ``_pick_colour``), as
  many real categories have typical colours; the shape tells them apart too.
* Multi-scale objects: the longest bbox side is log-uniform between ``min_object`` px and
  ``max_object_frac`` of the image side, so COCO's small / medium / large area buckets
  are all populated.
* Images of varying aspect ratio (both orientations), so aspect-ratio grouping matters.
* Occlusion: later shapes are drawn over earlier ones; an object less than
  ``MIN_VISIBLE_FRACTION`` visible is removed from the image and the annotations.
* Textured low-contrast backgrounds (gradients, stripes, checkers, blotches, noise).

Layout (same as COCO)::

    root/annotations/instances_{train,val,test}.json
    root/train/000000000001.jpg ...
    root/val/000000000801.jpg ...
    root/test/000000001001.jpg ...   # the reporting split: val chooses checkpoints, test reports
    root/shapes_meta.json          # generation parameters; written last

Each image is generated from its own RNG seeded with ``(seed, split, index)``, so the same
seed always gives the same JSON bytes, and the val (and test) images do not change when only
``num_train`` changes.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPE_CATEGORIES",
    "MIN_VISIBLE_FRACTION",
    "generate_shapes",
    "ensure_shapes",
    "read_shapes_meta",
]

log = logging.getLogger(__name__)

# Bump when the generator's output changes for the same parameters: ensure_shapes() then
# regenerates datasets written by an older version instead of silently reusing them.
GENERATOR_VERSION = 2

META_FILE = "shapes_meta.json"

# Non-contiguous on purpose (like COCO's 1..90 with gaps).
SHAPE_CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 5, "name": "star", "supercategory": "shape"},
    {"id": 7, "name": "hexagon", "supercategory": "shape"},
    {"id": 8, "name": "diamond", "supercategory": "shape"},
    {"id": 11, "name": "cross", "supercategory": "shape"},
    {"id": 13, "name": "ellipse", "supercategory": "shape"},
]

# An object whose visible (un-occluded) pixel fraction falls below this is dropped: it is
# neither drawn nor annotated, so no annotation points at an invisible object and no
# visible pixels are left unannotated.
MIN_VISIBLE_FRACTION = 0.4

_SPLITS = ("train", "val")
_JPEG_QUALITY = 92


def _regular_polygon(n: int, start_angle: float = -math.pi / 2) -> np.ndarray:
    t = start_angle + np.arange(n) * (2 * math.pi / n)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = -math.pi / 2 + np.arange(2 * points) * (math.pi / points)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross(half_width: float = 0.3) -> np.ndarray:
    a, w = 1.0, half_width
    return np.array(
        [
            [-w, -a],
            [w, -a],
            [w, -w],
            [a, -w],
            [a, w],
            [w, w],
            [w, a],
            [-w, a],
            [-w, w],
            [-a, w],
            [-a, -w],
            [-w, -w],
        ]
    )


# Unit-size templates (centred on 0, roughly in [-1, 1]^2), one per category, same order as
# SHAPE_CATEGORIES. Every shape is a polygon, so the drawn pixels and the COCO polygon
# segmentation are the same geometry. Ellipse (aspect 0.55) and diamond (aspect 0.6) are
# elongated so that no rotation of a circle / square can be confused with them.
_TEMPLATES: list[np.ndarray] = [
    _regular_polygon(32),
    np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]),
    _regular_polygon(3),
    _star(),
    _regular_polygon(6),
    np.array([[0.0, -1.0], [0.6, 0.0], [0.0, 1.0], [-0.6, 0.0]]),
    _cross(),
    _regular_polygon(32) * np.array([1.0, 0.55]),
]


def _params(
    num_train: int,
    num_val: int,
    image_size: int,
    seed: int,
    min_object: int,
    max_object_frac: float,
    max_objects: int,
    num_test: int = 0,
) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "image_size": int(image_size),
        "seed": int(seed),
        "min_object": int(min_object),
        "max_object_frac": float(max_object_frac),
        "max_objects": int(max_objects),
    }


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Textured background, float32 ``(H, W, 3)`` in [0, 255], and its mean colour ``(3,)``."""
    base = rng.uniform(50.0, 205.0, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Linear gradient towards a nearby colour, random direction.
    theta = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(theta) + yy * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    delta = rng.normal(0.0, 30.0, size=3).astype(np.float32)
    img = base + t[..., None] * delta
    # One texture on top; amplitudes are small so shapes keep a clear contrast.
    kind = rng.integers(0, 4)
    amp = np.float32(rng.uniform(6.0, 18.0))
    if kind == 1:  # stripes at a random angle and period
        phi = rng.uniform(0, math.pi)
        period = rng.uniform(5.0, 40.0)
        pattern = np.sin((xx * math.cos(phi) + yy * math.sin(phi)) * (2 * math.pi / period))
    elif kind == 2:  # checkerboard
        p = rng.uniform(6.0, 40.0)
        pattern = np.sign(np.sin(xx * (math.pi / p)) * np.sin(yy * (math.pi / p)))
    elif kind == 3:  # low-frequency blotches: coarse noise, bilinearly upsampled
        cells = int(rng.integers(3, 9))
        coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
        pattern = np.asarray(
            Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32
        )
    else:
        pattern = None
    if pattern is not None:
        tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
        img = img + (amp * pattern.astype(np.float32))[..., None] * tint
    return img, img.reshape(-1, 3).mean(axis=0)


def _shape_polygon(rng: np.random.Generator, cat_index: int, size: float, w: int, h: int) -> np.ndarray:
    """Polygon ``(K, 2)`` in pixel coords whose bbox longest side is ``size``, placed inside the image."""
    poly = _TEMPLATES[cat_index]
    a = rng.uniform(0, 2 * math.pi)  # any rotation: the class is rotation-invariant
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    poly = poly @ rot.T
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    poly = (poly - lo) * (size / float((hi - lo).max()))
    ext = poly.max(axis=0)
    # Keep the whole (amodal) shape inside the image so its bbox needs no clipping.
    x0 = rng.uniform(0.0, max(w - ext[0], 0.0))
    y0 = rng.uniform(0.0, max(h - ext[1], 0.0))
    return poly + np.array([x0, y0])


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _pick_colour(rng: np.random.Generator, ref: np.ndarray, cat_index: int) -> tuple[int, int, int]:
    """Fill colour of one object: its category's hue, random saturation and brightness.

    Each category owns a hue (evenly spaced, jittered by ±0.03 of the circle), as many real
    categories have typical colours; shape still tells them apart. Without a colour cue a
    from-scratch detector needs far longer than the ``make train`` budget to separate eight
    rotated shapes, and AP then measures classification, not the multi-scale localisation
    the necks change. The most contrasting of a few candidates against the local
    background ``ref`` (RGB) is kept so every object stays visible.
    """
    best, best_d = (0, 0, 0), -1.0
    base = cat_index / len(_TEMPLATES)
    for _ in range(8):
        h = (base + rng.uniform(-0.03, 0.03)) % 1.0
        rgb = np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))) * 255.0
        d = float(np.abs(rgb - ref).sum())
        if d > best_d:
            best, best_d = tuple(int(round(v)) for v in rgb), d
        if d >= 150:
            break
    return best


def _render_image(
    rng: np.random.Generator, p: dict[str, Any]
) -> tuple[Image.Image, list[tuple[int, np.ndarray]]]:
    """One image and its kept objects ``[(category_index, polygon (K, 2)), ...]``."""
    s = p["image_size"]
    short = int(round(rng.uniform(0.75, 1.0) * s))
    w, h = (s, short) if rng.random() < 0.5 else (short, s)

    bg, _ = _background(rng, h, w)

    max_side = max(min(p["max_object_frac"] * s, min(w, h) - 2.0), p["min_object"])
    lo, hi = math.log(p["min_object"]), math.log(max_side)
    n = int(rng.integers(1, p["max_objects"] + 1))
    objects: list[tuple[int, np.ndarray]] = []
    for _ in range(n):
        cat = int(rng.integers(0, len(_TEMPLATES)))
        size = math.exp(rng.uniform(lo, hi))
        objects.append((cat, _shape_polygon(rng, cat, size, w, h)))

    # Occlusion: paint instance indices in drawing order (later over earlier) and compare
    # each object's visible pixels with its full rasterised area. Removing an object can
    # only uncover earlier ones, so one pass leaves every kept object >= the threshold.
    index_map = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(index_map)
    full = np.zeros(n + 1, dtype=np.int64)
    for k, (_, poly) in enumerate(objects, start=1):
        pts = [tuple(xy) for xy in poly.tolist()]
        draw.polygon(pts, fill=k)
        x0, y0 = np.floor(poly.min(axis=0)).astype(int)
        x1, y1 = np.ceil(poly.max(axis=0)).astype(int)
        alone = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2), 0)
        ImageDraw.Draw(alone).polygon([(x - x0, y - y0) for x, y in pts], fill=1)
        full[k] = int(np.asarray(alone, dtype=np.uint8).sum())
    visible = np.bincount(np.asarray(index_map, dtype=np.uint8).ravel(), minlength=n + 1)
    keep = [
        obj
        for k, obj in enumerate(objects, start=1)
        if full[k] > 0 and visible[k] / full[k] >= MIN_VISIBLE_FRACTION
    ]

    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    for cat, poly in keep:
        cx, cy = np.clip(poly.mean(axis=0).astype(int), 0, [w - 1, h - 1])
        draw.polygon([tuple(xy) for xy in poly.tolist()], fill=_pick_colour(rng, bg[cy, cx], cat))

    # Sensor-like noise over everything (shapes included) so flat fills are not trivially separable.
    sigma = np.float32(rng.uniform(2.0, 7.0))
    arr = np.asarray(img, dtype=np.float32) + sigma * rng.standard_normal((h, w, 3), dtype=np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB"), keep


def _r(x: float) -> float:
    return round(float(x), 2)


def _write_split(
    out: Path,
    split: str,
    split_index: int,
    count: int,
    first_image_id: int,
    first_ann_id: int,
    p: dict[str, Any],
    progress: Any,
    task: Any,
) -> int:
    img_dir = out / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for i in range(count):
        rng = np.random.default_rng([p["seed"], split_index, i])
        img, objects = _render_image(rng, p)
        image_id = first_image_id + i
        file_name = f"{image_id:012d}.jpg"
        img.save(img_dir / file_name, quality=_JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": img.width, "height": img.height})
        for cat, poly in objects:
            x0, y0 = poly.min(axis=0)
            x1, y1 = poly.max(axis=0)
            # Amodal annotation: bbox, polygon and area describe the FULL shape even when a later
            # shape hides part of it (COCO instead annotates the visible part). Objects that are
            # mostly hidden are dropped at render time, so every box still has >= 40% visible.
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": SHAPE_CATEGORIES[cat]["id"],
                    "bbox": [_r(x0), _r(y0), _r(x1 - x0), _r(y1 - y0)],
                    "area": _r(_polygon_area(poly)),
                    "iscrowd": 0,
                    "segmentation": [[_r(v) for v in poly.reshape(-1).tolist()]],
                }
            )
            ann_id += 1
        if progress is not None:
            progress.advance(task)
    coco = {
        "info": {"description": f"pyramidlab synthetic shapes ({split})", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": SHAPE_CATEGORIES,
    }
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    with open(out / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    return ann_id


def _progress(total: int) -> Any:
    # Rich live display only on a terminal; logs and CI stay clean.
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]generating shapes"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def read_shapes_meta(root: str | os.PathLike) -> dict[str, Any] | None:
    """The generation parameters stored in ``root/shapes_meta.json``, or None if absent/unreadable."""
    try:
        with open(Path(root) / META_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def generate_shapes(
    root: str | os.PathLike,
    *,
    num_train: int = 800,
    num_val: int = 200,
    num_test: int = 200,
    image_size: int = 256,
    seed: int = 0,
    min_object: int = 8,
    max_object_frac: float = 0.6,
    max_objects: int = 8,
) -> Path:
    """Generate the shapes dataset at ``root`` (replacing a previous shapes dataset there).

    The dataset is written into a temporary sibling directory and renamed into place once
    complete (``shapes_meta.json`` written last), so an interrupted run never leaves a
    partial dataset that looks complete.

    Args:
        root: Target directory. If it exists it must be a shapes dataset (has
            ``shapes_meta.json``) or empty; anything else is refused, never deleted.
        num_train: Number of train images.
        num_val: Number of val images.
        num_test: Number of test images: a third split, so that the checkpoint chosen on val is
            reported on images selection never saw (``data.test_split: test``). Its images come
            from their own seeds ``(seed, 2, i)``: train and val do not change with it.
        image_size: Long side of every image in pixels; the short side is uniform in
            ``[0.75, 1.0] * image_size``, landscape or portrait at random.
        seed: Seed; the same seed gives byte-identical annotation files.
        min_object: Smallest longest-bbox-side in pixels.
        max_object_frac: Largest longest-bbox-side as a fraction of ``image_size`` (also
            capped by the short side of the image).
        max_objects: Objects drawn per image is uniform in ``[1, max_objects]`` before
            occlusion filtering (so an image always has at least one object).

    Returns:
        ``Path(root)``.
    """
    if not 1 <= max_objects <= 254:
        raise ValueError(f"max_objects must be in [1, 254], got {max_objects}")
    if min_object < 1 or min_object > max_object_frac * image_size:
        raise ValueError(f"min_object={min_object} must be in [1, max_object_frac * image_size]")
    root = Path(root).expanduser().absolute()
    if root.exists() and not (root / META_FILE).exists() and any(root.iterdir()):
        raise FileExistsError(
            f"refusing to overwrite {root}: it exists, is not empty and is not a shapes dataset (no {META_FILE})"
        )
    p = _params(num_train, num_val, image_size, seed, min_object, max_object_frac, max_objects, num_test)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    progress = _progress(num_train + num_val + num_test)
    try:
        task = None
        if progress is not None:
            progress.start()
            task = progress.add_task("shapes", total=num_train + num_val + num_test)
        ann_id = _write_split(tmp, "train", 0, num_train, 1, 1, p, progress, task)
        ann_id = _write_split(tmp, "val", 1, num_val, num_train + 1, ann_id, p, progress, task)
        if num_test > 0:
            _write_split(tmp, "test", 2, num_test, num_train + num_val + 1, ann_id, p, progress, task)
        with open(tmp / META_FILE, "w") as f:
            json.dump(p, f, indent=2, sort_keys=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if progress is not None:
            progress.stop()
    # Swap into place: move any old dataset aside first (a rename cannot replace a non-empty dir).
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process created root meanwhile (e.g. concurrent ranks): keep its dataset if it
        # matches ours, otherwise surface the error.
        shutil.rmtree(tmp, ignore_errors=True)
        if read_shapes_meta(root) != p:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info(
        "generated shapes dataset at %s (%d+%d+%d images) in %.1fs",
        root,
        num_train,
        num_val,
        num_test,
        time.perf_counter() - t0,
    )
    return root


def ensure_shapes(
    root: str | os.PathLike,
    *,
    num_train: int = 800,
    num_val: int = 200,
    num_test: int = 200,
    image_size: int = 256,
    seed: int = 0,
    min_object: int = 8,
    max_object_frac: float = 0.6,
    max_objects: int = 8,
) -> Path:
    """Generate the shapes dataset at ``root`` unless one with exactly these parameters is there.

    Args: as :func:`generate_shapes`.

    Returns:
        ``Path(root)``.
    """
    p = _params(num_train, num_val, image_size, seed, min_object, max_object_frac, max_objects, num_test)
    root = Path(root).expanduser().absolute()
    meta = read_shapes_meta(root)
    splits = (*_SPLITS, "test") if num_test > 0 else _SPLITS
    if meta == p and all((root / "annotations" / f"instances_{s}.json").is_file() for s in splits):
        return root
    if meta is not None:
        log.info("shapes dataset at %s has different parameters; regenerating", root)
    return generate_shapes(
        root,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        image_size=image_size,
        seed=seed,
        min_object=min_object,
        max_object_frac=max_object_frac,
        max_objects=max_objects,
    )
