"""Shared fixtures: composed configs pointing at tiny generated datasets in tmp dirs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Hermetic data: the embedded dataset's one place per machine is a temporary folder for the
# session (command-line runs in subprocesses inherit it), never the user's cache. The
# shapes_root fixture generates into it.
_DATA = Path(tempfile.mkdtemp(prefix="pyramidlab-test-data-"))
os.environ["PYRAMIDLAB_DATA"] = str(_DATA)
atexit.register(shutil.rmtree, _DATA, True)
# the same thread count as the command-line runs the tests compare in-process runs with (bit-identical
# resume tests): float sums depend on it, even with two xdist workers sharing the 2 cores
torch.set_num_threads(2)
# Rich wraps console lines at 80 columns when stdout is no terminal; tmp paths under xdist
# (.../popen-gw0/...) are long enough to wrap the lines tests read: a wide console, here and in
# the command-line runs that inherit it
os.environ["COLUMNS"] = "400"

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Small everything: a 4-image-per-batch CPU run takes seconds.
TINY = [
    "backbone=resnet18",
    "backbone.frozen_stages=0",
    "backbone.norm_eval=false",
    "trainer.enable_model_summary=false",
    "data.num_workers=0",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.min_size=96",
    "data.max_size=128",
    "logger=csv",
]


def small_neck(neck: str) -> list[str]:
    # every neck takes its pyramid width as neck.out_channels (SMSL's / SRF's base follows it)
    return [f"neck={neck}", "neck.out_channels=32"]


# The shapes_root fixture's generation parameters: a run on it must ask for the same dataset,
# or prepare_data regenerates the default 800 + 200 images into the fixture's folder.
SHAPES_GEN = [
    "data.generate.num_train=16", "data.generate.num_val=8", "data.generate.num_test=8", "data.generate.image_size=128"
]


def compose_cfg(config_name: str, overrides: list[str], tmp: Path, data_root: Path | None = None):
    """Compose the real config the way the CLI does, with paths under ``tmp``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        over = [f"paths.root_dir={tmp}", f"paths.output_dir={tmp / 'out'}", f"paths.data_dir={tmp / 'data'}"]
        if data_root is not None:
            over.append(f"data.root={data_root}")
            if not any(o.startswith("data=") for o in overrides):
                over += SHAPES_GEN
        cfg = compose(config_name=config_name, overrides=over + list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    (tmp / "out").mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture(scope="session")
def shapes_root() -> Path:
    """A tiny embedded dataset: 16 train / 8 val / 8 test images at 128 px, at ``$PYRAMIDLAB_DATA/shapes``."""
    from detection.data.shapes import ensure_shapes

    root = Path(os.environ["PYRAMIDLAB_DATA"]) / "shapes"
    ensure_shapes(root, num_train=16, num_val=8, num_test=8, image_size=128, seed=0)
    return root


@pytest.fixture(autouse=True)
def _drop_leftover_log_files():
    """An in-process ``hydra.main`` run (``train.main()``) leaves Hydra's ``train.log`` FileHandler on the
    root logger: later tests in the worker would log into that test's run folder, and fail once pytest
    removes it (``tmp_path_retention_policy = "failed"``). Each test ends with the handlers it began with."""
    import logging

    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for h in [h for h in root.handlers if h not in before and isinstance(h, logging.FileHandler)]:
        root.removeHandler(h)
        h.close()
