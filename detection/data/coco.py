"""COCO-format detection dataset, transforms, collate and aspect-ratio grouped batching.

Plain PyTorch / torchvision / pycocotools: no Lightning, no Hydra.

Conventions:
* Labels are contiguous ``0..K-1`` in the order of the sorted original category ids
  (``dataset.category_ids[label]`` gives the original COCO id back for results JSON).
* Boxes are ``XYXY`` float pixels. Train targets are in the transformed image's
  coordinates; eval targets additionally carry ``orig_boxes`` (and ``orig_masks``) in the
  original image's coordinates, as COCO evaluation needs.
* Images are float ``(3, H, W)`` in ``[0, 1]``; normalisation is the model's job.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import BatchSampler, Dataset, Sampler, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from detection.data.serialize import coco_records, freeze_inherited_objects

__all__ = [
    "BadImageError",
    "CocoDetection",
    "GroupedBatchSampler",
    "aspect_ratio_group_ids",
    "build_transforms",
    "collate_fn",
    "load_rgb_image",
    "num_categories_in",
    "read_coco_json",
]

log = logging.getLogger(__name__)

_LAYOUT_HINT = "expected DIR/annotations/instances_{split}.json with images in DIR/{split}/"

# Per-box target entries that must be filtered together with the boxes.
PER_BOX_KEYS = ("labels", "iscrowd", "area", "orig_boxes", "orig_masks")


class BadImageError(RuntimeError):
    """An image file that cannot be decoded (or does not match its annotation); names the file."""


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file with PIL and return it fully decoded as 8-bit RGB.

    Handles grayscale ("L", "I;16", "I", "F"), "LA", RGBA, CMYK and palette ("P") images.

    Raises:
        BadImageError: If the file is missing, truncated or not an image; the message names the path.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # 16-bit / float grayscale: PIL's convert("L") clips instead of scaling.
                arr = np.asarray(im, dtype=np.float32)
                top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                im = Image.fromarray((np.clip(arr / top, 0, 1) * 255).astype(np.uint8))
            elif im.mode in ("P", "PA") and "transparency" in im.info:
                # Palette transparency must go through RGBA, or PIL warns and may pick wrong colours.
                im = im.convert("RGBA")
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def num_categories_in(ann_file: str | os.PathLike) -> int:
    """Number of categories listed in a COCO annotation file (reads the JSON, no index built)."""
    return len(read_coco_json(ann_file).get("categories", []))


def _duplicates(ids: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    dup: list[Any] = []
    for i in ids:
        if i in seen and i not in dup:
            dup.append(i)
        seen.add(i)
    return dup


def read_coco_json(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Read and check a COCO annotation file; every problem is one line naming the file.

    Checks what pycocotools silently gets wrong: duplicated image ids (its index keeps the
    last image, so one image's annotations get attached to another's file) and duplicated
    annotation ids. An images-only file (COCO test-dev's ``image_info_test-dev2017.json``:
    no ``annotations`` key) gets an empty ``annotations`` list: usable for prediction.

    Returns:
        The JSON object (``images``, ``annotations``, ``categories``, ...).

    Raises:
        ValueError: not JSON, truncated, not a COCO object, or duplicated ids.
    """
    import json

    path = Path(ann_file)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"annotation file {path} is not valid JSON (truncated or corrupt?): {e.msg} at line {e.lineno} "
            f"column {e.colno}"
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"annotation file {path} is not UTF-8 JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"annotation file {path} is not COCO format: expected a JSON object with an 'images' list")
    anns = data.setdefault("annotations", [])
    if not isinstance(anns, list):
        raise ValueError(f"annotation file {path}: 'annotations' must be a list, got {type(anns).__name__}")
    for what, items in (("image", data["images"]), ("annotation", anns)):
        missing = next((k for k, it in enumerate(items) if not isinstance(it, dict) or "id" not in it), None)
        if missing is not None:
            raise ValueError(f"annotation file {path}: {what} entry #{missing} has no 'id'")
        dup = _duplicates([it["id"] for it in items])
        if dup:
            shown = ", ".join(str(i) for i in dup[:10]) + (f" (+{len(dup) - 10} more)" if len(dup) > 10 else "")
            raise ValueError(f"annotation file {path}: duplicated {what} ids {shown}; every {what} id must be unique")
    return data


def _load_coco(ann_file: Path) -> COCO:
    """pycocotools ``COCO`` from a file checked by :func:`read_coco_json`."""
    coco = COCO()
    coco.dataset = read_coco_json(ann_file)
    # pycocotools prints progress to stdout; keep logs clean.
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """COCO-format detection dataset returning ``(image, target)`` pairs.

    Args:
        root: Dataset directory (``root/annotations/instances_{split}.json``, images in ``root/{split}/``).
        split: Split name, e.g. ``"train2017"`` or ``"val"``.
        ann_file: Annotation file; overrides the default path.
        img_dir: Image directory; overrides the default path.
        transforms: Callable ``(image, target) -> (image, target)`` on tv_tensors (see
            :func:`build_transforms`). None: images are only converted to float.
        train: Training targets (crowd boxes dropped) vs eval targets (crowd kept with
            ``iscrowd=1``; ``orig_boxes`` / ``orig_masks`` added).
        with_masks: Also return instance masks decoded from polygons or RLE.
        skip_bad_images: On an unreadable image log a warning and return None (dropped by
            :func:`collate_fn`) instead of raising :class:`BadImageError`.
        remove_images_without_annotations: Drop images with no usable non-crowd box from
            the index. Default: ``train``.

    Item:
        image: float tensor ``(3, H, W)`` in ``[0, 1]`` (after transforms).
        target: dict with ``boxes`` ``(N, 4)`` float XYXY (transformed pixels), ``labels``
        ``(N,)`` int64 contiguous, ``iscrowd`` ``(N,)`` int64, ``area`` ``(N,)`` float (COCO
        ``area``, original pixels), ``image_id`` int, ``orig_size`` / ``size`` int64 ``[H, W]``,
        ``masks`` ``(N, H, W)`` uint8 if ``with_masks``; eval adds ``orig_boxes`` ``(N, 4)``
        and, with masks, ``orig_masks`` ``(N, H0, W0)`` uint8.

    Attributes:
        coco: The pycocotools ``COCO`` object (ground truth for evaluation).
        ids: Image ids in index order.
        category_ids: Sorted original category ids; ``category_ids[label]`` is the COCO id.
        cat_to_label: Original category id -> contiguous label.
        class_names: Category names in label order.
        num_clamped_boxes / num_dropped_boxes: Box sanitising counts from ``__init__``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        ann_file: str | os.PathLike | None = None,
        img_dir: str | os.PathLike | None = None,
        transforms: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None,
        train: bool = True,
        with_masks: bool = False,
        skip_bad_images: bool = False,
        remove_images_without_annotations: bool | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        hint = _LAYOUT_HINT.replace("{split}", split)
        if ann_file is None or img_dir is None:
            if not self.root.is_dir():
                raise FileNotFoundError(f"COCO dataset root not found: {self.root} ({hint})")
        self.ann_file = (
            Path(ann_file) if ann_file is not None else self.root / "annotations" / f"instances_{split}.json"
        )
        self.img_dir = Path(img_dir) if img_dir is not None else self.root / split
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file} ({hint})")
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"COCO image directory not found: {self.img_dir} ({hint})")

        self.transforms = transforms
        self.train = train
        self.with_masks = with_masks
        self.skip_bad_images = skip_bad_images
        if remove_images_without_annotations is None:
            remove_images_without_annotations = train
        self.num_bad_images = 0  # per process: each DataLoader worker counts its own

        self.coco = _load_coco(self.ann_file)
        self.category_ids: list[int] = sorted(int(c) for c in self.coco.cats)
        self.cat_to_label: dict[int, int] = {c: i for i, c in enumerate(self.category_ids)}
        self.class_names: list[str] = [str(self.coco.cats[c].get("name", c)) for c in self.category_ids]

        # Sanitise all boxes once, eagerly: cheap (no image decoding) and it gives one summary
        # warning per file instead of a stream of per-item warnings from the workers.
        self._anns: dict[int, dict[str, np.ndarray]] = {}
        clamped = dropped = 0
        for img_id in sorted(self.coco.imgs):
            info = self.coco.imgs[img_id]
            w, h = float(info["width"]), float(info["height"])
            boxes, labels, crowd, area, ann_ids = [], [], [], [], []
            for ann in self.coco.imgToAnns.get(img_id, []):
                cat = ann.get("category_id")
                if cat not in self.cat_to_label:
                    raise ValueError(
                        f"annotation id {ann.get('id')} has category_id {cat}, which is not in the categories "
                        f"of {self.ann_file}"
                    )
                is_crowd = int(ann.get("iscrowd", 0))
                if train and is_crowd:
                    continue  # crowd regions are not training targets (torchvision reference does the same)
                bbox = ann.get("bbox")
                if bbox is None or len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox):
                    dropped += 1
                    continue
                x, y, bw, bh = (float(v) for v in bbox)
                x0, y0, x1, y1 = x, y, x + bw, y + bh
                cx0, cy0 = min(max(x0, 0.0), w), min(max(y0, 0.0), h)
                cx1, cy1 = min(max(x1, 0.0), w), min(max(y1, 0.0), h)
                if cx1 <= cx0 or cy1 <= cy0:
                    dropped += 1
                    continue
                if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                    clamped += 1
                boxes.append((cx0, cy0, cx1, cy1))
                labels.append(self.cat_to_label[cat])
                crowd.append(is_crowd)
                area.append(float(ann.get("area", (cx1 - cx0) * (cy1 - cy0))))
                ann_ids.append(int(ann["id"]))
            self._anns[img_id] = {
                "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                "labels": np.asarray(labels, dtype=np.int64),
                "iscrowd": np.asarray(crowd, dtype=np.int64),
                "area": np.asarray(area, dtype=np.float32),
                "ann_ids": np.asarray(ann_ids, dtype=np.int64),
            }
        self.num_clamped_boxes, self.num_dropped_boxes = clamped, dropped
        if clamped or dropped:
            log.warning(
                "%s: %d boxes clamped to the image bounds, %d boxes dropped (empty/invalid after clamping)",
                self.ann_file.name,
                clamped,
                dropped,
            )

        ids = sorted(self.coco.imgs)
        self.num_images_in_file = len(ids)
        if remove_images_without_annotations:
            ids = [i for i in ids if (self._anns[i]["iscrowd"] == 0).any()]
        self.num_images_without_boxes = self.num_images_in_file - len(ids)
        self.ids: list[int] = ids
        # Which images were skipped as unreadable, by position in the file: shared memory, so the
        # DataLoader workers' skips are visible to the main process (counted once per image).
        self._pos = {img_id: k for k, img_id in enumerate(sorted(self.coco.imgs))}
        self._skipped = torch.zeros(max(len(self._pos), 1), dtype=torch.uint8)
        if skip_bad_images:
            self._skipped.share_memory_()
        # one serialized buffer instead of a dict of dicts: DataLoader workers read records without
        # copying them (detection/data/serialize.py)
        self._anns = coco_records(self.coco, self._anns, with_masks)

    # ----------------------------------------------------------------------------- index
    def __len__(self) -> int:
        return len(self.ids)

    def limit(self, n: int | None) -> CocoDetection:
        """Keep only the first ``n`` images of the index (deterministic subset); returns self."""
        if n is not None:
            self.ids = self.ids[: max(int(n), 0)]
        return self

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def num_skipped_images(self) -> int:
        """Distinct images skipped as unreadable so far, by every process reading this dataset."""
        return int(self._skipped.sum())

    def why_empty(self) -> str:
        """Why the index holds no image (for a one-line error); ``""`` when it holds some."""
        if self.ids:
            return ""
        if self.num_images_in_file == 0:
            return "its 'images' list is empty"
        if self.num_images_without_boxes:
            return (
                f"none of its {self.num_images_in_file} images has a usable training box "
                f"({self.num_dropped_boxes} boxes dropped as empty or invalid; crowd boxes are not training targets)"
            )
        return f"the image limit (max images) keeps none of its {self.num_images_in_file} images"

    # ----------------------------------------------------------------------------- items
    def _masks(self, ann_ids: np.ndarray, h: int, w: int, segms: list | None = None) -> np.ndarray:
        masks = np.zeros((len(ann_ids), h, w), dtype=np.uint8)
        for k, aid in enumerate(ann_ids.tolist()):
            seg = segms[k] if segms is not None else self.coco.anns[aid].get("segmentation")
            if not seg:
                continue  # box-only annotation: empty mask
            if isinstance(seg, list):  # polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            else:
                size = [int(v) for v in seg.get("size", ())] if isinstance(seg, dict) else None
                if size != [h, w]:
                    # pycocotools would fail with a NumPy broadcast error that names nothing
                    raise ValueError(
                        f"annotation id {aid} in {self.ann_file}: RLE segmentation size "
                        f"{seg.get('size') if isinstance(seg, dict) else seg!r} differs from its image "
                        f"{self.coco.anns[aid].get('image_id')}'s [height, width] = [{h}, {w}]"
                    )
                # uncompressed RLE (counts as a list) is compressed first
                rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
            masks[k] = mask_utils.decode(rle)
        return masks

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | None:
        img_id = self.ids[index]
        freeze_inherited_objects()
        a = self._anns[img_id]
        info = a["info"]
        path = self.img_dir / info["file_name"]
        try:
            pil = load_rgb_image(path)
            h0, w0 = int(info["height"]), int(info["width"])
            if (pil.height, pil.width) != (h0, w0):
                # Annotations would be in the wrong coordinates (e.g. a re-encoded or rotated file).
                raise BadImageError(
                    f"image {path} is {pil.width}x{pil.height} but its annotation says {w0}x{h0}"
                )
        except BadImageError as e:
            if not self.skip_bad_images:
                raise
            self.num_bad_images += 1
            pos = self._pos[img_id]
            if not self._skipped[pos]:  # each skipped file named once in the log, not every epoch
                self._skipped[pos] = 1
                log.warning("skipping bad image (%d so far, data.skip_bad_images=true): %s", self.num_skipped_images, e)
            return None

        image = tv_tensors.Image(torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1))
        boxes = torch.from_numpy(a["boxes"].copy())
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h0, w0)),
            "labels": torch.from_numpy(a["labels"].copy()),
            "iscrowd": torch.from_numpy(a["iscrowd"].copy()),
            "area": torch.from_numpy(a["area"].copy()),
            "image_id": int(img_id),
            "orig_size": torch.tensor([h0, w0], dtype=torch.int64),
        }
        if not self.train:
            target["orig_boxes"] = boxes.clone()
        if self.with_masks:
            masks = torch.from_numpy(self._masks(a["ann_ids"], h0, w0, a.get("segms")))
            target["masks"] = tv_tensors.Mask(masks)
            if not self.train:
                target["orig_masks"] = masks.clone()

        if self.transforms is not None:
            image, target = self.transforms(image, target)
        image = v2.functional.to_dtype(image, torch.float32, scale=True)
        image = image.as_subclass(torch.Tensor)
        # Plain tensors downstream: tv_tensor subclasses change the semantics of some torch ops.
        for k in ("boxes", "masks"):
            if k in target:
                target[k] = target[k].as_subclass(torch.Tensor)
        target["boxes"] = target["boxes"].float()
        target["size"] = torch.tensor(image.shape[-2:], dtype=torch.int64)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ann_file={self.ann_file}, images={len(self)}, "
            f"classes={self.num_classes}, train={self.train}, with_masks={self.with_masks})"
        )


# --------------------------------------------------------------------------------- transforms
def _per_box_entries(sample: Any) -> tuple[torch.Tensor, ...]:
    # SanitizeBoundingBoxes labels_getter: every per-box tensor of the target, so removing a
    # degenerate box also removes its label, crowd flag, area and original box / mask.
    # (tv_tensors.Mask "masks" are filtered by the transform itself.)
    target = sample[1]
    return tuple(target[k] for k in PER_BOX_KEYS if k in target)


def build_transforms(
    train: bool,
    min_size: int | Sequence[int],
    max_size: int,
    flip_prob: float = 0.5,
    scale_jitter: Sequence[int] | None = None,
) -> v2.Compose:
    """Detection transforms on ``(tv_tensors.Image, target)``: resize (+ flip), then float ``[0, 1]``.

    Args:
        train: Train (random shortest-side scale from ``scale_jitter`` or ``min_size``, random
            horizontal flip, degenerate boxes removed) or eval (deterministic resize).
        min_size: Target shortest side in pixels; a list is sampled from in train and its
            last value is used in eval (torchvision's GeneralizedRCNNTransform convention).
        max_size: Cap on the longest side in pixels.
        flip_prob: Horizontal flip probability (train only).
        scale_jitter: Shortest-side choices for multi-scale training; overrides ``min_size`` in train.

    Returns:
        A ``v2.Compose`` callable as ``transforms(image, target) -> (image, target)``.
    """
    sizes = [int(s) for s in (min_size if isinstance(min_size, Sequence) else [min_size])]
    if train:
        jitter = [int(s) for s in scale_jitter] if scale_jitter else sizes
        ops: list[Any] = [v2.RandomShortestSize(min_size=jitter, max_size=int(max_size), antialias=True)]
        if flip_prob > 0:
            ops.append(v2.RandomHorizontalFlip(p=flip_prob))
        # Only in train: eval targets must stay 1:1 with the COCO ground truth, and a tiny GT box
        # shrunk below 1 px by the resize is still a valid GT for evaluation.
        ops.append(v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_per_box_entries))
    else:
        ops = [v2.Resize(size=sizes[-1], max_size=int(max_size), antialias=True)]
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)


def collate_fn(batch: Sequence[Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Collate detection items into ``(list of (3, H, W) images, list of target dicts)``.

    None items (bad images skipped by the dataset) are dropped, so a batch may be shorter
    than ``batch_size`` or even empty.
    """
    items = [b for b in batch if b is not None]
    return [b[0] for b in items], [b[1] for b in items]


# ----------------------------------------------------------------------------- grouping
def aspect_ratio_group_ids(dataset: Dataset) -> list[int]:
    """Aspect-ratio group of every item, from COCO image info (no decoding): 0 if w < h else 1.

    Args:
        dataset: A :class:`CocoDetection` or a ``torch.utils.data.Subset`` of one (nested OK).

    Returns:
        ``len(dataset)`` ints: 0 for portrait, 1 for landscape or square.
    """
    if isinstance(dataset, Subset):
        inner = aspect_ratio_group_ids(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if not isinstance(dataset, CocoDetection):
        raise TypeError(
            f"aspect_ratio_group_ids needs a CocoDetection (or Subset of one), got {type(dataset)}"
        )
    out = []
    for img_id in dataset.ids:
        info = dataset.coco.imgs[img_id]
        out.append(0 if float(info["width"]) < float(info["height"]) else 1)
    return out


class GroupedBatchSampler(BatchSampler):
    """Batch sampler whose batches hold indices of one group (e.g. one aspect-ratio class).

    Indices are taken in the order of ``sampler`` and buffered per group; a batch is yielded
    as soon as a group's buffer holds ``batch_size`` indices. At the end of the epoch the
    leftovers (fewer than ``batch_size`` per group) are concatenated in group order and cut
    into batches of ``batch_size`` (the last one possibly smaller; dropped if ``drop_last``).

    So the number of batches is exactly ``ceil(len(sampler) / batch_size)`` (``floor`` with
    ``drop_last``), known without iterating and equal on every DDP rank (a
    ``DistributedSampler`` gives every rank the same length). The price: of the end-of-epoch
    leftover batches, at most ``num_groups - 1`` mix groups; every other batch is single-group.
    Per-group partial batches would keep all batches pure but make the batch count depend
    on each rank's random share of the groups, and unequal counts hang DDP.

    Lightning re-instantiates ``BatchSampler`` subclasses from their constructor arguments
    to swap in a ``DistributedSampler``: ``sampler`` is the first argument and every
    argument is kept as an attribute of the same name.

    Args:
        sampler: Yields dataset indices (``RandomSampler``, ``DistributedSampler``, ...).
        group_ids: Group of every dataset index (``len(dataset)`` ints).
        batch_size: Images per batch.
        drop_last: Drop the final incomplete batch.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterator[int],
        group_ids: Sequence[int],
        batch_size: int,
        drop_last: bool = False,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        # No super().__init__: BatchSampler's only adds the same attributes with stricter checks.
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        for idx in self.sampler:
            g = self.group_ids[idx]
            buf = buffers[g]
            buf.append(idx)
            if len(buf) == self.batch_size:
                yield buf
                buffers[g] = []
        leftovers = [i for g in sorted(buffers) for i in buffers[g]]
        for start in range(0, len(leftovers), self.batch_size):
            batch = leftovers[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
