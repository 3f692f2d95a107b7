"""SRF neck: a base FPN / PAFPN whose top-down ×2 upsampler is one shared SRF generator (Sec. 4.2).

"We change all the interpolation modules of FPN with the SRF generator": the generator is passed
to the base neck as its ``upsample`` (called as ``upsample(x, size)`` on the merged lateral +
top-down map, before the 3×3 output conv), so ONE :class:`~srfgan.generator.BaseGenerator` serves
every top-down level. The base may itself wrap the FPN (SMSL after FPN: ``neck=smsl_srf_fpn``).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from detection.necks import INTERPOLATION_MODES, Interpolate, build_base, pinned_out_channels, pyramid_of
from srfgan.generator import BaseGenerator, build_generator

__all__ = ["UPSAMPLERS", "SRFNeck", "srf_neck", "top_down_channels"]

UPSAMPLERS = ("srf", *INTERPOLATION_MODES)


def top_down_channels(neck: nn.Module) -> list[int]:
    """``in_channels_list`` of the FPN inside ``neck``: one entry per top-down (body) level."""
    return list(pyramid_of(neck).in_channels_list)


class SRFNeck(nn.Module):
    """A base neck whose FPN's top-down upsampler is an SRF generator (or a fixed interpolation).

    Args:
        base: the neck, built with the upsampler as its FPN's ``upsample`` (:func:`srf_neck` does
            that); FPN / PAFPN or a neck wrapping one in ``base`` (SMSL).

    The output is the base neck's, unchanged in keys and order ('0'..'3' + 'pool' for the
    R-CNNs' RoI poolers and RPN, '0'..'2' + 'p6', 'p7' for RetinaNet / FCOS). The *top-down levels*
    are the body levels, the first ``num_top_down`` keys (P3-P5 one-stage, P2-P5 R-CNNs): G is called
    ``num_top_down - 1`` times per forward, upsampling level i+1's merged map to level i's size.
    Extra levels (P6, P7, pool) are not on the top-down path.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.out_channels = base.out_channels
        self.num_levels = base.num_levels
        self.in_channels_list = top_down_channels(base)
        self.num_top_down = len(self.in_channels_list)
        gen = self.generator
        if gen is not None and gen.channels != self.out_channels:
            raise ValueError(f"neck.generator has {gen.channels} channels but neck.out_channels={self.out_channels}")

    @property
    def upsample(self) -> nn.Module:
        return pyramid_of(self.base).upsample

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
    extra_levels: str | None = None,
) -> SRFNeck:
    """Neck factory for config (``neck=srf_fpn | srf_pafpn | smsl_srf_fpn``), like ``smsl.smsl_after``.

    Args:
        in_channels_list: the body's channels, finest first.
        base: partial neck constructor (FPN, PAFPN, SMSL after FPN, ...) keeping the neck contract.
        upsample: ``srf`` (the generator) or ``nearest | bilinear | bicubic`` (Table 5's axis).
        generator: partial generator (``channels`` is filled in with the pyramid width) or a dict
            of :func:`~srfgan.generator.build_generator`'s arguments; ``None`` = the paper's generator.
            Ignored unless ``upsample='srf'``.
        out_channels: the pyramid width (``neck.out_channels``: the base and the generator follow
            it); None: the base's own (256 by default).
        extra_levels: the detector's extra levels, passed to the base.
    """
    if upsample not in UPSAMPLERS:
        raise ValueError(f"neck.upsample={upsample!r} is not known; choose one of {list(UPSAMPLERS)}")
    channels = out_channels or pinned_out_channels(base) or 256
    if upsample != "srf":
        module: nn.Module = Interpolate(upsample)
    else:
        if generator is None:
            factory: Callable[..., nn.Module] = build_generator
        elif isinstance(generator, Mapping):
            factory = functools.partial(build_generator, **dict(generator))
        else:
            factory = generator
        module = factory(channels=channels)
    return SRFNeck(build_base(base, in_channels_list, channels, extra_levels, module))
