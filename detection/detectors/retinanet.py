"""RetinaNet (Lin et al.) on torchvision's model and head; MMDetection's layout (P3-P7, P6 from C5)."""

from __future__ import annotations

import functools

from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead

from detection.detectors.base import Detector, Parts, group_norm_groups


def build(parts: Parts) -> Detector:
    """RetinaNet; ``parts.head_norm`` ``None`` (the papers' head) or ``"gn"`` (torchvision's v2 head)."""
    anchors = parts.anchors()
    channels = parts.channels
    if parts.head_norm not in (None, "gn"):
        raise ValueError(f"detector.head_norm={parts.head_norm!r} is not known; choose null or 'gn'")
    # GN(32) as torchvision's v2 head where the width allows 2 channels per group (any width works).
    # Measured on the shapes recipe (64 channels): 8 channels per group instead was worse (val AP
    # 2.6 vs 3.9 after 4 epochs).
    norm_layer = functools.partial(nn.GroupNorm, group_norm_groups(channels)) if parts.head_norm == "gn" else None
    head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], parts.num_classes, norm_layer=norm_layer)
    model = RetinaNet(
        parts.backbone, parts.num_classes, anchor_generator=anchors, head=head, score_thresh=parts.score_thresh,
        nms_thresh=parts.nms_thresh, detections_per_img=parts.detections_per_img,
        topk_candidates=parts.topk_candidates, image_mean=parts.image_mean, image_std=parts.image_std,
    )
    return Detector(model, parts.name, parts.num_classes, label_offset=0)
