"""Test-time augmentation (multi-scale + horizontal flip) for any detector, and the map back to file pixels.

The papers' "†" rows (SMSL Table 3, SRF-GAN Table 2) are multi-scale testing: the image is
run at several shorter sides (and mirrored), each run's detections are mapped back to the
original image, and all of them are merged by per-class NMS. Nothing here knows the
detector: a view is an image and a size, a prediction is the dict every torchvision
detector returns in eval mode (``boxes`` (N, 4) XYXY, ``scores`` (N,), ``labels`` (N,),
optionally ``masks`` (N, 1, H, W) probabilities in the input frame).

Example::

    >>> views = tta_views([800], flip=True, max_size=1333)
    >>> inputs = [view_image(img, orig_hw, v, max_size=1333) for v in views]  # (3, 800, 1067), mirrored copy
    >>> preds = [net([x])[0] for x in inputs]
    >>> merged = merge_views(preds, [x.shape[-2:] for x in inputs], views, orig_hw, with_masks=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import batched_nms
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "TTAView",
    "boxes_to_original",
    "masks_to_original",
    "merge_views",
    "resized_size",
    "to_original_coords",
    "tta_views",
    "unflip",
    "view_image",
]


@dataclass(frozen=True)
class TTAView:
    """One test-time view: a shorter side in pixels (None: the loaded image as it is) and a mirror flag."""

    scale: int | None
    flip: bool


def tta_views(scales: Sequence[int] | None, flip: bool, max_size: int | None) -> list[TTAView]:
    """The views of a TTA setting: every scale, each also mirrored when ``flip``.

    Args:
        scales: shorter sides in pixels; None or empty: the loaded image's own size only.
        flip: add a horizontally mirrored copy of every scale.
        max_size: cap on the longer side (as the data pipeline's resize); needed with ``scales``.
    """
    if scales:
        bad = [s for s in scales if not isinstance(s, int) or isinstance(s, bool) or s <= 0]
        if bad:
            raise ValueError(f"scales={list(scales)}: expected positive integers (shorter sides in pixels)")
        if len(set(scales)) != len(scales):
            raise ValueError(f"scales={list(scales)}: a scale is repeated")
        if max_size is None or int(max_size) <= 0:
            raise ValueError(f"max_size={max_size}: expected a positive longer-side cap in pixels")
        if max(scales) >= int(max_size):
            # torchvision's resize (the data pipeline's too) refuses a shorter side >= the cap
            raise ValueError(f"max_size={max_size}: must be larger than every scale (scales={list(scales)})")
    sizes: list[int | None] = [int(s) for s in scales] if scales else [None]
    return [TTAView(s, f) for s in sizes for f in ((False, True) if flip else (False,))]


def resized_size(orig_hw: tuple[int, int], shorter: int, max_size: int) -> tuple[int, int]:
    """(H, W) the data pipeline's ``v2.Resize(size=shorter, max_size=max_size)`` gives an (H0, W0) image.

    Asked of torchvision itself (resizing an empty box set only computes the canvas), so a view
    at the loader's own scale has exactly the loader's size, rounding included.
    """
    empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=tuple(orig_hw))
    out = TF.resize(empty, size=[int(shorter)], max_size=int(max_size))
    return tuple(int(v) for v in out.canvas_size)  # type: ignore[return-value]


def view_image(image: Tensor, orig_hw: tuple[int, int], view: TTAView, max_size: int | None = None) -> Tensor:
    """The network input of ``view``: ``image`` (3, h, w) resized to the view's size and mirrored.

    The size is computed from the original (H0, W0) with the data pipeline's rule, so it is
    the size the loader would have produced at that scale. The pixels are resized from the
    loaded image (a second interpolation); at the loaded size the image is used untouched.
    """
    if view.scale is not None:
        if max_size is None:
            raise ValueError("view_image: a view with a scale needs max_size")
        hw = resized_size(orig_hw, view.scale, max_size)
        if tuple(image.shape[-2:]) != hw:
            image = TF.resize(image, list(hw), antialias=True)
    return image.flip(-1) if view.flip else image


def unflip(pred: dict, width: int) -> dict:
    """Mirror one image's prediction back: boxes (N, 4) XYXY in an input ``width`` px wide, masks (N, 1, H, W)."""
    out = dict(pred)
    b = pred["boxes"]
    out["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
    if "masks" in pred:
        out["masks"] = pred["masks"].flip(-1)
    return out


def boxes_to_original(boxes: Tensor, size_hw: Sequence[int], orig_hw: Sequence[int]) -> Tensor:
    """Boxes (N, 4) XYXY from an input of ``size_hw`` to the file's ``orig_hw`` pixels, per axis, clamped."""
    h, w = (int(v) for v in size_hw)
    h0, w0 = (int(v) for v in orig_hw)
    sx, sy = w0 / w, h0 / h
    boxes = boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w0)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h0)
    return boxes


def masks_to_original(masks: Tensor, orig_hw: Sequence[int], threshold: float = 0.5) -> Tensor:
    """Mask probabilities (N, 1, h, w) in an input frame -> boolean (N, H0, W0) in the file's frame."""
    h0, w0 = (int(v) for v in orig_hw)
    if masks.numel():
        masks = F.interpolate(masks.float(), size=(h0, w0), mode="bilinear", align_corners=False)
    else:
        masks = masks.new_zeros((0, 1, h0, w0))
    return masks[:, 0] > threshold


def to_original_coords(pred: dict, target: dict, with_masks: bool, mask_threshold: float = 0.5) -> dict:
    """Map one image's predictions from the resized input back to original pixels.

    ``target['size']`` is the network input size (H, W) and ``target['orig_size']`` the
    file's; boxes scale per axis, masks (N, 1, H, W) are resized and thresholded.
    """
    out = {
        "boxes": boxes_to_original(pred["boxes"], target["size"], target["orig_size"]),
        "scores": pred["scores"],
        "labels": pred["labels"],
    }
    if with_masks:
        out["masks"] = masks_to_original(pred["masks"], target["orig_size"], mask_threshold)
    return out


def merge_views(
    preds: Sequence[dict],
    sizes: Sequence[Sequence[int]],
    views: Sequence[TTAView],
    orig_hw: Sequence[int],
    with_masks: bool,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    mask_threshold: float = 0.5,
) -> dict:
    """One image's detections of every view, in original pixels, merged by per-class NMS.

    Args:
        preds: per view, the detector's output for this image in that view's input frame.
        sizes: per view, its input size (H, W) (unpadded).
        views: the views (a mirrored view's prediction is mirrored back first).
        orig_hw: the file's (H0, W0).
        with_masks: ``preds`` carry ``masks`` (N, 1, H, W); the result carries (N, H0, W0) booleans.
        iou_threshold: NMS IoU among same-class boxes of all views.
        max_detections: highest-scoring detections kept after NMS.

    Returns:
        ``boxes`` (N, 4) XYXY in original pixels, ``scores`` (N,), ``labels`` (N,) sorted by
        score (and ``masks`` (N, H0, W0) bool), as :func:`to_original_coords` returns.
    """
    if not (len(preds) == len(sizes) == len(views)) or not preds:
        raise ValueError(f"merge_views: {len(preds)} predictions, {len(sizes)} sizes, {len(views)} views")
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold={iou_threshold}: expected a value in (0, 1]")
    if max_detections < 1:
        raise ValueError(f"max_detections={max_detections}: expected a positive number")
    preds = [unflip(p, int(s[1])) if v.flip else p for p, s, v in zip(preds, sizes, views)]
    if len(preds) == 1:
        # One view: the detector's own per-class NMS and top-k already ran on exactly these boxes;
        # running NMS again after the map to file pixels could only drop a pair whose IoU the
        # per-axis rescaling moved across the threshold. So one scale without flip is plain evaluation.
        return to_original_coords(preds[0], {"size": sizes[0], "orig_size": orig_hw}, with_masks, mask_threshold)
    boxes = torch.cat([boxes_to_original(p["boxes"], s, orig_hw) for p, s in zip(preds, sizes)])
    scores = torch.cat([p["scores"] for p in preds])
    labels = torch.cat([p["labels"] for p in preds])
    view_of = torch.cat([torch.full((len(p["scores"]),), i, dtype=torch.long) for i, p in enumerate(preds)])
    keep = batched_nms(boxes, scores, labels, float(iou_threshold))[: int(max_detections)]  # sorted by score
    out = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    if with_masks:
        # Masks are resized to file pixels only for the kept detections (all views' masks at full
        # resolution would be views x 100 x H0 x W0); a kept detection keeps its own view's mask.
        # (Detectron2 instead re-runs the mask head on the merged boxes in every view and averages:
        # that needs the detector's RoI heads, and this merge must work for any detector.)
        h0, w0 = (int(v) for v in orig_hw)
        masks = torch.zeros((len(keep), h0, w0), dtype=torch.bool, device=boxes.device)
        offsets = [0]
        for p in preds:
            offsets.append(offsets[-1] + len(p["scores"]))
        keep_view = view_of.to(keep.device)[keep]
        for i, p in enumerate(preds):
            rows = (keep_view == i).nonzero().flatten()
            if len(rows):
                masks[rows] = masks_to_original(p["masks"][keep[rows] - offsets[i]], orig_hw, mask_threshold)
        out["masks"] = masks
    return out
