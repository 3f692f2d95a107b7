"""FCOS (Tian et al.) on torchvision's model and head (GN(32), centerness); P3-P7, P6/P7 from P5."""

from __future__ import annotations

from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSHead

from detection.detectors.base import Detector, FixedStrideAnchorGenerator, Parts, widen_group_norm_groups


def fcos_anchors(parts: Parts) -> FixedStrideAnchorGenerator:
    """One "anchor" per location whose size (``anchor_scale × stride``) sets the level's scale range."""
    strides = parts.strides
    return FixedStrideAnchorGenerator(
        tuple((parts.anchor_scale * s,) for s in strides), ((1.0,),) * len(strides), strides
    )


def fcos_kwargs(parts: Parts) -> dict:
    """FCOS' inference settings and normalisation from ``parts``."""
    return dict(
        score_thresh=parts.score_thresh, nms_thresh=parts.nms_thresh, detections_per_img=parts.detections_per_img,
        topk_candidates=parts.topk_candidates, image_mean=parts.image_mean, image_std=parts.image_std,
    )


def build(parts: Parts) -> Detector:
    head = widen_group_norm_groups(FCOSHead(parts.channels, 1, parts.num_classes, num_convs=4))
    model = FCOS(parts.backbone, parts.num_classes, anchor_generator=fcos_anchors(parts), head=head,
                 **fcos_kwargs(parts))
    return Detector(model, parts.name, parts.num_classes, label_offset=0)
