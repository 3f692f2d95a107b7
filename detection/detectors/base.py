"""The pieces every detector shares: body + neck module, anchors, batching, the label wrapper.

Each detector file of this package builds a torchvision-style model from a :class:`Parts`
and returns a :class:`Detector`, the wrapper that speaks contiguous labels ``0..K-1`` on
both sides (torchvision's R-CNNs reserve label 0 for background).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detection.necks import num_extra_levels

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
        name: the registry name (``retinanet``, ``cascade_rcnn``, ...).
        num_classes: K, the number of object classes.
        label_offset: 1 for the R-CNNs (label 0 is background inside them), 0 otherwise.
        with_masks: the model predicts instance masks (trains on ``masks``, segm evaluation).

    ``forward(images, targets)``: ``images`` is a list of (3, H, W) float tensors in
    [0, 1]; in training ``targets`` holds ``boxes`` (N, 4) XYXY, ``labels`` (N,) and, for
    mask models, ``masks`` (N, H, W); returns a dict of losses. In eval returns one dict
    per image with ``boxes``, ``scores``, ``labels`` (and ``masks`` (N, 1, H, W)).
    """

    def __init__(
        self, model: nn.Module, name: str, num_classes: int, label_offset: int, with_masks: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.num_classes = num_classes
        self.label_offset = label_offset
        self.with_masks = bool(with_masks)

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


@dataclass
class Parts:
    """What ``build_detector`` hands each detector builder: the assembled body + neck and settings.

    ``backbone`` maps (B, 3, H, W) to the neck's levels (``out_channels`` = ``channels``);
    ``strides`` holds one stride per level, finest first; ``return_layers`` are the body levels
    (their keys ``'0'..`` are the RoI levels of the R-CNNs). The rest are ``build_detector``'s
    keyword arguments, documented there.
    """

    name: str
    backbone: BackboneWithNeck
    strides: list[int]
    num_classes: int
    return_layers: list[int]
    anchor_scale: float
    scales_per_octave: int
    aspect_ratios: list[float]
    score_thresh: float
    nms_thresh: float
    detections_per_img: int
    topk_candidates: int
    mask_head_channels: int
    head_norm: str | None
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    @property
    def channels(self) -> int:
        return self.backbone.out_channels

    @property
    def body_levels(self) -> list[str]:
        """Keys of the body's levels in the neck's output ('0'..): where RoIs are pooled from."""
        return [str(i) for i in range(len(self.return_layers))]

    def anchors(self) -> FixedStrideAnchorGenerator:
        """``scales_per_octave`` sizes ``anchor_scale × stride × 2^(k/n)`` × ``aspect_ratios`` per level."""
        n = self.scales_per_octave
        sizes = tuple(tuple(self.anchor_scale * s * 2 ** (k / n) for k in range(n)) for s in self.strides)
        ratios = (tuple(self.aspect_ratios),) * len(self.strides)
        return FixedStrideAnchorGenerator(sizes, ratios, self.strides)

    def transform(self) -> PadNormalizeTransform:
        # sizes unused: resizing happens in the data pipeline
        return PadNormalizeTransform(800, 1333, self.image_mean, self.image_std, size_divisible=32)


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups for a width: the most groups up to ``max_groups`` that divide ``channels`` and
    hold at least 2 channels each (32 at 64 channels, 16 at 32). With 1 channel per group a 1x1 level
    of a one-image batch has a single value per group and GroupNorm fails ("Expected more than 1
    value per channel"); a batch that ``skip_bad_images`` left with one image reaches that."""
    fits = [g for g in range(1, max_groups + 1) if channels % g == 0 and channels // g >= 2]
    return max(fits) if fits else 1


def widen_group_norm_groups(module: nn.Module) -> nn.Module:
    """Give every GroupNorm in ``module`` at least 2 channels per group (:func:`group_norm_groups`), in
    place: for heads that build GroupNorm(32, C) themselves (torchvision's FCOS head). Its affine
    parameters are per channel, so only the grouping changes."""
    for m in module.modules():
        if isinstance(m, nn.GroupNorm) and m.num_channels // m.num_groups < 2:
            m.num_groups = group_norm_groups(m.num_channels, m.num_groups)
    return module
