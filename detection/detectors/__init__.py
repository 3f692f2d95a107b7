"""Detector assembly: body + neck + one detector from the registry, wrapped as a :class:`Detector`.

``build_detector(name=...)`` assembles the body and the neck, then calls ``DETECTOR_BUILDERS[name]``
(one function per detector, each in its own file of this package) with the resulting
:class:`~detection.detectors.base.Parts`. Adding a detector = one file with ``build(parts, **options)``
returning a ``Detector``, one line in ``DETECTOR_BUILDERS``, one ``conf/detector/NAME.yaml``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import nn

from detection.detectors import cascade, centermask, fcos, rcnn, retinanet
from detection.detectors.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneWithNeck,
    Detector,
    FixedStrideAnchorGenerator,
    PadNormalizeTransform,
    Parts,
    level_strides,
)
from detection.necks import pinned

__all__ = [
    "DETECTORS", "DETECTOR_BUILDERS", "BackboneWithNeck", "Detector", "FixedStrideAnchorGenerator",
    "PadNormalizeTransform", "Parts", "build_detector", "count_parameters", "level_strides", "parameter_summary",
]

# name -> builder(parts, **detector-specific options) -> Detector
DETECTOR_BUILDERS: dict[str, Callable[..., Detector]] = {
    "retinanet": retinanet.build,
    "fcos": fcos.build,
    "faster_rcnn": rcnn.build_faster_rcnn,
    "mask_rcnn": rcnn.build_mask_rcnn,
    "cascade_rcnn": cascade.build,
    "cascade_mask_rcnn": functools.partial(cascade.build, with_masks=True),
    "centermask": centermask.build,
}
DETECTORS = tuple(DETECTOR_BUILDERS)


def build_detector(
    name: str,
    backbone: Callable[..., nn.Module],
    neck: Callable[..., nn.Module],
    num_classes: int,
    return_layers: list[int] = (2, 3, 4),
    extra_levels: str = "p6p7_c5",
    anchor_scale: float = 4.0,
    scales_per_octave: int = 3,
    aspect_ratios: list[float] = (0.5, 1.0, 2.0),
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    topk_candidates: int = 1000,
    mask_head_channels: int = 256,
    head_norm: str | None = None,
    image_mean: list[float] = IMAGENET_MEAN,
    image_std: list[float] = IMAGENET_STD,
    **options,
) -> Detector:
    """Assemble ``name`` from a body factory, a neck factory and the registry's builder.

    Args:
        name: a key of ``DETECTOR_BUILDERS`` (``retinanet | fcos | faster_rcnn | mask_rcnn |
            cascade_rcnn | cascade_mask_rcnn | centermask``).
        backbone: callable ``backbone(return_layers=...) -> body`` (a partial ResNetBody or
            TimmBody); the body exposes ``out_channels_list`` and ``strides``.
        neck: callable ``neck(in_channels_list=..., extra_levels=...) -> neck`` (a partial FPN /
            PAFPN / SMSL or SRF neck) keeping :class:`detection.necks.Neck`.
        num_classes: object classes K (without background).
        return_layers: body levels fed to the neck (C3–C5 one-stage, C2–C5 R-CNNs).
        extra_levels: the neck's extra levels (passed to it; the strides follow).
        anchor_scale: anchor size = ``anchor_scale × stride`` at each level (MMDetection's
            ``octave_base_scale``: 4 for RetinaNet, 8 for the RPN, 1 for FCOS' centres).
        scales_per_octave: anchor scales per level (3 for RetinaNet, 1 for the RPN).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: inference settings
            (SMSL Sec. 4.2: top 1000 per level, score 0.05, NMS 0.5, 100 per image).
        mask_head_channels: conv width of the mask head (256 in Mask R-CNN).
        head_norm: ``None`` (the papers' RetinaNet head) or ``"gn"``: GroupNorm(32) after
            each head conv (torchvision's RetinaNet v2 head); much faster to train from
            scratch. FCOS' head always uses GN(32).
        **options: keyword arguments of this detector's builder only (e.g. Cascade's
            ``stage_iou_thresholds``); another detector's option is an error naming it.
    """
    if name not in DETECTOR_BUILDERS:
        raise ValueError(f"detector.name={name!r} is not known; choose one of {list(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"data.num_classes={num_classes} must be at least 1")
    builder = DETECTOR_BUILDERS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p != "parts"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"detector.{unknown[0]} is not an option of detector {name!r}; its options: {accepted}")
    body = backbone(return_layers=list(return_layers))
    # the detector owns its extra levels (its head needs P6/P7 or the RPN's pool); the neck config
    # owns the width (detection.necks: the neck contract)
    own = pinned(neck, "extra_levels")
    if own is not None and own != extra_levels:
        raise ValueError(f"the neck pins extra_levels={own!r} but detector.extra_levels={extra_levels!r}: the "
                         "detector's head decides its levels; leave extra_levels out of the neck")
    neck_module = neck(in_channels_list=list(body.out_channels_list), extra_levels=extra_levels)
    strides = level_strides(body.strides, extra_levels)
    if getattr(neck_module, "num_levels", len(strides)) != len(strides):
        raise ValueError(
            f"neck produces {neck_module.num_levels} levels but detector.extra_levels={extra_levels!r} "
            f"implies {len(strides)}"
        )
    parts = Parts(
        name=name, backbone=BackboneWithNeck(body, neck_module), strides=strides, num_classes=num_classes,
        return_layers=list(return_layers), anchor_scale=anchor_scale, scales_per_octave=scales_per_octave,
        aspect_ratios=list(aspect_ratios), score_thresh=score_thresh, nms_thresh=nms_thresh,
        detections_per_img=detections_per_img, topk_candidates=topk_candidates,
        mask_head_channels=mask_head_channels, head_norm=head_norm, image_mean=list(image_mean),
        image_std=list(image_std),
    )
    det = builder(parts, **options)
    # resizing belongs to the data pipeline: every model only normalises and pads
    det.model.transform = parts.transform()
    return det


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_summary(det: Detector) -> dict:
    """Total / trainable parameter counts of a detector and of its parts."""
    out = {
        "params_total": count_parameters(det),
        "params_trainable": count_parameters(det, trainable_only=True),
    }
    for part, module in det.parts().items():
        out[part] = {
            "total": count_parameters(module),
            "trainable": count_parameters(module, trainable_only=True),
        }
    return out
