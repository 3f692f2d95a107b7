"""Interleaved latency measurement: the one timing harness of pyramidlab-bench's ``necks`` section and
``python -m srfgan.latency``.

Every candidate runs once per pass, passes repeat, and only the passes after ``warmup`` are recorded,
so load from other processes (or a GPU's clock changes) hits all candidates alike. Each call records
wall time and the process's CPU time (all its threads): on a machine shared with other jobs the wall
time also counts waiting for a core, the CPU time does not. Compare candidates by
:func:`paired_ratio`, the median of per-pass ratios (each pair ran seconds apart in the same pass).

Example::

    >>> times = interleaved_times({"a": lambda: sum(range(1000)), "b": lambda: sum(range(2000))}, repeats=5)
    >>> len(times.wall_ms["a"]), len(times.cpu_ms["b"])
    (5, 5)
    >>> paired_ratio(times.wall_ms["b"], times.wall_ms["a"]) > 0
    True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Timings", "interleaved_times", "paired_ratio"]


@dataclass
class Timings:
    """Per candidate, the recorded passes' times in milliseconds, in pass order."""

    wall_ms: dict[Hashable, list[float]]
    cpu_ms: dict[Hashable, list[float]]  # this process's CPU time, all its threads


def interleaved_times(
    runs: Mapping[Hashable, Callable[[], Any]],
    repeats: int,
    warmup: int = 0,
    *,
    rotate: bool = False,
    sync: Callable[[], None] | None = None,
    before_call: Callable[[int, Hashable], None] | None = None,
) -> Timings:
    """Time ``warmup + repeats`` passes over ``runs`` (each a call without arguments; outputs are dropped).

    Args:
        runs: the candidates, called in this order within a pass.
        repeats / warmup: recorded passes, and untimed passes before them.
        rotate: start recorded pass ``r`` at candidate ``r mod len(runs)`` (warm-up keeps the order), so
            no candidate always runs right after the same other one.
        sync: called before and after every call (``torch.cuda.synchronize`` for a GPU: the clock reads
            must measure the queued kernels).
        before_call: ``before_call(pass_index, name)`` before each call (a progress bar).
    """
    names = list(runs)
    wall: dict[Hashable, list[float]] = {n: [] for n in names}
    cpu: dict[Hashable, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        timed = r >= warmup
        k = (r - warmup) % len(names) if rotate and timed and names else 0
        for n in names[k:] + names[:k]:
            if before_call is not None:
                before_call(r, n)
            if sync is not None:
                sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[n]()
            if sync is not None:
                sync()
            if timed:
                wall[n].append(1000 * (time.perf_counter() - start))
                cpu[n].append(1000 * (time.process_time() - start_cpu))
    return Timings(wall, cpu)


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """The median over passes of ``times[i] / reference[i]``."""
    return statistics.median(t / r for t, r in zip(times, reference))
