"""pyramidlab-bench's ``data_scale`` section: the COCO loader on an annotation file of COCO train2017's size.

A synthetic annotation file with train2017's counts (118,287 images, 860,001 annotations with polygons,
80 category ids; generated here, never downloaded) is written once into ``bench.data_scale.cache_dir``;
every image entry points at one JPEG of COCO's typical 480 x 640 that compresses like a photo (the
memory phase resizes it to 96 px: what it measures is what the annotations cost). Each variant runs in a fresh Python process (so that peak memory
is its own):

- parse + index: ``CocoDetection(...)`` (JSON, pycocotools' index, box sanitising, the serialized
  records), its wall time and the process's peak RSS;
- ``bench.data_scale.num_workers`` DataLoader workers over ``bench.data_scale.batches`` shuffled batches:
  the summed PSS and RSS of the workers after a warm-up and at the end, and their growth;
- ``bench.data_scale.speed``: the same records through data=coco's default loader (4 workers, batches of
  2, training transforms to 800 x 1333) for its images/s, against a training step of RetinaNet-R50-FPN on
  images of the size the loader yields (``loader_over_step_coco``: the loader keeps up when >= 1).

Variants: ``serialized`` (the loader as it is: records in one NumPy buffer, inherited objects frozen in
the workers) and, with ``bench.data_scale.legacy``, ``dict`` (records as a Python dict of dicts, the
loader before; the same code otherwise).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from detection.atomic import atomic_path

TRAIN2017 = {"images": 118_287, "annotations": 860_001}
_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_synthetic_annotations(path: Path, images: int, annotations: int, size: tuple[int, int], seed: int,
                                file_name: str = "0.jpg") -> Path:
    """A COCO annotation file with ``images`` images of ``size`` (H, W) all named ``file_name`` and
    ``annotations`` objects spread over them (Poisson), each with a 16-point polygon, a box and an area,
    1 % crowd. Written in chunks (no giant Python structure); returns ``path``."""
    rng = np.random.default_rng(seed)
    h, w = size
    per_image = rng.multinomial(annotations, np.full(images, 1 / images))
    angles = np.linspace(0, 2 * np.pi, 17)[:-1]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"info": {"description": "synthetic, COCO train2017 counts"}, "images": [')
        f.write(",".join(
            f'{{"id": {i + 1}, "file_name": "{file_name}", "height": {h}, "width": {w}}}' for i in range(images)
        ))
        f.write('], "annotations": [')
        ann_id, first = 1, True
        for start in range(0, images, 4096):
            parts = []
            for i in range(start, min(start + 4096, images)):
                n = int(per_image[i])
                if not n:
                    continue
                bw, bh = rng.uniform(2, w / 2, n), rng.uniform(2, h / 2, n)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                cats = rng.choice(_CATEGORY_IDS, n)
                crowd = rng.random(n) < 0.01
                for k in range(n):
                    cx, cy = x[k] + bw[k] / 2, y[k] + bh[k] / 2
                    poly = np.stack([cx + bw[k] / 2 * np.cos(angles), cy + bh[k] / 2 * np.sin(angles)], 1).ravel()
                    parts.append(
                        f'{{"id": {ann_id}, "image_id": {i + 1}, "category_id": {int(cats[k])}, '
                        f'"iscrowd": {int(crowd[k])}, "area": {bw[k] * bh[k] * 0.97:.2f}, '
                        f'"bbox": [{x[k]:.2f}, {y[k]:.2f}, {bw[k]:.2f}, {bh[k]:.2f}], '
                        f'"segmentation": [[{", ".join(f"{v:.2f}" for v in poly)}]]}}'
                    )
                    ann_id += 1
            if parts:
                f.write(("" if first else ",") + ",".join(parts))
                first = False
        cats = ",".join(f'{{"id": {c}, "name": "c{c}", "supercategory": "s"}}' for c in _CATEGORY_IDS)
        f.write(f'], "categories": [{cats}]}}')
    return path


def synthetic_photo(size: tuple[int, int], seed: int) -> np.ndarray:
    """An (H, W, 3) uint8 image that JPEG-compresses like a photo (smooth gradients, shapes, mild noise):
    decoding it costs what a COCO image of that size costs (random noise would decode slower)."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 200, y / h * 200, (x + y) / (h + w) * 255], -1)
    for _ in range(30):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(h / 30, h / 5)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def ensure_dataset(cache_dir: Path, images: int, annotations: int, size: tuple[int, int], seed: int) -> Path:
    """``cache_dir/<name>/`` with ``annotations/instances_train.json`` and ``train/0.jpg``, made once."""
    from PIL import Image

    root = cache_dir / f"synthetic_{images}x{annotations}_{size[0]}x{size[1]}_s{seed}"
    ann = root / "annotations" / "instances_train.json"
    if not ann.is_file():
        (root / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_photo(size, seed)).save(root / "train" / "0.jpg", quality=90)
        write_synthetic_annotations(ann, images, annotations, size, seed)
    return root


def _memory(pid: int) -> tuple[float, float]:
    """(PSS, RSS) of ``pid`` in MB from ``/proc/<pid>/smaps_rollup`` (Linux)."""
    pss = rss = 0.0
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) / 1024
    return pss, rss


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _timed_batches(it: Any, warmup: int, batches: int, after_warmup: Any = None) -> tuple[float, Any]:
    """Draw ``warmup`` batches, call ``after_warmup``, then time ``batches`` more: (seconds, first batch)."""
    first = None
    for _ in range(warmup):
        batch = next(it)
        first = batch if first is None else first
    if after_warmup is not None:
        after_warmup()
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        first = batch if first is None else first
    return time.perf_counter() - start, first


def measure(root: str, variant: str, num_workers: int, batches: int, batch_size: int, warmup: int,
            speed: dict[str, int] | None = None) -> dict[str, Any]:
    """One variant, in this process (run it in a fresh one): parse + index, then the workers' memory;
    with ``speed`` ({num_workers, batch_size, batches, warmup_batches, min_size, max_size}), then the
    loader's images/s with those settings (data=coco's defaults: 800 x 1333 training transforms)."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    import detection.data.coco as coco_mod

    if variant == "dict":  # the loader before serialize.py: a Python dict of dicts, nothing frozen
        def as_dict(coco, anns, with_segmentations):
            return {k: {**v, "info": coco.imgs[k]} for k, v in anns.items()}

        coco_mod.coco_records = as_dict
        coco_mod.freeze_inherited_objects = lambda: None
    rss0 = _peak_rss_mb()
    start = time.perf_counter()
    ds = coco_mod.CocoDetection(root, "train", train=True, transforms=coco_mod.build_transforms(True, 64, 96))
    parse_s = time.perf_counter() - start
    out: dict[str, Any] = {
        "variant": variant, "images": len(ds), "annotations": len(ds.coco.anns), "parse_index_s": round(parse_s, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 0), "rss_before_parse_mb": round(rss0, 0),
        "main_rss_after_parse_mb": round(_memory(os.getpid())[1], 0),
    }
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=coco_mod.collate_fn,
                        sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)))
    it = iter(loader)
    pids = [w.pid for w in it._workers]  # noqa: SLF001 - the worker processes whose memory is measured
    before: list[tuple[float, float]] = []
    loader_s, _ = _timed_batches(it, warmup, batches, lambda: before.extend(_memory(p) for p in pids))
    after = [_memory(p) for p in pids]
    del it
    out.update({
        "num_workers": num_workers, "batches": batches, "batch_size": batch_size, "warmup_batches": warmup,
        "loader_img_s": round(batches * batch_size / loader_s, 1),
        "workers_pss_start_mb": round(sum(b[0] for b in before), 1),
        "workers_pss_end_mb": round(sum(a[0] for a in after), 1),
        "workers_rss_start_mb": round(sum(b[1] for b in before), 1),
        "workers_rss_end_mb": round(sum(a[1] for a in after), 1),
    })
    out["workers_pss_growth_mb"] = round(out["workers_pss_end_mb"] - out["workers_pss_start_mb"], 1)
    out["workers_rss_growth_mb"] = round(out["workers_rss_end_mb"] - out["workers_rss_start_mb"], 1)
    if speed:
        ds.transforms = coco_mod.build_transforms(True, int(speed["min_size"]), int(speed["max_size"]))
        loader = DataLoader(ds, batch_size=int(speed["batch_size"]), num_workers=int(speed["num_workers"]),
                            collate_fn=coco_mod.collate_fn,
                            sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(1)))
        it = iter(loader)
        seconds, first = _timed_batches(it, int(speed["warmup_batches"]), int(speed["batches"]))
        del it
        out["speed"] = {**{k: int(v) for k, v in speed.items()},
                        "loader_img_s": round(int(speed["batches"]) * int(speed["batch_size"]) / seconds, 2),
                        # the size the training transforms gave the first image: the step is timed at it
                        "image_hw": list(first[0][0].shape[-2:])}
    return out


def coco_step_img_s(b: Any, device: Any, steps: int, warmup: int, batch_size: int, size: tuple[int, int]) -> float:
    """Training images/s of ``bench.data_scale.step_detector`` (RetinaNet-R50-FPN, 80 classes) at COCO's
    input size: the framework section's plain-loop step (``PlainStep``: the configured optimizer, clipping
    and precision) on random images with 5 random boxes each, the model as the necks section builds it."""
    import torch

    from lightning_modules import checkpoints as CK
    from lightning_modules.bench.common import PlainStep, model_config, training_config

    torch.manual_seed(b.seed)
    total = warmup + steps
    fcfg = training_config(model_config(b, b.data_scale.step_detector, b.reference_neck), device, total, total)
    step = PlainStep(fcfg, CK.build_net(fcfg), device, total, total)
    g = torch.Generator().manual_seed(b.seed)
    h, w = size
    images = [torch.rand(3, h, w, generator=g).to(device) for _ in range(batch_size)]
    xy = torch.rand(batch_size, 5, 2, generator=g) * torch.tensor([w / 2, h / 2])
    wh = 16 + torch.rand(batch_size, 5, 2, generator=g) * torch.tensor([w / 2, h / 2])
    targets = [{"boxes": torch.cat([xy[i], xy[i] + wh[i]], 1).to(device),
                "labels": torch.randint(0, int(b.num_classes), (5,), generator=g).to(device)} for i in range(batch_size)]
    elapsed = 0.0
    for k in range(total):
        step(images, targets)
        if k >= warmup:
            elapsed += sum(step.last.values())  # forward, backward, optimizer: each ends synchronised
    return steps * batch_size / elapsed


def run_data_scale(b: Any, device: Any, progress: Any) -> dict[str, Any]:
    """The section: dataset made (or reused), then each variant in a fresh process, then the training step
    at COCO's input size that the loader must keep up with."""
    d, seed = b.data_scale, b.seed
    task = progress.add_task("data_scale", total=None)
    size = (int(d.image_size[0]), int(d.image_size[1]))
    progress.update(task, description="data_scale: synthetic annotation file")
    start = time.perf_counter()
    root = ensure_dataset(Path(d.cache_dir).expanduser(), int(d.images), int(d.annotations), size, seed)
    ann = root / "annotations" / "instances_train.json"
    out: dict[str, Any] = {"root": str(root), "annotation_file_mb": round(ann.stat().st_size / 2**20, 1),
                           "make_s": round(time.perf_counter() - start, 1), "variants": {}}
    variants = ["serialized", *(["dict"] if d.legacy else [])]
    for v in variants:
        progress.update(task, description=f"data_scale: {v} (parse, then {d.num_workers} workers x {d.batches} batches)")
        speed = None
        if v == "serialized" and d.speed.batches > 0:
            speed = {k: int(d.speed[k]) for k in ("num_workers", "batch_size", "batches", "warmup_batches",
                                                    "min_size", "max_size")}
        args = [str(root), v, int(d.num_workers), int(d.batches), int(d.batch_size), int(d.warmup_batches), speed]
        code = f"import json, sys; from lightning_modules.bench.data_scale import measure; print(json.dumps(measure(*{args!r})))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"bench.data_scale variant {v!r} failed: {proc.stderr.strip().splitlines()[-1:]}")
        out["variants"][v] = json.loads(proc.stdout.strip().splitlines()[-1])
    s = out["variants"]["serialized"]
    out.update({k: s[k] for k in ("parse_index_s", "peak_rss_mb", "workers_pss_growth_mb", "workers_rss_growth_mb",
                                  "loader_img_s", "images", "annotations")})
    if "speed" in s:
        sp = d.speed
        progress.update(task, description=f"data_scale: {d.step_detector} training step at {sp.max_size} px")
        h, w = s["speed"]["image_hw"]
        step = coco_step_img_s(b, device, int(sp.step_steps), int(sp.step_warmup), int(sp.batch_size), (h, w))
        out.update({"loader_coco_img_s": s["speed"]["loader_img_s"], "step_coco_img_s": round(step, 3),
                    "loader_over_step_coco": round(s["speed"]["loader_img_s"] / step, 2)})
    return out
