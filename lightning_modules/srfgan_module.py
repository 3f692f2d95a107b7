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
``strategy="ddp_find_unused_parameters_true"`` (else DDP raises on the unused half). Mixed precision: use ``bf16-mixed``
(``16-mixed`` would make manual clipping see scaled gradients).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from detection.detectors import Detector
from lightning_modules.compat import ddp_finds_unused_parameters
from lightning_modules.detection_eval import DetectionEvaluation
from lightning_modules.optim import build_scheduler, check_finite, check_scheduler, iteration_budget
from srfgan import (
    ADV_WEIGHT,
    LEVEL_MATCHING,
    BaseGenerator,
    FeaturePatchDiscriminator,
    TargetNetwork,
    capture_outputs,
    degrade,
    degrade_images,
    discriminator_accuracy,
    discriminator_loss,
    generator_of,
    l1_loss,
    level_pairs,
    pair_levels,
    scale_targets,
    srf_loss,
)
from srfgan.degradation import DEGRADATIONS

__all__ = [
    "STAGE1",
    "STAGE2",
    "SRFGANModule",
    "SRFExtractorModule",
    "AdversarialSteps",
    "gan_optimizer_steps",
    "check_gan_compatible",
]

STAGE1 = "stage 1 (SRF-GAN)"
STAGE2 = "stage 2 (SRF extractor)"
# Lightning optimizer steps per GAN iteration: one D step + one G (or M) step (Lightning #17958)
STEPS_PER_ITERATION = 2


def gan_optimizer_steps(iterations: int) -> int:
    """Lightning optimizer steps for ``iterations`` GAN iterations (D step + G step each)."""
    return STEPS_PER_ITERATION * int(iterations)


def _check_lr(factory: Callable, key: str) -> None:
    lr = getattr(factory, "keywords", {}).get("lr")
    if lr is not None and not lr > 0:
        raise ValueError(f"{key}.lr={lr} must be a positive number")


def check_gan_compatible(
    target: TargetNetwork, generator: BaseGenerator, discriminator: FeaturePatchDiscriminator, source: str
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


class AdversarialSteps:
    """The alternating updates shared by stages 1 and 2 (a mixin for LightningModules).

    Needs ``self.discriminator``, ``self.stage``, ``self.adv_weight``, ``self.gradient_clip`` and
    ``configure_optimizers`` returning ``[opt_d, opt_g], [sch_d, sch_g]`` (index 0: D, 1: G or M; see
    :meth:`adversarial_optimizers`).
    Optimizers and schedulers come from ``self.optimizers()`` / ``self.lr_schedulers()``, backward
    goes through ``self.manual_backward`` (precision plugin), and the other network is toggled off
    (``requires_grad=False``) during each step.
    """

    def setup(self, stage: str) -> None:
        # Fail before training rather than at the first backward with DDP's multi-line error.
        if ddp_finds_unused_parameters(self.trainer.strategy) is False:
            raise ValueError(
                f"trainer.strategy: {self.stage} alternates D and G steps, so each step leaves the other "
                "network without gradients; use strategy=ddp_find_unused_parameters_true"
            )
        super().setup(stage)

    def srfgan_meta(self, stage: int, strides: Sequence[int], **extra: Any) -> dict[str, Any]:
        """What a later stage checks before reusing this stage's G / D / M (the ``srfgan`` checkpoint entry)."""
        g = self.generator
        return {
            "stage": stage,
            "channels": self.target.out_channels,
            "strides": list(strides),
            **extra,
            "generator": {"kind": g.kind, "channels": g.channels, "mid_channels": g.mid_channels,
                          "num_blocks": g.num_blocks},
            "discriminator": {"in_channels": self.discriminator.in_channels, "channels": list(self.discriminator.channels)},
            "target_source": str(self.source),
        }

    def adversarial_optimizers(self, factory: Callable[..., torch.optim.Optimizer], other: torch.nn.Module) -> tuple[list, list]:
        """``[opt_d, opt_other], [sch_d, sch_other]``: D's and the other network's trainable parameters,
        each with the stage's schedule stepped once per iteration (``configure_optimizers``)."""
        opts = [self.optimizer_d_factory([p for p in self.discriminator.parameters() if p.requires_grad]),
                factory([p for p in other.parameters() if p.requires_grad])]
        budget = iteration_budget(self.trainer, STEPS_PER_ITERATION)
        return opts, [build_scheduler(o, self.scheduler_cfg, *budget) for o in opts]

    def _where(self) -> str:
        """The step a divergence is reported at: the iteration, the epoch and Lightning's optimizer step."""
        return (f"step {self.global_step // STEPS_PER_ITERATION} (epoch {self.current_epoch}, "
                f"optimizer step {self.global_step})")

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
            check_finite(self._where(), {"d_loss": d_loss}, self.stage)
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
            check_finite(self._where(), {**(extra_terms or {}), "l1": srf.l1, "adv": srf.adv}, self.stage)
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
    checkpoint monitor, mode min) with ``val/l1_nearest`` / ``val/l1_bilinear`` as references.
    The Fig. 2 image is a callback (:class:`lightning_modules.srfgan_figure.SRFFeatureFigure`).
    """

    stage = STAGE1

    def __init__(
        self,
        target: TargetNetwork,
        generator: BaseGenerator,
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
        self.scheduler_cfg = check_scheduler(scheduler, "srf.stage1.scheduler")
        self.adv_weight = float(adv_weight)
        self.degradation = degradation
        self.scale = float(scale)
        self.gradient_clip = gradient_clip
        self.source = source
        self.run_config: dict | None = None  # resolved config, stored in checkpoints

    @property
    def iteration(self) -> int:
        """Completed iterations (batches): two optimizer steps each."""
        return self.global_step // STEPS_PER_ITERATION

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
        real, low, _ = self.target_pairs(images)
        fake = [self.generator(p, r.shape[-2:]) for p, r in zip(low, real)]

        def interp(mode: str) -> list[Tensor]:
            kw = {} if mode == "nearest" else {"align_corners": False}
            return [F.interpolate(p, size=r.shape[-2:], mode=mode, **kw) for p, r in zip(low, real)]

        bs = len(images)
        self.log("val/l1", l1_loss(fake, real), batch_size=bs, sync_dist=True, prog_bar=True)
        self.log("val/l1_nearest", l1_loss(interp("nearest"), real), batch_size=bs, sync_dist=True)
        self.log("val/l1_bilinear", l1_loss(interp("bilinear"), real), batch_size=bs, sync_dist=True)

    def configure_optimizers(self) -> tuple[list, list]:
        return self.adversarial_optimizers(self.optimizer_g_factory, self.generator)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["pyramidlab_config"] = self.run_config
        checkpoint["srfgan"] = self.srfgan_meta(1, self.target.strides)


# --------------------------------------------------------------------------------------- stage 2
class SRFExtractorModule(AdversarialSteps, L.LightningModule):
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
            the paper's choice); ``different`` — Table 7's ablation: M and F see the same image
            (I^lr) and M's level i is compared with ↓s of F's level i-1 — the same M tensors at the
            same resolution, only the target's semantic level differs (:func:`srfgan.target.level_pairs`).
            Levels only one of M and F has are left out (Table 3: a Mask R-CNN extractor on P2-P5
            against a RetinaNet F on P3-P5); ``self.pairs`` lists the compared (M, F) strides.
        test_degraded: evaluate ``test`` on ↓s images too (default: full resolution, how Table 4
            evaluates the extractor alone, A3). Validation is always on ↓s images: the AP of the task
            M is trained for.
        gradient_clip: max grad-norm for both optimizers.
        source: the F checkpoint's path, named by compatibility errors.

    Logs the detection metrics (``val/bbox/AP`` ... on ↓s val images) plus ``train/{loss, l1,
    adv, srf, d_loss, d_acc_real, d_acc_fake}``, the detection terms, and ``val/l1``. Evaluation is
    ``self.evaluation``, the :class:`~lightning_modules.detection_eval.DetectionEvaluation` a
    :class:`~lightning_modules.detection_module.DetectionModule` holds too.
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
        eval_backend: str = "hotcoco",
        category_ids: list[int] | None = None,
        test_degraded: bool = False,
        gradient_clip: float | None = None,
        source: str = "target network",
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_cfg = check_scheduler(scheduler, "srf.stage2.scheduler")
        self.evaluation = DetectionEvaluation(net.with_masks, net.num_classes, eval_backend, category_ids)
        self.run_config: dict | None = None  # resolved config, stored in checkpoints
        self.automatic_optimization = False
        if level_matching not in LEVEL_MATCHING:
            raise ValueError(f"srf.level_matching={level_matching!r} is not known; choose one of {list(LEVEL_MATCHING)}")
        if degradation not in DEGRADATIONS:
            raise ValueError(f"srf.degradation={degradation!r} is not known; choose one of {list(DEGRADATIONS)}")
        if not 0 < scale < 1:
            raise ValueError(f"srf.scale={scale} must be in (0, 1)")
        generator_of(net, "stage 2")
        neck = net.backbone.neck
        c = target.out_channels
        if neck.out_channels != c or discriminator.in_channels != c:
            raise ValueError(
                f"{source}: F's levels have {c} channels but the extractor's neck has {neck.out_channels} "
                f"and the discriminator takes {discriminator.in_channels}"
            )
        strides = [int(s) for s in net.backbone.body.strides]
        pairs = pair_levels(strides, target.strides, level_matching)
        if not pairs:
            raise ValueError(
                f"srf.level_matching={level_matching}: the extractor's levels (strides {strides}) and F's "
                f"(strides {list(target.strides)}) have no level pair to compare"
            )
        self.pairs = pairs
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

    def setup(self, stage: str) -> None:
        super().setup(stage)  # AdversarialSteps: the DDP check
        self.evaluation.setup(getattr(self.trainer, "datamodule", None))

    @property
    def generator(self) -> BaseGenerator:
        """M's SRF generator, ``net.backbone.neck.generator`` (registered once, under ``net``)."""
        return generator_of(self.net)

    @property
    def iteration(self) -> int:
        return self.global_step // STEPS_PER_ITERATION

    def degrade_batch(self, batch: tuple[list[Tensor], list[dict]]) -> tuple[list[Tensor], list[dict]]:
        """↓s of every image, boxes / masks / size scaled to match (``orig_*`` kept for COCO eval)."""
        images, targets = batch
        lr = degrade_images(images, self.scale, self.degradation)
        return lr, scale_targets(targets, images, lr)

    @torch.no_grad()
    def _target_levels(self, images: Sequence[Tensor]) -> OrderedDict[int, Tensor]:
        return self.target.top_down(self.target(self.target.batch(images)))

    def srf_pairs(
        self, images: Sequence[Tensor], lr_images: Sequence[Tensor], pyramid: Mapping[str, Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(P^sr, target) per compared level, finest first, from M's pyramid of one forward on I^lr.

        F sees I^tr for ``same`` and I^lr for ``different`` (see ``level_matching``).
        """
        ours = OrderedDict((s, pyramid[k]) for s, k in zip(self.strides, pyramid))
        target = self._target_levels(images if self.level_matching == "same" else lr_images)
        return level_pairs(ours, target, self.pairs, self.scale)

    def _forward_captured(self, fn: Callable[[], Any]) -> tuple[Any, Mapping[str, Tensor]]:
        """Run ``fn`` (a forward of ``net``) and return its result and M's pyramid of that pass."""
        with capture_outputs(self.net.backbone) as pyramids:
            out = fn()
        return out, pyramids[-1]

    def training_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> dict:
        images = batch[0]
        lr_images, lr_targets = self.degrade_batch(batch)
        losses, pyramid = self._forward_captured(lambda: self.net(lr_images, lr_targets))
        fake, real = self.srf_pairs(images, lr_images, pyramid)
        out = self.adversarial_step(real, fake, sum(losses.values()), losses, self.srf_weight)
        bs = len(images)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"}, batch_size=bs)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        terms = {k: v.detach() for k, v in losses.items()} | {k: out[k] for k in ("l1", "adv", "d_loss")}
        return {"loss": out["loss"], "terms": terms}

    def validation_step(self, batch, batch_idx: int) -> None:
        lr_batch = self.degrade_batch(batch)
        _, pyramid = self._forward_captured(lambda: self.evaluation.validation_step(self.net, lr_batch))
        sr, tr = self.srf_pairs(batch[0], lr_batch[0], pyramid)
        self.log("val/l1", l1_loss(sr, tr), batch_size=len(batch[0]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.evaluation.on_validation_epoch_end(self)

    def test_step(self, batch, batch_idx: int) -> None:
        self.evaluation.test_step(self.net, self.degrade_batch(batch) if self.test_degraded else batch)

    def on_test_epoch_start(self) -> None:
        self.evaluation.on_test_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.evaluation.on_test_epoch_end(self)

    def configure_optimizers(self) -> tuple[list, list]:
        return self.adversarial_optimizers(self.optimizer_factory, self.net)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["pyramidlab_config"] = self.run_config
        self.evaluation.on_save_checkpoint(checkpoint)  # the category ids, as every detector's
        checkpoint["srfgan"] = self.srfgan_meta(
            2, self.strides, level_matching=self.level_matching, pairs=[list(p) for p in self.pairs])


