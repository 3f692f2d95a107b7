"""Side-by-side inference latency of NN-FPN vs SRF-FPN detectors (issue 4, Performance).

``python -m srfgan.latency`` builds RetinaNet-R50 (80 classes, MMDetection layout) with three necks
that share every weight except the upsampler — ``fpn`` (nearest), ``srf`` (the paper's generator),
``srf_light`` (``LIGHT_GENERATOR``) — and times one forward of a batch-1 800×1333 image in eval
mode under ``torch.inference_mode``. Variants run interleaved, in a rotating order, after warm-up,
so load from other processes hits all of them alike. Each forward records wall time and the
process's CPU time (all threads): on a machine shared with other jobs the wall time also counts the
time this process waits for a core, the CPU time does not, so it is the robust figure there. The
report gives per variant the median and minimum wall time, the median CPU time, and the ratios to
``fpn`` (of medians, and the median of per-round paired ratios). ``--component-repeats`` also times
the upsampler alone on the inputs it gets in the detector (the only part that differs), and
``--flops`` counts FLOPs.

With 2 threads on cores that other jobs also use, every op's OpenMP barrier waits for a descheduled
thread: forwards then take 2-6× longer and vary by as much, which swamps a few-percent difference.
Measure on an idle machine (or compare with ``--threads 1``, which is immune to it).

The timing loop is :func:`detection.latency.interleaved_times`, the harness pyramidlab-bench's
``necks`` section uses for every detector × neck; this module adds what only this study needs:
weight-shared variants, the upsampler timed alone, FLOPs.

Example::

    python -m srfgan.latency --threads 2 --repeats 7 --flops
    python -m srfgan.latency --variant light64x2=64,2 --variant light128x2=128,2
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch
from torch import nn

from detection.backbones import ResNetBody
from detection.detectors import build_detector
from detection.latency import interleaved_times, paired_ratio
from detection.necks import FPN
from srfgan.generator import LIGHT_GENERATOR, Generator
from srfgan.neck import srf_neck

__all__ = ["build_variants", "measure", "measure_upsamplers", "count_flops", "component_ratios", "main"]


def _retinanet(neck_factory) -> nn.Module:
    return build_detector(
        "retinanet", functools.partial(ResNetBody, "resnet50", frozen_stages=1, norm_eval=True), neck_factory,
        num_classes=80, return_layers=[2, 3, 4], extra_levels="p6p7_c5",
    ).eval()


def build_variants(generators: dict[str, dict | None], detector: str = "retinanet") -> dict[str, nn.Module]:
    """``{"fpn": NN-FPN detector, name: SRF detector with Generator(**kwargs)}``, all sharing weights."""
    if detector != "retinanet":
        raise ValueError(f"detector={detector!r}: the latency benchmark builds RetinaNet-R50 only")
    base = functools.partial(FPN, out_channels=256, upsample="nearest", extra_levels="p6p7_c5")
    torch.manual_seed(0)
    models = {"fpn": _retinanet(base)}
    shared = models["fpn"].state_dict()
    for name, kwargs in generators.items():
        gen = functools.partial(Generator, **(kwargs or {}))
        det = _retinanet(functools.partial(srf_neck, base=base, upsample="srf", generator=gen))
        # every weight but the generator's comes from the fpn model (same head outputs, same NMS work)
        missing, unexpected = det.load_state_dict(
            {k.replace("neck.", "neck.base.", 1): v for k, v in shared.items()}, strict=False
        )
        if unexpected or any("upsample" not in k for k in missing):
            raise RuntimeError(f"weight sharing failed for {name}: {unexpected or missing}")
        models[name] = det.eval()
    return models


@torch.inference_mode()
def measure(
    models: dict[str, nn.Module], size: tuple[int, int] = (800, 1333), repeats: int = 7, warmup: int = 2
) -> dict:
    """Interleaved timing; returns per-variant times (ms), medians and median paired ratios to ``fpn``."""
    image = [torch.rand(3, *size, generator=torch.Generator().manual_seed(0))]
    names = list(models)
    timed = interleaved_times({n: functools.partial(m, image) for n, m in models.items()}, repeats, warmup,
                              rotate=True)
    wall, cpu = timed.wall_ms, timed.cpu_ms
    out: dict = {"size": list(size), "repeats": repeats, "threads": torch.get_num_threads(),
                 "times_ms": {"wall": wall, "cpu": cpu}}
    for kind, times in (("wall", wall), ("cpu", cpu)):
        med = {n: statistics.median(t) for n, t in times.items()}
        out[f"{kind}_median_ms"] = {n: round(v, 1) for n, v in med.items()}
        out[f"{kind}_ratio_of_medians"] = {n: round(med[n] / med["fpn"], 4) for n in names}
        out[f"{kind}_ratio_paired_median"] = {n: round(paired_ratio(times[n], times["fpn"]), 4) for n in names}
    out["wall_min_ms"] = {n: round(min(t), 1) for n, t in wall.items()}
    out["wall_ratio_of_minima"] = {n: round(min(wall[n]) / min(wall["fpn"]), 4) for n in names}
    return out


@torch.inference_mode()
def measure_upsamplers(models: dict[str, nn.Module], size: tuple[int, int] = (800, 1333), repeats: int = 30) -> dict:
    """Time each model's top-down upsampler alone, on the exact inputs it gets in the detector.

    The SRF detectors differ from ``fpn`` only by this module, so ``T(detector) + ΔT(upsampler)``
    decomposes the overhead; with many cheap repeats its median / minimum is far less exposed to
    other jobs on the machine than a handful of 5-25 s detector forwards.
    """
    image = [torch.rand(3, *size, generator=torch.Generator().manual_seed(0))]
    calls: dict[str, list[tuple]] = {}
    for name, m in models.items():
        up = m.backbone.neck.upsample
        seen: list[tuple] = []
        handle = up.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append((args[0].clone(), tuple(args[1]))))
        m(image)
        handle.remove()
        calls[name] = seen

    def upsample_all(name: str) -> None:
        up = models[name].backbone.neck.upsample
        for x, s in calls[name]:
            up(x, s)

    timed = interleaved_times({n: functools.partial(upsample_all, n) for n in models}, repeats, warmup=1)
    wall, cpu = timed.wall_ms, timed.cpu_ms
    return {
        "calls": {n: [f"{'x'.join(map(str, x.shape[1:]))}->{s[0]}x{s[1]}" for x, s in c] for n, c in calls.items()},
        "wall_median_ms": {n: round(statistics.median(v), 2) for n, v in wall.items()},
        "wall_min_ms": {n: round(min(v), 2) for n, v in wall.items()},
        "cpu_median_ms": {n: round(statistics.median(v), 2) for n, v in cpu.items()},
    }


@torch.inference_mode()
def count_flops(models: dict[str, nn.Module], size: tuple[int, int] = (800, 1333)) -> dict:
    """GFLOPs (2 × multiply-adds, torch's FlopCounterMode) of one forward of each model, and ratios to ``fpn``."""
    from torch.utils.flop_counter import FlopCounterMode

    image = [torch.rand(3, *size, generator=torch.Generator().manual_seed(0))]
    flops = {}
    for name, m in models.items():
        with FlopCounterMode(display=False) as counter:
            m(image)
        flops[name] = counter.get_total_flops() / 1e9
    return {"gflops": {n: round(f, 2) for n, f in flops.items()},
            "flops_ratio": {n: round(f / flops["fpn"], 4) for n, f in flops.items()}}


def component_ratios(detector: dict, upsamplers: dict) -> dict:
    """(detector fpn time + upsampler time difference) / detector fpn time, for CPU medians and wall minima."""
    out = {}
    for kind, det_key, up_key in (("cpu_median", "cpu_median_ms", "cpu_median_ms"), ("wall_min", "wall_min_ms", "wall_min_ms")):
        base = detector[det_key]["fpn"]
        ups = upsamplers[up_key]
        out[kind] = {n: round((base + ups[n] - ups["fpn"]) / base, 4) for n in ups}
    return out


def _variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition("=")
    mid, _, blocks = spec.partition(",")
    return name, {"mid_channels": int(mid) if mid not in ("", "none") else None, "num_blocks": int(blocks or 5)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--component-repeats", type=int, default=30, help="repeats of the upsampler-only timing (0: off)")
    p.add_argument("--flops", action="store_true", help="also count each model's FLOPs (one more forward each)")
    p.add_argument(
        "--variant", action="append", default=None, metavar="NAME=MID,BLOCKS",
        help="extra generator variants (MID 'none' = C); default: srf (paper) and srf_light",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {"srf": {"num_blocks": 5, "mid_channels": None}, "srf_light": dict(LIGHT_GENERATOR)}
    for v in args.variant or []:
        name, kw = _variant(v)
        variants[name] = kw
    models = build_variants(variants)
    size = (args.height, args.width)
    result = measure(models, size, args.repeats, args.warmup)
    result["variants"] = variants
    if args.flops:
        result.update(count_flops(models, size))
    if args.component_repeats > 0:
        result["upsamplers"] = measure_upsamplers(models, size, args.component_repeats)
        result["component_ratio"] = component_ratios(result, result["upsamplers"])
    print(json.dumps({k: v for k, v in result.items() if k != "times_ms"}, indent=2))
    raw = {kind: {k: [round(x, 1) for x in v] for k, v in t.items()} for kind, t in result["times_ms"].items()}
    print(json.dumps({"times_ms": raw}))
    return result


if __name__ == "__main__":
    main()
