"""pyramidlab-summary [train overrides]: parameter counts as one JSON object; needs no dataset."""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from detection.detectors import parameter_summary
from lightning_modules.checkpoints import build_net
from lightning_modules.config_checks import resolve_num_classes
from lightning_modules.paths import CONF_DIR


def summarize(cfg: DictConfig) -> dict:
    if cfg.get("data") is not None:
        resolve_num_classes(cfg.data)  # data.num_classes: null -> the annotation file's (or COCO's 80)
    net = build_net(cfg, backbone_weights=False)  # counts need no weights (nor the embedded pretraining)
    s = parameter_summary(net)
    # The papers count trainable parameters (frozen stem + layer1): give M with 2 decimals too.
    s["params_trainable_M"] = round(s["params_trainable"] / 1e6, 2)
    s["params_total_M"] = round(s["params_total"] / 1e6, 2)
    s["detector"], s["neck"]["type"] = net.name, type(net.backbone.neck).__name__
    s["backbone"]["arch"] = getattr(net.backbone.body, "arch", None)
    s["num_classes"] = net.num_classes
    return s


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="summary")
def main(cfg: DictConfig) -> None:
    logging.getLogger("pyramidlab").setLevel(logging.WARNING)
    print(json.dumps(summarize(cfg), indent=2))


if __name__ == "__main__":
    main()
