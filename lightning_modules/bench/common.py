"""Shared by the bench sections: section names, config checks, devices, progress bars, timing stats."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lightning_modules import builders as B
from lightning_modules.paths import CONF_DIR

console = B.console

SECTIONS = ("necks", "framework", "data", "eval", "data_scale")
# Trainer precision -> autocast dtype of the plain loop and of the GPU latency rows.
AUTOCAST = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
GPU_VARIANTS = ("bf16-mixed", "16-mixed", "channels_last")
FP32 = "fp32"
# Lightning's framework files: their self time is the overhead the framework section looks for.
FRAMEWORK_FILES = ("/lightning/", "/lightning_utilities/", "/torchmetrics/", "/rich/")


# ------------------------------------------------------------------------------------- config
def group_options(group: str) -> list[str]:
    """Option names of config group ``group`` (``conf/<group>/**.yaml``, subfolders as ``a/b``)."""
    root = Path(CONF_DIR) / group
    return sorted(str(p.relative_to(root).with_suffix("").as_posix()) for p in root.rglob("*.yaml"))


def _names(key: str, value: Any) -> list[str]:
    if not OmegaConf.is_list(value) or not len(value):
        raise ValueError(f"{key}={value} must be a non-empty list, e.g. {key}=[a,b]")
    return [str(v) for v in value]


def _check_choices(key: str, values: list[str], group: str) -> None:
    choices = group_options(group)
    for v in values:
        if v not in choices:
            raise ValueError(f"{key}: unknown {group} {v!r}; choose from conf/{group}/: {choices}")


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key}={value} must be an integer >= {minimum}")
    return value


def bench_options(cfg: DictConfig) -> DictConfig:
    """Validate ``cfg.bench`` (one-line errors naming the key) and return it resolved."""
    if cfg.get("bench") is None:
        raise ValueError("the config has no `bench` node; run pyramidlab-bench (conf/bench.yaml)")
    b = OmegaConf.create(OmegaConf.to_container(cfg.bench, resolve=True))
    for s in _names("bench.sections", b.sections):
        if s not in SECTIONS:
            raise ValueError(f"bench.sections: unknown section {s!r}; choose from {list(SECTIONS)}")
    if b.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"bench.device={b.device!r} is not known; choose auto, cpu or cuda")
    if b.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench.device=cuda but no CUDA device is visible; use bench.device=auto or cpu")
    _check_choices("bench.detectors", _names("bench.detectors", b.detectors), "detector")
    _check_choices("bench.necks", _names("bench.necks", b.necks), "neck")
    _check_choices("bench.reference_neck", [b.reference_neck], "neck")
    _check_choices("bench.backbone", [b.backbone], "backbone")
    if b.reference_neck not in b.necks:
        # the ratios are the point of the table: measure the reference alongside
        b.necks = [b.reference_neck, *b.necks]
    if not OmegaConf.is_list(b.size) or len(b.size) != 2 or not all(isinstance(v, int) and v >= 32 for v in b.size):
        raise ValueError(f"bench.size={b.size} must be [H, W], two integers >= 32")
    if b.threads is not None:
        _positive_int("bench.threads", b.threads)
    _positive_int("bench.num_classes", b.num_classes)
    _positive_int("bench.repeats", b.repeats)
    _positive_int("bench.warmup", b.warmup, 0)
    if not OmegaConf.is_list(b.gpu_variants) or not OmegaConf.is_list(b.model_overrides):
        raise ValueError("bench.gpu_variants and bench.model_overrides must be lists (empty: [])")
    for v in b.gpu_variants:
        if v not in GPU_VARIANTS:
            raise ValueError(f"bench.gpu_variants: unknown variant {v!r}; choose from {list(GPU_VARIANTS)}")
    _positive_int("bench.framework.rounds", b.framework.rounds)
    # >= 1: the first step pays for worker start-up and allocations in both arms
    _positive_int("bench.framework.warmup_steps", b.framework.warmup_steps)
    _positive_int("bench.framework.steps", b.framework.steps)
    if b.eval.split not in ("train", "val"):
        raise ValueError(f"bench.eval.split={b.eval.split!r} is not known; choose train or val")
    _positive_int("bench.eval.images", b.eval.images)
    _positive_int("bench.eval.detections_per_image", b.eval.detections_per_image)
    _positive_int("bench.eval.repeats", b.eval.repeats)
    if not 0 <= float(b.eval.jitter) < 1:
        raise ValueError(f"bench.eval.jitter={b.eval.jitter} must be in [0, 1)")
    return b


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def compose_train(overrides: list[str]) -> DictConfig:
    """Compose ``conf/train.yaml`` with ``overrides``: the models the training entry point would build."""
    if GlobalHydra.instance().is_initialized():  # inside the running app
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # called as a library / from tests
        return compose(config_name="train", overrides=overrides)


def model_config(b: DictConfig, detector: str, neck: str) -> DictConfig:
    return compose_train([
        f"detector={detector}", f"neck={neck}", f"backbone={b.backbone}", f"data.num_classes={b.num_classes}",
        *b.model_overrides,
    ])


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so that the clock reads measure the work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _progress(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=transient,
    )


