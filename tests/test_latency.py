"""detection.latency: the one interleaved timing harness (bench ``necks`` section, ``python -m srfgan.latency``)."""

from __future__ import annotations

from detection.latency import interleaved_times, paired_ratio


def test_warmup_passes_are_not_recorded_and_rotation_changes_the_start():
    calls: list[str] = []
    runs = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    seen: list[tuple[int, str]] = []
    times = interleaved_times(runs, repeats=3, warmup=1, rotate=True, before_call=lambda r, n: seen.append((r, n)))
    # warm-up keeps the order, recorded pass r starts at candidate r mod 3
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert seen[:4] == [(0, "a"), (0, "b"), (0, "c"), (1, "a")]
    assert {n: len(v) for n, v in times.wall_ms.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(len(v) == 3 and min(v) >= 0 for v in times.cpu_ms.values())


def test_fixed_order_and_sync_around_every_call():
    log: list[str] = []
    runs = {"x": lambda: log.append("x"), "y": lambda: log.append("y")}
    interleaved_times(runs, repeats=2, sync=lambda: log.append("|"))
    assert log == ["|", "x", "|", "|", "y", "|"] * 2


def test_paired_ratio_is_the_median_of_per_pass_ratios():
    assert paired_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == 3.0
    assert paired_ratio([4.0, 4.0], [2.0, 1.0]) == 3.0
