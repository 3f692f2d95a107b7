"""FCOS (Tian et al.) on torchvision's model and head (GN(32), centerness); P3-P7, P6/P7 from P5."""

from __future__ import annotations

import torch
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


def init_regression_bias(head: FCOSHead, reg_bias_init: float) -> FCOSHead:
    """Start every level's box distances at ``reg_bias_init`` (in units of the location's anchor size).

    torchvision's head starts the bias at 0 and applies ReLU: every predicted box begins as a
    point, whose GIoU loss is 1 with a vanishing gradient (the box's area is the product of two
    near-zero sides). Where the first steps push the bias below zero, the ReLU closes and box
    regression never trains (seen on the embedded data: FCOS + PAFPN, GIoU loss 1.000 for the whole
    run, AP 0.0, in 3 of 6 runs). A positive start (boxes ``2 × reg_bias_init`` anchor sizes wide, the
    size of the objects each level is assigned) keeps the ReLU open. Neither paper specifies FCOS'
    initialisation; 0 restores torchvision's.
    """
    torch.nn.init.constant_(head.regression_head.bbox_reg.bias, float(reg_bias_init))
    return head


def build(parts: Parts, reg_bias_init: float = 0.0) -> Detector:
    head = widen_group_norm_groups(FCOSHead(parts.channels, 1, parts.num_classes, num_convs=4))
    init_regression_bias(head, reg_bias_init)
    model = FCOS(parts.backbone, parts.num_classes, anchor_generator=fcos_anchors(parts), head=head,
                 **fcos_kwargs(parts))
    return Detector(model, parts.name, parts.num_classes, label_offset=0)
