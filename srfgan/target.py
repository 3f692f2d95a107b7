"""The frozen target network F (Sec. 3.2), level matching for L_SRF (Eq. 3, Table 7), feature capture."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from srfgan.degradation import downsample_nearest
from srfgan.neck import top_down_channels

__all__ = [
    "LEVEL_MATCHING",
    "TargetNetwork",
    "capture_outputs",
    "crop_to_common",
    "same_level_pairs",
    "different_level_pairs",
]

LEVEL_MATCHING = ("same", "different")


class TargetNetwork(nn.Module):
    """F: a trained detector's normalise/pad transform + backbone body + FPN, frozen, always in eval mode.

    "F is not trained, but it just provides target features" (Sec. 4.2): every parameter has
    ``requires_grad=False`` and ``train()`` keeps the module in eval mode (BatchNorm uses running
    statistics) whatever the enclosing LightningModule does.

    Args:
        transform: the detector's ``PadNormalizeTransform`` (normalise, pad to 32, no resize).
        backbone: the detector's ``BackboneWithNeck`` (body + neck).

    Attributes:
        out_channels: C of every level.
        num_top_down: number of top-down (body) levels, the first keys of the output.
        strides: stride of each top-down level, finest first (from the body).
    """

    def __init__(self, transform: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.out_channels = int(backbone.out_channels)
        self.num_top_down = len(top_down_channels(backbone.neck))
        self.strides = [int(s) for s in backbone.body.strides][: self.num_top_down]
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @classmethod
    def from_detector(cls, detector: nn.Module) -> TargetNetwork:
        """F from a :class:`detection.detectors.Detector` (its ``model.transform`` and ``backbone``)."""
        return cls(detector.model.transform, detector.backbone)

    def train(self, mode: bool = True) -> TargetNetwork:
        return super().train(False)

    def batch(self, images: Sequence[Tensor]) -> Tensor:
        """Normalise and pad a list of (3, H, W) images in [0, 1] as the detector does: (B, 3, H_p, W_p)."""
        with torch.no_grad():
            return self.transform(list(images))[0].tensors

    @torch.no_grad()
    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """``x`` (B, 3, H, W) normalised batch -> the neck's levels, finest first (no gradient)."""
        return self.backbone(x)

    def top_down(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        """The top-down levels of ``features`` keyed by stride: ``{stride: (B, C, H_i, W_i)}``."""
        keys = list(features)[: self.num_top_down]
        return OrderedDict((s, features[k]) for s, k in zip(self.strides, keys))


@contextlib.contextmanager
def capture_outputs(module: nn.Module) -> Iterator[list]:
    """Collect every output of ``module.forward`` while the context is open (a forward hook).

    Used to read an extractor's pyramid (``net.backbone``) or its generator's super-resolved maps
    during the detector's own forward, so the detection and SRF losses share one forward pass.
    """
    outputs: list = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


def crop_to_common(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Crop two top-left aligned maps (B, C, H, W) to their common size.

    Both maps come from batches padded at the bottom/right (to 32) and bodies that put output pixel
    j on input pixel j·stride, so they agree from the top-left corner; the extra rows/columns one of
    them has lie in padding.
    """
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    return a[..., :h, :w], b[..., :h, :w]


def same_level_pairs(
    extractor: Mapping[int, Tensor], target: Mapping[int, Tensor], scale: float = 0.5
) -> tuple[list[Tensor], list[Tensor], list[int]]:
    """Eq. 3 pairs: the extractor's level i on I^lr vs ``↓s(P_i^tr)``, F's level i on I^tr (nearest ↓).

    Both mappings are ``{stride: features}`` of the top-down levels; levels are matched by stride,
    i.e. by semantic level. Every extractor level needs a target level of the same stride (F may
    have more, e.g. P2 for a RetinaNet extractor with P3-P5, as in the paper's Table 3 setting).
    Returns ``(sr, tr, strides)``, finest first.
    """
    missing = [s for s in extractor if s not in target]
    if missing:
        raise ValueError(
            f"extractor levels with strides {missing} have no target level (F has strides {list(target)})"
        )
    sr, tr = [], []
    for s, p in extractor.items():
        a, b = crop_to_common(p, downsample_nearest(target[s], scale))
        sr.append(a)
        tr.append(b.to(a.dtype))
    return sr, tr, list(extractor)


def different_level_pairs(
    generated: Mapping[int, Tensor], target: Mapping[int, Tensor]
) -> tuple[list[Tensor], list[Tensor], list[int]]:
    """Table 7's "different feature levels": ``{P3^sr, P4^sr, P5^sr}`` vs ``{P2^tr, P3^tr, P4^tr}``.

    Our reading: M and F see the same (↓0.5) image; P_i^sr is the map G produces inside M's
    top-down path from level i, which has level i-1's resolution, so it is compared with F's level
    i-1 on that same image, with no resampling — same resolution, semantic levels one apart.
    ``generated`` is ``{stride of the output: G's map}`` (stride of level i-1); returns
    ``(sr, tr, strides)``.
    """
    missing = [s for s in generated if s not in target]
    if missing:
        raise ValueError(f"generated maps with strides {missing} have no target level (F has strides {list(target)})")
    sr, tr = [], []
    for s, p in generated.items():
        a, b = crop_to_common(p, target[s])
        sr.append(a)
        tr.append(b.to(a.dtype))
    return sr, tr, list(generated)
