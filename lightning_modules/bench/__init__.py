"""pyramidlab-bench: parameters, latency, training throughput, data and evaluation speed, side by side.

One process measures every section of ``bench.sections`` (config ``conf/bench.yaml``); one module
per section (``necks``, ``training`` for framework + data, ``evaluation``, ``data_scale``,
``convergence``), shared helpers in ``common``, the one Markdown renderer and the targets in
``report``, the entry point in
``app``:

- ``necks``: for each ``bench.detectors`` × ``bench.necks`` model (composed from the same config
  groups as training, in the papers' layout), trainable / total parameters and batch-1 latency on
  one random ``bench.size`` image in eval mode under ``torch.inference_mode``; ``ratio_vs_fpn`` is
  the median over repeats of (this model's time / the same detector's ``fpn`` time in that repeat).
- ``framework``: training images/s of :class:`DetectionModule` under the Lightning Trainer against
  a plain loop written like torchvision's detection reference, from one initialisation, on the
  same DataModule, optimizer, LR schedule, batch size and number of steps.
- ``data``: the training DataLoader alone (images/s) against the step's consumption (images per
  second of compute in the plain loop, loader waits excluded).
- ``eval``: CocoEvaluator with pycocotools, faster-coco-eval and hotcoco on the same synthetic
  predictions, end to end (update + compute), time, AP and where the time goes; plus a COCO-sized
  case (5,000 images x 100 detections, bbox and segm).
- ``data_scale`` (not in the default sections): the COCO loader on a generated annotation file of
  COCO train2017's size: parse + index time, peak memory, the DataLoader workers' memory growth.
- ``convergence`` (not in the default sections: two full trainings): the model ``make train`` trains,
  trained by the framework and by the plain loop from the same weights on the same batches with the
  same optimizer, schedule and clipping for the same steps; both last weights' bbox AP (AP50, APs/m/l)
  on the test split by the same evaluator, their difference, wall time and images/s of each arm.

Every comparison warms up first and interleaves its candidates (each repeat / round runs all of
them once), so drift (other jobs on the machine, clocks, caches) hits every candidate alike;
medians are reported with min / max. On CUDA every timing is synchronised and the necks section
adds autocast (bf16 / fp16) and channels_last rows. Results: ``bench.json`` and ``bench.md`` in
the run dir, written atomically.
"""

from __future__ import annotations

from lightning_modules.bench.app import bench, main
from lightning_modules.bench.common import SECTIONS, bench_options, group_options
from lightning_modules.bench.report import render_markdown

__all__ = ["SECTIONS", "bench", "bench_options", "group_options", "main", "render_markdown"]
