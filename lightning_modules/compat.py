"""Every use of a library's private API, each behind one small function.

Each entry says the version it was checked against and why the public API does not suffice; each
fails loudly (an error naming the hook) when the private name disappears in a later release, so an
upgrade breaks here and not silently somewhere else.
"""

from __future__ import annotations

from typing import Any


def _missing(hook: str, checked: str) -> RuntimeError:
    return RuntimeError(f"pyramidlab.compat: {hook} is gone from this library version (checked against {checked}); "
                        "update lightning_modules/compat.py")


def ddp_finds_unused_parameters(strategy: Any) -> bool | None:
    """Whether a DDP strategy was created with ``find_unused_parameters=True``; None if not DDP.

    Checked against Lightning 2.6 (``DDPStrategy._ddp_kwargs``). Public API has no getter: the GAN
    stages leave D without gradients in a G step, so they must refuse a DDP strategy without it
    before training rather than fail at the first backward with DDP's multi-line error.
    """
    from lightning.pytorch.strategies import DDPStrategy

    if not isinstance(strategy, DDPStrategy):
        return None
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(kwargs, dict):
        raise _missing("lightning.pytorch.strategies.DDPStrategy._ddp_kwargs", "lightning 2.6")
    return bool(kwargs.get("find_unused_parameters", False))
