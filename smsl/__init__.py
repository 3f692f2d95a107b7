"""SMSL: Selective Multi-Scale Learning for Object Detection (Chen, Lu, Shen) as a plain-torch neck."""

from smsl.smsl import (
    SMSL,
    ChannelRescaling,
    GlobalFeature,
    NonLocal2d,
    SelectiveCombination,
    SMSLNeck,
    build_smsl_neck,
    smsl_after,
)

__all__ = [
    "SMSL",
    "SMSLNeck",
    "ChannelRescaling",
    "SelectiveCombination",
    "GlobalFeature",
    "NonLocal2d",
    "build_smsl_neck",
    "smsl_after",
]
