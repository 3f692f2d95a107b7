"""pyramidlab's grid sweeper: Hydra's BasicSweeper that finishes an existing sweep folder.

Hydra instantiates sweepers only from the ``hydra_plugins`` package, hence this module; the logic
lives in :func:`lightning_modules.hydra_callbacks.run_resumable_sweep` (imported when a sweep
starts: Hydra imports this module at every start, ``--help`` included, so it stays light).
"""

from __future__ import annotations

from typing import Any

from lightning_modules.compat import basic_sweeper_class

BasicSweeper = basic_sweeper_class()


class ResumableSweeper(BasicSweeper):
    """Same keys as ``BasicSweeper`` (``max_batch_size``, ``params``); completed jobs are skipped,
    jobs with a checkpoint resumed, the rest started (``SweepReport`` selects it for grid sweeps)."""

    def sweep(self, arguments: list[str]) -> Any:
        from lightning_modules.hydra_callbacks import run_resumable_sweep

        return run_resumable_sweep(self, arguments)
