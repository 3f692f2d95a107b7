"""Checkpoint <-> model, in one place: build a detector from a config, load a checkpoint without
running pickled code, rebuild its detector from the config stored in it, and load weights strictly
with the mismatching parts named.

Used by ``pyramidlab-train`` (the net), ``pyramidlab-eval`` / ``-predict`` / ``-export`` (rebuild),
every SRF-GAN stage (F from stage 0, G and D from stage 1, M from stage 2) and the bench.
Weight transfer *between* stages (G into an SRF neck, an extractor into a target detector) is
model code: ``srfgan/transfer.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from detection.detectors import Detector
from detection.state import load_prefixed_state

MODEL_GROUPS = ("detector", "backbone", "neck")
# keys of a detector config that belong to the training recipe, not to the model's constructor
DETECTOR_TRAINING_KEYS = ("base_lr",)


def build_net(cfg: DictConfig | Mapping[str, Any], backbone_weights: bool = True) -> Detector:
    """``detector(backbone=body, neck=partial neck)``: the one builder of every stage's detector.

    ``backbone_weights=False`` drops ``backbone.weights_path`` — for a net whose weights come from a
    checkpoint next (the file the run started from need not exist where the net is rebuilt).
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    for group in MODEL_GROUPS:
        if cfg.get(group) is None:
            raise ValueError(f"config group {group!r} is empty; choose one with {group}=NAME")
    backbone_cfg = cfg.backbone
    if not backbone_weights and backbone_cfg.get("weights_path"):
        backbone_cfg = OmegaConf.merge(backbone_cfg, {"weights_path": None})
    detector = OmegaConf.to_container(cfg.detector, resolve=True)
    detector_cfg = {k: v for k, v in detector.items() if k not in DETECTOR_TRAINING_KEYS}
    return instantiate(detector_cfg, backbone=instantiate(backbone_cfg), neck=instantiate(cfg.neck))


def load_checkpoint(path: str | Path, what: str = "ckpt_path", lightning: bool = True) -> dict:
    """Load a checkpoint with ``weights_only=True`` (pickled code is refused, never run).

    One-line errors naming ``what`` (the config key) and the file; ``lightning`` also requires a
    ``state_dict``.
    """
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such checkpoint: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: say which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{what}: cannot load {path} as a weights-only checkpoint: {first}") from e
    if lightning and (not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict)):
        raise ValueError(f"{what}: {path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def load_net_state(net: nn.Module, state: Mapping[str, Tensor], source: str, what: str = "ckpt_path") -> None:
    """Load a DetectionModule checkpoint's ``net.*`` weights into ``net`` strictly, naming mismatches."""
    load_prefixed_state(net, state, "net.", source, what)


def stored_config(ckpt: Mapping[str, Any], path: str | Path, what: str) -> DictConfig:
    """The resolved run config a pyramidlab checkpoint carries (``pyramidlab_config``)."""
    stored = ckpt.get("pyramidlab_config")
    if not isinstance(stored, Mapping):
        raise ValueError(f"{what}: {path} has no pyramidlab_config (expected a checkpoint written by pyramidlab)")
    return OmegaConf.create(dict(stored))


def net_from_checkpoint(path: str | Path, what: str = "ckpt_path") -> tuple[Detector, dict]:
    """Rebuild a checkpoint's detector from its stored config and load its ``net.*`` weights."""
    ckpt = load_checkpoint(path, what)
    cfg = stored_config(ckpt, path, what)
    try:
        net = build_net(cfg, backbone_weights=False)
    except Exception as e:  # noqa: BLE001 - hydra wraps errors over several lines
        msg = " ".join(str(e).split())
        raise ValueError(f"{what}: cannot rebuild the detector stored in {path}: {msg[:300]}") from e
    load_net_state(net, ckpt["state_dict"], str(path), what)
    return net, ckpt
