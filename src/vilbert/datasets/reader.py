"""FeatureStore: random access to a feature store by image id or position, safe in DataLoader workers."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from vilbert.datasets.manifest import INDEX_NAME, Manifest, StoreIndex, load_manifest, read_index
from vilbert.datasets.records import RegionFeatures
from vilbert.errors import CorruptStoreError, UnknownImageError

logger = logging.getLogger(__name__)


def open_shard_reader(manifest: Manifest, path: Path):
    """A format-specific shard reader (`read(row, image_id)`, `close()`, `num_rows`)."""
    if manifest.storage == "arrow":
        from vilbert.datasets.arrow_store import ArrowShardReader
        return ArrowShardReader(path, manifest.fields)
    if manifest.storage == "lmdb":
        from vilbert.datasets.lmdb_store import LmdbShardReader
        return LmdbShardReader(path, manifest.fields)
    from vilbert.datasets.hdf5_store import Hdf5ShardReader
    return Hdf5ShardReader(path, manifest.fields)


class ImageIds(Sequence):
    """The store's image ids in position order, backed by the index's Arrow string column."""

    def __init__(self, ids: pa.Array):
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._ids[j].as_py() for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"position {i} out of range for {len(self)} image ids")
        return self._ids[i].as_py()

    def __iter__(self):
        return iter(self._ids.to_pylist())


class FeatureStore:
    """A read-only feature store.

    Opening reads only manifest.json and the index; shards are opened lazily in the process that reads
    them and re-opened after a fork (the pid is checked on every shard access), so a store can be handed to
    DataLoader workers under fork or spawn. Pickling keeps only the path.

    Attributes:
        path: the store directory.
        manifest: the parsed manifest (.storage, .feature_dim, .feature_dtype, .fields, .provenance).
        image_ids: ids in position order.
    """

    def __init__(self, path: Path, manifest: Manifest, index: StoreIndex):
        self.path = path
        self.manifest = manifest
        self._index = index
        self.image_ids = ImageIds(index.image_ids)
        self._position: dict[str, int] | None = None
        self._readers: dict[int, object] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, path) -> "FeatureStore":
        """Open the store at `path` (reads manifest and index only).

        Raises:
            SourceNotFoundError: no store at `path`.
            SchemaVersionError: the store has a format version this release does not read.
            CorruptStoreError: the manifest or index is damaged or inconsistent.
        """
        path = Path(path)
        manifest = load_manifest(path)
        index_path = path / manifest.index.get("name", INDEX_NAME)
        size = manifest.index.get("size_bytes")
        if size is not None and index_path.is_file() and index_path.stat().st_size != size:
            raise CorruptStoreError(f"{index_path}: is {index_path.stat().st_size} bytes, the manifest says {size}: "
                                    "truncated or replaced; re-pack the store")
        index = read_index(index_path)
        if len(index) != manifest.num_records:
            raise CorruptStoreError(f"{index_path}: has {len(index)} entries, the manifest says "
                                    f"{manifest.num_records}; re-pack the store")
        if len(index) and (index.shard.min() < 0 or index.shard.max() >= len(manifest.shards)):
            raise CorruptStoreError(f"{index_path}: refers to shards outside the manifest's {len(manifest.shards)}")
        return cls(path, manifest, index)

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self._index)

    def _positions(self) -> dict[str, int]:
        if self._position is None:
            self._position = {image_id: i for i, image_id in enumerate(self._index.image_ids.to_pylist())}
        return self._position

    def __contains__(self, image_id) -> bool:
        return image_id in self._positions()

    def position(self, image_id: str) -> int:
        """Position of `image_id`.

        Raises:
            UnknownImageError: the id is not in the store.
        """
        try:
            return self._positions()[image_id]
        except KeyError:
            raise UnknownImageError(f"{self.path}: record {image_id!r}: no such image id in the store "
                                    f"({len(self)} records)") from None

    def get(self, image_id: str) -> RegionFeatures:
        """The record of `image_id` (see __getitem__)."""
        return self._read(self.position(image_id), image_id)

    def __getitem__(self, pos: int) -> RegionFeatures:
        """The record at position `pos`.

        Returns:
            RegionFeatures; boxes (N, 4) float32, features (N, D) in manifest.feature_dtype, optional fields as
            listed in manifest.fields. Arrow stores return read-only zero-copy views: copy before writing.

        Raises:
            IndexError: `pos` out of range.
            CorruptStoreError: the shard is missing, truncated or disagrees with the index.
        """
        n = len(self)
        p = int(pos)
        if p < 0:
            p += n
        if not 0 <= p < n:
            raise IndexError(f"{self.path}: position {pos} out of range for {n} records")
        return self._read(p, self._index.image_ids[p].as_py())

    def _read(self, p: int, image_id: str) -> RegionFeatures:
        """Read position `p`, whose id per the index is `image_id`, and check the record against the index."""
        shard = int(self._index.shard[p])
        row = int(self._index.row[p])
        reader = self._reader(shard)
        rec = reader.read(row, image_id)
        nb = int(self._index.num_boxes[p])
        if rec.image_id != image_id or rec.num_boxes != nb or rec.features.shape[0] != nb or rec.boxes.shape[0] != nb:
            raise CorruptStoreError(
                f"{reader.path}: record {image_id!r}: row {row} holds id {rec.image_id!r} with num_boxes="
                f"{rec.num_boxes} and {rec.features.shape[0]} feature rows, the index says {nb}; run "
                "`vilbert-cli validate`")
        return rec

    def num_boxes_array(self) -> np.ndarray:
        """(len,) int32 box count per position, from the index (no shard is opened)."""
        return self._index.num_boxes

    # ------------------------------------------------------------------ shards
    def _reader(self, shard: int):
        pid = os.getpid()
        if pid != self._pid:
            # A forked child inherited the parent's handles: release them here (py-lmdb >= 2 refuses a second
            # open of a path the process "still" holds) and open fresh ones.
            for r in self._readers.values():
                forget = getattr(r, "forget_after_fork", None)
                if forget is not None:
                    forget()
            self._readers = {}
            self._pid = pid
        r = self._readers.get(shard)
        if r is None:
            info = self.manifest.shards[shard]
            path = self.path / info.name
            if not path.is_file():
                raise CorruptStoreError(f"{path}: shard is missing from the store; re-pack it")
            size = path.stat().st_size
            if size != info.size_bytes:
                raise CorruptStoreError(f"{path}: is {size} bytes, the manifest says {info.size_bytes}: truncated "
                                        "or replaced; run `vilbert-cli validate`")
            r = open_shard_reader(self.manifest, path)
            self._readers[shard] = r
        return r

    def close(self) -> None:
        """Close the shards this process opened (the store can still be read: they reopen on demand)."""
        if os.getpid() == self._pid:
            for r in self._readers.values():
                r.close()
        self._readers = {}

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        other = FeatureStore.open(state["path"])
        self.__dict__.update(other.__dict__)

    def __repr__(self) -> str:
        m = self.manifest
        return f"FeatureStore({str(self.path)!r}, storage={m.storage}, records={len(self)}, dim={m.feature_dim})"
