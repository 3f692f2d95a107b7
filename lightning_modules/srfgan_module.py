"""SRF-GAN training stages (Lee & Bae, *SRF-GAN*, Sec. 4) as LightningModules, plus stage-3 helpers.

* Stage 1 — :class:`SRFGANModule`: G and D trained adversarially on the features of a frozen,
  trained FPN F (Sec. 4.1, Eq. 1-2).
* Stage 2 — :class:`SRFExtractorModule`: a detector with an SRF neck (the multi-scale SRF extractor
  M) trained on ↓0.5 images with L_INT = L_DET + L_SRF (Eq. 3), alternating with D (Sec. 4.2).
* Stage 3 — a plain :class:`DetectionModule` with an SRF neck; :func:`prepare_target_net` initialises
  its generator from stage 1 (``reuse=G``) or its body + neck from stage 2 (``reuse=M``) and can
  freeze the generator (Table 4's FR).

What a "step" means in the GAN stages
-------------------------------------
One *iteration* = one batch = one D step then one G (or M) step. Lightning's ``trainer.global_step``
counts optimizer steps, so it grows by 2 per iteration (Lightning #17958). Therefore:

* learning-rate schedules are stepped once per iteration and their ``warmup_iters`` and
  ``milestones`` (epochs, converted with the iterations per epoch) count iterations, as the paper's
  "150k iterations, decay at 120k";
* ``trainer.max_steps`` and ``ModelCheckpoint(every_n_train_steps=...)`` count optimizer steps: pass
  ``gan_optimizer_steps(iterations)`` (= 2 × iterations);
* the loggers' x-axis is Lightning's batch counter, i.e. iterations; error messages name the
  iteration as "step" and the optimizer step alongside.

Distributed training: a G step leaves D without gradients and vice versa, so DDP must run with
``strategy="ddp_find_unused_parameters_true"`` (PITFALLS). Mixed precision: use ``bf16-mixed``
(``16-mixed`` would make manual clipping see scaled gradients).
"""

from __future__ import annotations

import functools
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from detection.detectors import Detector
from lightning_modules.detection_module import SCHEDULES, DetectionModule
from lightning_modules.schedules import warmup_cosine_factor, warmup_multistep_factor
from srfgan import (
    ADV_WEIGHT,
    LEVEL_MATCHING,
    FeaturePatchDiscriminator,
    Generator,
    SRFNeck,
    TargetNetwork,
    capture_outputs,
    degrade,
    degrade_images,
    different_level_pairs,
    discriminator_accuracy,
    discriminator_loss,
    l1_loss,
    same_level_pairs,
    scale_targets,
    srf_loss,
)
from srfgan.degradation import DEGRADATIONS

__all__ = [
    "STAGE1",
    "STAGE2",
    "REUSE",
    "SRFGANModule",
    "SRFExtractorModule",
    "AdversarialSteps",
    "gan_optimizer_steps",
    "build_lr_scheduler",
    "check_finite",
    "load_checkpoint_file",
    "build_detector_from_config",
    "detector_from_checkpoint",
    "load_target_network",
    "check_gan_compatible",
    "generator_of",
    "load_generator",
    "load_discriminator",
    "load_extractor",
    "freeze_generator",
    "prepare_target_net",
    "build_stage1_module",
    "build_stage2_module",
    "feature_comparison_figure",
]

STAGE1 = "stage 1 (SRF-GAN)"
STAGE2 = "stage 2 (SRF extractor)"
REUSE = ("none", "G", "M")


# --------------------------------------------------------------------------------------- schedules
def gan_optimizer_steps(iterations: int) -> int:
    """Lightning optimizer steps for ``iterations`` GAN iterations (D step + G step each)."""
    return 2 * int(iterations)


def _iteration_budget(trainer: L.Trainer) -> tuple[int, int]:
    """(total iterations, iterations per epoch) of a fit with two optimizer steps per batch."""
    est = trainer.estimated_stepping_batches  # batches, capped by max_steps (which counts optimizer steps)
    if trainer.max_steps is not None and trainer.max_steps > 0:
        est = min(est, math.ceil(trainer.max_steps / 2))
    total = max(1, int(est)) if math.isfinite(est) else 1
    per_epoch = trainer.num_training_batches  # set up by estimated_stepping_batches
    if not (isinstance(per_epoch, int | float) and math.isfinite(per_epoch) and per_epoch > 0):
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        per_epoch = math.ceil(total / epochs)
    return total, max(1, int(per_epoch))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any] | None, total: int, per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The DetectionModule schedules (``step | cosine | constant`` + linear warmup), in iterations.

    ``cfg``: ``name``, ``warmup_iters``, ``warmup_ratio``, ``milestones`` (epochs, for ``step``),
    ``gamma``, ``final_ratio`` (for ``cosine``) — the same keys as ``optim.scheduler``.
    """
    cfg = dict(cfg or {})
    name = cfg.get("name", "step")
    if name not in SCHEDULES:
        raise ValueError(f"scheduler.name={name!r} is not known; choose one of {list(SCHEDULES)}")
    warmup = dict(warmup_iters=int(cfg.get("warmup_iters", 0)), warmup_ratio=float(cfg.get("warmup_ratio", 0.001)))
    if name == "step":
        milestones = [int(m * per_epoch) for m in cfg.get("milestones", [])]
        fn = functools.partial(warmup_multistep_factor, milestones=milestones, gamma=float(cfg.get("gamma", 0.1)), **warmup)
    elif name == "cosine":
        fn = functools.partial(warmup_cosine_factor, total=total, final_ratio=float(cfg.get("final_ratio", 0.01)), **warmup)
    else:
        fn = functools.partial(warmup_multistep_factor, milestones=[], gamma=1.0, **warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _check_lr(factory: Callable, key: str) -> None:
    lr = factory.keywords.get("lr") if isinstance(factory, functools.partial) else None
    if lr is not None and not lr > 0:
        raise ValueError(f"{key}.lr={lr} must be a positive number")


# ------------------------------------------------------------------------------------------ guard
def check_finite(stage: str, module: L.LightningModule, terms: Mapping[str, Tensor]) -> None:
    """Divergence guard: raise at once, in one line, if any loss term is NaN or Inf.

    Raised before the corresponding backward, so no parameter sees the bad value; the checkpoint
    callbacks do not save on an exception, so the last good checkpoint stays on disk.
    """
    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
    if bad:
        values = [float(terms[k].detach().float().mean()) for k in bad]
        raise FloatingPointError(
            f"{stage}: non-finite loss at step {module.global_step // 2} (epoch {module.current_epoch}, "
            f"optimizer step {module.global_step}): {', '.join(bad)} = {values}; lower the learning rate "
            "or lengthen the warmup (the last good checkpoint is kept)"
        )


# ------------------------------------------------------------------------------------ checkpoints
def load_checkpoint_file(path: str | Path, what: str) -> dict:
    """Load a Lightning checkpoint with ``weights_only=True``; one-line errors naming ``what`` and the file."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such checkpoint: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: say which
        raise ValueError(f"{what}: cannot load {path} as a weights-only checkpoint: {str(e).splitlines()[0]}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{what}: {path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def build_detector_from_config(cfg: Mapping[str, Any]) -> Detector:
    """``detector(backbone=partial body, neck=partial neck)`` from a (stored, resolved) config.

    The body's ``weights_path`` is dropped: the weights come from the checkpoint, and the file the
    stage-0 run started from need not exist where F is rebuilt.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(dict(cfg))
    for group in ("detector", "backbone", "neck"):
        if cfg.get(group) is None:
            raise ValueError(f"config group {group!r} is missing")
    backbone_cfg = OmegaConf.merge(cfg.backbone, {"weights_path": None}) if "weights_path" in cfg.backbone else cfg.backbone
    return instantiate(cfg.detector, backbone=instantiate(backbone_cfg), neck=instantiate(cfg.neck))


def _load_prefixed(module: nn.Module, state: Mapping[str, Tensor], prefix: str, source: str, what: str) -> None:
    """Strictly load ``state[prefix + k]`` into ``module``; one line naming the mismatching parts."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(sub))
    unexpected = sorted(set(sub) - set(own))
    shape = [k for k in own if k in sub and own[k].shape != sub[k].shape]  # module order: the first layer first
    if missing or unexpected or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(f"{k}: checkpoint {tuple(sub[k].shape)} vs configured {tuple(own[k].shape)} (+{len(shape) - 1} more)")
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise ValueError(f"{what}: {source} does not fit the configured model — {'; '.join(parts)}")
    module.load_state_dict(sub)


def detector_from_checkpoint(path: str | Path, what: str = "srf.target_ckpt") -> tuple[Detector, dict]:
    """Rebuild a DetectionModule checkpoint's detector from its ``pyramidlab_config`` and load its weights."""
    ckpt = load_checkpoint_file(path, what)
    stored = ckpt.get("pyramidlab_config")
    if not isinstance(stored, Mapping):
        raise ValueError(f"{what}: {path} has no pyramidlab_config (expected a pyramidlab-train checkpoint)")
    try:
        net = build_detector_from_config(stored)
    except Exception as e:  # noqa: BLE001 - hydra wraps errors over several lines
        msg = " ".join(str(e).split())
        raise ValueError(f"{what}: cannot rebuild the detector stored in {path}: {msg[:300]}") from e
    _load_prefixed(net, ckpt["state_dict"], "net.", str(path), what)
    return net, ckpt


def load_target_network(path: str | Path, what: str = "srf.target_ckpt") -> TargetNetwork:
    """F from a stage-0 DetectionModule checkpoint: its transform + body + FPN, frozen and in eval mode."""
    net, _ = detector_from_checkpoint(path, what)
    try:
        return TargetNetwork.from_detector(net)
    except ValueError as e:
        raise ValueError(f"{what}: {path}: {e}") from e


def check_gan_compatible(
    target: TargetNetwork, generator: Generator, discriminator: FeaturePatchDiscriminator, source: str
) -> None:
    """Stage-1 check, before any training: F, G and D agree on channels and F has top-down levels."""
    c = target.out_channels
    if generator.channels != c:
        raise ValueError(
            f"{source}: F's levels have {c} channels but the generator has {generator.channels} "
            "(neck.out_channels must equal the stage-0 FPN's)"
        )
    if discriminator.in_channels != c:
        raise ValueError(f"{source}: F's levels have {c} channels but the discriminator takes {discriminator.in_channels}")
    if target.num_top_down < 1:
        raise ValueError(f"{source}: F has no top-down levels")


# ------------------------------------------------------------------------------------ visualisation
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


def _write_figure(module: L.LightningModule, image: np.ndarray, tag: str) -> Path:
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


class AdversarialSteps:
    """The alternating updates shared by stages 1 and 2 (a mixin for LightningModules).

    Needs ``self.discriminator``, ``self.stage``, ``self.adv_weight``, ``self.gradient_clip`` and
    ``configure_optimizers`` returning ``[opt_d, opt_g], [sch_d, sch_g]`` (index 0: D, 1: G or M).
    Optimizers and schedulers come from ``self.optimizers()`` / ``self.lr_schedulers()``, backward
    goes through ``self.manual_backward`` (precision plugin), and the other network is toggled off
    (``requires_grad=False``) during each step.
    """

    def setup(self, stage: str) -> None:
        # Fail before training rather than at the first backward with DDP's multi-line error.
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
            raise ValueError(
                f"trainer.strategy: {self.stage} alternates D and G steps, so each step leaves the other "
                "network without gradients; use strategy=ddp_find_unused_parameters_true"
            )
        super().setup(stage)

    def _step(self, opt, loss: Tensor) -> None:
        """Backward through the precision plugin, optional manual clipping, one optimizer step."""
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
        opt.step()

    def discriminator_step(self, real: list[Tensor], fake: list[Tensor]) -> dict[str, Tensor]:
        """Maximise Eq. 1 over D: real = target levels, fake = generated levels (detached here)."""
        opt_d, _ = self.optimizers()
        self.toggle_optimizer(opt_d)
        try:
            d_real = [self.discriminator(r) for r in real]
            d_fake = [self.discriminator(f.detach()) for f in fake]
            d_loss = discriminator_loss(d_real, d_fake)
            check_finite(self.stage, self, {"d_loss": d_loss})
            self._step(opt_d, d_loss)
        finally:
            self.untoggle_optimizer(opt_d)
        acc_real, acc_fake = discriminator_accuracy(d_real, d_fake)
        return {"d_loss": d_loss.detach(), "d_acc_real": acc_real, "d_acc_fake": acc_fake}

    def generator_step(
        self,
        real: list[Tensor],
        fake: list[Tensor],
        extra_loss: Tensor | None = None,
        extra_terms: Mapping[str, Tensor] | None = None,
        srf_weight: float = 1.0,
    ) -> dict[str, Tensor]:
        """Minimise L_SRF (Eq. 2; Eq. 3 in stage 2, where ``extra_loss`` = L_DET and the total is L_INT).

        ``fake`` carries the graph into G (or M); D's parameters are toggled off, so the adversarial
        gradient flows through D into G without updating D.
        """
        _, opt_g = self.optimizers()
        self.toggle_optimizer(opt_g)
        try:
            srf = srf_loss(fake, real, self.discriminator, self.adv_weight)
            total = srf_weight * srf.total if extra_loss is None else extra_loss + srf_weight * srf.total
            check_finite(self.stage, self, {**(extra_terms or {}), "l1": srf.l1, "adv": srf.adv})
            self._step(opt_g, total)
        finally:
            self.untoggle_optimizer(opt_g)
        return {"loss": total.detach(), "l1": srf.l1.detach(), "adv": srf.adv.detach(), "srf": srf.total.detach()}

    def adversarial_step(
        self,
        real: list[Tensor],
        fake: list[Tensor],
        extra_loss: Tensor | None = None,
        extra_terms: Mapping[str, Tensor] | None = None,
        srf_weight: float = 1.0,
    ) -> dict[str, Tensor]:
        """One iteration: a D step, then a G / M step (D judges the fakes again after its update),
        then both schedulers step once (schedules count iterations)."""
        out = self.discriminator_step(real, fake)
        out.update(self.generator_step(real, fake, extra_loss, extra_terms, srf_weight))
        for sch in self.lr_schedulers():
            sch.step()
        return out


# --------------------------------------------------------------------------------------- stage 1
class SRFGANModule(AdversarialSteps, L.LightningModule):
    """Stage 1: G and D trained adversarially on the frozen target network's features (Sec. 4.1).

    For a batch of images: F's normalise/pad -> ``P^tr = F(I^tr)``, ``P^lr = F(↓s(I^tr))``; for every
    top-down level i, ``G(P_i^lr, size(P_i^tr))`` against ``P_i^tr``. One D step (Eq. 1) then one G step
    (Eq. 2: L1 + λ·adv), separate optimizers and schedulers, manual optimization (see the module
    docstring for what a step is).

    Args:
        target: the frozen F (:func:`load_target_network`).
        generator: G; ``channels`` must equal F's.
        discriminator: D; ``in_channels`` must equal F's.
        optimizer_g / optimizer_d: partial optimizer constructors (``optimizer(params)``); the paper
            uses SGD, momentum 0.9, wd 1e-4, lr 1e-3 for both. ``optimizer_d=None``: as ``optimizer_g``.
        scheduler: ``optim.scheduler``-style dict, applied to both, in iterations.
        adv_weight: λ of Eq. 2.
        degradation: ``bilinear | nearest | bicubic`` (Table 6). scale: s (0.5).
        gradient_clip: max grad-norm for both optimizers (None: off).
        source: the F checkpoint's path, named by compatibility errors.

    Logs ``train/{l1,adv,loss,d_loss,d_acc_real,d_acc_fake}`` and, on validation, ``val/l1`` (the
    checkpoint monitor, mode min) with ``val/l1_nearest`` / ``val/l1_bilinear`` as references. After
    every validation the Fig. 2 comparison of the finest top-down level goes to
    ``<trainer.default_root_dir>/srf_features/step*.png`` and to W&B / TensorBoard.
    """

    stage = STAGE1

    def __init__(
        self,
        target: TargetNetwork,
        generator: Generator,
        discriminator: FeaturePatchDiscriminator,
        optimizer_g: Callable[..., torch.optim.Optimizer],
        optimizer_d: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        adv_weight: float = ADV_WEIGHT,
        degradation: str = "bilinear",
        scale: float = 0.5,
        gradient_clip: float | None = None,
        source: str = "target network",
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        check_gan_compatible(target, generator, discriminator, source)
        if degradation not in DEGRADATIONS:
            raise ValueError(f"srf.degradation={degradation!r} is not known; choose one of {list(DEGRADATIONS)}")
        if not 0 < scale < 1:
            raise ValueError(f"srf.scale={scale} must be in (0, 1)")
        if adv_weight < 0:
            raise ValueError(f"srf.adv_weight={adv_weight} must be >= 0")
        _check_lr(optimizer_g, "optimizer_g")
        _check_lr(optimizer_d or optimizer_g, "optimizer_d")
        self.target = target
        self.generator = generator
        self.discriminator = discriminator
        self.optimizer_g_factory = optimizer_g
        self.optimizer_d_factory = optimizer_d or optimizer_g
        self.scheduler_cfg = dict(scheduler or {})
        build_lr_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), self.scheduler_cfg, 1, 1)
        self.adv_weight = float(adv_weight)
        self.degradation = degradation
        self.scale = float(scale)
        self.gradient_clip = gradient_clip
        self.source = source
        self.run_config: dict | None = None  # resolved config, stored in checkpoints
        self._figure: tuple | None = None

    @property
    def iteration(self) -> int:
        """Completed iterations (batches): two optimizer steps each."""
        return self.global_step // 2

    @torch.no_grad()
    def target_pairs(self, images: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], tuple]:
        """(P^tr, P^lr) of the top-down levels, finest first, and (image, padded) sizes of image 0.

        The ↓s is applied to the normalised, padded batch (linear, so the same as degrading the
        images first) so that I^lr stays top-left aligned with I^tr and every level of G(P^lr) is
        ``size(P^tr)`` or one pixel more (cropped by the generator).
        """
        x_tr = self.target.batch(images)
        x_lr = degrade(x_tr, self.scale, self.degradation)
        p_tr = self.target.top_down(self.target(x_tr))
        p_lr = self.target.top_down(self.target(x_lr))
        return list(p_tr.values()), list(p_lr.values()), (tuple(images[0].shape[-2:]), tuple(x_tr.shape[-2:]))

    def training_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> dict:
        images, _ = batch
        real, low, _ = self.target_pairs(images)
        fake = [self.generator(p, r.shape[-2:]) for p, r in zip(low, real)]
        out = self.adversarial_step(real, fake)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, batch_size=len(images))
        return {"loss": out["loss"], "terms": {k: out[k] for k in ("l1", "adv", "d_loss")}}

    def validation_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> None:
        images, _ = batch
        real, low, sizes = self.target_pairs(images)
        fake = [self.generator(p, r.shape[-2:]) for p, r in zip(low, real)]

        def interp(mode: str) -> list[Tensor]:
            kw = {} if mode == "nearest" else {"align_corners": False}
            return [F.interpolate(p, size=r.shape[-2:], mode=mode, **kw) for p, r in zip(low, real)]

        bs = len(images)
        self.log("val/l1", l1_loss(fake, real), batch_size=bs, sync_dist=True, prog_bar=True)
        self.log("val/l1_nearest", l1_loss(interp("nearest"), real), batch_size=bs, sync_dist=True)
        self.log("val/l1_bilinear", l1_loss(interp("bilinear"), real), batch_size=bs, sync_dist=True)
        if batch_idx == 0:
            valid = _valid_size(sizes[0], sizes[1], real[0].shape[-2:])
            self._figure = (low[0][0].float().cpu(), fake[0][0].float().cpu(), real[0][0].float().cpu(), valid)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self._figure is None:
            return
        if self.trainer.is_global_zero:
            lr, sr, tr, valid = self._figure
            title = f"{self.stage}, step {self.iteration}: finest top-down level (stride {self.target.strides[0]})"
            _write_figure(self, feature_comparison_figure(lr, sr, tr, valid, title), "val/srf_features")
        self._figure = None

    def configure_optimizers(self) -> tuple[list, list]:
        opt_d = self.optimizer_d_factory([p for p in self.discriminator.parameters() if p.requires_grad])
        opt_g = self.optimizer_g_factory([p for p in self.generator.parameters() if p.requires_grad])
        total, per_epoch = _iteration_budget(self.trainer)
        schedulers = [build_lr_scheduler(o, self.scheduler_cfg, total, per_epoch) for o in (opt_d, opt_g)]
        return [opt_d, opt_g], schedulers

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["pyramidlab_config"] = self.run_config
        checkpoint["srfgan"] = {
            "stage": 1,
            "channels": self.target.out_channels,
            "strides": list(self.target.strides),
            "generator": {
                "channels": self.generator.channels,
                "mid_channels": self.generator.mid_channels,
                "num_blocks": self.generator.num_blocks,
            },
            "discriminator": {"in_channels": self.discriminator.in_channels, "channels": list(self.discriminator.channels)},
            "target_source": str(self.source),
        }


# --------------------------------------------------------------------------------------- stage 2
def generator_of(net: nn.Module, what: str = "neck") -> Generator:
    """The SRF generator of a detector (``net.backbone.neck.generator``); one-line error if none."""
    neck = net.backbone.neck
    gen = neck.generator if isinstance(neck, SRFNeck) else None
    if gen is None:
        kind = f"{type(neck).__name__}" + (f"(upsample={type(neck.upsample).__name__})" if isinstance(neck, SRFNeck) else "")
        raise ValueError(f"{what}: the detector's neck {kind} has no SRF generator; use neck=srf_fpn|srf_pafpn with neck.upsample=srf")
    return gen


class SRFExtractorModule(AdversarialSteps, DetectionModule):
    """Stage 2: the multi-scale SRF extractor M (a detector with an SRF neck) against D (Sec. 4.2).

    Each batch: I^lr = ↓s(I^tr) per image, boxes / masks scaled to match; M's forward on I^lr gives
    L_DET and (through a forward hook, same pass) its pyramid; L_SRF (Eq. 3) compares it with F's
    features (``level_matching``); one D step, then one M step on L_INT = L_DET + srf_weight · L_SRF.

    Args:
        net: the extractor (its detector head is independent of the stage-3 target detector's).
        target: the frozen F.
        discriminator: D (stage 1's, reloaded with :func:`load_discriminator`).
        optimizer: partial optimizer for M (all trainable detector parameters, G included).
        optimizer_d: partial optimizer for D.
        scheduler: ``optim.scheduler``-style dict for both, in iterations.
        adv_weight: λ of Eq. 3. srf_weight: weight of L_SRF in L_INT (1 in the paper).
        degradation, scale: ↓s of the images (Table 6).
        level_matching: ``same`` — M's level i on I^lr vs nearest ↓s of F's level i on I^tr (Eq. 3,
            the paper's choice); ``different`` — Table 7's ablation, see
            :func:`srfgan.target.different_level_pairs` (M and F both see I^lr; G's map from level i
            vs F's level i-1, no resampling).
        test_degraded: evaluate ``test`` on ↓s images too (default: full resolution, how Table 4
            evaluates the extractor alone, A3). Validation is always on ↓s images: the AP of the task
            M is trained for.
        gradient_clip: max grad-norm for both optimizers.
        source: the F checkpoint's path, named by compatibility errors.

    Logs the DetectionModule metrics (``val/bbox/AP`` ... on ↓s val images) plus ``train/{loss, l1,
    adv, srf, d_loss, d_acc_real, d_acc_fake}``, the detection terms, and ``val/l1``.
    """

    stage = STAGE2

    def __init__(
        self,
        net: Detector,
        target: TargetNetwork,
        discriminator: FeaturePatchDiscriminator,
        optimizer: Callable[..., torch.optim.Optimizer],
        optimizer_d: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        adv_weight: float = ADV_WEIGHT,
        srf_weight: float = 1.0,
        degradation: str = "bilinear",
        scale: float = 0.5,
        level_matching: str = "same",
        eval_backend: str = "faster_coco_eval",
        category_ids: list[int] | None = None,
        test_degraded: bool = False,
        gradient_clip: float | None = None,
        source: str = "target network",
    ) -> None:
        super().__init__(net, optimizer, dict(scheduler or {}), eval_backend, category_ids)
        self.automatic_optimization = False
        if level_matching not in LEVEL_MATCHING:
            raise ValueError(f"srf.level_matching={level_matching!r} is not known; choose one of {list(LEVEL_MATCHING)}")
        if degradation not in DEGRADATIONS:
            raise ValueError(f"srf.degradation={degradation!r} is not known; choose one of {list(DEGRADATIONS)}")
        if not 0 < scale < 1:
            raise ValueError(f"srf.scale={scale} must be in (0, 1)")
        generator_of(net, "stage 2")
        neck: SRFNeck = net.backbone.neck
        c = target.out_channels
        if neck.out_channels != c or discriminator.in_channels != c:
            raise ValueError(
                f"{source}: F's levels have {c} channels but the extractor's neck has {neck.out_channels} "
                f"and the discriminator takes {discriminator.in_channels}"
            )
        strides = [int(s) for s in net.backbone.body.strides][: neck.num_top_down]
        compared = strides if level_matching == "same" else strides[:-1]
        if not compared:
            raise ValueError(
                f"srf.level_matching={level_matching}: the extractor has {len(strides)} top-down level(s); "
                "comparing G's maps with F's finer levels needs at least 2"
            )
        missing = [s for s in compared if s not in target.strides]
        if missing:
            raise ValueError(
                f"{source}: F's top-down levels have strides {target.strides} but the extractor "
                f"(level_matching={level_matching}) compares strides {compared}: {missing} unmatched"
            )
        _check_lr(optimizer_d or optimizer, "optimizer_d")
        self.target = target
        self.discriminator = discriminator
        self.optimizer_d_factory = optimizer_d or optimizer
        self.adv_weight = float(adv_weight)
        self.srf_weight = float(srf_weight)
        self.degradation = degradation
        self.scale = float(scale)
        self.level_matching = level_matching
        self.test_degraded = bool(test_degraded)
        self.gradient_clip = gradient_clip
        self.source = source
        self.strides = strides

    @property
    def generator(self) -> Generator:
        """M's SRF generator, ``net.backbone.neck.generator`` (registered once, under ``net``)."""
        return generator_of(self.net)

    @property
    def iteration(self) -> int:
        return self.global_step // 2

    def degrade_batch(self, batch: tuple[list[Tensor], list[dict]]) -> tuple[list[Tensor], list[dict]]:
        """↓s of every image, boxes / masks / size scaled to match (``orig_*`` kept for COCO eval)."""
        images, targets = batch
        lr = degrade_images(images, self.scale, self.degradation)
        return lr, scale_targets(targets, images, lr)

    @torch.no_grad()
    def _target_levels(self, images: Sequence[Tensor]) -> OrderedDict[int, Tensor]:
        return self.target.top_down(self.target(self.target.batch(images)))

    def srf_pairs(
        self, images: Sequence[Tensor], lr_images: Sequence[Tensor], pyramid: Mapping[str, Tensor], generated: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(P^sr, target) per compared level, finest first, from one M forward's captured outputs."""
        if self.level_matching == "same":
            keys = list(pyramid)[: len(self.strides)]
            ours = OrderedDict((s, pyramid[k]) for s, k in zip(self.strides, keys))
            sr, tr, _ = same_level_pairs(ours, self._target_levels(images), self.scale)
        else:
            # G runs coarsest first; its output from level i has level i-1's stride
            ours = OrderedDict(zip(self.strides[:-1], reversed(generated)))
            sr, tr, _ = different_level_pairs(ours, self._target_levels(lr_images))
        return sr, tr

    def _forward_captured(self, fn: Callable[[], Any]) -> tuple[Any, Mapping[str, Tensor], list[Tensor]]:
        """Run ``fn`` (a forward of ``net``) and return its result, M's pyramid and G's outputs of that pass."""
        with capture_outputs(self.net.backbone) as pyramids, capture_outputs(self.generator) as generated:
            out = fn()
        n = len(self.strides) - 1
        return out, pyramids[-1], list(generated[-n:]) if n > 0 else []

    def training_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> dict:
        images = batch[0]
        lr_images, lr_targets = self.degrade_batch(batch)
        losses, pyramid, generated = self._forward_captured(lambda: self.net(lr_images, lr_targets))
        fake, real = self.srf_pairs(images, lr_images, pyramid, generated)
        out = self.adversarial_step(real, fake, sum(losses.values()), losses, self.srf_weight)
        bs = len(images)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"}, batch_size=bs)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        terms = {k: v.detach() for k, v in losses.items()} | {k: out[k] for k in ("l1", "adv", "d_loss")}
        return {"loss": out["loss"], "terms": terms}

    def validation_step(self, batch, batch_idx: int) -> None:
        lr_batch = self.degrade_batch(batch)
        _, pyramid, generated = self._forward_captured(lambda: DetectionModule.validation_step(self, lr_batch, batch_idx))
        sr, tr = self.srf_pairs(batch[0], lr_batch[0], pyramid, generated)
        self.log("val/l1", l1_loss(sr, tr), batch_size=len(batch[0]), sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        super().test_step(self.degrade_batch(batch) if self.test_degraded else batch, batch_idx)

    def configure_optimizers(self) -> tuple[list, list]:  # type: ignore[override]
        opt_d = self.optimizer_d_factory([p for p in self.discriminator.parameters() if p.requires_grad])
        opt_m = self.optimizer_factory([p for p in self.net.parameters() if p.requires_grad])
        total, per_epoch = _iteration_budget(self.trainer)
        schedulers = [build_lr_scheduler(o, self.scheduler_cfg, total, per_epoch) for o in (opt_d, opt_m)]
        return [opt_d, opt_m], schedulers

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["srfgan"] = {
            "stage": 2,
            "channels": self.target.out_channels,
            "strides": list(self.strides),
            "level_matching": self.level_matching,
            "generator": {
                "channels": self.generator.channels,
                "mid_channels": self.generator.mid_channels,
                "num_blocks": self.generator.num_blocks,
            },
            "discriminator": {"in_channels": self.discriminator.in_channels, "channels": list(self.discriminator.channels)},
            "target_source": str(self.source),
        }


# ------------------------------------------------------------------------ weights between stages
def _generator_prefix(state: Mapping[str, Tensor]) -> str | None:
    """Where a checkpoint keeps G: ``generator.`` (stage 1) or the SRF neck's upsampler (stage 2/3)."""
    if any(k.startswith("generator.") for k in state):
        return "generator."
    for k in state:
        m = re.match(r"(net\..*\.neck\.(?:.*\.)?upsample\.)", k)
        if m and "head." in k[len(m.group(1)):]:
            return m.group(1)
    return None


def load_generator(net: nn.Module, path: str | Path, what: str = "srf.generator_ckpt") -> Generator:
    """``reuse=G``: the generator of a stage-1 (or stage-2/3) checkpoint into ``net``'s SRF neck."""
    gen = generator_of(net, what)
    ckpt = load_checkpoint_file(path, what)
    prefix = _generator_prefix(ckpt["state_dict"])
    if prefix is None:
        raise ValueError(f"{what}: {path} holds no SRF generator weights (expected a stage-1 or stage-2 checkpoint)")
    _load_prefixed(gen, ckpt["state_dict"], prefix, str(path), what)
    return gen


def load_discriminator(discriminator: nn.Module, path: str | Path, what: str = "srf.discriminator_ckpt") -> nn.Module:
    """D of a stage-1 (or stage-2) checkpoint, re-used by stage 2 (Sec. 5.1)."""
    ckpt = load_checkpoint_file(path, what)
    if not any(k.startswith("discriminator.") for k in ckpt["state_dict"]):
        raise ValueError(f"{what}: {path} holds no discriminator weights (expected a stage-1 or stage-2 checkpoint)")
    _load_prefixed(discriminator, ckpt["state_dict"], "discriminator.", str(path), what)
    return discriminator


# index of a neck ModuleList entry -> the top-down level it belongs to
_NECK_LEVEL_LISTS = {"lateral_convs": 0, "output_convs": 0, "downsample_convs": 0, "pafpn_convs": 1}


def load_extractor(net: Detector, path: str | Path, what: str = "srf.extractor_ckpt") -> list[str]:
    """``reuse=M``: body + SRF neck (G included) of a stage-2 extractor into ``net`` (Sec. 4.3, Table 1/3).

    The detector heads are not reused (the target detector's head may differ: Table 3). Neck
    modules that belong to a pyramid level (lateral / output convs, PAFPN's convs) are matched by
    stride, so an extractor on P2-P5 (Mask R-CNN) initialises a RetinaNet on P3-P7 at P3-P5. The body
    and the generator must load completely; returns the ``net.backbone`` keys left at their
    initialisation (e.g. RetinaNet's P6/P7 convs when the extractor had none).
    """
    generator_of(net, what)
    ckpt = load_checkpoint_file(path, what)
    meta = ckpt.get("srfgan") or {}
    if meta.get("stage") != 2:
        raise ValueError(f"{what}: {path} is not a stage-2 (SRF extractor) checkpoint")
    prefix = "net.model.backbone."
    src = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    src_strides = [int(s) for s in meta.get("strides", [])]
    dst_strides = [int(s) for s in net.backbone.body.strides]
    own = net.backbone.state_dict()
    pattern = re.compile(r"^(neck\..*?)(" + "|".join(_NECK_LEVEL_LISTS) + r")\.(\d+)\.(.*)$")

    def source_key(k: str) -> str | None:
        m = pattern.match(k)
        if not m:
            return k
        offset = _NECK_LEVEL_LISTS[m.group(2)]
        i = int(m.group(3)) + offset
        if i >= len(dst_strides) or dst_strides[i] not in src_strides:
            return None
        return f"{m.group(1)}{m.group(2)}.{src_strides.index(dst_strides[i]) - offset}.{m.group(4)}"

    new_state, left = {}, []
    for k, v in own.items():
        sk = source_key(k)
        if sk is not None and sk in src and src[sk].shape == v.shape:
            new_state[k] = src[sk]
        else:
            left.append(k)
    must = [k for k in left if k.startswith("body.") or ".upsample." in k]
    if must:
        detail = f"{must[0]}" + (f" (checkpoint {tuple(src[must[0]].shape)} vs configured {tuple(own[must[0]].shape)})" if must[0] in src else " (absent)")
        raise ValueError(f"{what}: {path} does not fit the configured body / generator — {detail}, +{len(must) - 1} more")
    net.backbone.load_state_dict(new_state, strict=False)
    return left


def freeze_generator(net: nn.Module) -> Generator:
    """Table 4's FR: G keeps its weights (requires_grad False) and BatchNorm statistics (eval) in training."""
    gen = generator_of(net, "freeze_generator")
    for p in gen.parameters():
        p.requires_grad_(False)
    gen.frozen = True
    gen.eval()
    return gen


def prepare_target_net(
    net: Detector, reuse: str = "G", checkpoint: str | Path | None = None, freeze: bool = False
) -> list[str]:
    """Stage 3: initialise the target detector's SRF neck from stage 1 (``G``) or stage 2 (``M``).

    ``reuse='none'`` keeps the initialisation (the SRF generator trained with the detector only).
    Returns the backbone keys left at initialisation for ``M`` (empty otherwise).
    """
    if reuse not in REUSE:
        raise ValueError(f"srf.reuse={reuse!r} is not known; choose one of {list(REUSE)}")
    left: list[str] = []
    if reuse != "none" and checkpoint in (None, ""):
        raise ValueError(f"srf.reuse={reuse} needs a checkpoint (stage {1 if reuse == 'G' else 2})")
    if reuse == "G":
        load_generator(net, checkpoint)  # type: ignore[arg-type]
    elif reuse == "M":
        left = load_extractor(net, checkpoint)  # type: ignore[arg-type]
    if freeze:
        freeze_generator(net)
    return left


# -------------------------------------------------------------------------------- config builders
def _resolved(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def _srf_node(cfg: Any) -> Any:
    """The SRF-GAN settings: ``cfg.srf`` (pyramidlab-srfgan: ``- srfgan@srf: default``) or ``cfg.srfgan``."""
    for key in ("srf", "srfgan"):
        node = cfg.get(key)
        if node is not None:
            return node
    raise ValueError("config node 'srf' is missing; add `- srfgan@srf: default` to the defaults (or +srfgan@srf=default)")


def _neck_channels(cfg: Any) -> int:
    neck = cfg.neck
    if neck.get("generator") is None or neck.get("base") is None:
        raise ValueError("neck: the SRF-GAN stages need an SRF neck config (neck=srf_fpn | srf_pafpn) for the generator")
    return int(neck.get("out_channels") or neck.base.out_channels)


def build_stage1_module(cfg: Any, target_ckpt: str | Path) -> SRFGANModule:
    """Stage 1 from a composed config: F from ``target_ckpt``, G from ``cfg.neck.generator`` (the same
    generator config as the stage-3 neck, so its weights fit), D and the optimisation from ``cfg.srf``
    (``conf/srfgan/default.yaml``).
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    srf = _srf_node(cfg)
    channels = _neck_channels(cfg)
    target = load_target_network(target_ckpt)
    generator = instantiate(cfg.neck.generator)(channels=channels)
    discriminator = instantiate(srf.discriminator)(in_channels=channels)
    module = SRFGANModule(
        target, generator, discriminator,
        optimizer_g=instantiate(srf.stage1.optimizer_g), optimizer_d=instantiate(srf.stage1.optimizer_d),
        scheduler=OmegaConf.to_container(srf.stage1.scheduler, resolve=True),
        adv_weight=float(srf.adv_weight), degradation=str(srf.degradation), scale=float(srf.scale),
        gradient_clip=srf.get("gradient_clip"), source=str(target_ckpt),
    )
    module.run_config = _resolved(cfg)
    return module


def build_stage2_module(cfg: Any, target_ckpt: str | Path, stage1_ckpt: str | Path | None) -> SRFExtractorModule:
    """Stage 2 from a composed config: the extractor from ``cfg.detector/backbone/neck`` (an SRF neck),
    its G and D from ``stage1_ckpt`` (None: from scratch, which the paper reports diverging), F from
    ``target_ckpt``, M's optimizer from ``cfg.optim``, D's and the loss settings from ``cfg.srf``.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    srf = _srf_node(cfg)
    target = load_target_network(target_ckpt)
    net = build_detector_from_config(cfg)
    discriminator = instantiate(srf.discriminator)(in_channels=int(net.backbone.out_channels))
    if stage1_ckpt not in (None, ""):
        load_generator(net, stage1_ckpt, "srf.stage1_ckpt")
        load_discriminator(discriminator, stage1_ckpt, "srf.stage1_ckpt")
    module = SRFExtractorModule(
        net, target, discriminator,
        optimizer=instantiate(cfg.optim.optimizer), optimizer_d=instantiate(srf.stage2.optimizer_d),
        scheduler=OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
        adv_weight=float(srf.adv_weight), srf_weight=float(srf.stage2.get("srf_weight", 1.0)),
        degradation=str(srf.degradation), scale=float(srf.scale), level_matching=str(srf.level_matching),
        eval_backend=str(cfg.eval.backend) if cfg.get("eval") else "faster_coco_eval",
        gradient_clip=srf.get("gradient_clip"), source=str(target_ckpt),
    )
    module.run_config = _resolved(cfg)
    return module
