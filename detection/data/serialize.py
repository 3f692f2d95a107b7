"""Per-image records in one serialized NumPy buffer, so DataLoader workers do not copy them.

A forked DataLoader worker shares its parent's memory copy-on-write, but CPython writes to every object
it reads (the reference count) and its cyclic garbage collector walks every container it tracks: a
Python dict of per-image dicts (and pycocotools' index of ~860k annotation dicts for COCO train2017)
gets copied page by page into each worker, which then grows towards a full copy of the annotations.
Detectron2 (``DatasetFromList(serialize=True)``) and MMEngine (``serialize_data=True``) pickle each
record into one byte array plus offsets; the workers then read two NumPy arrays, which hold no Python
objects per record, and unpickle only the record they need. This module does the same (neither library
is a dependency here, and their versions are tied to their dataset classes).
"""

from __future__ import annotations

import gc
import os
import pickle
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["SerializedList", "SerializedRecords", "coco_records", "freeze_inherited_objects"]


class SerializedList:
    """A read-only list of picklable items stored as one ``uint8`` buffer and an ``int64`` end-offset array.

    ``items[i]`` unpickles a fresh copy of item ``i`` (mutating it changes nothing stored).
    """

    def __init__(self, items: Iterable[Any]) -> None:
        blobs = [pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL) for x in items]
        self._ends = np.cumsum(np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs)))
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"SerializedList index {index} out of range for {len(self)} items")
        start = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(memoryview(self._buffer[start : int(self._ends[index])]))

    @property
    def nbytes(self) -> int:
        """Bytes held (buffer + offsets)."""
        return int(self._buffer.nbytes + self._ends.nbytes)


class SerializedRecords(Mapping):
    """A read-only mapping ``key -> record`` (int keys, e.g. image ids) over a :class:`SerializedList`.

    Keys are kept in a sorted ``int64`` array (looked up by binary search), so the mapping holds no
    Python object per record either.
    """

    def __init__(self, records: Mapping[int, Any]) -> None:
        keys = sorted(int(k) for k in records)
        self._keys = np.asarray(keys, dtype=np.int64)
        self._items = SerializedList(records[k] for k in keys)

    def _position(self, key: int) -> int:
        pos = int(np.searchsorted(self._keys, key))
        if pos >= len(self._keys) or int(self._keys[pos]) != int(key):
            raise KeyError(key)
        return pos

    def __getitem__(self, key: int) -> Any:
        return self._items[self._position(key)]

    def __contains__(self, key: object) -> bool:
        try:
            self._position(int(key))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def __iter__(self):
        return (int(k) for k in self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def nbytes(self) -> int:
        return self._items.nbytes + int(self._keys.nbytes)


def coco_records(
    coco: Any, anns: Mapping[int, Mapping[str, np.ndarray]], with_segmentations: bool
) -> SerializedRecords:
    """Serialized per-image records for :class:`detection.data.coco.CocoDetection`.

    Args:
        coco: the pycocotools ``COCO`` index of the annotation file.
        anns: image id -> the dataset's sanitised arrays (``boxes``, ``labels``, ``iscrowd``, ``area``,
            ``ann_ids``).
        with_segmentations: also store each kept annotation's ``segmentation`` (for masks).

    Returns:
        image id -> ``{**anns[id], "info": {"file_name", "height", "width"}, "segms": [...]}`` (``segms``
        aligned with ``ann_ids``; absent without ``with_segmentations``).
    """
    records: dict[int, dict[str, Any]] = {}
    for img_id, a in anns.items():
        info = coco.imgs[img_id]
        rec: dict[str, Any] = dict(a)
        rec["info"] = {"file_name": info["file_name"], "height": info["height"], "width": info["width"]}
        if with_segmentations:
            rec["segms"] = [coco.anns[int(aid)].get("segmentation") for aid in a["ann_ids"].tolist()]
        records[int(img_id)] = rec
    return SerializedRecords(records)


_FROZEN_PID: list[int] = []


def freeze_inherited_objects() -> None:
    """In a forked worker, once: move every object inherited from the parent to the collector's
    permanent generation (``gc.freeze``), so that the worker's collections never walk them (each walk
    writes to every object's header and copies its page). A no-op outside DataLoader workers (the main
    process keeps collecting everything) and in a worker that ran it before."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return
    pid = os.getpid()
    if _FROZEN_PID and _FROZEN_PID[0] == pid:
        return
    _FROZEN_PID[:] = [pid]
    gc.freeze()
