"""The ``necks`` section: parameters and batch-1 latency of every detector x neck, interleaved."""

from __future__ import annotations

import copy
import functools
import gc
import math
import resource
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from detection.detectors import Detector, parameter_summary
from detection.latency import interleaved_times, paired_ratio
from lightning_modules import checkpoints as CK
from lightning_modules.bench.common import AUTOCAST, FP32, _progress, _stats, model_config, sync


# -------------------------------------------------------------------------------------- necks
@dataclass
class Candidate:
    """One timed model: a (detector, neck) pair in one variant (fp32, autocast, channels_last)."""

    detector: str
    neck: str
    variant: str
    run: Callable[[list[torch.Tensor]], Any]
    ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # this process's CPU time, all its threads
    detections: int = 0  # post-processing and the mask head scale with it: equal counts, fair times

    def detect(self, images: list[torch.Tensor]) -> None:
        """One timed call: a forward, keeping only the first image's detection count."""
        self.detections = len(self.run(images)[0]["scores"])


def _variant_runner(net: Detector, variant: str) -> Callable[[list[torch.Tensor]], Any]:
    dtype = AUTOCAST.get(variant)
    if dtype is None:
        return net

    def run(images: list[torch.Tensor]) -> Any:
        with torch.autocast("cuda", dtype=dtype):
            return net(images)

    return run


def _median_sem(values: list[float]) -> float:
    """The median's standard error, 1.2533 s / sqrt(n) (the normal approximation); 0 below 2 values."""
    return 1.2533 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else 0.0


def _neck_isolated(b: DictConfig, device: torch.device, detector: str, rows: dict[str, dict[str, Any]],
                   by_key: dict[tuple[str, str, str], Candidate], image: torch.Tensor) -> None:
    """Add ``ratio_vs_fpn_neck`` to ``rows``: 1 + (neck time - reference neck time) / whole-model time.

    A whole forward of RetinaNet-R50 at 800x1333 on 2 CPU cores takes 6-8 s and moves by 5-30 %
    between passes, so the end-to-end ratio of two models that differ by 1-2 % has a standard error of
    0.03 after 11 repeats even on an idle machine (0.994 ± 0.032 there; the two runs of issue 18 gave
    1.051 and 1.085): agreeing within 0.01 would take ~450 repeats. The models differ only in the neck (same body, same head on same-shaped levels, same
    detection count), so the neck's extra time is measured where it happens: every neck on the same
    body features, interleaved, ``neck_repeats`` times, and the paired per-pass difference's median
    divided by the reference model's median whole-forward time. Its error combines both standard errors.
    """
    ref_key = (detector, b.reference_neck, FP32)
    net = by_key[ref_key].run
    with torch.inference_mode():
        batch = net.model.transform([image])[0].tensors  # normalised and padded as in the forward
        feats = net.backbone.body(batch)
        runs = {n: functools.partial(by_key[detector, n, FP32].run.backbone.neck, feats) for n in rows}
        times = interleaved_times(runs, b.neck_repeats, b.warmup, sync=functools.partial(sync, device))
    ref_ms = times.wall_ms[b.reference_neck]
    whole = rows[b.reference_neck]["ms_median"]
    whole_sem = _median_sem(by_key[ref_key].ms)
    for n, row in rows.items():
        diffs = [t - r for t, r in zip(times.wall_ms[n], ref_ms)]
        delta, delta_sem = statistics.median(diffs), _median_sem(diffs)
        row["neck_ms_median"] = round(statistics.median(times.wall_ms[n]), 3)
        row["neck_extra_ms"] = round(delta, 3)
        row["ratio_vs_fpn_neck"] = round(1 + delta / whole, 4)
        row["ratio_vs_fpn_neck_sem"] = round(math.hypot(delta_sem / whole, delta * whole_sem / whole**2), 4)


def run_necks(b: DictConfig, device: torch.device) -> dict[str, Any]:
    """Build every model once, then time ``warmup + repeats`` interleaved passes over all of them."""
    variants = [FP32] + (list(b.gpu_variants) if device.type == "cuda" else [])
    pairs = [(d, n) for d in b.detectors for n in b.necks]
    params: dict[tuple[str, str], dict[str, int]] = {}
    candidates: list[Candidate] = []
    with _progress() as progress:
        task = progress.add_task("necks: build", total=len(pairs))
        for d, n in pairs:
            progress.update(task, description=f"necks: build {d} + {n}")
            torch.manual_seed(b.seed)
            net = CK.build_net(model_config(b, d, n)).eval().to(device)
            s = parameter_summary(net)
            params[d, n] = {"params_trainable": s["params_trainable"], "params_total": s["params_total"]}
            for v in variants:
                if v == "channels_last":
                    # a copy: channels_last changes the weights' layout, the other rows keep NCHW
                    m = copy.deepcopy(net).to(memory_format=torch.channels_last)
                    candidates.append(Candidate(d, n, v, m))
                else:
                    candidates.append(Candidate(d, n, v, _variant_runner(net, v)))
            progress.advance(task)

        g = torch.Generator().manual_seed(b.seed)
        image = torch.rand(3, *b.size, generator=g).to(device)  # one random image in [0, 1]
        passes = b.warmup + b.repeats
        task = progress.add_task("necks: time", total=passes * len(candidates))

        runs = {(c.detector, c.neck, c.variant): functools.partial(c.detect, [image]) for c in candidates}
        position = {key: i for i, key in enumerate(runs)}

        def show(r: int, key: tuple[str, str, str]) -> None:
            progress.update(task, completed=r * len(runs) + position[key],
                            description=f"necks: {'warm-up' if r < b.warmup else 'repeat'} {r + 1}/{passes} "
                            f"{key[0]} + {key[1]} {key[2]}")

        with torch.inference_mode():
            times = interleaved_times(runs, b.repeats, b.warmup, sync=functools.partial(sync, device), before_call=show)
        progress.update(task, completed=passes * len(runs))
        for c in candidates:
            key = (c.detector, c.neck, c.variant)
            c.ms, c.cpu_ms = times.wall_ms[key], times.cpu_ms[key]

    by_key = {(c.detector, c.neck, c.variant): c for c in candidates}

    def spread(c: list[float], ref: list[float], key: str) -> dict[str, Any]:
        """The per-repeat ratios' quartiles and the median's standard error (1.2533 s / sqrt(n), the
        normal approximation): two runs agree within about 2 x sem when the machine behaves alike."""
        ratios = [t / r for t, r in zip(c, ref)]
        out: dict[str, Any] = {f"{key}_repeats": [round(v, 4) for v in ratios]}
        if len(ratios) >= 2:
            q = statistics.quantiles(ratios, n=4, method="inclusive")
            out[f"{key}_q25"], out[f"{key}_q75"] = round(q[0], 4), round(q[2], 4)
            out[f"{key}_sem"] = round(_median_sem(ratios), 4)
        return out

    rows, gpu_rows = [], []
    for c in candidates:
        ref = by_key[c.detector, b.reference_neck, c.variant]
        st = _stats(c.ms)
        row = {
            "detector": c.detector, "neck": c.neck, **params[c.detector, c.neck],
            "ms_median": round(st["median"], 3), "ms_min": round(st["min"], 3), "ms_max": round(st["max"], 3),
            "ratio_vs_fpn": round(paired_ratio(c.ms, ref.ms), 4), "detections": c.detections,
            **spread(c.ms, ref.ms, "ratio_vs_fpn"),
        }
        if device.type == "cpu":
            # On a machine shared with other jobs wall time also counts waiting for a core; the
            # process's CPU time does not, so its ratio is the steadier figure there.
            row["cpu_ms_median"] = round(statistics.median(c.cpu_ms), 3)
            row["ratio_vs_fpn_cpu"] = round(paired_ratio(c.cpu_ms, ref.cpu_ms), 4)
            row.update(spread(c.cpu_ms, ref.cpu_ms, "ratio_vs_fpn_cpu"))
        if c.variant == FP32:
            rows.append(row)
        else:
            fp32 = by_key[c.detector, c.neck, FP32]
            gpu_rows.append({**row, "variant": c.variant, "speedup_vs_fp32": round(paired_ratio(fp32.ms, c.ms), 4)})
    if b.neck_repeats > 0:
        for d in b.detectors:
            _neck_isolated(b, device, d, {r["neck"]: r for r in rows if r["detector"] == d}, by_key, image)
    memory = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        memory["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    del candidates, by_key
    gc.collect()
    return {"rows": rows, "gpu_rows": gpu_rows, "memory": memory}


