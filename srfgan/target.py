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
    "pair_levels",
    "level_pairs",
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


def pair_levels(extractor_strides: Sequence[int], target_strides: Sequence[int], matching: str = "same") -> list[tuple[int, int]]:
    """Which extractor level is compared with which target level in L_SRF (Eq. 3, Table 7).

    ``same`` (the paper's choice): M's level i with F's level i (same semantic level), matched by
    stride; levels only one of them has are left out (SRF-GAN Table 3 pairs a Mask R-CNN extractor on
    P2-P5 with a RetinaNet F on P3-P5: P3-P5 are compared). ``different`` (Table 7's ablation):
    M's level i with F's level i-1, "{P3^sr, P4^sr, P5^sr} and {P2^tr, P3^tr, P4^tr}".
    Returns ``[(extractor stride, target stride), ...]`` finest first; empty if nothing pairs.
    """
    if matching not in LEVEL_MATCHING:
        raise ValueError(f"level_matching={matching!r} is not known; choose one of {list(LEVEL_MATCHING)}")
    target = {int(s) for s in target_strides}
    shift = 1 if matching == "same" else 2  # F's level i-1 has half the stride of level i
    return [(int(s), int(s) // shift) for s in extractor_strides if int(s) // shift in target and int(s) % shift == 0]


def level_pairs(
    extractor: Mapping[int, Tensor], target: Mapping[int, Tensor], pairs: Sequence[tuple[int, int]], scale: float = 0.5
) -> tuple[list[Tensor], list[Tensor]]:
    """Eq. 3's pairs: ``(extractor[s_m], ↓s(target[s_t]))`` for each ``(s_m, s_t)`` of ``pairs``.

    ``extractor``: M's top-down levels on I^lr, ``{stride: (B, C, h, w)}``. ``target``: F's top-down
    levels on the image whose level ``s_t`` has twice M's resolution — I^tr for ``same`` (F's level
    i on I^tr is 2× M's level i on I^lr = ↓0.5 I^tr), I^lr for ``different`` (F's level i-1 on I^lr
    is 2× M's level i on I^lr) — nearest ↓s (Eq. 3) brings it to M's size. So both matchings
    compare the same M tensors at the same resolution; only the semantic level of the target
    differs (Sec. 4.2 / 5.3). Returns ``(sr, tr)`` cropped to common sizes, finest first.
    """
    sr, tr = [], []
    for s_m, s_t in pairs:
        if s_m not in extractor or s_t not in target:
            raise ValueError(f"level pair (extractor stride {s_m}, target stride {s_t}) is missing: "
                             f"extractor has {list(extractor)}, target {list(target)}")
        a, b = crop_to_common(extractor[s_m], downsample_nearest(target[s_t], scale))
        sr.append(a)
        tr.append(b.to(a.dtype))
    return sr, tr
