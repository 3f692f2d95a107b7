"""Object and background crops of a detection dataset, for classification pretraining of a backbone.

The papers fine-tune ImageNet-pretrained backbones with the stem and layer1 frozen. Without network
access there is no ImageNet here, so ``pyramidlab-pretrain`` teaches a backbone the embedded data's
own objects first: square crops around each training box (label: its category) and crops of
background (label: ``num_classes``), classified by the backbone plus a linear layer.

Only the training split is read (the caller passes its dataset); the evaluation images are never
seen. Images are decoded once and kept in memory (the embedded train split is 800 images, ~150 MB
as uint8); each crop is cut and resized by ``torchvision.ops.roi_align``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset
from torchvision.ops import box_iou, roi_align

__all__ = ["CropSampler"]


class CropSampler(IterableDataset):
    """An endless stream of ``(crops, labels)`` batches from a detection dataset's images and boxes.

    Args:
        dataset: items ``(image (3, H, W) float in [0, 1], target with boxes XYXY and labels)``
            (a :class:`~detection.data.coco.CocoDetection` without transforms).
        num_classes: object categories; background crops get label ``num_classes``.
        crop_size: side of the square crops in pixels.
        batch_size: crops per batch.
        object_fraction: share of crops centred on an object (the rest are background).
        context: a crop's side is the object's longer side times U(context[0], context[1]).
        jitter: the crop centre moves by up to this fraction of its side.
        min_background: smallest background crop side in pixels.
        max_background_iou: a background crop overlapping any box by more IoU than this is
            ignored in the loss (label -1): neither an object nor clean background.
        seed: the sampler's RNG.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        num_classes: int,
        crop_size: int = 64,
        batch_size: int = 64,
        object_fraction: float = 0.75,
        context: Sequence[float] = (1.2, 2.0),
        jitter: float = 0.15,
        min_background: int = 8,
        max_background_iou: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= object_fraction <= 1.0:
            raise ValueError(f"object_fraction={object_fraction} must be in [0, 1]")
        if len(context) != 2 or not 0 < context[0] <= context[1]:
            raise ValueError(f"context={list(context)} must be [low, high] with 0 < low <= high")
        self.images: list[Tensor] = []
        self.boxes: list[Tensor] = []
        self.labels: list[Tensor] = []
        for k in range(len(dataset)):
            item = dataset[k]
            if item is None:  # an unreadable image skipped by the dataset (counted there)
                continue
            image, target = item
            self.images.append((image * 255).round().to(torch.uint8))
            self.boxes.append(target["boxes"].float().reshape(-1, 4))
            self.labels.append(target["labels"].long().reshape(-1))
        if not self.images:
            raise ValueError("CropSampler: the dataset holds no readable image")
        self.num_classes = int(num_classes)
        self.crop_size = int(crop_size)
        self.batch_size = int(batch_size)
        self.object_fraction = float(object_fraction)
        self.context = (float(context[0]), float(context[1]))
        self.jitter = float(jitter)
        self.min_background = float(min_background)
        self.max_background_iou = float(max_background_iou)
        self.seed = int(seed)

    def _crop_box(self, rng: np.random.Generator, k: int) -> tuple[list[float], int]:
        """One crop of image ``k``: ``[x0, y0, x1, y1]`` and its label (-1: ignored)."""
        _, h, w = self.images[k].shape
        boxes, labels = self.boxes[k], self.labels[k]
        if len(boxes) and rng.random() < self.object_fraction:
            j = int(rng.integers(len(boxes)))
            x0, y0, x1, y1 = boxes[j].tolist()
            side = max(x1 - x0, y1 - y0) * rng.uniform(*self.context)
            cx = (x0 + x1) / 2 + rng.uniform(-self.jitter, self.jitter) * side
            cy = (y0 + y1) / 2 + rng.uniform(-self.jitter, self.jitter) * side
            label = int(labels[j])
        else:
            top = max(min(h, w) * 0.6, self.min_background + 1)
            side = math.exp(rng.uniform(math.log(self.min_background), math.log(top)))
            cx = rng.uniform(min(side / 2, w / 2), max(w - side / 2, w / 2))
            cy = rng.uniform(min(side / 2, h / 2), max(h - side / 2, h / 2))
            label = self.num_classes
            if len(boxes):
                crop = torch.tensor([[cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]])
                if bool((box_iou(crop, boxes) > self.max_background_iou).any()):
                    label = -1
        return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], label

    def batch(self, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """``crops`` (B, 3, S, S) float in [0, 1] and ``labels`` (B,) int64 (-1: ignore)."""
        crops, labels = [], []
        size = (self.crop_size, self.crop_size)
        for k in rng.integers(len(self.images), size=self.batch_size).tolist():
            box, label = self._crop_box(rng, k)
            # one image at a time: padding a whole batch of full images costs more than the network
            image = self.images[k][None].float().div_(255)
            crops.append(roi_align(image, [torch.tensor([box])], size, 1.0, 2, aligned=True))
            labels.append(label)
        out = torch.cat(crops)
        flip = torch.from_numpy(rng.random(len(out)) < 0.5)
        out[flip] = out[flip].flip(-1)
        return out, torch.tensor(labels, dtype=torch.int64)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if info is None else info.id])
        while True:
            yield self.batch(rng)
