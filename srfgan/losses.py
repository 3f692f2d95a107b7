"""SRF-GAN losses (Eq. 1-3): per level averaged over pixels, summed over levels.

All functions take lists of per-level tensors, finest level first; level ``i`` of ``sr`` and ``tr``
must have the same shape (B, C, H_i, W_i).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srfgan.discriminator import frozen_running_stats

__all__ = [
    "ADV_WEIGHT",
    "SRFLoss",
    "l1_loss",
    "adversarial_loss",
    "discriminator_loss",
    "discriminator_accuracy",
    "srf_loss",
]

ADV_WEIGHT = 1e-3  # λ of Eq. 2-3 ("tuned to 0.001")


class SRFLoss(NamedTuple):
    """``total = l1 + adv_weight · adv`` (Eq. 2 / Eq. 3); ``adv`` is unweighted."""

    total: Tensor
    l1: Tensor
    adv: Tensor


def _check_levels(sr: Sequence[Tensor], tr: Sequence[Tensor]) -> None:
    if len(sr) != len(tr) or not sr:
        raise ValueError(f"got {len(sr)} super-resolved and {len(tr)} target levels; expected the same, >= 1")
    for i, (a, b) in enumerate(zip(sr, tr)):
        if a.shape != b.shape:
            raise ValueError(f"level {i}: super-resolved {tuple(a.shape)} vs target {tuple(b.shape)}")


def l1_loss(sr: Sequence[Tensor], tr: Sequence[Tensor]) -> Tensor:
    """Σ_i 1/(C W_i H_i) Σ |P_i^tr - P_i^sr| (first term of Eq. 2 / 3), also averaged over the batch."""
    _check_levels(sr, tr)
    return torch.stack([F.l1_loss(a.float(), b.float()) for a, b in zip(sr, tr)]).sum()


def adversarial_loss(fake_logits: Sequence[Tensor]) -> Tensor:
    """Σ_i 1/(W_i H_i) Σ -log D(P_i^sr) (second term of Eq. 2 / 3): the non-saturating generator loss."""
    return torch.stack(
        [F.binary_cross_entropy_with_logits(d.float(), torch.ones_like(d, dtype=torch.float32)) for d in fake_logits]
    ).sum()


def discriminator_loss(real_logits: Sequence[Tensor], fake_logits: Sequence[Tensor]) -> Tensor:
    """Eq. 1 for D: Σ_i mean -[log D(P_i^tr) + log(1 - D(P_i^sr))], minimised (= Eq. 1 maximised)."""
    if len(real_logits) != len(fake_logits):
        raise ValueError(f"got {len(real_logits)} real and {len(fake_logits)} fake levels")
    terms = []
    for r, f in zip(real_logits, fake_logits):
        r, f = r.float(), f.float()
        terms.append(
            F.binary_cross_entropy_with_logits(r, torch.ones_like(r))
            + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f))
        )
    return torch.stack(terms).sum()


@torch.no_grad()
def discriminator_accuracy(real_logits: Sequence[Tensor], fake_logits: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Fraction of real pixels judged real (logit > 0) and of fake pixels judged fake, over all levels.

    Pixel-weighted over levels (every feature patch counts once), unlike the losses, which give
    each level the same weight as Eq. 1 does.
    """
    real = torch.cat([(r > 0).flatten() for r in real_logits]).float().mean()
    fake = torch.cat([(f < 0).flatten() for f in fake_logits]).float().mean()
    return real, fake


def srf_loss(
    sr: Sequence[Tensor], tr: Sequence[Tensor], discriminator: nn.Module, adv_weight: float = ADV_WEIGHT
) -> SRFLoss:
    """L_SRF = L_L1 + λ L_adv for the generator / extractor step (Eq. 2, and Eq. 3 in stage 2).

    Eq. 2 writes ``G(P_i^tr)``: a typo for ``G(P_i^lr)`` — G super-resolves the low-resolution
    features (Sec. 3.1, Fig. 1, and Eq. 1 / 3 both use P^lr); callers pass ``sr = G(P^lr)``.

    The adversarial term is NOT detached: its gradient flows through D (whose parameters the caller
    excludes from the step, e.g. Lightning's ``toggle_optimizer``) into G. The authors' code detaches
    D's output there, which silently drops L_adv from G's gradient; we follow the paper. D runs in
    its current mode with batch statistics but without updating its running statistics
    (:func:`frozen_running_stats`): a G step leaves D's state untouched.
    """
    l1 = l1_loss(sr, tr)
    with frozen_running_stats(discriminator):
        adv = adversarial_loss([discriminator(x) for x in sr])
    return SRFLoss(l1 + adv_weight * adv, l1, adv)
