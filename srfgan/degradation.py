"""Degradation ↓s of images, I^lr = ↓s(I^tr) (SRF-GAN Sec. 3.2, Table 6), and matching targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEGRADATIONS", "degraded_size", "degrade", "degrade_images", "scale_targets", "downsample_nearest"]

DEGRADATIONS = ("bilinear", "nearest", "bicubic")


def _check(mode: str, scale: float) -> None:
    if mode not in DEGRADATIONS:
        raise ValueError(f"srf.degradation={mode!r} is not known; choose one of {list(DEGRADATIONS)}")
    if not 0 < scale < 1:
        raise ValueError(f"srf.scale={scale} must be in (0, 1) (the paper uses 0.5)")


def degraded_size(h: int, w: int, scale: float = 0.5) -> tuple[int, int]:
    """Size of ``↓scale`` of an (h, w) image: floor, at least 1 (exact halves for even sizes)."""
    return max(1, int(h * scale)), max(1, int(w * scale))


def degrade(x: Tensor, scale: float = 0.5, mode: str = "bilinear") -> Tensor:
    """``↓scale`` of ``x`` (B, C, H, W) or (C, H, W) with ``mode`` (Table 6: bilinear is the paper's).

    No antialiasing: at s = 0.5 a bilinear ↓ (align_corners=False) is the mean of each 2×2 block,
    which is what ``F.interpolate`` (the authors' Detectron2 code) computes; ``bicubic`` may overshoot
    the input range, as theirs. Works on normalised, padded batches as well (the op is linear).
    """
    _check(mode, scale)
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    size = degraded_size(x.shape[-2], x.shape[-1], scale)
    if mode == "nearest":
        y = F.interpolate(x, size=size, mode="nearest")
    else:
        y = F.interpolate(x, size=size, mode=mode, align_corners=False)
    return y[0] if squeeze else y


def degrade_images(images: Sequence[Tensor], scale: float = 0.5, mode: str = "bilinear") -> list[Tensor]:
    """``↓scale`` of each (3, H, W) image in [0, 1]; bicubic's overshoot is clamped back into [0, 1]."""
    out = [degrade(im, scale, mode) for im in images]
    return [im.clamp(0, 1) for im in out] if mode == "bicubic" else out


def scale_targets(targets: Sequence[dict[str, Any]], images: Sequence[Tensor], lr_images: Sequence[Tensor]) -> list[dict]:
    """Fit training/eval targets of ``images`` to their degraded ``lr_images`` (stage 2, Sec. 4.2).

    ``boxes`` (N, 4) XYXY scale by the exact per-axis factors (w'/w, h'/h), ``masks`` (N, H, W) are
    resized with nearest (they stay binary), ``size`` becomes the new (H', W') so that evaluation maps
    predictions back to the original image through ``size -> orig_size``. ``orig_*`` entries (COCO
    ground truth in original pixels) are untouched. Other keys are copied.
    """
    out = []
    for t, im, lr in zip(targets, images, lr_images):
        h, w = im.shape[-2:]
        h2, w2 = lr.shape[-2:]
        sx, sy = w2 / w, h2 / h
        t = dict(t)
        if "boxes" in t:
            b = t["boxes"]
            t["boxes"] = b * torch.tensor([sx, sy, sx, sy], dtype=b.dtype, device=b.device)
        if "masks" in t:
            m = t["masks"]
            if m.numel():
                m = F.interpolate(m[:, None].float(), size=(h2, w2), mode="nearest")[:, 0].to(t["masks"].dtype)
            else:
                m = m.new_zeros((m.shape[0], h2, w2))
            t["masks"] = m
        if "size" in t:
            t["size"] = torch.tensor([h2, w2], dtype=torch.int64)
        out.append(t)
    return out


def downsample_nearest(x: Tensor, scale: float = 0.5) -> Tensor:
    """Nearest ``↓scale`` of features (B, C, H, W): ``↓^{×s}(P_i^tr)`` of Eq. 3.

    Nearest as the authors' code (the paper does not name the kernel for features). With s = 0.5 it
    keeps pixel (2y, 2x), the position a stride-2 body puts under pixel (y, x) of the ↓0.5 image's
    features; the size is ``ceil(H / 2)`` so it covers every level pixel of the ↓0.5 image.
    """
    if scale == 0.5:
        return x[..., ::2, ::2]
    size = degraded_size(x.shape[-2], x.shape[-1], scale)
    return F.interpolate(x, size=size, mode="nearest")
