"""One validation step between composing a config and running it (:func:`prepare_config`).

- Types: every value of a node that Hydra will instantiate (``_target_``) is checked against
  the annotation of the matching constructor parameter, so ``trainer.max_epochs=abc`` or
  ``optim.optimizer.lr=abc`` is one line naming the key and the expected type, before any
  model or data is built (not a ``TypeError`` deep inside Lightning or torch). Written here
  rather than as structured configs: the annotations already exist on the targets, and a
  schema per group would repeat them.
- Paths: ``data.root`` becomes absolute (against the directory the command was started in),
  so the config stored in checkpoints still points at the data when evaluated elsewhere.
- ``data.num_classes: null``: filled in from the annotation file before the detector reads it.
"""

from __future__ import annotations

import collections.abc
import inspect
import logging
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger("pyramidlab")

__all__ = ["check_types", "prepare_config"]


def _verdict(value: Any, tp: Any) -> bool | None:
    """Whether ``value`` fits annotation ``tp``: True, False, or None when it cannot tell."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_verdict(value, a) for a in typing.get_args(tp)]
        return True if True in verdicts else (False if all(v is False for v in verdicts) else None)
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    seq = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)
    if tp in seq or origin in seq:
        return isinstance(value, list | tuple | ListConfig)
    maps = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
    if tp in maps or origin in maps:
        return isinstance(value, dict | DictConfig)
    if inspect.isclass(tp) and tp.__module__ == "torch" and tp.__name__ == "Tensor":
        return False  # a config value is never a tensor (torch.optim's lr: float | Tensor)
    return None


def _describe(tp: Any) -> str:
    """``int or null``, ``float``, ``one of 'a', 'b'``: the annotation in config terms."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if not (inspect.isclass(a) and a.__name__ == "Tensor")]
        return " or ".join(dict.fromkeys(parts))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if inspect.isclass(tp):
        return {"list": "a list", "tuple": "a list", "dict": "a mapping"}.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _hints(target: str) -> dict[str, Any]:
    from hydra.utils import get_object

    try:
        obj = get_object(target)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations or target: nothing to check against
        return {}
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return {}
    return {k: hints[k] for k in params if k in hints}


def check_types(cfg: DictConfig) -> None:
    """Raise ``TypeError`` for the first value that cannot match its constructor's annotation."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, DictConfig):
            target = node.get("_target_") if "_target_" in node else None
            hints = _hints(str(target)) if isinstance(target, str) else {}
            for key in node.keys():
                key = str(key)
                full = f"{path}.{key}" if path else key
                if OmegaConf.is_missing(node, key):
                    continue
                try:
                    value = node[key]
                except Exception:  # noqa: BLE001 - an interpolation that resolves only at run time
                    continue
                if value is None and OmegaConf.is_interpolation(node, key):
                    continue  # an interpolation with nothing behind it outside a job (hydra:runtime.*)
                if key in hints and not isinstance(value, DictConfig | ListConfig):
                    if _verdict(value, hints[key]) is False:
                        raise TypeError(f"{full}={value}: expected {_describe(hints[key])} "
                                        f"(the {key} argument of {target})")
                walk(value, full)
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                try:
                    walk(node[i], f"{path}[{i}]")
                except TypeError:
                    raise
                except Exception:  # noqa: BLE001 - unresolvable item: nothing to check
                    continue

    for top in cfg.keys():
        if str(top) != "hydra":
            walk(cfg[top] if not OmegaConf.is_missing(cfg, top) else None, str(top))


def prepare_config(cfg: DictConfig) -> DictConfig:
    """Type checks, absolute data paths, ``data.num_classes`` from the annotation file; edits ``cfg`` in place."""
    data = cfg.get("data") if "data" in cfg else None
    if isinstance(data, DictConfig):
        if "root" in data and not OmegaConf.is_missing(data, "root") and data.root is not None:
            root = Path(str(data.root)).expanduser()
            if not root.is_absolute():
                data.root = str(root.absolute())
        resolve_num_classes(data)  # before the type checks: detector.num_classes follows it
    check_types(cfg)
    # backbone.weights_path=embedded: the cached crop-pretrained body (pretraining first if missing)
    from lightning_modules.pretrain import resolve_backbone_weights

    resolve_backbone_weights(cfg)
    return cfg


# COCO's categories: what `data=coco` builds when no annotation file is there to read (pyramidlab-summary,
# the bench: the papers' 80-class layouts need no data)
COCO_NUM_CLASSES = 80


def resolve_num_classes(data: DictConfig) -> None:
    """``data.num_classes: null`` -> the number of categories of the annotation file (in place).

    The embedded data has its 8; COCO-format data reads its file, and ``data=coco`` without any
    annotation file (nothing to train or evaluate on: the summary, the bench) builds COCO's 80.
    """
    if "num_classes" not in data or data.get("num_classes", 0) is not None:
        return
    if data.get("name") == "shapes":
        from detection.data.shapes import SHAPE_CATEGORIES

        data.num_classes = len(SHAPE_CATEGORIES)
        return
    from lightning_modules.datamodule import num_classes_from_files

    try:
        if OmegaConf.is_missing(data, "root"):
            raise FileNotFoundError("data.root is not set")
        data.num_classes = num_classes_from_files(data)
    except FileNotFoundError:
        if data.get("name") != "coco":
            raise
        log.info(f"data.num_classes=null and no annotation file to read: COCO's {COCO_NUM_CLASSES} categories")
        data.num_classes = COCO_NUM_CLASSES
