"""COCO-format data: the dataset, transforms, batching and the embedded synthetic "shapes" dataset."""

from detection.data.coco import (
    BadImageError,
    CocoDetection,
    GroupedBatchSampler,
    aspect_ratio_group_ids,
    build_transforms,
    collate_fn,
    load_rgb_image,
    num_categories_in,
)
from detection.data.shapes import SHAPE_CATEGORIES, ensure_shapes, generate_shapes, read_shapes_meta

__all__ = [
    "SHAPE_CATEGORIES",
    "BadImageError",
    "CocoDetection",
    "GroupedBatchSampler",
    "aspect_ratio_group_ids",
    "build_transforms",
    "collate_fn",
    "ensure_shapes",
    "generate_shapes",
    "load_rgb_image",
    "num_categories_in",
    "read_shapes_meta",
]
