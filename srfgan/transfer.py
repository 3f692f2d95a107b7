"""Weights between SRF-GAN's stages (Sec. 4.2-4.3), as plain functions on modules and state dicts.

* stage 1 -> 2 and 3 (``reuse=G``): the generator G into a detector's SRF neck;
* stage 1 -> 2: the discriminator D;
* stage 2 -> 3 (``reuse=M``): the extractor's body + neck (G included) into the target detector,
  its pyramid levels matched by stride (SRF-GAN Table 3 pairs extractors and targets whose levels
  differ: Mask R-CNN's P2-P6 against RetinaNet's P3-P7).

No file I/O and no Lightning here: the training layer loads checkpoints
(``lightning_modules/checkpoints.py``) and passes their ``state_dict``; errors name ``source``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from detection.necks import pyramid_of
from detection.state import load_prefixed_state
from srfgan.generator import BaseGenerator

__all__ = [
    "generator_of",
    "generator_prefix",
    "load_generator_state",
    "load_discriminator_state",
    "transfer_extractor",
    "freeze_generator",
    "matched_levels",
]


def generator_of(net: nn.Module, what: str = "neck") -> BaseGenerator:
    """The SRF generator of a detector: the ``upsample`` of the FPN inside its neck."""
    neck = net.backbone.neck
    try:
        up = pyramid_of(neck).upsample
    except ValueError:
        up = None
    if isinstance(up, BaseGenerator):
        return up
    raise ValueError(
        f"{what}: the detector's neck {type(neck).__name__} has no SRF generator; use an SRF neck "
        "(srf_fpn, srf_pafpn, smsl_srf_fpn) with upsample=srf"
    )


def generator_prefix(state: Mapping[str, Tensor]) -> str | None:
    """Where a state dict keeps G: ``generator.`` (stage 1) or an SRF neck's upsampler (stages 2/3)."""
    if any(k.startswith("generator.") for k in state):
        return "generator."
    for k in state:
        m = re.match(r"(net\..*\.neck\.(?:.*\.)?upsample\.)", k)
        if m and "head." in k[len(m.group(1)):]:
            return m.group(1)
    return None


def load_generator_state(net: nn.Module, state: Mapping[str, Tensor], source: str, what: str) -> BaseGenerator:
    """``reuse=G``: G's weights (from a stage-1, -2 or -3 state dict) into ``net``'s SRF neck."""
    gen = generator_of(net, what)
    prefix = generator_prefix(state)
    if prefix is None:
        raise ValueError(f"{what}: {source} holds no SRF generator weights (expected a stage-1 or stage-2 checkpoint)")
    load_prefixed_state(gen, state, prefix, source, what)
    return gen


def load_discriminator_state(discriminator: nn.Module, state: Mapping[str, Tensor], source: str, what: str) -> nn.Module:
    """D's weights from a stage-1 (or stage-2) state dict (stage 2 reuses stage 1's D, Sec. 5.1)."""
    if not any(k.startswith("discriminator.") for k in state):
        raise ValueError(f"{what}: {source} holds no discriminator weights (expected a stage-1 or stage-2 checkpoint)")
    load_prefixed_state(discriminator, state, "discriminator.", source, what)
    return discriminator


def matched_levels(source_strides: Sequence[int], target_strides: Sequence[int]) -> list[int]:
    """Strides (finest first) of the pyramid levels both an extractor and a target detector have."""
    return [int(s) for s in target_strides if int(s) in {int(x) for x in source_strides}]


def _pyramid_prefix(keys: Sequence[str], what: str) -> str:
    """Where an FPN's weights sit in a state dict (``neck.base.`` for an SRF-FPN, ``neck.base.base.``
    with SMSL in between): the prefix of its first lateral conv."""
    found = sorted({k[: -len("lateral_convs.0.weight")] for k in keys if k.endswith("lateral_convs.0.weight")})
    if len(found) != 1:
        raise ValueError(f"{what}: expected one FPN in the neck's weights, found {len(found)} ({found})")
    return found[0]


def transfer_extractor(
    net: nn.Module,
    state: Mapping[str, Tensor],
    source_strides: Sequence[int],
    source: str,
    what: str,
    prefix: str = "net.model.backbone.",
) -> tuple[list[int], list[str]]:
    """``reuse=M``: body + SRF neck (G included) of a stage-2 extractor into ``net`` (Sec. 4.3).

    The detector heads are not reused (the target's head may differ: Table 3). The modules of the
    FPN that belong to one pyramid level (:meth:`detection.necks.FPN.per_level_modules`: lateral /
    output convs, PAFPN's convs) are matched by stride, so an extractor on P2-P5 (Mask R-CNN)
    initialises a RetinaNet on P3-P5; the FPN may sit at another depth of the neck (an SRF-FPN
    extractor into an SMSL-after-SRF-FPN target: SMSL stays at its initialisation). The body and the
    generator must load completely. Returns (the matched strides, the ``net.backbone`` keys left at
    their initialisation, e.g. RetinaNet's P6/P7 convs when the extractor had none).
    """
    generator_of(net, what)
    src = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    src_strides = [int(s) for s in source_strides]
    dst_strides = [int(s) for s in net.backbone.body.strides]
    own = net.backbone.state_dict()
    pyramid = pyramid_of(net.backbone.neck)
    lists = pyramid.per_level_modules()
    dst_pyr = _pyramid_prefix(list(own), what)
    src_pyr = _pyramid_prefix(list(src), f"{what}: {source}")
    pattern = re.compile(r"^(" + "|".join(map(re.escape, lists)) + r")\.(\d+)\.(.*)$")

    def source_key(k: str) -> str | None:
        if not k.startswith(dst_pyr):
            return k  # the body (and modules outside the FPN, matched by name)
        rest = k[len(dst_pyr):]
        m = pattern.match(rest)
        if not m:
            return src_pyr + rest  # the generator (upsample.*) and the extra levels
        offset = lists[m.group(1)]
        i = int(m.group(2)) + offset
        if i >= len(dst_strides) or dst_strides[i] not in src_strides:
            return None
        return f"{src_pyr}{m.group(1)}.{src_strides.index(dst_strides[i]) - offset}.{m.group(3)}"

    new_state, left = {}, []
    for k, v in own.items():
        sk = source_key(k)
        if sk is not None and sk in src and src[sk].shape == v.shape:
            new_state[k] = src[sk]
        else:
            left.append(k)
    must = [k for k in left if k.startswith("body.") or ".upsample." in k]
    if must:
        sk = source_key(must[0])
        detail = f"{must[0]}" + (f" (checkpoint {tuple(src[sk].shape)} vs configured {tuple(own[must[0]].shape)})"
                                 if sk in src else " (absent)")
        raise ValueError(f"{what}: {source} does not fit the configured body / generator — {detail}, +{len(must) - 1} more")
    net.backbone.load_state_dict(new_state, strict=False)
    return matched_levels(src_strides, dst_strides), left


def freeze_generator(net: nn.Module) -> BaseGenerator:
    """Table 4's FR: G keeps its weights (requires_grad False) and BatchNorm statistics (eval) in training."""
    gen = generator_of(net, "freeze_generator")
    for p in gen.parameters():
        p.requires_grad_(False)
    gen.frozen = True
    gen.eval()
    return gen
