"""Instantiate the pieces of a run from a composed Hydra config: data, module, callbacks, trainer.

Shared by the entry points. Loggers (W&B, CSV) are built in ``loggers.py``, what a run prints and
writes at its end in ``outputs.py``, nets and checkpoints in ``checkpoints.py``."""

from __future__ import annotations

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from detection.detectors import Detector
from lightning_modules import hydra_callbacks as H
from lightning_modules.callbacks import RestoreTrainLoaderState
from lightning_modules.detection_eval import tta_settings
from lightning_modules.detection_module import DetectionModule
from lightning_modules.optim import build_optimizer


def build_datamodule(data_cfg: DictConfig, with_masks: bool) -> L.LightningDataModule:
    # _convert_="all": plain containers, so saved hyper-parameters load with weights_only.
    return instantiate(data_cfg, with_masks=with_masks, _convert_="all")


def build_module(cfg: DictConfig, net: Detector) -> DetectionModule:
    return DetectionModule(
        net,
        optimizer=build_optimizer(cfg),
        scheduler=OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
        eval_backend=cfg.eval.backend,
        tta=tta_settings(cfg.eval.get("tta"), cfg.data.max_size if cfg.get("data") else None),
    )


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    node = cfg.get("callbacks") or {}
    return [instantiate(c) for c in node.values() if c is not None and "_target_" in c]


def _uses_ddp(tcfg: DictConfig) -> bool:
    return "ddp" in str(tcfg.get("strategy", "")) and "spawn" not in str(tcfg.get("strategy", ""))


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    tcfg = cfg.trainer
    if tcfg.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={tcfg.accelerator} but no CUDA device is visible; choose trainer=cpu, or "
            "trainer=ddp_cpu for two CPU processes"
        )
    if tcfg.get("accelerator") == "cpu" and str(tcfg.get("precision")) in ("16", "16-mixed"):
        # Lightning would silently switch to bf16-mixed: that changes the experiment.
        raise ValueError(
            f"trainer.precision={tcfg.precision} is not available on CPU; choose 32, bf16-mixed or bf16-true"
        )
    if tcfg.get("sync_batchnorm") and tcfg.get("accelerator") == "cpu":
        # torch's SyncBatchNorm runs on GPUs only; it would fail at the first forward
        raise ValueError("trainer.sync_batchnorm=true needs GPUs (trainer=ddp); set it false on CPU")
    if _uses_ddp(tcfg):
        H.install_ddp_child_command()
    # not a config choice: without it a mid-epoch resume silently replays the epoch's first batches
    callbacks = [*callbacks, RestoreTrainLoaderState()]
    return instantiate(tcfg, callbacks=callbacks, logger=loggers or False)


