"""pyramidlab-eval ckpt_path=... [data overrides]: COCO metrics and detections files for a checkpoint.

The model is rebuilt from the resolved config stored in the checkpoint, so no model
overrides are needed. Data: the checkpoint's data config, edited by ``data.key=value``
overrides; ``data=NAME`` replaces it with the named config group. ``eval.tta.*``: multi-scale /
flip testing. A split whose annotation file lists images only (COCO test-dev) gets no metrics
but the evaluation server's files (:func:`server_files`).
"""

from __future__ import annotations

import re
import time
import zipfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from detection.atomic import atomic_path, write_json_atomic
from lightning_modules import builders as B
from lightning_modules import checkpoints as CK
from lightning_modules import hydra_callbacks as H
from lightning_modules import loggers as LG
from lightning_modules import outputs as OUT
from lightning_modules.paths import CONF_DIR


def eval_data_config(cfg: DictConfig, stored: DictConfig) -> DictConfig:
    """Which data config to evaluate on: the composed one if ``data=`` was given, else the stored one."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    if any(o.split("=")[0].lstrip("+~") == "data" for o in overrides):
        return cfg.data
    data = stored.data
    edits = [o.lstrip("+") for o in overrides if o.lstrip("+~").startswith("data.")]
    if edits:
        with open_dict(data):
            data = OmegaConf.merge(data, OmegaConf.from_dotlist([e[len("data."):] for e in edits]))
    return data


def tta_loader_data(data: DictConfig, tta: DictConfig | None) -> DictConfig:
    """With multi-scale testing, the loader reads images at the largest scale (and the views' cap).

    Each view is then resized from that image (downsampled, never upsampled from a smaller
    copy). With one scale the loader reads at exactly that scale, so ``eval.tta.scales=[S]``
    is plain evaluation at ``data.min_size=S``.
    """
    if not tta or not tta.get("scales"):
        return data
    data = OmegaConf.merge(data, {})  # a copy: the stored config is printed and logged as it was
    with open_dict(data):
        if tta.get("max_size") is not None:
            data.max_size = int(tta.max_size)
        data.min_size = max(int(s) for s in tta.scales)
    return data


def results_name(cfg: DictConfig) -> str:
    """``eval.results_name``, checked before any image is read."""
    name = str(cfg.eval.get("results_name") or "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", name):
        # the server splits the file name at underscores: type_split_name_results
        raise ValueError(f"eval.results_name={name!r}: use letters, digits and hyphens only (no underscores)")
    return name


def server_files(output_dir: str | Path, results: dict[str, list], split: str, name: str) -> dict[str, Path]:
    """The COCO evaluation server's upload for an unannotated split (test-dev): JSON + zip per type.

    The server reads ``detections_<split>_<name>_results.json`` from a zip, one submission per
    type (bbox and segm are separate challenges with the same file name): the bbox files go
    to ``output_dir``, the segm ones to ``output_dir/segm/``. ``results``: COCO results lists
    by type (``bbox``, and ``segm`` when not empty). Returns ``{"bbox": zip, "bbox_json": ..., ...}``.
    """
    out: dict[str, Path] = {}
    for iou_type, folder in (("bbox", Path(output_dir)), ("segm", Path(output_dir) / "segm")):
        if iou_type == "segm" and not results.get("segm"):
            continue
        stem = f"detections_{split}_{name}_results"
        json_path = write_json_atomic(folder / f"{stem}.json", results[iou_type])
        with atomic_path(folder / f"{stem}.zip") as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(json_path, arcname=json_path.name)
        out[iou_type] = folder / f"{stem}.zip"
        out[f"{iou_type}_json"] = json_path
    return out


def evaluate(cfg: DictConfig) -> dict[str, float]:
    name = results_name(cfg)
    ckpt = CK.load_checkpoint(cfg.ckpt_path)
    if "pyramidlab_config" not in ckpt:
        raise ValueError(f"{cfg.ckpt_path}: not a pyramidlab checkpoint (no stored config)")
    stored = OmegaConf.create(ckpt["pyramidlab_config"])
    model_cfg = OmegaConf.create({k: stored[k] for k in ("detector", "backbone", "neck", "optim")})
    model_cfg.eval = cfg.eval
    with open_dict(model_cfg):
        # evaluation never steps the optimizer, and scaling would need the training devices
        model_cfg.optim.scale_lr = False
    data_cfg = eval_data_config(cfg, stored)
    OUT.print_config(
        OmegaConf.create({"ckpt_path": cfg.ckpt_path, "model": model_cfg, "data": data_cfg, "trainer": cfg.trainer}),
        "pyramidlab-eval",
    )
    net = CK.build_net(model_cfg)
    CK.load_net_state(net, ckpt["state_dict"], str(cfg.ckpt_path))
    if int(data_cfg.num_classes) != net.num_classes:
        raise ValueError(
            f"data.num_classes={data_cfg.num_classes} but the checkpoint's detector has {net.num_classes} classes"
        )
    module = B.build_module(OmegaConf.merge(model_cfg, {"data": data_cfg}), net)  # checks eval.tta first
    datamodule = B.build_datamodule(tta_loader_data(data_cfg, cfg.eval.get("tta")), net.with_masks)
    module.evaluation.category_ids = ckpt.get("category_ids")
    loggers = LG.build_loggers(cfg, job_type="eval")
    exit_code = 1
    try:
        trainer = B.build_trainer(cfg, callbacks=B.build_callbacks(cfg), loggers=loggers)
        LG.log_config(loggers, OUT.resolved_config(cfg))
        start = time.perf_counter()
        trainer.test(module, datamodule=datamodule, verbose=False)  # our table (percent) only
        test_s = time.perf_counter() - start
        if trainer.is_global_zero:
            extra = {**OUT.params_entry(net), "test_seconds": round(test_s, 1), "checkpoint": str(cfg.ckpt_path)}
            if info := LG.wandb_info(loggers):
                extra["wandb"] = info
            split = data_cfg.get("test_split") or data_cfg.val_split
            if not module.evaluation.test_annotated:
                server = server_files(cfg.paths.output_dir, module.evaluation.test_results, split, name)
                extra["metrics"] = f"none: the {split} annotation file lists images only"
                extra["server_files"] = {k: str(v) for k, v in server.items()}
            paths = OUT.write_outputs(cfg.paths.output_dir, module, extra)
            if module.evaluation.test_annotated:
                OUT.report(module, paths, str(cfg.ckpt_path))
            else:
                OUT.console.print(
                    f"No metrics: the {split} annotation file lists images only, and no metrics can be computed "
                    "without annotations; upload the zip(s) below to the COCO evaluation server."
                )
                for key, p in {**paths, **server}.items():
                    OUT.console.print(f"{key + ':':<18}{p}")
        exit_code = 0
        return dict(module.evaluation.test_metrics)
    finally:
        LG.finish_loggers(loggers, exit_code=exit_code)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def hydra_main(cfg: DictConfig) -> float | None:
    metrics = H.run_guarded(evaluate, cfg)
    return None if metrics is None else metrics.get("bbox/AP")


def main() -> None:
    """Console script ``pyramidlab-eval``."""
    H.main_with_hints(hydra_main, "eval")


if __name__ == "__main__":
    main()
