"""SRF neck: a base FPN / PAFPN whose top-down ×2 upsampler is one shared SRF generator (Sec. 4.2).

"We change all the interpolation modules of FPN with the SRF generator": the base neck's pluggable
``upsample`` (called as ``upsample(x, size)`` on the merged lateral + top-down map, before the 3×3
output conv) becomes ONE :class:`~srfgan.generator.Generator`, so every top-down level shares it.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from detection.necks import INTERPOLATION_MODES, Interpolate
from srfgan.generator import BaseGenerator, Generator

__all__ = ["UPSAMPLERS", "SRFNeck", "srf_neck", "find_upsampler_owner", "top_down_channels"]

UPSAMPLERS = ("srf", *INTERPOLATION_MODES)


def find_upsampler_owner(neck: nn.Module) -> nn.Module:
    """The module holding the top-down ``upsample`` (the neck itself, or a wrapped ``base``)."""
    m: Any = neck
    while m is not None:
        if isinstance(getattr(m, "upsample", None), nn.Module):
            return m
        m = getattr(m, "base", None)
    raise ValueError(f"neck {type(neck).__name__} has no pluggable top-down `upsample` (expected FPN / PAFPN)")


def top_down_channels(neck: nn.Module) -> list[int]:
    """``in_channels_list`` of the FPN inside ``neck``: one entry per top-down (body) level."""
    owner = find_upsampler_owner(neck)
    channels = getattr(owner, "in_channels_list", None)
    if channels is None:
        raise ValueError(f"neck {type(owner).__name__} has no in_channels_list")
    return list(channels)


class SRFNeck(nn.Module):
    """A base neck whose top-down upsampler is ``upsample`` (an SRF generator or a fixed interpolation).

    Args:
        base: FPN / PAFPN (or a neck wrapping one in ``base``, e.g. SMSL) with ``out_channels``.
        upsample: the module called as ``upsample(x, size)``; a :class:`Generator` for SRF.

    The output is the base neck's, unchanged in keys and order ('0'..'3' + 'pool' for the
    R-CNNs' RoI poolers and RPN, '0'..'2' + 'p6', 'p7' for RetinaNet / FCOS). The *top-down levels*
    are the body levels, the first ``num_top_down`` keys (P3-P5 one-stage, P2-P5 R-CNNs): G is called
    ``num_top_down - 1`` times per forward, upsampling level i+1's merged map to level i's size.
    Extra levels (P6, P7, pool) are not on the top-down path.
    """

    def __init__(self, base: nn.Module, upsample: nn.Module) -> None:
        super().__init__()
        out_channels = getattr(base, "out_channels", None)
        if out_channels is None:
            raise ValueError(f"base neck {type(base).__name__} has no out_channels attribute")
        if isinstance(upsample, BaseGenerator) and upsample.channels != out_channels:
            raise ValueError(
                f"neck.generator has {upsample.channels} channels but neck.base.out_channels={out_channels}"
            )
        find_upsampler_owner(base).upsample = upsample
        self.base = base
        self.out_channels = out_channels
        self.num_levels = getattr(base, "num_levels", None)
        self.in_channels_list = top_down_channels(base)
        self.num_top_down = len(self.in_channels_list)

    @property
    def upsample(self) -> nn.Module:
        return find_upsampler_owner(self.base).upsample

    @property
    def generator(self) -> BaseGenerator | None:
        """The shared SRF generator (``None`` when the neck uses a fixed interpolation)."""
        up = self.upsample
        return up if isinstance(up, BaseGenerator) else None

    def forward(self, x: Any) -> OrderedDict[str, Tensor]:
        """``x``: the body's ``OrderedDict`` of C-levels -> the base neck's P-levels."""
        return self.base(x)


def srf_neck(
    in_channels_list: list[int],
    base: Callable[..., nn.Module],
    upsample: str = "srf",
    generator: Callable[..., nn.Module] | Mapping[str, Any] | None = None,
    out_channels: int | None = None,
) -> SRFNeck:
    """Neck factory for config (``neck=srf_fpn`` / ``srf_pafpn``), like ``smsl.smsl_after``.

    Args:
        in_channels_list: the body's channels, finest first.
        base: partial neck constructor (FPN, PAFPN, ...) exposing ``out_channels``.
        upsample: ``srf`` (the generator) or ``nearest | bilinear | bicubic`` (Table 5's axis).
        generator: partial :class:`Generator` (``channels`` is filled in from ``base``'s
            ``out_channels``) or a dict of its keyword arguments; ``None`` = the paper's generator.
            Ignored unless ``upsample='srf'``.
        out_channels: the pyramid width as configs set it for every neck (``neck.out_channels``;
            ``neck.base.out_channels`` follows it); checked against the base when given.
    """
    if upsample not in UPSAMPLERS:
        raise ValueError(f"neck.upsample={upsample!r} is not known; choose one of {list(UPSAMPLERS)}")
    base_neck = base(in_channels_list=in_channels_list)
    channels = getattr(base_neck, "out_channels", None)
    if channels is None:
        raise ValueError(f"base neck {type(base_neck).__name__} has no out_channels attribute")
    if out_channels is not None and out_channels != channels:
        raise ValueError(
            f"neck.out_channels={out_channels} but the base neck has out_channels={channels}; "
            "set neck.out_channels only (neck.base.out_channels follows it)"
        )
    if upsample != "srf":
        return SRFNeck(base_neck, Interpolate(upsample))
    if generator is None:
        factory: Callable[..., nn.Module] = Generator
    elif isinstance(generator, Mapping):
        factory = functools.partial(Generator, **dict(generator))
    else:
        factory = generator
    return SRFNeck(base_neck, factory(channels=channels))
