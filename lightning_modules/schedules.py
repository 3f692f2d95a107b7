"""Learning-rate schedules stepped per iteration (the detection reference recipe)."""

from __future__ import annotations

import bisect
import math


def warmup_multistep_factor(
    step: int,
    *,
    warmup_iters: int,
    warmup_ratio: float,
    milestones: list[int],
    gamma: float,
) -> float:
    """LR multiplier at optimizer step ``step``: linear warmup, then ×gamma at each milestone.

    ``milestones`` are in optimizer steps (the caller converts epochs with the number of
    steps per epoch). Warmup goes linearly from ``warmup_ratio`` to 1 over
    ``warmup_iters`` steps, as MMDetection's ``LinearWarmup``.
    """
    factor = gamma ** bisect.bisect_right(sorted(milestones), step)
    if warmup_iters > 0 and step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_ratio * (1 - alpha) + alpha
    return factor


def warmup_cosine_factor(step: int, *, warmup_iters: int, warmup_ratio: float, total: int, final_ratio: float) -> float:
    """Linear warmup then cosine decay to ``final_ratio`` at ``total`` steps."""
    if warmup_iters > 0 and step < warmup_iters:
        alpha = step / warmup_iters
        return warmup_ratio * (1 - alpha) + alpha
    t = min(1.0, (step - warmup_iters) / max(1, total - warmup_iters))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t))
