"""SRF-GAN Fig. 2 as a callback: one feature map under nearest / bilinear / SRF against the target.

After every validation of stage 1 (:class:`~lightning_modules.srfgan_module.SRFGANModule`), the
finest top-down level of the first validation image goes to ``<run dir>/srf_features/step*.png``
and to W&B / TensorBoard when attached. ``pyramidlab-srfgan`` adds the callback to stage 1.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from lightning_modules.srfgan_module import STEPS_PER_ITERATION

__all__ = ["SRFFeatureFigure", "feature_comparison_figure", "write_figure"]


def feature_comparison_figure(
    lr: Tensor, sr: Tensor, tr: Tensor, valid: tuple[int, int] | None = None, title: str = ""
) -> np.ndarray:
    """Fig. 2 of the paper: one feature map under nearest / bilinear / SRF against the target.

    ``lr`` (C, h, w), ``sr`` and ``tr`` (C, H, W); each panel shows the mean |activation| over
    channels on one colour scale (the target's 1-99th percentiles), its L1 to the target in the title.
    ``valid`` crops the padding away. Returns the RGB image (H, W, 3) uint8.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = tr.shape[-2:]
    panels = OrderedDict(
        [
            ("nearest", F.interpolate(lr[None], size=size, mode="nearest")[0]),
            ("bilinear", F.interpolate(lr[None], size=size, mode="bilinear", align_corners=False)[0]),
            ("SRF (G)", sr),
            ("target F(I_tr)", tr),
        ]
    )
    h, w = valid if valid is not None else size
    maps = {k: v[:, :h, :w].float() for k, v in panels.items()}
    energy = {k: v.abs().mean(0).numpy() for k, v in maps.items()}
    lo, hi = np.percentile(energy["target F(I_tr)"], [1, 99])
    fig = Figure(figsize=(4 * 3.2, 3.2 * max(0.4, h / max(w, 1)) + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, e) in enumerate(energy.items()):
        ax = fig.add_subplot(1, 4, i + 1)
        ax.imshow(e, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
        l1 = float((maps[name] - maps["target F(I_tr)"]).abs().mean())
        ax.set_title(f"{name}\nL1 {l1:.4f}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def write_figure(module: L.LightningModule, image: np.ndarray, tag: str) -> Path:
    """PNG into ``<run dir>/srf_features/`` and the image to W&B / TensorBoard when attached."""
    from PIL import Image

    step = module.global_step // 2
    out = Path(module.trainer.default_root_dir) / "srf_features"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step{step:08d}.png"
    Image.fromarray(image).save(path)
    for lg in module.loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(key=tag, images=[str(path)], step=step)
        elif isinstance(lg, TensorBoardLogger):
            lg.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
    return path


def _valid_size(image_hw: Sequence[int], padded_hw: Sequence[int], feat_hw: Sequence[int]) -> tuple[int, int]:
    """Feature pixels covering the unpadded image (the rest of the map is padding)."""
    return tuple(
        max(1, min(f, math.ceil(i * f / p))) for i, p, f in zip(image_hw, padded_hw, feat_hw)
    )  # type: ignore[return-value]


class SRFFeatureFigure(L.Callback):
    """Write Fig. 2 after every validation (not the sanity check) of a module with ``target_pairs``
    and ``generator`` (stage 1), from the first validation batch's first image."""

    def __init__(self) -> None:
        self._sample: tuple | None = None

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        images = batch[0][:1]
        real, low, sizes = pl_module.target_pairs(images)
        fake = pl_module.generator(low[0], real[0].shape[-2:])
        valid = _valid_size(sizes[0], sizes[1], real[0].shape[-2:])
        self._sample = (low[0][0].float().cpu(), fake[0].float().cpu(), real[0][0].float().cpu(), valid)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._sample is None:
            return
        lr, sr, tr, valid = self._sample
        step = pl_module.global_step // STEPS_PER_ITERATION
        title = f"{pl_module.stage}, step {step}: finest top-down level (stride {pl_module.target.strides[0]})"
        write_figure(pl_module, feature_comparison_figure(lr, sr, tr, valid, title), "val/srf_features")
        self._sample = None
