"""A torch Dataset of ViLBERT image inputs over a feature store, safe in fork and spawn DataLoader workers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vilbert.datasets.image_features import DEFAULT_MAX_REGIONS, ImageFeatureView
from vilbert.datasets.manifest import MANIFEST_NAME
from vilbert.datasets.reader import FeatureStore

logger = logging.getLogger(__name__)

# Keys of an item that hold arrays (stacked by collate_regions) and ints (gathered into an int64 tensor).
ARRAY_KEYS = ("features", "spatials", "boxes", "image_mask")
INT_KEYS = ("num_regions", "num_detections", "num_gt", "image_h", "image_w")


# One FeatureStore per store directory and process, shared by every dataset of the process (train and val
# splits of one store, a pickled copy): the id index is loaded once, and shards are opened once (py-lmdb >= 2
# refuses to open an LMDB path twice in one process). A forked child inherits the entries; FeatureStore
# itself re-opens its shards in the new process.
_SHARED_STORES: dict[str, tuple[tuple, FeatureStore]] = {}


def _open_store(path: str) -> FeatureStore:
    """The process's FeatureStore for ``path``, re-opened when the store on disk was replaced."""
    key = os.path.realpath(path)
    try:
        st = os.stat(os.path.join(key, MANIFEST_NAME))
        stamp: tuple = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = ()  # FeatureStore.open raises the proper error below
    cached = _SHARED_STORES.get(key)
    if cached is not None and cached[0] == stamp and stamp:
        return cached[1]
    if cached is not None:
        cached[1].close()  # a re-packed store: release the old shards before opening the new ones
        del _SHARED_STORES[key]
    store = FeatureStore.open(path)
    _SHARED_STORES[key] = (stamp, store)
    return store


class RegionFeatureDataset(Dataset):
    """ViLBERT image inputs for the images of a feature store, as torch tensors.

    Only paths, ids and settings are pickled: each process that reads opens the store itself (the
    FeatureStore opens its shards lazily in the reading process), so the dataset can be sent to
    ``spawn`` workers and survives ``fork`` even when the parent has already read from it.

    Args:
        store_path: directory of the feature store (Arrow, LMDB or HDF5).
        image_ids: ids to serve, in this order; default: every record of the store in position order.
        max_regions: number of rows per image, [IMG] included.
        gt_store_path: optional store of ground-truth boxes appended after the detections (RefCOCO+, VCR).
        add_global: prepend the [IMG] row.
        global_over_gt: average the [IMG] feature over detections and GT boxes (VCR).

    Each item is a dict: ``image_id`` (str), ``features`` (R, D) float32, ``spatials`` (R, 5) float32,
    ``boxes`` (R, 4) float32 pixels, ``image_mask`` (R,) int64, and the ints ``num_regions``,
    ``num_detections``, ``num_gt``, ``image_h``, ``image_w`` (see ``build_image_inputs``).

    Raises:
        UnknownImageError: (on construction) an entry of ``image_ids`` is not in the store.
    """

    def __init__(
        self,
        store_path: str | os.PathLike,
        image_ids: Optional[Sequence[str]] = None,
        max_regions: int = DEFAULT_MAX_REGIONS,
        gt_store_path: str | os.PathLike | None = None,
        add_global: bool = True,
        global_over_gt: bool = False,
    ) -> None:
        self.store_path = str(Path(store_path))
        self.gt_store_path = None if gt_store_path is None else str(Path(gt_store_path))
        self.max_regions = int(max_regions)
        self.add_global = bool(add_global)
        self.global_over_gt = bool(global_over_gt)
        self._view: Optional[ImageFeatureView] = None
        view = self._get_view()  # opens manifests and indexes only; shards open on first read
        store = view.store
        if image_ids is None:
            self.image_ids: Optional[list[str]] = None
            self._length = len(store)
        else:
            self.image_ids = [str(i) for i in image_ids]
            for image_id in self.image_ids:
                store.position(image_id)  # fail now, naming the store and the id, not inside a worker
            self._length = len(self.image_ids)

    def _get_view(self) -> ImageFeatureView:
        if self._view is None:
            store = _open_store(self.store_path)
            gt = _open_store(self.gt_store_path) if self.gt_store_path is not None else None
            self._view = ImageFeatureView(store, self.max_regions, gt_store=gt, add_global=self.add_global,
                                          global_over_gt=self.global_over_gt)
        return self._view

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        view = self._get_view()
        if self.image_ids is None:
            record = view.store[int(index)]
        else:
            record = view.store.get(self.image_ids[index])
        inputs = view.build(record)
        item: dict[str, Any] = {"image_id": record.image_id}
        for key in ARRAY_KEYS:
            item[key] = torch.from_numpy(inputs[key])  # freshly allocated, writable: no copy
        for key in INT_KEYS:
            item[key] = int(inputs[key])
        return item

    def num_boxes_array(self) -> np.ndarray:
        """(len,) int64 detections per item, from the store index (for length bucketing); no shard opened."""
        store = self._get_view().store
        counts = np.asarray(store.num_boxes_array(), dtype=np.int64)
        if self.image_ids is None:
            return counts
        return counts[[store.position(i) for i in self.image_ids]]

    def close(self) -> None:
        """Close the shards this process opened (they reopen on demand if any dataset reads again)."""
        if self._view is not None:
            self._view.store.close()
            if self._view.gt_store is not None:
                self._view.gt_store.close()
            self._view = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_view"] = None  # paths only: the receiving process opens its own stores
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def collate_regions(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch.

    Args:
        items: B items of ``RegionFeatureDataset`` (same ``max_regions`` and feature size).

    Returns:
        ``image_id``: list of B str; ``features`` (B, R, D) float32; ``spatials`` (B, R, 5) float32;
        ``boxes`` (B, R, 4) float32; ``image_mask`` (B, R) int64; ``num_regions``, ``num_detections``,
        ``num_gt``, ``image_h``, ``image_w``: (B,) int64.
    """
    batch: dict[str, Any] = {"image_id": [it["image_id"] for it in items]}
    for key in ARRAY_KEYS:
        batch[key] = torch.stack([it[key] for it in items])
    for key in INT_KEYS:
        batch[key] = torch.tensor([it[key] for it in items], dtype=torch.int64)
    return batch
