"""Detector assembly on torchvision's heads: body + neck + head, wired by a constructor.

``build_detector`` returns a :class:`Detector`: a thin wrapper that owns one torchvision
detector (RetinaNet, FCOS, Faster R-CNN, Mask R-CNN) and speaks contiguous labels
``0..K-1`` on both sides (torchvision's R-CNNs reserve label 0 for background).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from detection.necks import num_extra_levels

DETECTORS = ("retinanet", "fcos", "faster_rcnn", "mask_rcnn")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWithNeck(nn.Module):
    """Backbone body followed by a pyramid neck; ``out_channels`` as torchvision expects.

    ``body``: (B, 3, H, W) -> OrderedDict of C-levels; ``neck``: C-levels -> P-levels.
    """

    def __init__(self, body: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.neck = neck
        self.out_channels = neck.out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.neck(self.body(x))


class FixedStrideAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with each level's stride given, not inferred.

    torchvision infers a level's stride as padded image size // feature size, which is
    only exact when the batch is padded to a multiple of the coarsest stride (128 for P7):
    a 192×144 image then costs 256×256 of compute, 2.4× its pixels. Known strides (as
    MMDetection's anchor generators use) keep anchors exact at any padding, so batches are
    padded to 32 only. ``strides``: one int per level, finest first.
    """

    def __init__(self, sizes, aspect_ratios, strides: list[int]) -> None:
        super().__init__(sizes, aspect_ratios)
        if len(strides) != len(self.sizes):
            raise ValueError(f"{len(strides)} strides for {len(self.sizes)} anchor levels")
        self.strides = [int(s) for s in strides]

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [fm.shape[-2:] for fm in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in range(len(image_list.image_sizes))]


class PadNormalizeTransform(GeneralizedRCNNTransform):
    """torchvision's batching transform without its resize.

    Resizing belongs to the data pipeline (``transforms.v2``, in the loader workers), so
    the model only normalises and pads each batch to ``size_divisible`` (32: the body's
    coarsest stride; anchors use fixed strides, see FixedStrideAnchorGenerator).
    """

    def resize(self, image: Tensor, target: dict | None = None) -> tuple[Tensor, dict | None]:
        return image, target


class Detector(nn.Module):
    """A torchvision detector that speaks contiguous labels ``0..K-1``.

    Args:
        model: the torchvision detection model (its ``backbone`` is a BackboneWithNeck).
        name: ``retinanet | fcos | faster_rcnn | mask_rcnn``.
        num_classes: K, the number of object classes.
        label_offset: 1 for the R-CNNs (label 0 is background inside them), 0 otherwise.

    ``forward(images, targets)``: ``images`` is a list of (3, H, W) float tensors in
    [0, 1]; in training ``targets`` holds ``boxes`` (N, 4) XYXY, ``labels`` (N,) and, for
    mask models, ``masks`` (N, H, W); returns a dict of losses. In eval returns one dict
    per image with ``boxes``, ``scores``, ``labels`` (and ``masks`` (N, 1, H, W)).
    """

    def __init__(self, model: nn.Module, name: str, num_classes: int, label_offset: int) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.num_classes = num_classes
        self.label_offset = label_offset
        self.with_masks = name == "mask_rcnn"

    @property
    def backbone(self) -> BackboneWithNeck:
        return self.model.backbone

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if targets is not None:
            keys = ("boxes", "labels", "masks") if self.with_masks else ("boxes", "labels")
            targets = [{k: t[k] for k in keys if k in t} for t in targets]
            if self.label_offset:
                targets = [{**t, "labels": t["labels"] + self.label_offset} for t in targets]
        out = self.model(images, targets)
        if not self.training and self.label_offset:
            out = [{**o, "labels": o["labels"] - self.label_offset} for o in out]
        return out

    def parts(self) -> dict[str, nn.Module]:
        """The three parts a parameter summary reports: backbone body, neck, head(s)."""
        head = nn.ModuleDict(
            {n: m for n, m in self.model.named_children() if n not in ("backbone", "transform")}
        )
        return {"backbone": self.backbone.body, "neck": self.backbone.neck, "head": head}


def level_strides(body_strides: list[int], extra_levels: str) -> list[int]:
    """Strides of the neck's output levels: the body's, then ×2 per extra level."""
    strides = list(body_strides)
    for _ in range(num_extra_levels(extra_levels)):
        strides.append(strides[-1] * 2)
    return strides


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
) -> Detector:
    """Assemble ``name`` from a body factory, a neck factory and torchvision's heads.

    Args:
        name: ``retinanet | fcos | faster_rcnn | mask_rcnn``.
        backbone: callable ``backbone(return_layers=...) -> body`` (a partial ResNetBody);
            the body exposes ``out_channels_list`` and ``strides``.
        neck: callable ``neck(in_channels_list=...) -> neck`` (a partial FPN / PAFPN /
            SMSL-wrapped neck) with ``out_channels``; its levels must be the body's
            followed by ``extra_levels``.
        num_classes: object classes K (without background).
        return_layers: body levels fed to the neck (C3–C5 one-stage, C2–C5 R-CNNs).
        extra_levels: the neck's extra levels; used here to derive strides.
        anchor_scale: anchor size = ``anchor_scale × stride`` at each level (MMDetection's
            ``octave_base_scale``: 4 for RetinaNet, 8 for the RPN, 1 for FCOS' centres).
        scales_per_octave: anchor scales per level (3 for RetinaNet, 1 for the RPN).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: inference settings
            (SMSL Sec. 4.2: top 1000 per level, score 0.05, NMS 0.5, 100 per image).
        mask_head_channels: conv width of the mask head (256 in Mask R-CNN).
        head_norm: ``None`` (the papers' RetinaNet head) or ``"gn"``: GroupNorm(32) after
            each head conv (torchvision's RetinaNet v2 head); much faster to train from
            scratch. FCOS' head always uses GN(32).
    """
    if name not in DETECTORS:
        raise ValueError(f"detector.name={name!r} is not known; choose one of {list(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"data.num_classes={num_classes} must be at least 1")
    body = backbone(return_layers=list(return_layers))
    neck_module = neck(in_channels_list=list(body.out_channels_list))
    strides = level_strides(body.strides, extra_levels)
    if getattr(neck_module, "num_levels", len(strides)) != len(strides):
        raise ValueError(
            f"neck produces {neck_module.num_levels} levels but detector.extra_levels={extra_levels!r} "
            f"implies {len(strides)}"
        )
    bb = BackboneWithNeck(body, neck_module)
    channels = bb.out_channels
    sizes = tuple(
        tuple(anchor_scale * s * 2 ** (k / scales_per_octave) for k in range(scales_per_octave)) for s in strides
    )
    ratios = (tuple(aspect_ratios),) * len(strides)
    common = dict(image_mean=list(image_mean), image_std=list(image_std))
    if name == "retinanet":
        anchors = FixedStrideAnchorGenerator(sizes, ratios, strides)
        if head_norm not in (None, "gn"):
            raise ValueError(f"detector.head_norm={head_norm!r} is not known; choose null or 'gn'")
        if head_norm == "gn" and channels % 32:
            raise ValueError(
                f"detector.head_norm=gn uses GroupNorm(32): neck.out_channels={channels} "
                "must be a multiple of 32"
            )
        # GN(32) as torchvision's v2 head. Measured on the shapes recipe (64 channels):
        # 8 channels per group instead was worse (val AP 2.6 vs 3.9 after 4 epochs).
        norm_layer = functools.partial(nn.GroupNorm, 32) if head_norm == "gn" else None
        head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm_layer)
        model = RetinaNet(
            bb, num_classes, anchor_generator=anchors, head=head, score_thresh=score_thresh,
            nms_thresh=nms_thresh, detections_per_img=detections_per_img, topk_candidates=topk_candidates, **common,
        )
        offset = 0
    elif name == "fcos":
        # FCOS uses one "anchor" per location whose size sets the level's scale range.
        anchors = FixedStrideAnchorGenerator(
            tuple((anchor_scale * s,) for s in strides), ((1.0,),) * len(strides), strides
        )
        head = FCOSHead(channels, 1, num_classes, num_convs=4)
        model = FCOS(
            bb, num_classes, anchor_generator=anchors, head=head, score_thresh=score_thresh,
            nms_thresh=nms_thresh, detections_per_img=detections_per_img, topk_candidates=topk_candidates, **common,
        )
        offset = 0
    else:
        anchors = FixedStrideAnchorGenerator(sizes, ratios, strides)
        rpn_head = RPNHead(channels, anchors.num_anchors_per_location()[0])
        # RoI features come from the body's levels only ('0'..'3'); the extra 'pool'
        # level feeds the RPN alone, as in torchvision and MMDetection.
        roi_levels = [str(i) for i in range(len(return_layers))]
        kwargs = dict(
            rpn_anchor_generator=anchors, rpn_head=rpn_head,
            box_roi_pool=MultiScaleRoIAlign(roi_levels, 7, 2),
            box_head=TwoMLPHead(channels * 7 * 7, 1024),
            box_predictor=FastRCNNPredictor(1024, num_classes + 1), box_score_thresh=score_thresh,
            box_nms_thresh=nms_thresh, box_detections_per_img=detections_per_img, **common,
        )
        if name == "faster_rcnn":
            model = FasterRCNN(bb, None, **kwargs)
        else:
            model = MaskRCNN(
                bb, None, mask_roi_pool=MultiScaleRoIAlign(roi_levels, 14, 2),
                mask_head=MaskRCNNHeads(channels, [mask_head_channels] * 4, 1),
                mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
                **kwargs,
            )
        offset = 1
    model.transform = PadNormalizeTransform(
        min_size=800, max_size=1333, size_divisible=32, **common  # sizes unused: no resize
    )
    return Detector(model, name, num_classes, offset)


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
