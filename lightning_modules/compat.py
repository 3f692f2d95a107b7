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


# ------------------------------------------------------------------------------------------- Hydra
def basic_sweeper_class() -> type:
    """Hydra's ``BasicSweeper`` (hydra-core 1.3.x: ``hydra._internal.core_plugins.basic_sweeper``).

    Hydra has no public import path for its default sweeper; pyramidlab's ``ResumableSweeper``
    subclasses it (finishing an existing sweep folder), and the report splits a grid the way it does.
    """
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    except ImportError as e:
        raise _missing("hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "hydra-core 1.3.8") from e
    return BasicSweeper


def sweeper_params(sweeper: Any) -> list[str]:
    """The ``hydra.sweeper.params`` of a ``BasicSweeper`` as override strings (its ``_parse_config``,
    hydra-core 1.3.8): the resumable sweep must split the grid exactly as Hydra would."""
    parse = getattr(sweeper, "_parse_config", None)
    if parse is None:
        raise _missing("BasicSweeper._parse_config", "hydra-core 1.3.8")
    return list(parse())


# ----------------------------------------------------------------------------------------- Lightning
def set_ddp_child_command(command: Any) -> None:
    """Replace Lightning's ``_hydra_subprocess_cmd`` (lightning 2.6: ``strategies.launchers.subprocess_script``).

    Lightning re-runs ``sys.argv`` for each DDP child when Hydra is in use; in a multirun that
    re-runs the whole sweep in every child (a second sweep folder, jobs started twice). The hook is
    the only place to give children the job's own command.
    """
    from lightning.pytorch.strategies.launchers import subprocess_script

    if not hasattr(subprocess_script, "_hydra_subprocess_cmd"):
        # without the hook DDP children would silently re-run whole sweeps
        raise _missing("lightning.pytorch.strategies.launchers.subprocess_script._hydra_subprocess_cmd", "lightning 2.6.6")
    subprocess_script._hydra_subprocess_cmd = command  # type: ignore[attr-defined]


def pending_step_row(trainer: Any) -> dict[str, float] | None:
    """The log row Lightning will write for the running batch, or None (lightning 2.6.6: the loop calls
    ``_logger_connector.update_train_step_metrics`` after the batch's ``on_train_batch_end``, where the
    checkpoints are saved; it logs ``metrics["log"]`` when ``should_update_logs``)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or not hasattr(connector, "should_update_logs") or not hasattr(connector, "metrics"):
        raise _missing("trainer._logger_connector.should_update_logs / .metrics", "lightning 2.6.6")
    if not connector.should_update_logs:
        return None
    row = {k: float(v) for k, v in connector.metrics["log"].items()}
    return row or None


def batches_that_stepped(trainer: Any) -> int:
    """Batches of this fit that stepped the optimizer (the loggers' step; lightning 2.6.6:
    ``fit_loop.epoch_loop._batches_that_stepped``): a resumed CSV log is cut back to it."""
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(loop, "_batches_that_stepped"):
        raise _missing("fit_loop.epoch_loop._batches_that_stepped", "lightning 2.6.6")
    return int(loop._batches_that_stepped)


def train_loaders(trainer: Any) -> list:
    """The fit loop's train DataLoaders (lightning 2.6.6: ``fit_loop._combined_loader.flattened``)."""
    fit_loop = trainer.fit_loop
    if not hasattr(fit_loop, "_combined_loader"):
        raise _missing("fit_loop._combined_loader", "lightning 2.6.6")
    return list(getattr(fit_loop._combined_loader, "flattened", None) or [])


def restore_loader_states(trainer: Any) -> bool:
    """Load the train loaders' saved state when resuming (inside an epoch or at its end); True if it did.

    Lightning 2.6.6 applies a stateful DataLoader's state only in ``FitLoop.setup_data``, and only
    while ``restarting``. Our per-step schedules read ``trainer.estimated_stepping_batches``, so the
    data is set up (and its iterator made) before the loops are restored, and the state is never
    applied: a run resumed inside an epoch would replay the epoch's first batches. A run resumed from
    a checkpoint written at an epoch end (``RESTARTED_ON_EPOCH_END``, or ``RESUMED_ON_EPOCH_END``
    where ``restarting`` is False) would lose the saved random state: its augmentations then differ
    from the run that never stopped (found with a kill after the first batch of an epoch: the loss
    differed from the third batch on). The fit loop's ``_combined_loader_states_to_load``,
    ``_combined_loader`` and ``_data_fetcher`` are the only way to apply the states and make the
    iterator again before the first batch is drawn. In both cases the loader's ``load_state_dict``
    decides what the state means (``datamodule.ResumableDataLoader``); the new iterator draws the
    workers' base seed after the restore, as the uninterrupted run's next ``iter()`` did.
    """
    fit_loop = trainer.fit_loop
    for name in ("_combined_loader_states_to_load", "_combined_loader", "_data_fetcher", "restarted_mid_epoch",
                 "restarted_on_epoch_end", "resumed_on_epoch_end"):
        if not hasattr(fit_loop, name):
            raise _missing(f"fit_loop.{name}", "lightning 2.6.6")
    states = fit_loop._combined_loader_states_to_load
    resumed = fit_loop.restarted_mid_epoch or fit_loop.restarted_on_epoch_end or fit_loop.resumed_on_epoch_end
    if not (states and resumed) or fit_loop._combined_loader is None or fit_loop._data_fetcher is None:
        return False
    fit_loop._combined_loader._load_state_dicts(states)
    fit_loop._combined_loader_states_to_load = []
    iter(fit_loop._data_fetcher)
    return True
