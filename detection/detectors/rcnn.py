"""Faster R-CNN (Ren et al.) and Mask R-CNN (He et al.) with FPN on torchvision's models.

RPN on every neck level (P2-P6, P6 = max-pool), RoIAlign on the body's levels (P2-P5).
"""

from __future__ import annotations

from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from detection.detectors.base import Detector, Parts


def _kwargs(parts: Parts) -> dict:
    anchors = parts.anchors()
    c = parts.channels
    # RoI features come from the body's levels only ('0'..'3'); the extra 'pool' level
    # feeds the RPN alone, as in torchvision and MMDetection.
    return dict(
        rpn_anchor_generator=anchors, rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0]),
        box_roi_pool=MultiScaleRoIAlign(parts.body_levels, 7, 2), box_head=TwoMLPHead(c * 7 * 7, 1024),
        box_predictor=FastRCNNPredictor(1024, parts.num_classes + 1), box_score_thresh=parts.score_thresh,
        box_nms_thresh=parts.nms_thresh, box_detections_per_img=parts.detections_per_img,
        image_mean=parts.image_mean, image_std=parts.image_std,
    )


def build_faster_rcnn(parts: Parts) -> Detector:
    model = FasterRCNN(parts.backbone, None, **_kwargs(parts))
    return Detector(model, parts.name, parts.num_classes, label_offset=1)


def mask_branch(parts: Parts) -> dict:
    """Mask R-CNN's mask branch: 14x14 RoIAlign on the body levels, 4 convs, deconv, per-class logits."""
    m = parts.mask_head_channels
    return dict(
        mask_roi_pool=MultiScaleRoIAlign(parts.body_levels, 14, 2),
        mask_head=MaskRCNNHeads(parts.channels, [m] * 4, 1),
        mask_predictor=MaskRCNNPredictor(m, m, parts.num_classes + 1),
    )


def build_mask_rcnn(parts: Parts) -> Detector:
    model = MaskRCNN(parts.backbone, None, **mask_branch(parts), **_kwargs(parts))
    return Detector(model, parts.name, parts.num_classes, label_offset=1, with_masks=True)
