"""The console scripts: ``--help`` answers without importing torch or Lightning; a run imports its command.

Every ``pyramidlab-*`` command starts here. ``--help`` / ``-h`` print :func:`help_text` (what the
command does, the five overrides people use most, the groups a user swaps with their options; also
Hydra's help template, so ``python -m lightning_modules.train --help`` shows it); anything else
imports the command's module and runs its ``main()``. A failed start that names an unknown ``experiment=``
lists every preset (``smsl/...`` and ``srfgan/...`` included).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lightning_modules.paths import CONF_DIR

HELP_RESOLVER = "pyramidlab.help"

# the groups a user swaps, per command (internal ones, e.g. hydra, paths, smsl_table2, pipeline, are left out)
MODEL = ["detector", "backbone", "neck"]
TRAIN_GROUPS = ["experiment", "data", *MODEL, "optim", "schedule", "recipe", "trainer", "logger", "callbacks",
                "debug"]

# command -> (module, config, what it does, the five most used overrides, groups)
COMMANDS: dict[str, tuple[str, str, str, list[tuple[str, str]], list[str]]] = {
    "train": (
        "lightning_modules.train", "train",
        "Train a detector (detector x backbone x neck) with Lightning, then evaluate its best checkpoint with "
        "COCO metrics. A run writes runs/train/<date>_<time>/: the config, checkpoints, metrics.json, COCO "
        "detections, curves.png, val_images/. With -m every comma-separated value is a job and the sweep "
        "ends with report.md; the same -m command with the same hydra.sweep.dir finishes a crashed sweep.",
        [("experiment=shapes_fcos", "the CPU recipe on the embedded data (make train); shapes_retinanet, smsl/table1, ..."),
         ("neck=smsl_fpn detector=mask_rcnn", "swap a part: detector=, backbone=, neck="),
         ("data=coco data.root=/path/to/coco", "train on COCO (recipe=paper for the papers' schedule)"),
         ("trainer=gpu | trainer=ddp trainer.devices=8", "where it runs"),
         ("debug=fdr", "smoke-run the whole path in seconds (debug=limit, debug=profiler, debug=overfit)")],
        [*TRAIN_GROUPS, "hparams_search"],
    ),
    "eval": (
        "lightning_modules.evaluate", "eval",
        "Evaluate a checkpoint with COCO metrics: the model is rebuilt from the config stored in the checkpoint; "
        "writes metrics.json and COCO detections into runs/eval/<date>_<time>/.",
        [("ckpt_path=runs/train/<run>/checkpoints/best.ckpt", "the checkpoint (required)"),
         ("data.root=/path/to/coco", "edit the checkpoint's data config"),
         ("data=coco", "replace it with a data config"),
         ("trainer=gpu", "where it runs"),
         ("eval.backend=pycocotools", "the COCOeval implementation")],
        ["data", "trainer", "logger", "debug"],
    ),
    "predict": (
        "lightning_modules.predict", "predict",
        "Draw a checkpoint's detections (boxes, class names, scores; masks) on any image files, no annotation "
        "file needed: runs/predict/<date>_<time>/images/*.png, detections_bbox.json (COCO results) and "
        "images.json.",
        [("ckpt_path=FILE", "the checkpoint (required)"),
         ("input=IMAGE_OR_DIR", "one image or a folder of images (required)"),
         ("score_threshold=0.3", "detections below it are neither drawn nor written"),
         ("max_detections=100", "per image"),
         ("device=cuda", "cpu (default) | cuda | auto")],
        [],
    ),
    "export": (
        "lightning_modules.export", "export",
        "Export a checkpoint's detector to TorchScript or ONNX and check the exported model against the "
        "PyTorch one on an image: runs/export/<date>_<time>/model.pt | model.onnx and export.json.",
        [("ckpt_path=FILE", "the checkpoint (required)"),
         ("format=torchscript", "torchscript | onnx"),
         ("input=IMAGE", "the image of the check (default: a generated one)"),
         ("atol=1e-3", "largest box / score difference allowed"),
         ("hydra.run.dir=DIR", "where the files go")],
        [],
    ),
    "srfgan": (
        "lightning_modules.srfgan_pipeline", "srfgan",
        "SRF-GAN's stages 0 -> 1 -> 2 -> 3 and Table 4's variants (A1-A5) in one run folder with report.md; a "
        "rerun with the same hydra.run.dir skips finished stages.",
        [("debug=fdr", "every stage as fast_dev_run (seconds)"),
         ("hydra.run.dir=runs/srfgan/<run>", "finish a run: finished stages are skipped"),
         ("'stages=[3]' 'variants=[A2]' srf.ckpt.stage1=G.ckpt", "a subset, from checkpoints made elsewhere"),
         ("srf.adv_weight=1e-3 srf.degradation=bicubic", "the GAN's settings (Tables 6, 7: srf.level_matching)"),
         ("data=coco data.root=/coco recipe=paper trainer=ddp", "the paper's setting")],
        TRAIN_GROUPS,
    ),
    "summary": (
        "lightning_modules.summary", "summary",
        "Print the parameter counts of a detector (total, trainable, per part) as JSON; needs no data.",
        [("detector=mask_rcnn", "the detector"), ("backbone=resnet50", "the backbone"),
         ("neck=smsl_fpn", "the neck"), ("data=coco", "sets the number of classes"),
         ("recipe=paper", "the papers' widths")],
        [*MODEL, "data", "recipe"],
    ),
    "bench": (
        "lightning_modules.bench", "bench",
        "Measure parameters, latency, training throughput, data and evaluation speed side by side "
        "(make bench): bench.json and bench.md in runs/bench/<date>_<time>/.",
        [("'bench.detectors=[retinanet]'", "which detectors"), ("'bench.necks=[fpn,smsl_fpn]'", "which necks"),
         ("'bench.size=[800,1333]'", "input size"), ("bench.repeats=5", "repeats per measurement"),
         ("'bench.sections=[framework,data,eval]'", "which sections")],
        [*MODEL, "data", "trainer"],
    ),
    "pretrain": (
        "lightning_modules.pretrain", "pretrain",
        "Pretrain the backbone on crops of the training split's objects and background (the embedded data's "
        "stand-in for ImageNet); cached in <data.root>/pretrain/ and used by backbone.weights_path=embedded.",
        [("experiment=shapes_fcos", "the recipe whose backbone and data it pretrains for (default)"),
         ("pretrain.steps=300", "longer pretraining (a new cache entry)"),
         ("pretrain.force=true", "pretrain again even if cached"),
         ("backbone=resnet50", "another backbone"),
         ("data.root=DIR", "another COCO-format dataset (its train split only)")],
        ["experiment", "data", "backbone", "recipe"],
    ),
}


def group_options(group: str) -> list[str]:
    """The options of a config group: every YAML file under ``conf/<group>/``, subfolders included."""
    root = Path(CONF_DIR) / group
    names = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
    return [n for n in names if not (group == "debug" and n == "default")]


def help_text(task: str, for_hydra: bool = True) -> str:
    """``--help`` of one command (``task_name``); ``for_hydra``: ``$`` escaped for Hydra's string.Template."""
    name = str(task)
    spec = COMMANDS.get(name)
    if spec is None:
        return f"pyramidlab-{task}\n"
    _, _, what, overrides, groups = spec
    import textwrap

    lines = [f"pyramidlab-{name} [overrides]", "", *textwrap.wrap(what, 100), "", "Most used overrides:"]
    width = max(len(o) for o, _ in overrides)
    lines += [f"  {o:<{width}}  {why}" for o, why in overrides]
    if groups:
        lines += ["", "Groups (group=option):"]
        for g in groups:
            opts = group_options(g)
            if opts:
                lines.append(f"  {g + ':':<15} {', '.join(opts)}")
    lines += ["", "Any key of the config: key=value (shown with --cfg job); -m key=a,b sweeps; "
              "--hydra-help for Hydra's own flags. README.md has the details."]
    text = "\n".join(lines) + "\n"
    return text.replace("$", "$$") if for_hydra else text


def register_help_resolver() -> None:
    if not OmegaConf.has_resolver(HELP_RESOLVER):
        OmegaConf.register_new_resolver(HELP_RESOLVER, help_text)


def experiment_presets() -> list[str]:
    return group_options("experiment")


def preset_hint(args: list[str]) -> str | None:
    """For ``experiment=NAME`` naming no preset: every preset, one line."""
    for a in args:
        key, _, value = a.lstrip("+").partition("=")
        if key == "experiment" and value and "," not in value:
            presets = experiment_presets()
            if value not in presets:
                return f"experiment={value} is not a preset; the presets are: {', '.join(presets)}"
    return None


def run(command: str) -> None:
    """Run ``pyramidlab-<command>``."""
    module = COMMANDS[command][0]
    register_help_resolver()
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        # printed here, not by Hydra's help: Hydra lists every config group's options first, even
        # those the template leaves out (~2 s of composing); the text is the same (hydra.help.template)
        print(help_text(command, for_hydra=False), end="")
        return
    try:
        importlib.import_module(module).main()
    except SystemExit as e:
        if e.code not in (0, None) and (hint := preset_hint(sys.argv[1:])):
            print(hint, file=sys.stderr)
        raise


def train() -> None:
    run("train")


def evaluate() -> None:
    run("eval")


def predict() -> None:
    run("predict")


def export() -> None:
    run("export")


def srfgan() -> None:
    run("srfgan")


def summary() -> None:
    run("summary")


def bench() -> None:
    run("bench")


def pretrain() -> None:
    run("pretrain")
