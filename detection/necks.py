"""Pyramid necks: the neck contract, and FPN and PAFPN with a pluggable upsampling operator.

Both take the backbone body's ``OrderedDict[str, Tensor]`` (finest first) and return
one with the same keys followed by the extra levels (``'p6', 'p7'`` or ``'pool'``),
every level with ``out_channels`` channels. The top-down pathway's ×2 step is an
injected module (``Interpolate`` here; SRF-GAN's generator, passed as ``upsample=``), in
the spirit of torchvision's injected ``extra_blocks``.

The neck contract (:class:`Neck`) is what detectors, SMSL and SRF-GAN rely on; a neck that
refines another (SMSL) keeps it as ``base`` and the pyramid it wraps is found with
:func:`pyramid_of`. A detector builds its neck as ``neck(in_channels_list=..., extra_levels=...)``:
the detector config owns ``extra_levels`` (its head needs P6/P7 or the RPN's pool level), the
neck config owns ``out_channels`` (a wrapping neck passes both to its base).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

INTERPOLATION_MODES = ("nearest", "bilinear", "bicubic")
EXTRA_LEVELS = ("p6p7_c5", "p6p7_p5", "maxpool", "none")


@runtime_checkable
class Neck(Protocol):
    """What every neck provides.

    Attributes:
        out_channels: C of every output level.
        num_levels: output levels: the body's (top-down) levels, then the extra ones.
        num_top_down: the body's levels among them (the first ``num_top_down`` keys).

    ``forward(OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]``: the body's levels,
    finest first, to ``num_levels`` levels keeping the body's keys (``'0'..`` for the R-CNNs'
    RoI poolers) followed by the extra levels' (``'p6', 'p7'`` or ``'pool'``).
    """

    out_channels: int
    num_levels: int
    num_top_down: int

    def __call__(self, x: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]: ...


def pyramid_of(neck: nn.Module) -> FPN:
    """The :class:`FPN` (or PAFPN) inside ``neck``: itself, or the ``base`` of a wrapping neck."""
    m: nn.Module | None = neck
    while m is not None:
        if isinstance(m, FPN):
            return m
        m = getattr(m, "base", None)
    raise ValueError(f"neck {type(neck).__name__} has no FPN / PAFPN inside (its `base` chain ends without one)")


class Interpolate(nn.Module):
    """Fixed-kernel upsampler: ``Interpolate(mode)(x, size)`` resizes ``x`` (B, C, h, w) to ``size``.

    The pluggable operator of the FPN top-down pathway (SRF-GAN Table 5's axis).
    """

    def __init__(self, mode: str = "nearest") -> None:
        super().__init__()
        if mode not in INTERPOLATION_MODES:
            raise ValueError(f"neck.upsample={mode!r} is not known; choose one of {list(INTERPOLATION_MODES)}")
        self.mode = mode

    def forward(self, x: Tensor, size: tuple[int, int] | list[int]) -> Tensor:
        if self.mode == "nearest":
            return F.interpolate(x, size=tuple(size), mode="nearest")
        return F.interpolate(x, size=tuple(size), mode=self.mode, align_corners=False)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def build_upsampler(upsample: str | nn.Module) -> nn.Module:
    """A string names a fixed interpolation; a module (e.g. an SRF generator) is used as is."""
    return upsample if isinstance(upsample, nn.Module) else Interpolate(upsample)


class _P6P7(LastLevelP6P7):
    """torchvision's P6/P7 block with the source chosen explicitly (C5 or P5).

    torchvision infers the source from ``in_channels == out_channels``; MMDetection's
    RetinaNet builds P6 from C5 (``add_extra_convs='on_input'``) whatever the widths.
    """

    def __init__(self, in_channels: int, out_channels: int, use_p5: bool) -> None:
        super().__init__(in_channels, out_channels)
        self.use_P5 = use_p5


def build_extra_block(extra_levels: str, c5_channels: int, out_channels: int) -> ExtraFPNBlock | None:
    if extra_levels == "p6p7_c5":
        return _P6P7(c5_channels, out_channels, use_p5=False)
    if extra_levels == "p6p7_p5":
        return _P6P7(out_channels, out_channels, use_p5=True)
    if extra_levels == "maxpool":
        return LastLevelMaxPool()
    if extra_levels == "none":
        return None
    raise ValueError(f"neck.extra_levels={extra_levels!r} is not known; choose one of {list(EXTRA_LEVELS)}")


def num_extra_levels(extra_levels: str) -> int:
    return {"p6p7_c5": 2, "p6p7_p5": 2, "maxpool": 1, "none": 0}[extra_levels]


def pinned(factory: Callable[..., nn.Module], key: str) -> Any:
    """The value a partial neck constructor pins for ``key``, looking through wrapped ``base``s."""
    keywords = getattr(factory, "keywords", {})
    if keywords.get(key) is not None:
        return keywords[key]
    inner = keywords.get("base")
    return pinned(inner, key) if inner is not None else None


def pinned_out_channels(factory: Callable[..., nn.Module]) -> int | None:
    """The width a partial neck constructor pins (``out_channels=``), looking through wrapped ``base``s."""
    value = pinned(factory, "out_channels")
    return None if value is None else int(value)


def build_base(
    base: Callable[..., nn.Module],
    in_channels_list: list[int],
    out_channels: int | None = None,
    extra_levels: str | None = None,
    upsample: str | nn.Module | None = None,
) -> nn.Module:
    """Build the neck a wrapping neck refines (SMSL after FPN; SRF's FPN with G as ``upsample``),
    passing down what the wrapper received — the pyramid width (its one source is the outer
    neck's ``out_channels``), the detector's ``extra_levels`` and the top-down ``upsample``.

    ``base`` is a partial neck constructor; a width pinned in it that differs is an error.
    """
    pinned = pinned_out_channels(base)
    if out_channels is not None and pinned is not None and pinned != out_channels:
        raise ValueError(
            f"neck.out_channels={out_channels} but the base neck has out_channels={pinned}; "
            "set neck.out_channels only (the base neck follows it)"
        )
    kwargs = {k: v for k, v in (("out_channels", out_channels), ("extra_levels", extra_levels),
                                ("upsample", upsample)) if v is not None}
    neck = base(in_channels_list=list(in_channels_list), **kwargs)
    for attr in ("out_channels", "num_levels"):
        if getattr(neck, attr, None) is None:
            raise ValueError(f"base neck {type(neck).__name__} has no {attr} attribute (see detection.necks.Neck)")
    return neck


def _init_conv(m: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_uniform_(m.weight, a=1)
    nn.init.constant_(m.bias, 0)
    return m


class FPN(nn.Module):
    """Feature Pyramid Network (Lin et al., "Feature Pyramid Networks for Object Detection").

    Args:
        in_channels_list: channels of the body's levels, finest first (e.g. C3..C5).
        out_channels: channels of every output level (256 in the papers).
        upsample: ``"nearest" | "bilinear" | "bicubic"`` or an ``nn.Module`` called as
            ``upsample(x, size)`` for the top-down ×2 step. It is applied to the coarser
            merged map before adding the lateral, i.e. before the 3×3 output conv — where
            SRF-GAN puts its generator.
        extra_levels: ``p6p7_c5`` (P6 = 3×3/s2 conv on C5, P7 on ReLU(P6): MMDetection's
            RetinaNet, ``add_extra_convs='on_input'``), ``p6p7_p5`` (same from P5),
            ``maxpool`` (P6 = max-pool of P5, the R-CNNs' RPN level), ``none``.

    Example:
        >>> fpn = FPN([512, 1024, 2048], 256, extra_levels="p6p7_c5")
        >>> feats = OrderedDict((str(i), torch.rand(1, c, 64 // 2**i, 96 // 2**i))
        ...                     for i, c in enumerate([512, 1024, 2048]))
        >>> {k: tuple(v.shape) for k, v in fpn(feats).items()}
        {'0': (1, 256, 64, 96), '1': (1, 256, 32, 48), '2': (1, 256, 16, 24), 'p6': (1, 256, 8, 12), 'p7': (1, 256, 4, 6)}
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int = 256,
        upsample: str | nn.Module = "nearest",
        extra_levels: str = "p6p7_c5",
    ) -> None:
        super().__init__()
        if out_channels <= 0:
            raise ValueError(f"neck.out_channels={out_channels} must be positive")
        self.in_channels_list = list(in_channels_list)
        self.out_channels = out_channels
        self.upsample = build_upsampler(upsample)
        self.lateral_convs = nn.ModuleList(_init_conv(nn.Conv2d(c, out_channels, 1)) for c in in_channels_list)
        self.output_convs = nn.ModuleList(
            _init_conv(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels_list
        )
        self.extra_levels = extra_levels
        self.extra_block = build_extra_block(extra_levels, self.in_channels_list[-1], out_channels)
        self.num_top_down = len(in_channels_list)
        self.num_levels = self.num_top_down + num_extra_levels(extra_levels)

    def per_level_modules(self) -> dict[str, int]:
        """The ``ModuleList`` attributes holding one module per top-down level, with the level of their
        entry 0 (a stage that moves weights between pyramids with other levels matches them by it)."""
        return {"lateral_convs": 0, "output_convs": 0}

    def top_down(self, feats: list[Tensor]) -> list[Tensor]:
        """Lateral 1×1 convs + top-down pathway; returns the merged maps (before 3×3 convs)."""
        merged = [self.lateral_convs[-1](feats[-1])]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.lateral_convs[i](feats[i])
            merged.insert(0, lateral + self.upsample(merged[0], lateral.shape[-2:]))
        return merged

    def add_extra(self, outs: list[Tensor], feats: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        if self.extra_block is None:
            return outs, names
        return self.extra_block(outs, feats, names)

    def forward(self, x: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        names, feats = list(x.keys()), list(x.values())
        outs = [conv(m) for conv, m in zip(self.output_convs, self.top_down(feats))]
        outs, names = self.add_extra(outs, feats, names)
        return OrderedDict(zip(names, outs))


class PAFPN(FPN):
    """Path Aggregation FPN (Liu et al., "Path Aggregation Network for Instance Segmentation").

    FPN followed by a bottom-up path: ``N_{i+1} = conv3x3(P_{i+1} + conv3x3_s2(N_i))``,
    as MMDetection's ``PAFPN``; the extra levels are built after the bottom-up path
    (from C5 or from the last aggregated level). Same arguments as :class:`FPN`.

    Not the SMSL paper's "PANet*" exactly: its re-implementation counts 39.51 M on RetinaNet-R50
    (SMSL Table 2), this one 40.10 M — MMDetection's PAFPN has one 3×3 conv (0.59 M at C = 256) more
    on the bottom-up path. We keep MMDetection's, the public implementation a reader can check.
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int = 256,
        upsample: str | nn.Module = "nearest",
        extra_levels: str = "p6p7_c5",
    ) -> None:
        super().__init__(in_channels_list, out_channels, upsample, extra_levels)
        n = len(in_channels_list) - 1
        self.downsample_convs = nn.ModuleList(
            _init_conv(nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)) for _ in range(n)
        )
        self.pafpn_convs = nn.ModuleList(
            _init_conv(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in range(n)
        )

    def per_level_modules(self) -> dict[str, int]:
        # downsample_convs[i] leaves level i; pafpn_convs[i] makes level i + 1
        return {**super().per_level_modules(), "downsample_convs": 0, "pafpn_convs": 1}

    def forward(self, x: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        names, feats = list(x.keys()), list(x.values())
        inter = [conv(m) for conv, m in zip(self.output_convs, self.top_down(feats))]
        outs = [inter[0]]
        for i in range(len(inter) - 1):
            down = self.downsample_convs[i](outs[-1])
            # A stride-2 conv on an odd size gives ceil(h/2); the FPN level has the
            # body's size, which matches for ResNet bodies. Guard odd mismatches anyway.
            if down.shape[-2:] != inter[i + 1].shape[-2:]:
                down = F.interpolate(down, size=inter[i + 1].shape[-2:], mode="nearest")
            outs.append(self.pafpn_convs[i](inter[i + 1] + down))
        outs, names = self.add_extra(outs, feats, names)
        return OrderedDict(zip(names, outs))
