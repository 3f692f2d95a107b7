"""SRF-GAN: Super-Resolved Feature GAN for Multi-Scale Representation (Lee & Bae) as plain-torch modules.

Model code only (no Lightning, no Hydra): the generator G, the feature patch discriminator D, the
losses of Eq. 1-3, the image degradation, the SRF neck and the frozen target network F. The
training stages live in ``lightning_modules/srfgan_module.py``.
"""

from srfgan.degradation import DEGRADATIONS, degrade, degrade_images, downsample_nearest, scale_targets
from srfgan.discriminator import FeaturePatchDiscriminator, frozen_running_stats
from srfgan.generator import (
    GENERATOR_KINDS,
    LIGHT_GENERATOR,
    BaseGenerator,
    Generator,
    ResidualBlock,
    RRDBGenerator,
    build_generator,
    fit_to_size,
)
from srfgan.losses import (
    ADV_WEIGHT,
    SRFLoss,
    adversarial_loss,
    discriminator_accuracy,
    discriminator_loss,
    l1_loss,
    srf_loss,
)
from srfgan.neck import UPSAMPLERS, SRFNeck, srf_neck, top_down_channels
from srfgan.target import (
    LEVEL_MATCHING,
    TargetNetwork,
    capture_outputs,
    crop_to_common,
    level_pairs,
    pair_levels,
)
from srfgan.transfer import (
    freeze_generator,
    generator_of,
    load_discriminator_state,
    load_generator_state,
    matched_levels,
    transfer_extractor,
)

__all__ = [
    "ADV_WEIGHT",
    "DEGRADATIONS",
    "LEVEL_MATCHING",
    "LIGHT_GENERATOR",
    "UPSAMPLERS",
    "BaseGenerator",
    "FeaturePatchDiscriminator",
    "GENERATOR_KINDS",
    "RRDBGenerator",
    "build_generator",
    "Generator",
    "ResidualBlock",
    "SRFLoss",
    "SRFNeck",
    "TargetNetwork",
    "adversarial_loss",
    "capture_outputs",
    "crop_to_common",
    "degrade",
    "degrade_images",
    "discriminator_accuracy",
    "discriminator_loss",
    "downsample_nearest",
    "fit_to_size",
    "freeze_generator",
    "generator_of",
    "load_discriminator_state",
    "load_generator_state",
    "matched_levels",
    "transfer_extractor",
    "frozen_running_stats",
    "l1_loss",
    "level_pairs",
    "pair_levels",
    "scale_targets",
    "srf_loss",
    "srf_neck",
    "top_down_channels",
]
