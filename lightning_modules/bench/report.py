"""bench.json / bench.md: machine description, targets and the one Markdown renderer of every section."""

from __future__ import annotations

import os
import platform
import shlex
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_modules.markdown import markdown_table


# -------------------------------------------------------------------------------------- report
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }
    # OpenMP's spin-waiting threads collapse under oversubscription (measured on a shared 2-core
    # machine: 10-30x slower steps with the default policy, none with OMP_WAIT_POLICY=PASSIVE)
    info["env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    if hasattr(os, "getloadavg"):
        # other jobs on the machine move every figure: the load says how busy it was
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def command_line() -> str:
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join(["pyramidlab-bench", *(shlex.quote(o) for o in overrides)])


def check_targets(results: dict[str, Any], b: DictConfig) -> list[dict[str, Any]]:
    t = b.targets
    checks: list[dict[str, Any]] = []

    def add(what: str, value: float | None, bound: float, upper: bool, measure: str | None = None) -> None:
        met = None if value is None else (value <= bound if upper else value >= bound)
        checks.append({"what": what, "value": value, ("max" if upper else "min"): bound, "met": met,
                       **({"measure": measure} if measure else {})})

    rows = {(r["detector"], r["neck"]): r for r in results.get("necks") or []}
    for spec in t.necks:
        row = rows.get((spec.detector, spec.neck))
        # the neck-isolated ratio where measured: the end-to-end one's error on a CPU is larger than
        # the margin it is checked against (bench.neck_repeats)
        isolated = bool(row) and "ratio_vs_fpn_neck" in row
        add(f"{spec.detector} {spec.neck} / {b.reference_neck} latency",
            row and row["ratio_vs_fpn_neck" if isolated else "ratio_vs_fpn"], float(spec.max_ratio), True,
            "neck-isolated" if isolated else None)
    if results.get("framework"):
        add("plain / lightning images/s", results["framework"]["ratio"], float(t.framework_max_ratio), True)
    if results.get("eval"):
        add("pycocotools / faster-coco-eval time, CocoEvaluator", results["eval"]["speedup"],
            float(t.eval_min_speedup), False)
        add(f"pycocotools / fastest ({results['eval']['fastest']}) time, CocoEvaluator",
            results["eval"]["speedup_fastest"], float(t.eval_min_speedup_fastest), False)
    if results.get("data"):
        add("loader / step images/s", results["data"]["loader_over_step"], float(t.data_min_ratio), False)
    if results.get("data_scale"):
        add("COCO-scale loader: workers' summed PSS growth (MB)", results["data_scale"]["workers_pss_growth_mb"],
            float(t.data_scale_max_growth_mb), True)
        if "loader_over_step_coco" in results["data_scale"]:
            add("COCO-scale loader / training step images/s (data=coco defaults)",
                results["data_scale"]["loader_over_step_coco"], float(t.data_scale_min_ratio), False)
    return checks


def _ratio_cell(row: dict[str, Any], key: str) -> str:
    """``1.051 ± 0.008 [1.030, 1.070]``: median ratio, its standard error, the per-repeat quartiles."""
    if f"{key}_sem" not in row:
        return f"{row[key]:.3f}"
    cell = f"{row[key]:.3f} ± {row[f'{key}_sem']:.3f}"
    return cell + (f" [{row[f'{key}_q25']:.3f}, {row[f'{key}_q75']:.3f}]" if f"{key}_q25" in row else "")


def render_markdown(results: dict[str, Any]) -> str:
    dev = results["device"]
    hw = dev["gpu"] or f"{dev['cpu']} ({dev['cpu_affinity']} cores, {dev['torch_threads']} torch threads)"
    out = [
        f"# pyramidlab-bench — {results['date']}", "",
        f"`{results['command']}`", "",
        f"{hw}; torch {dev['torch']}, torchvision {dev['torchvision']}, lightning {dev['lightning']}; "
        f"load average {dev.get('loadavg_start')} at start, {dev.get('loadavg_end')} at the end; "
        f"section wall times (s): {results.get('seconds')}.",
    ]
    cfg = results["config"]
    if results.get("necks"):
        h, w = cfg["size"]
        out += ["", f"## Necks: batch 1, {h}×{w}, eval mode, inference_mode, {dev['device']}, "
                f"{cfg['repeats']} interleaved repeats after {cfg['warmup']} warm-up", ""]
        cpu = "ratio_vs_fpn_cpu" in results["necks"][0]
        isolated = "ratio_vs_fpn_neck" in results["necks"][0]
        ref = cfg["reference_neck"]
        out += markdown_table(
            ["detector", "neck", "trainable (M)", "total (M)", "ms median", "ms min", "ms max",
             f"× {ref}", *(["CPU ms median", f"× {ref} (CPU time)"] if cpu else []),
             *(["neck ms median", "neck extra ms", f"× {ref} (neck-isolated)"] if isolated else []), "detections"],
            [[r["detector"], r["neck"], f"{r['params_trainable'] / 1e6:.2f}", f"{r['params_total'] / 1e6:.2f}",
              f"{r['ms_median']:.1f}", f"{r['ms_min']:.1f}", f"{r['ms_max']:.1f}", _ratio_cell(r, "ratio_vs_fpn"),
              *([f"{r['cpu_ms_median']:.1f}", _ratio_cell(r, "ratio_vs_fpn_cpu")] if cpu else []),
              *([f"{r['neck_ms_median']:.1f}", f"{r['neck_extra_ms']:+.1f}", _ratio_cell(r, "ratio_vs_fpn_neck")]
                if isolated else []), r["detections"]]
             for r in results["necks"]],
        )
        out += ["", f"× {cfg['reference_neck']}: median over repeats of the per-repeat time ratio to the same "
                f"detector with {cfg['reference_neck']}, ± the median's standard error, [quartiles of the per-repeat "
                "ratios]; neck-isolated: every neck timed alone on the same body features "
                f"({cfg.get('neck_repeats')} interleaved repeats), 1 + (neck ms − {ref} neck ms, the per-repeat "
                f"difference's median) / the {ref} model's ms median, ± its standard error; "
                "CPU time: this process's, all threads (on a shared "
                "machine wall time also counts waiting for a core). Random weights; detections: what each model kept of the "
                f"random image (post-processing and the mask head scale with it). Peak memory: {results['memory']}."]
    if results.get("gpu"):
        out += ["", "## GPU variants (CUDA-synchronised)", ""]
        out += markdown_table(
            ["detector", "neck", "variant", "ms median", "ms min", "ms max", f"× {cfg['reference_neck']}",
             "speed-up vs fp32"],
            [[r["detector"], r["neck"], r["variant"], f"{r['ms_median']:.2f}", f"{r['ms_min']:.2f}",
              f"{r['ms_max']:.2f}", f"{r['ratio_vs_fpn']:.3f}", f"{r['speedup_vs_fp32']:.2f}"]
             for r in results["gpu"]],
        )
    f = results.get("framework")
    if f:
        arm = f["lightning_arm"]
        out += ["", f"## Framework: training images/s, batch {f['batch_size']}, {f['steps']} timed steps after "
                f"{f['warmup_steps']} warm-up, {f['rounds']} interleaved rounds, precision {f['precision']}", ""]
        out += markdown_table(
            ["Lightning img/s", "plain loop img/s", "ratio plain / Lightning", "per-round ratio (median)",
             "CPU ms/img Lightning", "CPU ms/img plain", "ratio (CPU time)"],
            [[f"{f['lightning_img_s']:.2f}", f"{f['plain_img_s']:.2f}", f"{f['ratio']:.3f}",
              f"{f['ratio_median_of_rounds']:.3f}", f"{f['lightning_cpu_ms_per_img']:.1f}",
              f"{f['plain_cpu_ms_per_img']:.1f}", f"{f['ratio_cpu']:.3f}"]],
        )
        out += ["", f"Rounds: Lightning {f['lightning_img_s_rounds']}, plain {f['plain_img_s_rounds']} img/s. "
                f"The Lightning arm: DetectionModule under the Trainer with callbacks {arm['callbacks']}, loggers "
                f"{arm['loggers']}, log_every_n_steps={arm['log_every_n_steps']}; without {', '.join(arm['excluded'])} "
                "(in both arms). The plain arm: torchvision's reference loop (forward, sum, loss.item() finite "
                "check, zero_grad, backward, step, scheduler step) with the same optimizer and LR schedule."]
        if f.get("plain_phase_ms"):
            ph = f["plain_phase_ms"]
            out += ["", f"Where a plain-loop step's {f['plain_step_ms']:.1f} ms go (median over rounds):", ""]
            out += markdown_table(list(ph), [[f"{v:.1f} ms ({100 * v / f['plain_step_ms']:.0f} %)" for v in ph.values()]])
        if f.get("profile"):
            out += ["", f"cProfile (one extra round per arm, profile_*.txt): {f['profile']}"]
    d = results.get("data")
    if d:
        out += ["", f"## Data: training DataLoader, num_workers={d['num_workers']}, batch {d['batch_size']}", ""]
        out += markdown_table(
            ["loader alone img/s", "step consumes img/s", "loader / step", "plain loop time waiting on data"],
            [[f"{d['loader_img_s']:.1f}", f"{d['step_img_s']:.2f}", f"{d['loader_over_step']:.1f}",
              f"{100 * d['loader_wait_frac']:.1f} %"]],
        )
    e = results.get("eval")
    if e:
        out += render_eval(e)
    if results.get("data_scale"):
        out += render_data_scale(results["data_scale"])
    if results.get("convergence"):
        out += render_convergence(results["convergence"])
    if results.get("targets"):
        out += ["", "## Targets (issue 6)", ""]
        out += markdown_table(
            ["target", "value", "bound", "met"],
            [[t["what"] + (f" ({t['measure']})" if t.get("measure") else ""), "–" if t["value"] is None else f"{t['value']:.3f}",
              f"≤ {t['max']}" if "max" in t else f"≥ {t['min']}",
              {True: "yes", False: "**no**", None: "not measured"}[t["met"]]] for t in results["targets"]],
        )
    return "\n".join(out) + "\n"


# eval and data_scale sections
NAMES = {"pycocotools": "pycocotools", "faster_coco_eval": "faster-coco-eval", "hotcoco": "hotcoco"}


def _profile_cells(p: dict[str, float]) -> list[str]:
    return [f"{p.get(k, 0.0):.3f}" for k in ("update_s", "gather_s", "datasets_s", "cocoeval_s")]


def render_eval(e: dict[str, Any]) -> list[str]:
    """bench.md lines of the eval section."""
    backends = [k for k in NAMES if f"{k}_s" in e]
    out = ["", f"## COCO evaluation: {e['images']} images, {e['detections']} synthetic detections "
           f"({e['split']} split ground truth), CocoEvaluator update + compute", ""]
    lib = e["library"]
    ap_key = {"pycocotools": "ap_pycocotools", "faster_coco_eval": "ap_faster", "hotcoco": "ap_hotcoco"}
    out += markdown_table(
        ["backend", "end to end s (median)", "pycocotools / this", "AP", "library alone s", "update s",
         "gather s", "datasets s", "COCOeval s"],
        [[NAMES[k], f"{e[f'{k}_s']:.3f}", f"{e['pycocotools_s'] / e[f'{k}_s']:.1f}×", f"{e[ap_key[k]]:.6f}",
          f"{lib[f'{k}_s']:.3f}", *_profile_cells(e["profile"][k])] for k in backends],
    )
    out += ["", f"Fastest: {NAMES[e['fastest']]}, **{e['speedup_fastest']:.1f}×** pycocotools end to end; "
            f"largest |ΔAP| to pycocotools {e['ap_abs_diff']:.1e}. Profile columns (medians): update = our rows "
            "and RLE encoding, gather = DDP gather, datasets = the COCO datasets and the backend's COCO objects "
            "(ours), COCOeval = the backend's evaluate + accumulate + summarize. Library alone: COCO + loadRes + "
            "COCOeval on the results list, as a script runs it."]
    c = e.get("coco")
    if c:
        out += ["", f"### COCO-sized: {c['images']} images × {c['detections_per_image']} detections, "
                f"{c.get('annotations')} generated annotations; bbox at {c['image_size'][0]}×{c['image_size'][1]}, "
                f"segm masks at {c['mask_size'][0]}×{c['mask_size'][1]} ({c['seconds']} s in all)", ""]
        rows = []
        for t in ("bbox", "segm"):
            entry = c[t]
            py = entry["backends"].get("pycocotools")
            for k, r in entry["backends"].items():
                rows.append([t, NAMES[k], f"{r['s']:.2f}", f"{py['s'] / r['s']:.1f}×" if py else "–",
                             f"{r['ap']:.6f}", *_profile_cells(r["profile"])])
        out += markdown_table(["iou type", "backend", "end to end s", "pycocotools / this", "AP", "update s", "gather s",
                       "datasets s", "COCOeval s"], rows)
    return out


def render_data_scale(d: dict[str, Any]) -> list[str]:
    """bench.md lines of the data_scale section."""
    v0 = next(iter(d["variants"].values()))
    out = ["", f"## Data at COCO scale: {v0['annotations']} annotations on {d['variants']['serialized']['images']} "
           f"training images ({d['annotation_file_mb']} MB annotation file), {v0['num_workers']} workers × "
           f"{v0['batches']} batches of {v0['batch_size']}", ""]
    head = ["records", "parse + index s", "peak RSS MB", "workers PSS start → end MB", "PSS growth MB",
            "workers RSS start → end MB", "RSS growth MB", "loader img/s"]
    rows = [[k, v["parse_index_s"], v["peak_rss_mb"], f"{v['workers_pss_start_mb']} → {v['workers_pss_end_mb']}",
             v["workers_pss_growth_mb"], f"{v['workers_rss_start_mb']} → {v['workers_rss_end_mb']}",
             v["workers_rss_growth_mb"], v["loader_img_s"]] for k, v in d["variants"].items()]
    out += markdown_table(head, rows)
    out += ["", "serialized: records in one NumPy buffer (detection/data/serialize.py) and inherited objects "
            "frozen in the workers; dict: the same loader with a Python dict of per-image dicts (before). "
            "Growth: summed over the workers, from after the warm-up batches to the end."]
    sp = d["variants"]["serialized"].get("speed")
    if sp:
        out += ["", f"At data=coco's defaults (serialized records, {sp['num_workers']} workers, batches of "
                f"{sp['batch_size']}, training transforms to {sp['min_size']} × {sp['max_size']}, {sp['batches']} batches "
                f"after {sp['warmup_batches']}): the loader gives **{d['loader_coco_img_s']} img/s**; a training step of "
                f"RetinaNet-R50-FPN on images of that size takes {d['step_coco_img_s']} img/s on this device: "
                f"loader / step = **{d['loader_over_step_coco']}**."]
    return out


CONVERGENCE_METRICS = (("ap", "AP"), ("ap50", "AP50"), ("ap75", "AP75"), ("aps", "APs"), ("apm", "APm"),
                       ("apl", "APl"))


def _pct(mean: float | None, std: float | None) -> str:
    """A 0-1 metric in %, ``± std`` over seeds when there are several; – where it is undefined."""
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def render_convergence(c: dict[str, Any]) -> list[str]:
    """bench.md lines of the convergence section."""
    epochs = c["steps"] / c["batches_per_epoch"]
    out = ["", f"## Convergence: Lightning vs a plain loop, {c['steps']} steps ({epochs:.2f} epochs of "
           f"{c['batches_per_epoch']} batches of {c['batch_size']}; steps from {c['steps_from']}), seeds {c['seeds']}, "
           f"last weights on {c['eval_split']} ({c['eval_images']} images)", ""]
    rows = []
    for arm, name in (("lightning", "Lightning"), ("plain", "plain loop")):
        rows.append([name, *(_pct(c[f"{k}_{arm}"], c[f"{k}_{arm}_std"]) for k, _ in CONVERGENCE_METRICS),
                     f"{c[f'{arm}_s']:.1f}", f"{c[f'{arm}_img_s']:.2f}", f"{c[f'{arm}_total_s']:.1f}",
                     f"{c[f'final_loss_{arm}']:.4f}"])
    rows.append(["Lightning − plain", *(_pct(c[f"{k}_diff"], c[f"{k}_diff_std"]) for k, _ in CONVERGENCE_METRICS),
                 f"{c['lightning_s'] - c['plain_s']:+.1f}", "", f"{c['lightning_total_s'] - c['plain_total_s']:+.1f}", ""])
    out += markdown_table(["arm", *(f"bbox {n} %" for _, n in CONVERGENCE_METRICS), "steps s", "images/s", "arm s",
                      "final loss"], rows)
    yes = {True: "yes", False: "**no**"}
    out += ["", f"Both arms: the same initial weights ({yes[c['same_init_weights']]}), the same first batch "
            f"({yes[c['same_first_batch']]}), first-step loss |Δ| {c['first_loss_abs_diff']:.1e}, losses equal to 1e-5 "
            f"for the first {c['loss_agree_steps']} of {c['steps']} steps; optimizer "
            f"{c['optimizer'].get('_target_')} lr {c['optimizer'].get('lr')}, schedule {c['scheduler']}, gradient "
            f"clipping {c['gradient_clip_val']} ({c['gradient_clip_algorithm']}), precision {c['precision']}. "
            "Lightning: DetectionModule under the Trainer as pyramidlab-train builds them (no validation, no "
            "checkpoints); plain: torchvision's reference loop. ± std over seeds; the difference is paired per seed. "
            "Final loss: mean of the last tenth of the steps. Steps s and images/s: from the end of the first step to the "
            "end of the last (fetches included); arm s: the whole training call (set-up, worker start-up, steps; "
            "Lightning's also its teardown)."]
    return out


