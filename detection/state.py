"""Strict, prefixed state-dict loading with one-line errors that name the mismatching parts."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["load_prefixed_state"]


def _parts(keys: list[str]) -> list[str]:
    """Module paths (3 levels) of parameter keys: what a user recognises in a mismatch."""
    return sorted({".".join(k.removeprefix("model.").split(".")[:3]) for k in keys})


def load_prefixed_state(module: nn.Module, state: Mapping[str, Tensor], prefix: str, source: str, what: str) -> None:
    """Strictly load ``state[prefix + k]`` into ``module``.

    Raises one ``ValueError`` line, ``"{what}: {source} does not match the configured architecture — ..."``,
    naming the first wrong-shape key (checkpoint vs configured shape) and the missing / unexpected
    parts, when the two differ in any key or shape.
    """
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(sub))
    unexpected = sorted(set(sub) - set(own))
    shape = [k for k in own if k in sub and own[k].shape != sub[k].shape]  # module order: the first layer first
    if missing or unexpected or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(f"wrong shape: {k}: checkpoint {tuple(sub[k].shape)} vs configured {tuple(own[k].shape)}"
                         + (f" (+{len(shape) - 1} more)" if len(shape) > 1 else ""))
        if missing:
            parts.append(f"missing: {_parts(missing)[:6]}")
        if unexpected:
            parts.append(f"unexpected: {_parts(unexpected)[:6]}")
        raise ValueError(f"{what}: {source} does not match the configured architecture — {'; '.join(parts)}")
    module.load_state_dict(sub)
