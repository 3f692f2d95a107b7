"""LightningDataModule for COCO-format detection data (real COCO or the embedded shapes dataset)."""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, RandomSampler

from detection.data.coco import (
    CocoDetection,
    GroupedBatchSampler,
    aspect_ratio_group_ids,
    build_transforms,
    collate_fn,
)
from detection.data.shapes import ensure_shapes

__all__ = ["DetectionDataModule", "EpochRandomSampler", "ResumableDataLoader"]

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    # Hydra hands over DictConfig / ListConfig; keep plain Python values (picklable for workers,
    # clean in saved hyper-parameters).
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


_ROLES = ("train", "val", "test")


def _per_role(key: str, table: Mapping[str, Any] | None) -> dict[str, str | None]:
    """``{train, val, test} -> path or None`` from a config mapping; unknown roles are an error."""
    table = dict(table or {})
    unknown = sorted(set(table) - set(_ROLES))
    if unknown:
        raise ValueError(f"{key} has keys {unknown}; expected a mapping with keys among {list(_ROLES)}")
    return {r: None if table.get(r) is None else str(table[r]) for r in _ROLES}


def split_ann_file(data_cfg: Mapping[str, Any], role: str) -> Path:
    """The annotation file a split role reads (``data.ann_file.<role>`` or the COCO layout)."""
    root = Path(str(data_cfg["root"])).expanduser()
    split = data_cfg.get(f"{role}_split") or data_cfg.get("val_split")
    custom = (data_cfg.get("ann_file") or {}).get(role)
    return root / Path(str(custom)).expanduser() if custom is not None else root / "annotations" / f"instances_{split}.json"


def num_classes_from_files(data_cfg: Mapping[str, Any], roles: Sequence[str] = ("train", "val", "test")) -> int:
    """Number of categories in the first existing annotation file of ``roles`` (for ``data.num_classes: null``)."""
    from detection.data.coco import num_categories_in

    tried = []
    for role in roles:
        path = split_ann_file(data_cfg, role)
        if path.is_file():
            n = num_categories_in(path)
            if n < 1:
                raise ValueError(f"data.num_classes=null but {path} lists no categories; set data.num_classes")
            return n
        tried.append(str(path))
    raise FileNotFoundError(f"data.num_classes=null: no annotation file to read it from (tried {', '.join(tried)})")


class EpochRandomSampler(RandomSampler):
    """A random permutation that is a function of ``(seed, epoch)`` only, like ``DistributedSampler``'s.

    ``RandomSampler`` draws each epoch's permutation from the global RNG, so a run resumed
    mid-epoch cannot see the same order again. Lightning calls ``set_epoch`` at every
    epoch start. It stays a ``RandomSampler`` subclass because Lightning reads
    ``isinstance(sampler, RandomSampler)`` to decide that the ``DistributedSampler`` it
    injects under DDP shuffles (seeded, like this one, with ``PL_GLOBAL_SEED``).

    Args:
        data_source: the dataset (only its length is used).
        seed: base seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(self, data_source: Sequence, seed: int) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


def sampler_seed() -> int:
    """``PL_GLOBAL_SEED`` (set by ``seed_everything``) as DDP's injected sampler uses; else a fresh draw."""
    env = os.environ.get("PL_GLOBAL_SEED")
    # seed=null asks for an unseeded run: draw from the global RNG as RandomSampler would
    return int(env) if env is not None else int(torch.empty((), dtype=torch.int64).random_().item())


def _rng_states() -> dict[str, Any]:
    """Process RNG states as plain containers and tensors (checkpoints load with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class _SkipFirstBatches:
    """The loader's batch sampler, minus the batches a resumed epoch has already trained on.

    Skipping happens on indices, so no skipped image is read. The count is taken when the
    iteration starts (a generator body), not at ``iter()``: torch's multi-worker iterator
    calls ``iter()`` on its index sampler twice while starting.
    """

    def __init__(self, loader: ResumableDataLoader, base: Any) -> None:
        self.loader = loader
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[Any]:
        skip, self.loader._index_skip = self.loader._index_skip, 0
        yield from itertools.islice(iter(self.base), skip, None)


class _CountingIterator:
    """Counts the batches handed to the training loop; restores RNG states before the first one."""

    def __init__(self, loader: ResumableDataLoader, iterator: Iterator, rng: dict | None) -> None:
        self.loader = loader
        self.iterator = iterator
        self.rng = rng

    def __iter__(self) -> _CountingIterator:
        return self

    def __len__(self) -> int:
        return len(self.iterator)  # type: ignore[arg-type]

    def __next__(self) -> Any:
        if self.rng is not None:
            # the state the interrupted run had right after its checkpoint, i.e. before this fetch
            _set_rng_states(self.rng)
            self.rng = None
        batch = next(self.iterator)
        self.loader._served += 1
        return batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning checkpoints and restores mid-epoch.

    Lightning 2.x saves ``state_dict()`` of a train loader that has one (the ``_Stateful``
    protocol) into the checkpoint's fit-loop state and calls ``load_state_dict`` when a run
    restarts mid-epoch. The state is the sampler's epoch, the number of batches served in
    it, and the process RNG states at that moment, so the resumed epoch continues with
    the same remaining batches and, with ``num_workers=0``, the same augmentation draws:
    a deterministic run resumed after a stop reaches the same weights as one that never
    stopped. With worker processes the order is restored but worker augmentation seeds
    are drawn anew. No ``__init__`` of its own: Lightning re-instantiates the loader from
    its constructor arguments to inject a ``DistributedSampler``.
    """

    _served = 0  # batches handed out in the current epoch
    _skip = 0  # batches to skip at the next iteration (set by load_state_dict)
    _index_skip = 0  # handed to _SkipFirstBatches when the iteration starts
    _rng: dict | None = None  # RNG states to restore before the next batch

    @property
    def _index_sampler(self) -> Any:  # type: ignore[override]
        return _SkipFirstBatches(self, DataLoader._index_sampler.fget(self))  # type: ignore[attr-defined]

    def _epoch_sampler(self) -> Any:
        for s in (getattr(self.batch_sampler, "sampler", None), self.sampler):
            if s is not None and hasattr(s, "epoch"):
                return s
        return None

    def __iter__(self) -> Iterator:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        rng, self._rng = self._rng, None
        self._served = skip
        self._index_skip = skip
        return _CountingIterator(self, super().__iter__(), rng)

    def state_dict(self) -> dict[str, Any]:
        sampler = self._epoch_sampler()
        return {
            "epoch": int(sampler.epoch) if sampler is not None else None,
            "batches": int(self._served),
            "rng": _rng_states(),
        }

    _epoch_batches: int | float = float("inf")  # batches Lightning takes per epoch (limit_train_batches)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batches = state.get("epoch"), int(state.get("batches", 0))
        if batches >= min(len(self), self._epoch_batches):
            # the saved epoch was complete: the next one starts from its first batch
            batches = 0
            epoch = None if epoch is None else epoch + 1
        sampler = self._epoch_sampler()
        if epoch is not None and sampler is not None:
            # now, not at Lightning's set_epoch: worker processes draw indices as soon as iter() runs
            sampler.set_epoch(epoch)
        self._skip = batches
        self._rng = state.get("rng")
        if batches == 0 and self._rng is not None:
            # an epoch end: the next epoch's iter() draws the workers' base seed from the RNG, as it
            # did in the run that never stopped, so the states go back before it, not at its first batch
            _set_rng_states(self._rng)
            self._rng = None


class DetectionDataModule(L.LightningDataModule):
    """Train / val / test DataLoaders over :class:`detection.data.CocoDetection`.

    Batches are ``(images, targets)``: a list of float ``(3, H, W)`` tensors in ``[0, 1]``
    (sizes differ; the detector pads) and a list of target dicts (see ``CocoDetection``).

    Args:
        root: Dataset directory (COCO layout: ``root/annotations/instances_{split}.json``, ``root/{split}/``).
        num_classes: Expected number of categories; ``setup`` raises if the annotation file differs.
            None: whatever the annotation file lists (the entry points fill it in before the
            detector is built: :func:`num_classes_from_files`).
        ann_file / img_dir: Per split role (``train``, ``val``, ``test``) an annotation file / image
            folder for datasets that do not follow COCO's names (COCO test-dev:
            ``{test: annotations/image_info_test-dev2017.json}`` and ``{test: test2017}``); relative
            paths are under ``root``; a missing role uses the COCO layout.
        name: ``"coco"`` or ``"shapes"`` (the embedded dataset, generated by ``prepare_data``).
        train_split / val_split: Split names.
        test_split: Split for test/predict; None uses ``val_split``.
        min_size / max_size: Shortest-side resize target and longest-side cap, in pixels.
        scale_jitter: Shortest-side choices for multi-scale training (None: ``min_size``).
        flip_prob: Horizontal flip probability in training.
        batch_size: Train batch size. val_batch_size: eval batch size (None: ``batch_size``).
        num_workers: DataLoader workers. pin_memory: pin host memory.
        persistent_workers: Keep workers between epochs (only when ``num_workers > 0``).
        aspect_ratio_grouping: Train batches from :class:`GroupedBatchSampler` (portrait vs landscape).
        with_masks: Load instance masks (Mask R-CNN, segm evaluation).
        skip_bad_images: Skip unreadable images with a warning instead of failing.
        generate: For ``name="shapes"``: keyword arguments of ``ensure_shapes`` (None: defaults).
        max_train_images / max_val_images: Use only the first N images (quick runs, tests);
            ``max_val_images`` also applies to the test split.
    """

    def __init__(
        self,
        root: str,
        num_classes: int | None,
        name: str = "coco",
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = None,
        min_size: int | list[int] = 800,
        max_size: int = 1333,
        scale_jitter: list[int] | None = None,
        flip_prob: float = 0.5,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        aspect_ratio_grouping: bool = True,
        with_masks: bool = False,
        skip_bad_images: bool = False,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        generate: dict[str, Any] | None = None,
        max_train_images: int | None = None,
        max_val_images: int | None = None,
        ann_file: Mapping[str, str | None] | None = None,
        img_dir: Mapping[str, str | None] | None = None,
    ) -> None:
        super().__init__()
        if name not in ("coco", "shapes"):
            raise ValueError(f"unknown dataset name {name!r}; expected 'coco' or 'shapes'")
        self.root = str(Path(root).expanduser())
        self.num_classes = None if num_classes is None else int(num_classes)
        self.ann_file = _per_role("data.ann_file", ann_file)
        self.img_dir = _per_role("data.img_dir", img_dir)
        self.name = name
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split if test_split is not None else val_split
        self.min_size = _plain(min_size)
        self.max_size = int(max_size)
        self.scale_jitter = _plain(scale_jitter)
        self.flip_prob = float(flip_prob)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.aspect_ratio_grouping = bool(aspect_ratio_grouping)
        self.with_masks = bool(with_masks)
        self.skip_bad_images = bool(skip_bad_images)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.generate = _plain(generate) if generate is not None else None
        self.max_train_images = max_train_images
        self.max_val_images = max_val_images
        self.save_hyperparameters(logger=False)

        self.train_dataset: CocoDetection | None = None
        self.val_dataset: CocoDetection | None = None
        self.test_dataset: CocoDetection | None = None

    # ------------------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        """Generate the shapes dataset if needed (runs once per node, before ``setup``)."""
        if self.name == "shapes":
            ensure_shapes(self.root, **(self.generate or {}))

    def split_paths(self, role: str) -> dict[str, Path | None]:
        """``ann_file`` / ``img_dir`` of a split role from the per-role config (None: COCO layout)."""
        return {
            key: None if table.get(role) is None else Path(self.root) / Path(str(table[role])).expanduser()
            for key, table in (("ann_file", self.ann_file), ("img_dir", self.img_dir))
        }

    def _dataset(self, split: str, train: bool, limit: int | None, role: str) -> CocoDetection:
        ds = CocoDetection(
            self.root,
            split,
            **self.split_paths(role),
            transforms=build_transforms(
                train, self.min_size, self.max_size, flip_prob=self.flip_prob, scale_jitter=self.scale_jitter
            ),
            train=train,
            with_masks=self.with_masks,
            skip_bad_images=self.skip_bad_images,
        ).limit(limit)
        if self.num_classes is not None and ds.num_classes != self.num_classes:
            raise ValueError(
                f"{ds.ann_file} has {ds.num_classes} categories but data.num_classes={self.num_classes} was "
                "expected (data.num_classes=null reads it from the annotation file)"
            )
        if not len(ds):
            # an empty eval split would end "completed" with no AP; an empty train split in
            # Lightning's "num_samples=0" naming nothing
            key = {"train": "data.train_split", "val": "data.val_split", "test": "data.test_split"}[role]
            raise ValueError(f"{key}={split}: no images to use in {ds.ann_file}: {ds.why_empty()}")
        return ds

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` ("fit", "validate", "test", "predict"; None: all)."""
        if self.name == "shapes" and not Path(self.root).exists():
            # setup() called without a Trainer (scripts, tests): prepare_data has not run.
            self.prepare_data()
        if stage in ("fit", None) and self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_split, True, self.max_train_images, "train")
        if stage in ("fit", "validate", None) and self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_split, False, self.max_val_images, "val")
        if stage in ("test", "predict", None) and self.test_dataset is None:
            same = self.test_split == self.val_split and self.split_paths("test") == self.split_paths("val")
            if same and self.val_dataset is not None:
                self.test_dataset = self.val_dataset
            else:
                self.test_dataset = self._dataset(self.test_split, False, self.max_val_images, "test")

    def data_counts(self) -> dict[str, dict[str, int]]:
        """Counted skips per split, for ``metrics.json``: ``data/skipped_images`` (unreadable images
        skipped with ``skip_bad_images``, every process of this rank) and ``data/dropped_boxes``
        (empty or invalid boxes). A split that shares the val dataset (test = val) repeats its counts."""
        out: dict[str, dict[str, int]] = {"data/skipped_images": {}, "data/dropped_boxes": {}}
        for split, ds in (("train", self.train_dataset), ("val", self.val_dataset), ("test", self.test_dataset)):
            if ds is not None:
                out["data/skipped_images"][split] = ds.num_skipped_images
                out["data/dropped_boxes"][split] = ds.num_dropped_boxes
        return out

    # ------------------------------------------------------------------------- metadata
    def _any_dataset(self) -> CocoDetection:
        for ds in (self.val_dataset, self.test_dataset, self.train_dataset):
            if ds is not None:
                return ds
        raise RuntimeError("DetectionDataModule: call setup() first")

    @property
    def category_ids(self) -> list[int]:
        """Original COCO category id of every contiguous label (``category_ids[label]``)."""
        return self._any_dataset().category_ids

    @property
    def class_names(self) -> list[str]:
        """Category names in label order."""
        return self._any_dataset().class_names

    @property
    def eval_dataset(self) -> CocoDetection:
        """The dataset evaluated last set up: val if built, else test."""
        ds = self.val_dataset or self.test_dataset
        if ds is None:
            raise RuntimeError(
                "DetectionDataModule: no eval dataset; call setup('fit'/'validate'/'test') first"
            )
        return ds

    @property
    def coco(self) -> COCO:
        """pycocotools ground truth of the eval dataset (for COCO evaluation)."""
        return self.eval_dataset.coco

    @property
    def test_coco(self) -> COCO:
        """pycocotools ground truth of the test split."""
        if self.test_dataset is None:
            raise RuntimeError("DetectionDataModule: call setup('test') first")
        return self.test_dataset.coco

    # ---------------------------------------------------------------------- dataloaders
    # DataLoaders are built inside the hooks so that Lightning can capture their constructor
    # arguments (and GroupedBatchSampler's) and rebuild them with a DistributedSampler.
    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "collate_fn": collate_fn,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        """Shuffled by :class:`EpochRandomSampler`, served by :class:`ResumableDataLoader` (mid-epoch resume)."""
        ds = self.train_dataset
        if ds is None:
            raise RuntimeError("DetectionDataModule: call setup('fit') first")
        sampler = EpochRandomSampler(ds, seed=sampler_seed())
        if self.aspect_ratio_grouping:
            batch_sampler = GroupedBatchSampler(sampler, aspect_ratio_group_ids(ds), self.batch_size)
            return ResumableDataLoader(ds, batch_sampler=batch_sampler, **self._loader_kwargs())
        return ResumableDataLoader(ds, batch_size=self.batch_size, sampler=sampler, **self._loader_kwargs())

    def _eval_loader(self, ds: CocoDetection | None, stage: str) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"DetectionDataModule: call setup('{stage}') first")
        return DataLoader(ds, batch_size=self.val_batch_size, shuffle=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset, "validate")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset, "predict")
