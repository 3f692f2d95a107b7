"""pyramidlab-bench: run the sections of ``bench.sections`` and write bench.json + bench.md."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from detection.atomic import write_json_atomic, write_text_atomic
from lightning_modules.bench import data_scale as bench_data_scale
from lightning_modules.bench import evaluation as bench_eval
from lightning_modules.bench.common import _progress, bench_options, console, resolve_device
from lightning_modules.bench.convergence import run_convergence
from lightning_modules.bench.necks import run_necks
from lightning_modules.bench.report import (
    check_targets,
    command_line,
    device_info,
    render_markdown,
)
from lightning_modules.bench.training import data_entry, framework_entry, run_training
from lightning_modules.config_checks import prepare_config
from lightning_modules.paths import CONF_DIR


# ------------------------------------------------------------------------------------------ app
def bench(cfg: DictConfig) -> dict[str, Any]:
    """Run the sections of ``cfg.bench``; write bench.json and bench.md into ``cfg.paths.output_dir``."""
    b = bench_options(cfg)
    # the checks pyramidlab-train runs (types, data paths and num_classes, backbone.weights_path=embedded)
    prepare_config(cfg)
    threads = torch.get_num_threads()
    if b.threads is not None:
        torch.set_num_threads(b.threads)
    try:
        return _bench(cfg, b)
    finally:
        torch.set_num_threads(threads)  # process-wide: leave it as found (tests, notebooks)


def _bench(cfg: DictConfig, b: DictConfig) -> dict[str, Any]:
    device = resolve_device(b.device)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": command_line(),
        "device": device_info(device),
        "config": OmegaConf.to_container(b),
        "necks": None, "gpu": None, "memory": None, "framework": None, "data": None, "eval": None,
        "data_scale": None, "convergence": None,
    }
    console.print(f"[bold]{escape(results['command'])}[/]  ->  {escape(str(out_dir))}")  # [a,b]: not markup
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if "necks" in b.sections:
        necks = run_necks(b, device)
        results["necks"], results["memory"] = necks["rows"], necks["memory"]
        results["gpu"] = necks["gpu_rows"] or None
        seconds["necks"] = round(time.perf_counter() - start, 1)
    arms = [a for a, s in (("lightning", "framework"), ("plain", "framework"), ("plain", "data"),
                           ("loader", "data")) if s in b.sections]
    arms = list(dict.fromkeys(arms))
    if arms:
        start = time.perf_counter()
        train = run_training(cfg, b, device, arms)
        if "framework" in b.sections:
            results["framework"] = framework_entry(train, b)
        if "data" in b.sections:
            results["data"] = data_entry(train)
        seconds["framework+data"] = round(time.perf_counter() - start, 1)
    if "eval" in b.sections:
        start = time.perf_counter()
        results["eval"] = bench_eval.run_section(cfg, b)
        seconds["eval"] = round(time.perf_counter() - start, 1)
    if "data_scale" in b.sections:
        start = time.perf_counter()
        with _progress() as progress:
            results["data_scale"] = bench_data_scale.run_data_scale(b, device, progress)
        seconds["data_scale"] = round(time.perf_counter() - start, 1)
    if "convergence" in b.sections:
        start = time.perf_counter()
        results["convergence"] = run_convergence(cfg, b, device)
        seconds["convergence"] = round(time.perf_counter() - start, 1)
    results["seconds"] = seconds
    if hasattr(os, "getloadavg"):
        results["device"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    results["targets"] = check_targets(results, b)
    write_json_atomic(out_dir / "bench.json", results, indent=2)
    md = render_markdown(results)
    write_text_atomic(out_dir / "bench.md", md)
    print(md)
    console.print(f"bench.json, bench.md: {escape(str(out_dir))}")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
def main(cfg: DictConfig) -> None:
    bench(cfg)


if __name__ == "__main__":
    sys.exit(main())
