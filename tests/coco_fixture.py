"""A tiny hand-built COCO directory with the edge cases real COCO has (shared by tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATS = [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}, {"id": 10, "name": "c"}]


def _rle_mask() -> np.ndarray:
    m = np.zeros((30, 40), dtype=np.uint8)
    m[5:15, 10:30] = 1
    return m


def _make_coco(root: Path, extra_anns: list[dict] | None = None) -> Path:
    """Tiny COCO dir, split "s": 5 images (RGB, L, RGBA, P, empty), odd annotations."""
    (root / "annotations").mkdir(parents=True)
    img_dir = root / "s"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), "RGB").save(img_dir / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), "L").save(img_dir / "gray.png")
    Image.fromarray(rng.integers(0, 255, (30, 40, 4), dtype=np.uint8), "RGBA").save(img_dir / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), "L").convert("P").save(
        img_dir / "pal.png"
    )
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8), "RGB").save(img_dir / "empty.png")
    images = [
        {"id": 11, "file_name": "rgb.png", "width": 40, "height": 30},
        {"id": 12, "file_name": "gray.png", "width": 30, "height": 40},
        {"id": 13, "file_name": "rgba.png", "width": 40, "height": 30},
        {"id": 14, "file_name": "pal.png", "width": 30, "height": 40},
        {"id": 15, "file_name": "empty.png", "width": 40, "height": 30},
    ]
    compressed = mask_utils.encode(np.asfortranarray(_rle_mask()))
    compressed["counts"] = compressed["counts"].decode()
    # uncompressed RLE (column-major run lengths), as COCO stores crowd regions
    flat = _rle_mask().flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    anns = [
        {
            "id": 101,
            "image_id": 11,
            "category_id": 5,
            "bbox": [2, 3, 10, 8],
            "area": 80,
            "iscrowd": 0,
            "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]],
        },
        # out of image: clamped to x1 = 40
        {
            "id": 102,
            "image_id": 11,
            "category_id": 10,
            "bbox": [30, 10, 20, 5],
            "area": 100,
            "iscrowd": 0,
            "segmentation": [[30, 10, 40, 10, 40, 15, 30, 15]],
        },
        {
            "id": 103,
            "image_id": 11,
            "category_id": 1,
            "bbox": [10, 5, 20, 10],
            "area": 200,
            "iscrowd": 1,
            "segmentation": {"size": [30, 40], "counts": runs},
        },
        {
            "id": 104,
            "image_id": 12,
            "category_id": 1,
            "bbox": [5, 6, 10, 20],
            "area": 200,
            "iscrowd": 0,
            "segmentation": [[5, 6, 15, 6, 15, 26, 5, 26]],
        },
        # zero width: dropped
        {
            "id": 105,
            "image_id": 12,
            "category_id": 5,
            "bbox": [5, 6, 0, 20],
            "area": 0,
            "iscrowd": 0,
            "segmentation": [[5, 6, 5, 26]],
        },
        {
            "id": 106,
            "image_id": 13,
            "category_id": 10,
            "bbox": [10, 5, 20, 10],
            "area": 200,
            "iscrowd": 0,
            "segmentation": compressed,
        },
        {
            "id": 107,
            "image_id": 14,
            "category_id": 1,
            "bbox": [1, 1, 5, 5],
            "area": 25,
            "iscrowd": 0,
            "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]],
        },
    ] + (extra_anns or [])
    (root / "annotations" / "instances_s.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATS})
    )
    return root
