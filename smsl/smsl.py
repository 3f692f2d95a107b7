"""Selective Multi-Scale Learning (SMSL) neck.

Chen, Lu, Shen, *Selective Multi-Scale Learning for Object Detection* (ICANN 2021), Sec. 3.
Gather / refine / scatter follows MMDetection's Balanced Feature Pyramid (BFP), on which the
paper builds; the refinement is the paper's channel rescaling (CR, Eq. 1-6) and selective feature
combination (SFC, Eq. 7-14).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detection.necks import build_base

__all__ = [
    "SMSL",
    "SMSLNeck",
    "ChannelRescaling",
    "SelectiveCombination",
    "GlobalFeature",
    "NonLocal2d",
    "build_smsl_neck",
    "adaptive_max_pool2d",
]


class ChannelRescaling(nn.Module):
    """SE-style gate over the concatenated levels (Eq. 1-6).

    Args:
        in_channels (int): channels C of one level.
        num_levels (int): number of levels L.
        reduction (int): reduction ratio r of the hidden layer (L·C / r units).
    """

    def __init__(self, in_channels: int, num_levels: int, reduction: int) -> None:
        super().__init__()
        channels = num_levels * in_channels
        self.fc1 = nn.Linear(channels, channels // reduction)  # W_1, Eq. 3
        self.fc2 = nn.Linear(channels // reduction, channels)  # W_2, Eq. 3

    def gates(self, d: Tensor) -> Tensor:
        """Gates s of Eq. 3 for gathered levels ``d`` (B, L, C, H, W); returns (B, L, C) in (0, 1)."""
        b, num_levels, c = d.shape[:3]
        # Eq. 1-2: GAP of the concatenation [D^1, ..., D^L] (level-major, as Eq. 6 splits it).
        x = d.mean(dim=(3, 4)).reshape(b, num_levels * c)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x))))  # Eq. 3
        return s.view(b, num_levels, c)

    def forward(self, d: Tensor) -> Tensor:
        """Rescaled groups Q (B, L, C, H, W) for gathered levels ``d`` (B, L, C, H, W)."""
        # Eq. 4-6: J = s ⊗ D̃, split into L groups of C channels; the split is a view along dim 1.
        return d * self.gates(d)[..., None, None]


class SelectiveCombination(nn.Module):
    """One selective combination block (SCB, Fig. 2b): soft attention over levels (Eq. 9-11).

    Args:
        in_channels (int): channels C of one level.
        num_levels (int): number of levels L.
        reduction (int): reduction ratio r (C / r hidden units).
    """

    def __init__(self, in_channels: int, num_levels: int, reduction: int) -> None:
        super().__init__()
        self.num_levels = num_levels
        hidden = in_channels // reduction
        self.fc1 = nn.Linear(in_channels, hidden)  # W^l, Eq. 9
        self.norm = nn.LayerNorm(hidden)  # L(.), Eq. 9
        self.fc2 = nn.Linear(hidden, num_levels * in_channels)  # V^l, Eq. 10

    def forward(self, g: Tensor) -> Tensor:
        """Attention A^l (B, L, C) from the global context ``g`` (B, C); sums to 1 over L."""
        z = F.relu(self.norm(self.fc1(g)))  # Eq. 9
        u = self.fc2(z)  # Eq. 10
        # Eq. 11: U^l ∈ R^{LC} -> M^l ∈ R^{L×C}. The paper does not say which index runs fastest;
        # we read it row-major (level-major), the same layout as the concatenation of Eq. 1 / 6.
        m = u.view(g.shape[0], self.num_levels, -1)
        return m.softmax(dim=1)  # Eq. 11: softmax across levels, per channel


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., *Non-local Neural Networks*), as MMCV's.

    Configured like BFP's refine step: inter channels = C (reduction 1), no 1/sqrt(C) scaling,
    1×1 convs with bias and no norm, residual ``x + conv_out(y)``. Initialised as MMCV's
    ``NonLocal2d.init_weights`` (which BFP keeps): g / theta / phi ~ N(0, 0.01), bias 0, and
    conv_out all zeros so the block starts as the identity.

    Args:
        in_channels (int): channels C.
        reduction (int): inter channels = C // reduction.
        use_scale (bool): divide the pairwise logits by sqrt(inter channels).
        zeros_init (bool): zero-init conv_out (MMCV / BFP default) instead of N(0, 0.01).
    """

    def __init__(
        self, in_channels: int, reduction: int = 1, use_scale: bool = False, zeros_init: bool = True
    ) -> None:
        super().__init__()
        self.use_scale = use_scale
        self.inter_channels = max(in_channels // reduction, 1)
        self.g = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.theta = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.conv_out = nn.Conv2d(self.inter_channels, in_channels, kernel_size=1)
        self.reset_parameters(zeros_init=zeros_init)

    def reset_parameters(self, std: float = 0.01, zeros_init: bool = True) -> None:
        for conv in (self.g, self.theta, self.phi):
            nn.init.normal_(conv.weight, std=std)
            nn.init.zeros_(conv.bias)
        if zeros_init:
            nn.init.zeros_(self.conv_out.weight)
        else:
            nn.init.normal_(self.conv_out.weight, std=std)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, _, h, w = x.shape
        g_x = self.g(x).flatten(2).transpose(1, 2)  # (B, HW, C')
        theta_x = self.theta(x).flatten(2).transpose(1, 2)  # (B, HW, C')
        phi_x = self.phi(x).flatten(2)  # (B, C', HW)
        pairwise = torch.bmm(theta_x, phi_x)  # (B, HW, HW)
        if self.use_scale:
            pairwise = pairwise / self.inter_channels**0.5
        y = torch.bmm(pairwise.softmax(dim=-1), g_x)  # (B, HW, C')
        y = y.transpose(1, 2).reshape(b, self.inter_channels, h, w)
        return x + self.conv_out(y)


class GlobalFeature(nn.Module):
    """Global feature of SFC: one more SCB gives F^g, a non-local block refines it to G.

    Args:
        in_channels (int): channels C of one level.
        num_levels (int): number of levels L.
        reduction (int): reduction ratio r of the SCB.
    """

    def __init__(self, in_channels: int, num_levels: int, reduction: int) -> None:
        super().__init__()
        self.combination = SelectiveCombination(in_channels, num_levels, reduction)
        # BFP's refine: NonLocal2d(C, reduction=1, use_scale=False, norm_cfg=None).
        self.refine = NonLocal2d(in_channels, reduction=1, use_scale=False)

    def forward(self, q: Tensor, g: Tensor) -> Tensor:
        """G (B, C, H, W) from the rescaled groups ``q`` (B, L, C, H, W) and context ``g`` (B, C)."""
        a = self.combination(g)  # (B, L, C)
        f_g = torch.einsum("blc,blchw->bchw", a, q)  # Eq. 12-13 with the global weights
        return self.refine(f_g)


def _window_index(n_in: int, n_out: int) -> tuple[Tensor, int]:
    """Adaptive pooling's windows along one axis as an index (n_out * k,) and the width k.

    Window i is ``[floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out))``, as ATen's adaptive pooling
    computes it; shorter windows repeat their last index (a repeat changes no maximum).
    """
    starts = [(i * n_in) // n_out for i in range(n_out)]
    ends = [-((-(i + 1) * n_in) // n_out) for i in range(n_out)]
    k = max(e - s for s, e in zip(starts, ends))
    return torch.tensor([min(s + j, e - 1) for s, e in zip(starts, ends) for j in range(k)]), k


def adaptive_max_pool2d(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.adaptive_max_pool2d(x, size)`` computed as two 1-D maxima (a maximum over a rectangle is the
    maximum over its rows of the maxima over its columns): equal values, NaN propagated alike.

    Written by hand because ATen's CPU kernel also computes argmax indices element by element: at
    RetinaNet's 800x1333 input (P3 100x167 -> 25x42, 256 channels) it took 2-15x longer than this
    (measured single-threaded per level; ``tests/test_smsl.py`` checks equality). Gradients agree except
    on exact ties, where the maximum's gradient is shared among the tied inputs instead of given to one.

    Args:
        x: (..., H, W). size: (h, w) output size.
    Returns:
        (..., h, w).
    """
    h, w = x.shape[-2:]
    oh, ow = (int(v) for v in size)
    lead = x.shape[:-2]
    if h % oh == 0:
        x = x.reshape(*lead, oh, h // oh, w).amax(-2)
    else:
        idx, k = _window_index(h, oh)
        x = x.index_select(-2, idx.to(x.device)).reshape(*lead, oh, k, w).amax(-2)
    if w % ow == 0:
        return x.reshape(*lead, oh, ow, w // ow).amax(-1)
    idx, k = _window_index(w, ow)
    return x.index_select(-1, idx.to(x.device)).reshape(*lead, oh, ow, k).amax(-1)


class SMSL(nn.Module):
    """Selective Multi-Scale Learning, from *Selective Multi-Scale Learning for Object Detection*
    (Chen, Lu, Shen, 2021).

    A neck refinement placed after FPN / PAFPN. All levels are gathered to one resolution (the
    middle level by default), channel-rescaled (CR, Eq. 1-6), recombined per target level with a
    soft attention across levels (SFC local features, Eq. 7-13) plus a non-local-refined global
    feature (Eq. 14), then scattered back to every level and added to its input (Eq. 15).

    Args:
        in_channels (int): channels C of every input level.
        num_levels (int): number of levels L (>= 2), e.g. 5 for P3-P7.
        reduction (int): reduction ratio r of CR (L·C / r hidden units) and of every SCB
            (C / r hidden units); must divide ``in_channels``.
        gather_level (int | None): 0-based index (finest first) of the level everything is gathered
            to; None = ``(num_levels - 1) // 2``, the paper's (l_min + l_max) / 2.
        channel_rescaling (bool): use CR; when False the SCBs combine the gathered levels directly.
        global_feature (bool): add the non-local-refined global feature G to every local feature.

    Inputs are an ``OrderedDict[str, Tensor]`` of L levels, finest first, each (B, C, H_l, W_l); the
    output has the same keys, order and shapes. ``attention_weights`` and ``channel_gates`` expose
    the soft attention A (Eq. 11) and CR gates s (Eq. 3) for inspection; forward computes neither
    twice nor keeps them.

    Example::

        >>> smsl = SMSL(in_channels=256, num_levels=5)
        >>> sizes = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]  # P3..P7
        >>> x = OrderedDict((f"p{i + 3}", torch.rand(2, 256, h, w)) for i, (h, w) in enumerate(sizes))
        >>> out = smsl(x)
        >>> [(k, tuple(v.shape)) for k, v in out.items()][:2]
        [('p3', (2, 256, 100, 152)), ('p4', (2, 256, 50, 76))]
        >>> smsl.attention_weights(x).shape  # (B, L local targets + 1 global, L, C)
        torch.Size([2, 6, 5, 256])
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_levels: int = 5,
        reduction: int = 8,
        gather_level: int | None = None,
        channel_rescaling: bool = True,
        global_feature: bool = True,
    ) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"num_levels={num_levels}: SMSL needs at least 2 levels")
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels}: must be a positive integer")
        if reduction < 1 or in_channels % reduction != 0:
            raise ValueError(
                f"reduction={reduction}: must be a positive divisor of in_channels={in_channels} "
                f"(SCB hidden C/r) and so of num_levels*in_channels={num_levels * in_channels} (CR hidden L·C/r)"
            )
        if gather_level is None:
            gather_level = (num_levels - 1) // 2
        if not 0 <= gather_level < num_levels:
            raise ValueError(
                f"gather_level={gather_level}: must be in [0, {num_levels}) for num_levels={num_levels}"
            )
        self.in_channels = in_channels
        self.num_levels = num_levels
        self.reduction = reduction
        self.gather_level = gather_level
        self.channel_rescaling = (
            ChannelRescaling(in_channels, num_levels, reduction) if channel_rescaling else None
        )
        # One SCB per target level: each level learns its own weights (Eq. 9-10 superscript l).
        self.selective_combination = nn.ModuleList(
            SelectiveCombination(in_channels, num_levels, reduction) for _ in range(num_levels)
        )
        self.global_feature = GlobalFeature(in_channels, num_levels, reduction) if global_feature else None

    # -- steps ------------------------------------------------------------------------------------
    def _check(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        if len(features) != self.num_levels:
            raise ValueError(
                f"got {len(features)} feature levels {list(features)}: SMSL was built for num_levels={self.num_levels}"
            )
        for key, x in features.items():
            if x.dim() != 4 or x.shape[1] != self.in_channels:
                raise ValueError(
                    f"level {key!r} has shape {tuple(x.shape)} ({x.shape[1] if x.dim() > 1 else '?'} channels): "
                    f"expected (B, {self.in_channels}, H, W)"
                )
        return list(features.values())

    def _gather(self, xs: list[Tensor]) -> Tensor:
        """Resize every level to the gather level's size; returns D (B, L, C, H, W)."""
        size = xs[self.gather_level].shape[-2:]
        gathered = []
        for i, x in enumerate(xs):
            # BFP's gather rule: adaptive max-pool finer levels, nearest-upsample coarser ones.
            if i < self.gather_level:
                x = adaptive_max_pool2d(x, size)
            elif i > self.gather_level:
                x = F.interpolate(x, size=size, mode="nearest")
            gathered.append(x)
        return torch.stack(gathered, dim=1)

    def _scatter(self, fused: Tensor, xs: list[Tensor]) -> list[Tensor]:
        """Eq. 15: resize F̃^l (B, L, C, H, W) back to each level's size and add that level's input."""
        outs = []
        for i, x in enumerate(xs):
            f = fused[:, i]
            # BFP's scatter rule, the inverse of gather: nearest-upsample to finer levels,
            # adaptive max-pool to coarser ones.
            if i < self.gather_level:
                # a fresh tensor that nearest's backward does not keep: the residual adds into it in
                # place (one level-sized buffer less; P3 is 4.3M values per image at 800x1333)
                outs.append(F.interpolate(f, size=x.shape[-2:], mode="nearest").add_(x))
                continue
            if i > self.gather_level:
                f = adaptive_max_pool2d(f, x.shape[-2:])
            outs.append(x + f)
        return outs

    def _rescaled_groups(self, xs: list[Tensor]) -> Tensor:
        d = self._gather(xs)
        # Eq. 1-6; without CR the SCBs see the gathered levels themselves (Table 1, row 1 / 3).
        return self.channel_rescaling(d) if self.channel_rescaling is not None else d

    @staticmethod
    def _context(q: Tensor) -> Tensor:
        """Global context g (B, C) of the rescaled groups, shared by every SCB."""
        q_sum = q.sum(dim=1)  # Eq. 7
        return q_sum.mean(dim=(2, 3))  # Eq. 8

    def _local_attention(self, g: Tensor) -> Tensor:
        """A^l for every target level, stacked: (B, L targets, L, C)."""
        return torch.stack([scb(g) for scb in self.selective_combination], dim=1)

    # -- public -----------------------------------------------------------------------------------
    def forward(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        """OrderedDict of L levels (B, C, H_l, W_l), finest first -> same keys, order and shapes."""
        xs = self._check(features)
        q = self._rescaled_groups(xs)  # (B, L, C, H, W)
        g = self._context(q)  # (B, C)
        a = self._local_attention(g)  # (B, L, L, C)
        fused = torch.einsum("btlc,blchw->btchw", a, q)  # Eq. 12-13: F^l = Σ_i A^l_i ⊙ Q^i
        if self.global_feature is not None:
            fused = fused + self.global_feature(q, g).unsqueeze(1)  # Eq. 14: F̃^l = F^l ⊕ G
        return OrderedDict(zip(features.keys(), self._scatter(fused, xs)))

    def attention_weights(self, features: Mapping[str, Tensor]) -> Tensor:
        """Soft attention A (Eq. 11) for ``features``: (B, T, L, C), softmax over L.

        T = L local target levels (finest first), plus the global block's weights last when
        ``global_feature`` is on.
        """
        g = self._context(self._rescaled_groups(self._check(features)))
        a = self._local_attention(g)
        if self.global_feature is not None:
            a = torch.cat([a, self.global_feature.combination(g).unsqueeze(1)], dim=1)
        return a

    def channel_gates(self, features: Mapping[str, Tensor]) -> Tensor:
        """CR gates s (Eq. 3) for ``features``: (B, L, C) in (0, 1). Requires ``channel_rescaling``."""
        if self.channel_rescaling is None:
            raise RuntimeError("channel_gates: this SMSL was built with channel_rescaling=False")
        return self.channel_rescaling.gates(self._gather(self._check(features)))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_levels={self.num_levels}, gather_level={self.gather_level}"
        )


class SMSLNeck(nn.Module):
    """A base neck (FPN, PAFPN, ...) followed by SMSL: ``forward(x) = smsl(base(x))``.

    Args:
        base (nn.Module): neck returning ``OrderedDict[str, Tensor]`` with an ``out_channels`` attribute.
        smsl (SMSL): the refinement; its ``in_channels`` must equal ``base.out_channels``.
    """

    def __init__(self, base: nn.Module, smsl: SMSL) -> None:
        super().__init__()
        out_channels = getattr(base, "out_channels", None)
        if out_channels is None:
            raise ValueError(f"base neck {type(base).__name__} has no out_channels attribute")
        if out_channels != smsl.in_channels:
            raise ValueError(
                f"base.out_channels={out_channels} differs from smsl.in_channels={smsl.in_channels}"
            )
        self.base = base
        self.smsl = smsl
        self.out_channels = out_channels
        self.num_levels = smsl.num_levels
        self.num_top_down = getattr(base, "num_top_down", smsl.num_levels)

    def forward(self, x: Any) -> OrderedDict[str, Tensor]:
        """``x`` is whatever the base neck takes (e.g. the backbone's feature dict)."""
        return self.smsl(self.base(x))


def build_smsl_neck(
    base: nn.Module,
    num_levels: int,
    reduction: int = 8,
    gather_level: int | None = None,
    channel_rescaling: bool = True,
    global_feature: bool = True,
) -> SMSLNeck:
    """Wrap ``base`` with an SMSL whose ``in_channels`` is read from ``base.out_channels``."""
    in_channels = getattr(base, "out_channels", None)
    if in_channels is None:
        raise ValueError(f"base neck {type(base).__name__} has no out_channels attribute")
    smsl = SMSL(
        in_channels=in_channels,
        num_levels=num_levels,
        reduction=reduction,
        gather_level=gather_level,
        channel_rescaling=channel_rescaling,
        global_feature=global_feature,
    )
    return SMSLNeck(base, smsl)


def smsl_after(
    in_channels_list: list[int],
    base: Callable[..., nn.Module],
    reduction: int = 8,
    gather_level: int | None = None,
    channel_rescaling: bool = True,
    global_feature: bool = True,
    out_channels: int | None = None,
    extra_levels: str | None = None,
    upsample: str | nn.Module | None = None,
) -> SMSLNeck:
    """Neck factory for config: build ``base`` and put SMSL after it (``neck=smsl_fpn | smsl_pafpn``).

    ``base`` is a partial neck constructor (FPN, PAFPN, ...) keeping the neck contract
    (:class:`detection.necks.Neck`). ``out_channels`` (the pyramid width, set once as
    ``neck.out_channels``), ``extra_levels`` (the detector's) and ``upsample`` (an SRF generator
    when an SRF neck wraps this one) are passed down to it.
    """
    base_neck = build_base(base, in_channels_list, out_channels, extra_levels, upsample)
    return build_smsl_neck(base_neck, base_neck.num_levels, reduction, gather_level, channel_rescaling, global_feature)
