"""CenterMask (Lee & Park, CVPR 2020): torchvision's FCOS plus the spatial-attention-guided mask head.

SAG-Mask: RoIAlign 14×14 on the pyramid level chosen by CenterMask's box-scale rule (Eq. 1),
torchvision's 4 Mask R-CNN convs, spatial attention (channel-wise average and max pooling, a
3×3 conv, sigmoid, multiplying the features), torchvision's deconv to 28×28 and per-class mask
logits. Only the level rule, the attention and the FCOS forward that feeds the mask branch are
written here: torchvision has neither (its MultiScaleRoIAlign uses FPN's 224-canonical rule).
The MaskIoU head of the paper is not part of this detector (the issue asks for SAG-Mask only).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference, maskrcnn_loss
from torchvision.ops import box_area, clip_boxes_to_image, roi_align

from detection.detectors.base import Detector, Parts, widen_group_norm_groups
from detection.detectors.fcos import fcos_anchors, fcos_kwargs, init_regression_bias


def centermask_levels(boxes: list[Tensor], image_sizes: list[tuple[int, int]], k_min: int, k_max: int) -> Tensor:
    """CenterMask Eq. 1: ``k = ceil(k_max - log2(A_input / A_box))``, clamped to ``[k_min, k_max]``.

    ``boxes``: per image (N_i, 4) XYXY; ``image_sizes``: (H, W) of each (unpadded) input image.
    Returns (sum N_i,) level indices ``k - k_min``. A box as large as the image goes to ``k_max``
    (P5), one with a quarter of its area to P4, and so on.
    """
    areas = torch.cat([box_area(b) for b in boxes]).clamp(min=1e-6)
    img = torch.cat([b.new_full((len(b),), float(h * w)) for b, (h, w) in zip(boxes, image_sizes)])
    k = torch.ceil(k_max - torch.log2(img / areas) - 1e-6)  # - eps: an exact power of 2 stays on its level
    return (k.clamp(k_min, k_max) - k_min).to(torch.int64)


class LevelRoIAlign(nn.Module):
    """RoIAlign of each box on the level :func:`centermask_levels` picks.

    Args:
        featmap_names: keys of the levels to pool from, finest first ('0', '1', '2' = P3-P5).
        strides: their strides (powers of 2); ``k = log2(stride)``.
        output_size, sampling_ratio: as torchvision's MultiScaleRoIAlign (14, 2).

    ``forward(features, boxes, image_sizes)`` -> (sum N_i, C, S, S).
    """

    def __init__(self, featmap_names: list[str], strides: list[int], output_size: int = 14, sampling_ratio: int = 2):
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError(f"{len(featmap_names)} mask levels but {len(strides)} strides")
        self.featmap_names = list(featmap_names)
        self.strides = [int(s) for s in strides]
        self.levels = [int(round(math.log2(s))) for s in self.strides]
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def forward(self, features: OrderedDict[str, Tensor], boxes: list[Tensor], image_sizes) -> Tensor:
        first = features[self.featmap_names[0]]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
        out = first.new_zeros(len(rois), first.shape[1], self.output_size, self.output_size)
        if len(rois) == 0:
            return out
        level = centermask_levels(boxes, image_sizes, self.levels[0], self.levels[-1])
        for i, (name, stride) in enumerate(zip(self.featmap_names, self.strides)):
            idx = torch.where(level == i)[0]
            if len(idx):
                out[idx] = roi_align(features[name], rois[idx], self.output_size, 1.0 / stride,
                                     self.sampling_ratio).to(out.dtype)
        return out


class SpatialAttention(nn.Module):
    """SAG-Mask's spatial attention: ``x · sigmoid(conv3x3([mean_c(x), max_c(x)]))``; (N, C, H, W) -> same."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(pooled))


class SAGMaskHead(nn.Sequential):
    """4 convs 3×3 + spatial attention + deconv ×2 + 1×1 per-class logits: (N, C, 14, 14) -> (N, K, 28, 28)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__(OrderedDict(
            convs=MaskRCNNHeads(in_channels, [channels] * 4, 1),
            attention=SpatialAttention(),
            predictor=MaskRCNNPredictor(channels, channels, num_classes),
        ))


class _MatchRecordingHead(FCOSHead):
    """FCOSHead that keeps the location -> gt matching of its last loss (FCOS computes it inside
    ``compute_loss`` and does not return it); the mask branch trains on the same positives."""

    matched_idxs: list[Tensor] | None = None

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        self.matched_idxs = matched_idxs
        return super().compute_loss(targets, head_outputs, anchors, matched_idxs)


class CenterMask(FCOS):
    """torchvision's FCOS with a SAG-Mask branch.

    Args:
        backbone, num_classes, **fcos_kwargs: as torchvision's FCOS (``head`` must be a
            ``_MatchRecordingHead``).
        mask_pool: a :class:`LevelRoIAlign` on the body's levels.
        mask_head: a :class:`SAGMaskHead` with ``num_classes`` outputs (no background).
        mask_rois_per_image: at most this many positive locations per image train the mask head.

    Training: the mask RoIs of an image are FCOS' predicted boxes at (up to ``mask_rois_per_image``
    random) positive locations, detached, plus the gt boxes themselves; each RoI's target is its
    matched gt's mask (torchvision's ``maskrcnn_loss``). Test: masks of the final detections,
    (N, 1, H, W) probabilities after pasting.
    """

    def __init__(self, backbone, num_classes, mask_pool: LevelRoIAlign, mask_head: nn.Module,
                 mask_rois_per_image: int = 128, **fcos_kwargs) -> None:
        super().__init__(backbone, num_classes, **fcos_kwargs)
        if not isinstance(self.head, _MatchRecordingHead):
            raise TypeError("CenterMask needs a _MatchRecordingHead (the mask branch trains on FCOS' positives)")
        if mask_rois_per_image < 1:
            raise ValueError(f"detector.mask_rois_per_image={mask_rois_per_image} must be at least 1")
        self.mask_pool = mask_pool
        self.mask_head = mask_head
        self.mask_rois_per_image = mask_rois_per_image

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("CenterMask in training mode needs targets")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        images, targets = self.transform(images, targets)
        feature_dict = self.backbone(images.tensors)
        features = list(feature_dict.values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(images, features)
        num_anchors_per_level = [x.size(2) * x.size(3) for x in features]
        if self.training:
            losses = self.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)
            matched, self.head.matched_idxs = self.head.matched_idxs, None
            losses["loss_mask"] = self.mask_loss(feature_dict, head_outputs, anchors, matched, targets,
                                                 images.image_sizes)
            return losses
        split_outputs = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(num_anchors_per_level)) for a in anchors]
        detections = self.postprocess_detections(split_outputs, split_anchors, images.image_sizes)
        self.add_masks(feature_dict, detections, images.image_sizes)
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)

    def mask_loss(self, features, head_outputs, anchors, matched_idxs, targets, image_sizes) -> Tensor:
        rois, roi_gt = [], []
        for i, (matched, target, size) in enumerate(zip(matched_idxs, targets, image_sizes)):
            pos = torch.where(matched >= 0)[0]
            if len(pos) > self.mask_rois_per_image:
                pos = pos[torch.randperm(len(pos), device=pos.device)[: self.mask_rois_per_image]]
            pred = self.box_coder.decode(head_outputs["bbox_regression"][i][pos].detach(), anchors[i][pos])
            gt = target["boxes"]
            rois.append(torch.cat([clip_boxes_to_image(pred.reshape(-1, 4), size), gt]))
            roi_gt.append(torch.cat([matched[pos], torch.arange(len(gt), device=gt.device)]))
        logits = self.mask_head(self.mask_pool(features, rois, image_sizes))
        return maskrcnn_loss(logits, rois, [t["masks"] for t in targets], [t["labels"] for t in targets], roi_gt)

    def add_masks(self, features, detections: list[dict[str, Tensor]], image_sizes) -> None:
        """Adds ``masks`` (N, 1, 28, 28): each detection's class channel, as probabilities."""
        logits = self.mask_head(self.mask_pool(features, [d["boxes"] for d in detections], image_sizes))
        for d, m in zip(detections, maskrcnn_inference(logits, [d["labels"] for d in detections])):
            d["masks"] = m


def build(parts: Parts, mask_rois_per_image: int = 128, reg_bias_init: float = 0.0) -> Detector:
    """CenterMask on ``parts``: FCOS as ``detector=fcos`` builds it, SAG-Mask on the body levels (P3-P5)."""
    k = parts.num_classes
    n = len(parts.return_layers)
    if any(s & (s - 1) for s in parts.strides[:n]):
        raise ValueError(f"CenterMask's level rule needs power-of-2 strides, got {parts.strides[:n]}")
    head = widen_group_norm_groups(_MatchRecordingHead(parts.channels, 1, k, num_convs=4))
    model = CenterMask(
        parts.backbone, k, LevelRoIAlign(parts.body_levels, parts.strides[:n], 14, 2),
        SAGMaskHead(parts.channels, parts.mask_head_channels, k), mask_rois_per_image,
        anchor_generator=fcos_anchors(parts), head=init_regression_bias(head, reg_bias_init), **fcos_kwargs(parts),
    )
    return Detector(model, parts.name, k, label_offset=0, with_masks=True)
