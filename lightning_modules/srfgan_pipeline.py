"""pyramidlab-srfgan: SRF-GAN's stages 0 -> 1 -> 2 -> 3 and Table 4's variants in one run folder.

Each stage trains in its own subfolder of the run dir with its own checkpoints, loggers and
``metrics.json``, and ends by writing ``stage.json`` (its final checkpoint, metrics and time):
a rerun pointed at the same folder (``hydra.run.dir=...``) skips every stage that has one.
Checkpoints pass between stages through config (``srf.ckpt.stage0|1|2``, default: this run's).

Table 4 (progressive learning), as rows of ``report.md`` / ``report.csv``:

====  =========================================================  ===========================
A1    stage 0: the target detector with NN-FPN                    ``stage0/``
A2    stage 1 (SRF-GAN) + target detector, G reused              ``stage3_A2/`` (reuse=G)
A3    the multi-scale SRF extractor alone, tested at full size    ``stage2/``
A4    stages 1 + 2 + target detector with G frozen (FR)          ``stage3_A4/`` (reuse=M)
A5    stages 1 + 2 + target detector (ours)                       ``stage3_A5/`` (reuse=M)
====  =========================================================  ===========================
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from detection.atomic import atomic_path, write_json_atomic
from detection.detectors import Detector, count_parameters
from lightning_modules import builders as B
from lightning_modules import hydra_callbacks as H
from lightning_modules import outputs as OUT
from lightning_modules import srfgan_module as S
from lightning_modules import train as T
from lightning_modules.checkpoints import build_net, load_checkpoint, net_from_checkpoint
from lightning_modules.optim import batch_scale, build_optimizer
from lightning_modules.paths import CONF_DIR
from lightning_modules.report import write_report
from srfgan import (
    TargetNetwork,
    freeze_generator,
    generator_of,
    load_discriminator_state,
    load_generator_state,
    transfer_extractor,
)

log = logging.getLogger("pyramidlab")

STAGES = (0, 1, 2, 3)
# variant -> (stages it needs, folder holding its metrics.json)
VARIANTS: dict[str, tuple[tuple[int, ...], str]] = {
    "A1": ((0,), "stage0"),
    "A2": ((0, 1, 3), "stage3_A2"),
    "A3": ((0, 1, 2), "stage2"),
    "A4": ((0, 1, 2, 3), "stage3_A4"),
    "A5": ((0, 1, 2, 3), "stage3_A5"),
    # the target detector with a fixed interpolation in FPN (Table 5's rows; NN is the baseline of
    # a target detector other than F's, Tables 1 and 3)
    "NN": ((3,), "stage3_NN"),
    "BL": ((3,), "stage3_BL"),
    "BC": ((3,), "stage3_BC"),
}
# stage-3 variants: (reuse, freeze_generator, FPN upsampler)
TARGETS = {
    "A2": ("G", False, "srf"),
    "A4": ("M", True, "srf"),
    "A5": ("M", False, "srf"),
    "NN": ("none", False, "nearest"),
    "BL": ("none", False, "bilinear"),
    "BC": ("none", False, "bicubic"),
}
DESCRIPTIONS = {
    "A1": "NN-FPN baseline (stage 0)",
    "A2": "SRF-GAN + target detector (reuse G)",
    "A3": "SRF extractor alone (stage 2)",
    "A4": "SRF-GAN + extractor + target, G frozen (FR)",
    "A5": "SRF-GAN + extractor + target (reuse M)",
    "NN": "target detector, nearest-neighbour FPN",
    "BL": "target detector, bilinear FPN",
    "BC": "target detector, bicubic FPN",
}


REUSE = ("none", "G", "M")


def check_selection(cfg: DictConfig) -> tuple[list[int], list[str]]:
    """(the stages to run: those of ``stages`` that a selected variant needs, the variants)."""
    stages = [int(s) for s in cfg.stages]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"stages={list(cfg.stages)}: expected a non-empty subset of {list(STAGES)}")
    variants = [str(v) for v in cfg.variants]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants={variants}: {unknown or 'none'} not known; choose from {list(VARIANTS)}")
    shared = [int(s) for s in cfg.srf.get("shared_stages") or []]
    if shared and not cfg.srf.get("shared_dir"):
        raise ValueError(f"srf.shared_stages={shared} needs srf.shared_dir (the folder those stages are shared in)")
    needed = {s for v in variants for s in VARIANTS[v][0]}
    return sorted(set(stages) & needed), variants


def stage_folder(cfg: DictConfig, run_dir: Path, stage: int, folder: str) -> Path:
    """Where a stage's outputs live: this run's folder, or ``srf.shared_dir`` for ``srf.shared_stages``.

    A table that is a sweep of pipelines shares the stages its rows do not vary (Table 7's rows vary
    stage 2 only: F and G are trained once) — the first job trains them, the next ones find their
    ``stage.json`` and skip them. A shared stage 2 is kept per extractor head (Table 3 varies it).
    """
    if cfg.srf.get("shared_dir") and stage in [int(s) for s in cfg.srf.get("shared_stages") or []]:
        if stage == 2:
            folder = f"stage2_{cfg.srf.get('extractor_detector') or cfg.detector.name}"
        return Path(str(cfg.srf.shared_dir)) / folder
    return run_dir / folder


def stage_length(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """The stage's length as trainer settings, from ``srf.<stage>``.

    ``iterations`` (the SRF-GAN paper's unit, Sec. 5.1: "150k iterations", mini-batches of
    ``optim.base_batch_size`` = 16 images) is converted to this run's total batch — ×16 / batch,
    as are the scheduler's ``milestone_iters`` — and to Lightning optimizer steps (two per GAN
    iteration). Else ``max_epochs``; ``null`` keeps ``trainer.max_epochs`` (the detector's own
    schedule: 1x = 12 epochs at ``recipe=paper``, ``schedule=3x`` = 37).
    Returns ``{"max_epochs": ..., "max_steps": ..., "milestone_iters": ..., "iterations": ...}``.
    """
    node = cfg.srf[stage]
    iters = node.get("iterations")
    if iters is not None:
        scale = batch_scale(cfg)
        if int(iters) <= 0:
            raise ValueError(f"srf.{stage}.iterations={iters}: expected a positive number")
        n = max(1, round(int(iters) / scale))
        steps_per_iter = S.STEPS_PER_ITERATION if stage in ("stage1", "stage2") else 1
        sched = node.get("scheduler") or {}
        milestones = sched.get("milestone_iters")
        milestones = None if milestones is None else [max(1, round(int(m) / scale)) for m in milestones]
        return {"max_epochs": -1, "max_steps": steps_per_iter * n, "iterations": n, "milestone_iters": milestones}
    epochs = node.get("max_epochs")
    return {"max_epochs": int(cfg.trainer.max_epochs if epochs is None else epochs)}


def stage_config(cfg: DictConfig, folder: Path, stage: str) -> DictConfig:
    """The run's config for one stage: outputs under ``folder``, the stage's length, no sweep."""
    scfg = copy.deepcopy(cfg)
    length = stage_length(cfg, stage)
    with open_dict(scfg):
        scfg.paths.output_dir = str(folder)
        if not scfg.trainer.get("fast_dev_run"):
            scfg.trainer.max_epochs = length["max_epochs"]
            if "max_steps" in length:
                scfg.trainer.max_steps = length["max_steps"]
                scfg.srf[stage].iterations_run = length["iterations"]
                if length["milestone_iters"] is not None:
                    scfg.srf[stage].scheduler.milestone_iters = length["milestone_iters"]
        scfg.task_name = stage
    return scfg


def with_neck_upsample(cfg: DictConfig, upsample: str) -> DictConfig:
    """Stage 0's F is the target detector's FPN with nearest-neighbour upsampling (baseline A1)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.neck.upsample = upsample
    return out


def with_detector(cfg: DictConfig, name: str | None, key: str = "srf.extractor_detector") -> DictConfig:
    """Stage 2's extractor (SRF-GAN Table 3) or stage 0's F may carry another detector head than the
    target detector; ``name`` is a file of conf/detector/ (``key`` names the setting in errors)."""
    if name in (None, "", cfg.detector.name):
        return cfg
    path = Path(CONF_DIR) / "detector" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"{key}={name!r}: no {path}; choose one of {choices}")
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.detector = _group_option(path)
    return out


def _group_option(path: Path) -> DictConfig:
    """A config group file with its defaults merged as Hydra merges them: options of the same group
    (``- cascade_rcnn``) first, then the file itself (``_self_``, last when not listed)."""
    node = OmegaConf.load(path)
    defaults = list(node.pop("defaults", []) or [])
    if "_self_" not in defaults:
        defaults.append("_self_")
    merged = OmegaConf.create({})
    for entry in defaults:
        merged = OmegaConf.merge(merged, node if entry == "_self_" else _group_option(path.parent / f"{entry}.yaml"))
    return merged


def gan_trainer_config(cfg: DictConfig, monitor: str, mode: str) -> DictConfig:
    """GAN stages: DDP must allow unused parameters (a G step leaves D without gradients);
    the best checkpoint follows ``monitor`` (stage 1 has no AP: ``val/l1``; stage 2: ``val/bbox/AP``)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        if str(out.trainer.get("strategy", "auto")) == "ddp":
            out.trainer.strategy = "ddp_find_unused_parameters_true"
        best = out.callbacks.get("model_checkpoint") if out.get("callbacks") else None
        if best is not None:
            best.monitor, best.mode = monitor, mode
    return out


def load_target_network(path: str | Path, what: str = "srf.ckpt.stage0") -> TargetNetwork:
    """F from a stage-0 DetectionModule checkpoint: its transform + body + FPN, frozen and in eval mode."""
    net, _ = net_from_checkpoint(path, what)
    try:
        return TargetNetwork.from_detector(net)
    except ValueError as e:
        raise ValueError(f"{what}: {path}: {e}") from e


def build_stage1_module(cfg: DictConfig, target_ckpt: str | Path) -> S.SRFGANModule:
    """Stage 1 from a composed config: F from ``target_ckpt``; G as the configured neck builds it (the
    generator of a fresh target detector: its weights fit the stage-2/3 necks); D and the optimisation
    from ``cfg.srf``.
    """
    from hydra.utils import instantiate

    srf = cfg.srf
    target = load_target_network(target_ckpt)
    generator = generator_of(build_net(cfg, backbone_weights=False), "neck (SRF-GAN stage 1)")
    discriminator = instantiate(srf.discriminator)(in_channels=generator.channels)
    module = S.SRFGANModule(
        target, generator, discriminator,
        optimizer_g=build_optimizer(cfg, srf.stage1.optimizer_g, "srf.stage1.optimizer_g"),
        optimizer_d=build_optimizer(cfg, srf.stage1.optimizer_d, "srf.stage1.optimizer_d"),
        scheduler=OmegaConf.to_container(srf.stage1.scheduler, resolve=True),
        adv_weight=float(srf.adv_weight), degradation=str(srf.degradation), scale=float(srf.scale),
        gradient_clip=srf.get("gradient_clip"), source=str(target_ckpt),
    )
    module.run_config = OUT.resolved_config(cfg)
    return module


def build_stage2_module(cfg: DictConfig, target_ckpt: str | Path, stage1_ckpt: str | Path | None) -> S.SRFExtractorModule:
    """Stage 2 from a composed config: the extractor M from ``cfg.detector/backbone/neck`` by the one
    builder every stage uses (so ``backbone.weights_path`` is loaded, as in stages 0 and 3), its G and
    D from ``stage1_ckpt`` (None: from scratch, which the paper reports diverging), F from
    ``target_ckpt``, optimizers and schedule from ``cfg.srf.stage2``.
    """
    from hydra.utils import instantiate

    srf = cfg.srf
    target = load_target_network(target_ckpt)
    net = build_net(cfg)
    discriminator = instantiate(srf.discriminator)(in_channels=int(net.backbone.out_channels))
    if stage1_ckpt not in (None, ""):
        state = load_checkpoint(stage1_ckpt, "srf.ckpt.stage1")["state_dict"]
        load_generator_state(net, state, str(stage1_ckpt), "srf.ckpt.stage1")
        load_discriminator_state(discriminator, state, str(stage1_ckpt), "srf.ckpt.stage1")
    module = S.SRFExtractorModule(
        net, target, discriminator,
        optimizer=build_optimizer(cfg, srf.stage2.optimizer, "srf.stage2.optimizer"),
        optimizer_d=build_optimizer(cfg, srf.stage2.optimizer_d, "srf.stage2.optimizer_d"),
        scheduler=OmegaConf.to_container(srf.stage2.scheduler, resolve=True),
        adv_weight=float(srf.adv_weight), srf_weight=float(srf.stage2.get("srf_weight", 1.0)),
        degradation=str(srf.degradation), scale=float(srf.scale), level_matching=str(srf.level_matching),
        eval_backend=str(cfg.eval.backend) if cfg.get("eval") else "hotcoco",
        gradient_clip=srf.get("gradient_clip"), source=str(target_ckpt),
    )
    if module.level_matching == "same" and [p[0] for p in module.pairs] != module.strides:
        log.info(f"stage 2: L_SRF compares the levels M and F share, strides {[p[0] for p in module.pairs]}; "
                 f"M's strides {[s for s in module.strides if s not in [p[0] for p in module.pairs]]} have no "
                 f"level in F (strides {module.target.strides})")
    module.run_config = OUT.resolved_config(cfg)
    return module


def prepare_target_net(
    net: Detector, reuse: str = "G", checkpoint: str | Path | None = None, freeze: bool = False
) -> dict[str, Any]:
    """Stage 3: initialise the target detector's SRF neck from stage 1 (``G``) or stage 2 (``M``).

    ``reuse='none'`` keeps the initialisation. Returns what was transferred (for ``stage.json``):
    ``matched_strides`` and ``left_at_init`` (backbone keys not in the extractor) for ``M``.
    """
    if reuse not in REUSE:
        raise ValueError(f"srf.reuse={reuse!r} is not known; choose one of {list(REUSE)}")
    info: dict[str, Any] = {"reuse": reuse}
    if reuse != "none" and checkpoint in (None, ""):
        raise ValueError(f"srf.reuse={reuse} needs a checkpoint (stage {1 if reuse == 'G' else 2})")
    what = "srf.ckpt.stage1" if reuse == "G" else "srf.ckpt.stage2"
    if reuse == "G":
        load_generator_state(net, load_checkpoint(checkpoint, what)["state_dict"], str(checkpoint), what)
    elif reuse == "M":
        ckpt = load_checkpoint(checkpoint, what)
        meta = ckpt.get("srfgan") or {}
        if meta.get("stage") != 2:
            raise ValueError(f"{what}: {checkpoint} is not a stage-2 (SRF extractor) checkpoint")
        matched, left = transfer_extractor(net, ckpt["state_dict"], meta.get("strides", []), str(checkpoint), what)
        info.update(matched_strides=matched, left_at_init=left)
        log.info(f"stage 3: extractor levels matched at strides {matched}; {len(left)} neck tensors left at init")
    if freeze:
        freeze_generator(net)
    return info


def save_final(trainer: L.Trainer, folder: Path) -> Path:
    """The stage's final weights, written atomically (a crash never leaves a half file as final.ckpt)."""
    path = folder / "checkpoints" / "final.ckpt"
    with atomic_path(path, replace=trainer.is_global_zero) as tmp:  # rank 0 writes (Lightning saves there)
        trainer.save_checkpoint(tmp, weights_only=False)
    return path


def run_stage(
    name: str,
    cfg: DictConfig,
    module: L.LightningModule,
    with_masks: bool,
    params: dict[str, Any],
    test: bool,
    job_type: str,
) -> dict[str, Any]:
    """Fit ``module`` (then test its best checkpoint if ``test``) in ``cfg.paths.output_dir`` with
    pyramidlab-train's loop; save ``final.ckpt`` and record the stage in ``stage.json``."""
    folder = Path(cfg.paths.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    OUT.print_config(cfg, f"pyramidlab-srfgan: {name}")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    def after_fit(trainer: L.Trainer) -> dict[str, Any]:
        final = str(save_final(trainer, folder))
        # "checkpoint": the final weights unless fit_and_test finds a best checkpoint
        return {"checkpoint": final, "final_checkpoint": final}

    result = T.fit_and_test(
        cfg, module, B.build_datamodule(cfg.data, with_masks), job_type=job_type, test=test, extra=dict(params),
        after_fit=after_fit,
    )
    entry: dict[str, Any] = {"stage": name, **{k: v for k, v in result.extra.items() if k != "wandb"}}
    if test:
        entry["metrics"] = result.metrics
        entry["time_ms"] = round(module.evaluation.test_time_ms, 2)
    if result.trainer.is_global_zero:
        write_json_atomic(folder / "stage.json", entry)
    # every rank waits for rank 0's stage.json: the next stage reads this stage's checkpoint from it
    result.trainer.strategy.barrier("srfgan_stage_done")
    return entry


def done(folder: Path) -> dict[str, Any] | None:
    """The stage's record if it completed in an earlier run of this folder."""
    record = folder / "stage.json"
    if not record.is_file():
        return None
    entry = json.loads(record.read_text())
    ckpt = entry.get("checkpoint")
    return entry if ckpt and Path(ckpt).is_file() else None


def checkpoint_of(cfg: DictConfig, folder: Path, stage: int) -> str:
    """srf.ckpt.stageN if set, else stage N's output in ``folder``; a clear error if neither exists."""
    external = cfg.srf.ckpt.get(f"stage{stage}")
    if external not in (None, ""):
        path = Path(str(external)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"srf.ckpt.stage{stage}={external}: no such file")
        return str(path)
    entry = done(folder)
    if entry is None:
        raise FileNotFoundError(
            f"stage {stage} output missing: no {folder / 'stage.json'}; run stage {stage} first "
            f"(stages=[..., {stage}, ...]) or set srf.ckpt.stage{stage}=FILE"
        )
    return str(entry["checkpoint"])


def run_pipeline(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Run the selected stages in order; returns {variant: stage record} for the report."""
    stages, variants = check_selection(cfg)
    run_dir = Path(cfg.paths.output_dir)
    seconds: dict[str, float] = {}

    where = {n: stage_folder(cfg, run_dir, n, f) for n, f in ((0, "stage0"), (1, "stage1"), (2, "stage2"))}

    def stage(path: Path, fn: Callable[[], dict[str, Any]]) -> None:
        if (entry := done(path)) is not None:
            log.info(f"{path.name}: done in an earlier run ({entry['checkpoint']}); skipped")
            return
        start = time.perf_counter()
        fn()
        seconds[path.name] = round(time.perf_counter() - start, 1)

    def ckpt(n: int) -> str:
        return checkpoint_of(cfg, where[n], n)

    if 0 in stages:
        def stage0() -> dict[str, Any]:
            # F: the detector srf.target_network_detector names (default: the target detector) with NN-FPN
            base = with_detector(cfg, cfg.srf.get("target_network_detector"), "srf.target_network_detector")
            scfg = stage_config(with_neck_upsample(base, "nearest"), where[0], "stage0")
            net = build_net(scfg)
            return run_stage("stage 0 (target network F, A1)", scfg, B.build_module(scfg, net), net.with_masks,
                             OUT.params_entry(net), bool(cfg.test), "srfgan_stage0")
        stage(where[0], stage0)

    if 1 in stages:
        def stage1() -> dict[str, Any]:
            scfg = gan_trainer_config(stage_config(cfg, where[1], "stage1"), "val/l1", "min")
            with open_dict(scfg):  # Fig. 2 after every validation
                scfg.callbacks = scfg.get("callbacks") or {}
                scfg.callbacks.srf_features = {"_target_": "lightning_modules.srfgan_figure.SRFFeatureFigure"}
            module = build_stage1_module(scfg, ckpt(0))
            gd = [module.generator, module.discriminator]
            params = {"params_total": sum(count_parameters(m) for m in gd),
                      "params_trainable": sum(count_parameters(m, trainable_only=True) for m in gd)}
            return run_stage("stage 1 (SRF-GAN)", scfg, module, False, params, False, "srfgan_stage1")
        stage(where[1], stage1)

    if 2 in stages:
        def stage2() -> dict[str, Any]:
            base = with_detector(cfg, cfg.srf.get("extractor_detector"), "srf.extractor_detector")
            # stage 2 has AP: keep the best checkpoint by val AP (on ↓0.5 images)
            scfg = gan_trainer_config(stage_config(base, where[2], "stage2"), "val/bbox/AP", "max")
            module = build_stage2_module(scfg, ckpt(0), ckpt(1))
            return run_stage("stage 2 (SRF extractor, A3)", scfg, module, module.net.with_masks,
                             OUT.params_entry(module.net), bool(cfg.test), "srfgan_stage2")
        stage(where[2], stage2)

    if 3 in stages:
        for variant in [v for v in variants if v in TARGETS]:
            reuse, freeze, upsample = TARGETS[variant]

            def stage3(variant: str = variant, reuse: str = reuse, freeze: bool = freeze,
                       upsample: str = upsample) -> dict[str, Any]:
                folder = f"stage3_{variant}"
                scfg = stage_config(with_neck_upsample(cfg, upsample), run_dir / folder, "stage3")
                with open_dict(scfg):
                    scfg.task_name = folder
                source = {"G": lambda: ckpt(1), "M": lambda: ckpt(2)}.get(reuse, lambda: None)()
                net = build_net(scfg)
                info = prepare_target_net(net, reuse=reuse, checkpoint=source, freeze=freeze)
                return run_stage(f"stage 3 (target detector, {variant})", scfg, B.build_module(scfg, net),
                                 net.with_masks, {**OUT.params_entry(net), "transfer": info}, bool(cfg.test),
                                 "srfgan_stage3")
            stage(run_dir / f"stage3_{variant}", stage3)

    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        needs, folder = VARIANTS[variant]
        path = where[{"stage0": 0, "stage2": 2}[folder]] if folder in ("stage0", "stage2") else run_dir / folder
        entry = done(path)
        results[variant] = {"needs": needs, "folder": str(path.relative_to(run_dir)) if path.is_relative_to(run_dir)
                            else str(path), "entry": entry, "seconds": seconds.get(path.name)}
    return results


def report_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for variant, r in results.items():
        entry = r["entry"]
        row: dict[str, Any] = {"variant": variant, "description": DESCRIPTIONS[variant], "folder": r["folder"]}
        if entry is None or "metrics" not in entry:
            row["status"] = "not run"
            row["error"] = "its stages did not run" if entry is None else "not tested (test=false)"
        else:
            row["status"] = "ok"
            row.update(entry["metrics"])
            row["params_trainable"] = entry.get("params_trainable")
            row["time_ms"] = entry.get("time_ms")
            row["fit_seconds"] = entry.get("fit_seconds")
            row["eval_checkpoint"], row["eval_split"] = entry.get("eval_checkpoint"), entry.get("eval_split")
        rows.append(row)
    return rows


def headline_metrics(cfg: DictConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """This run's ``metrics.json``: the headline variant's metrics (one row of a table that is a
    sweep of pipelines, Tables 1, 3, 6, 7) — ``status: failed`` when that variant did not run."""
    name = cfg.get("headline") or rows[-1]["variant"]
    row = next((r for r in rows if r["variant"] == name), None)
    if row is None:
        raise ValueError(f"headline={name!r} is not among variants={[r['variant'] for r in rows]}")
    if row["status"] != "ok":
        return {"status": "failed", "error": f"variant {name}: {row.get('error')}", "variant": name}
    keep = {k: v for k, v in row.items() if k not in ("status", "error", "description")}
    return {"status": "completed", **keep}


def srfgan(cfg: DictConfig) -> dict[str, Any]:
    OUT.print_config(cfg, "pyramidlab-srfgan")
    results = run_pipeline(cfg)
    rows = report_rows(results)
    if not H.is_rank_zero():  # a DDP child re-runs this function: one report
        return {r["variant"]: r.get("bbox/AP") for r in rows}
    run_dir = Path(cfg.paths.output_dir)
    def origin(entry: dict[str, Any] | None) -> str:
        if not entry or entry.get("eval_split") is None:
            return ""
        return f", the {entry.get('eval_checkpoint')} checkpoint on split `{entry['eval_split']}`"

    notes = [f"{v}: stages {list(r['needs'])}, folder `{r['folder']}`{origin(r['entry'])}" for v, r in results.items()]
    files = write_report(rows, run_dir, title=str(cfg.get("report_title") or "SRF-GAN"),
                         columns=["variant", "description"], notes=notes,
                         baseline=cfg.get("report_baseline"), baseline_key="report_baseline")
    write_json_atomic(run_dir / "metrics.json", headline_metrics(cfg, rows))
    OUT.console.print(f"report: {files.md} (+ {files.csv.name}, {files.png.name if files.png else 'no plot'})")
    return {r["variant"]: r.get("bbox/AP") for r in rows}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="srfgan")
def hydra_main(cfg: DictConfig) -> float | None:
    out = H.run_guarded(srfgan, cfg)
    if out is None:
        return None
    return out.get(cfg.get("headline") or list(out)[-1])


def main() -> None:
    """Console script ``pyramidlab-srfgan``."""
    H.main_with_hints(hydra_main, "srfgan")


if __name__ == "__main__":
    main()

