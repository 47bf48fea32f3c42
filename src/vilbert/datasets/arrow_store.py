"""Arrow IPC file shards: one row per image, memory-mapped, read as zero-copy numpy views."""

from __future__ import annotations

import bisect
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from vilbert.datasets.atomic import TailHasher
from vilbert.datasets.records import OPTIONAL_FIELDS, RegionFeatures
from vilbert.errors import CorruptStoreError

logger = logging.getLogger(__name__)

# 64 rows x 263 KB is about 17 MB per record batch (feature-formats.md §6: 16-64 MB batches).
ROWS_PER_BATCH = 64
_ARROW_TYPES = {"float16": pa.float16(), "float32": pa.float32(), "int32": pa.int32(), "int64": pa.int64()}


def arrow_schema(feature_dim: int, feature_dtype: str, fields: dict) -> pa.Schema:
    """The shard schema for a store layout.

    Per-box arrays are list<fixed_size_list<T, W>> (2-d) or list<T> (1-d) columns, one row per image,
    so a reader slices a whole record batch's values once and then cuts rows with offsets.
    """
    cols = [
        ("image_id", pa.string()),
        ("image_h", pa.int32()),
        ("image_w", pa.int32()),
        ("num_boxes", pa.int32()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("features", pa.list_(pa.list_(_ARROW_TYPES[feature_dtype], feature_dim))),
    ]
    for name in OPTIONAL_FIELDS:
        if name not in fields:
            continue
        t = _ARROW_TYPES[fields[name]["dtype"]]
        width = fields[name].get("width")
        cols.append((name, pa.list_(pa.list_(t, width)) if width else pa.list_(t)))
    return pa.schema(cols, metadata={b"vilbert.format": b"vilbert-feature-store-shard"})


def _list_column(arrays: list, dtype: pa.DataType, width: int | None, scratch: dict | None = None,
                 key: str = "") -> pa.Array:
    """A list<fixed_size_list<dtype, width>> (or list<dtype>) column from per-row arrays.

    The values are concatenated into a scratch buffer reused across batches: a fresh 16 MB buffer per
    batch costs more in page faults than the copy itself.
    """
    counts = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    np_dtype = arrays[0].dtype
    total = sum(a.size for a in arrays)
    buf = None if scratch is None else scratch.get(key)
    if buf is None or buf.dtype != np_dtype or buf.size < total:
        buf = np.empty(max(total, 1), np_dtype)
        if scratch is not None:
            scratch[key] = buf
    flat = buf[:total]
    np.concatenate([a.reshape(-1) for a in arrays], out=flat)
    values = pa.array(flat, type=dtype)
    if width:
        values = pa.FixedSizeListArray.from_arrays(values, width)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


class ArrowShardWriter:
    """Appends records to one uncompressed Arrow IPC file.

    Args:
        path: file to write (the caller publishes it under its final name).
        feature_dim: D.
        feature_dtype: 'float16' or 'float32'.
        fields: optional fields of the layout (see Manifest.fields).
    """

    def __init__(self, path: str | Path, feature_dim: int, feature_dtype: str, fields: dict):
        self.path = Path(path)
        self._schema = arrow_schema(feature_dim, feature_dtype, fields)
        self._feature_type = _ARROW_TYPES[feature_dtype]
        self._feature_dim = feature_dim
        self._fields = fields
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self._schema)  # IPC file format, no compression
        # The IPC file writer only appends, so the shard is hashed while it is written.
        self._hasher = TailHasher(self.path)
        self.sha256: str | None = None
        self._pending: list[RegionFeatures] = []
        self._scratch: dict[str, np.ndarray] = {}  # reused only after write_batch has copied the batch out
        self.num_rows = 0
        self.bytes_written = 0

    def append(self, record: RegionFeatures) -> None:
        """Queue one record (already cast to the store dtypes); writes a batch every ROWS_PER_BATCH rows."""
        self._pending.append(record)
        self.num_rows += 1
        self.bytes_written += record.boxes.nbytes + record.features.nbytes + sum(
            getattr(record, n).nbytes for n in self._fields)
        if len(self._pending) >= ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        recs = self._pending
        if not recs:
            return
        cols = {
            "image_id": pa.array([r.image_id for r in recs], pa.string()),
            "image_h": pa.array(np.array([r.image_h for r in recs], np.int32)),
            "image_w": pa.array(np.array([r.image_w for r in recs], np.int32)),
            "num_boxes": pa.array(np.array([r.num_boxes for r in recs], np.int32)),
            "boxes": _list_column([r.boxes for r in recs], pa.float32(), 4, self._scratch, "boxes"),
            "features": _list_column([r.features for r in recs], self._feature_type, self._feature_dim,
                                     self._scratch, "features"),
        }
        for name, spec in self._fields.items():
            cols[name] = _list_column([getattr(r, name) for r in recs], _ARROW_TYPES[spec["dtype"]], spec.get("width"),
                                      self._scratch, name)
        self._writer.write_batch(pa.RecordBatch.from_arrays([cols[n] for n in self._schema.names], schema=self._schema))
        self._hasher.advance(self._sink.tell())
        self._pending = []

    def close(self) -> None:
        """Write the pending batch and the file footer and close the file (the caller fsyncs and renames it)."""
        self._flush()
        self._writer.close()
        self._size = self._sink.tell()
        self._sink.close()

    def digest(self) -> str:
        """Hex sha256 of the closed file (hashed while it was written; waits for the tail)."""
        self.sha256 = self._hasher.finish(self._size)
        return self.sha256

    def abort(self) -> None:
        """Close without caring about the content (the caller deletes the file)."""
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away
            pass
        self._sink.close()
        self._hasher.abort()


class ArrowShardReader:
    """Random row access into one memory-mapped Arrow shard.

    Numpy views over a record batch are built once per (process, shard, batch); afterwards reading a row
    is pure numpy slicing (feature-formats.md §6: 19.9 µs vs 58 µs for per-row pyarrow calls). Returned
    arrays are read-only views into the page cache.

    Args:
        path: the shard file.
        fields: optional fields of the layout (see Manifest.fields).
    """

    def __init__(self, path: str | Path, fields: dict):
        self.path = Path(path)
        self._fields = dict(fields)
        try:
            self._mmap = pa.memory_map(str(self.path), "r")
            self._file = pa.ipc.open_file(self._mmap)
            n = self._file.num_record_batches
            rows = [self._file.get_batch(i).num_rows for i in range(n)]
        except (OSError, pa.ArrowException) as exc:
            raise CorruptStoreError(f"{self.path}: unreadable Arrow shard ({exc}); run `vilbert-cli validate`") from None
        self._starts = np.zeros(n + 1, np.int64)
        np.cumsum(rows, out=self._starts[1:])
        self.num_rows = int(self._starts[-1])
        self._starts_list = self._starts.tolist()
        self._array_names = ("boxes", "features", *self._fields)
        self._views: dict[int, dict] = {}

    def _batch_views(self, b: int) -> dict:
        views = self._views.get(b)
        if views is not None:
            return views
        try:
            batch = self._file.get_batch(b)
            views = {
                "image_id": batch.column("image_id").to_pylist(),
                "image_h": batch.column("image_h").to_pylist(),
                "image_w": batch.column("image_w").to_pylist(),
                "num_boxes": batch.column("num_boxes").to_pylist(),
            }
            for name in ("boxes", "features", *self._fields):
                col = batch.column(name)
                offsets = col.offsets.to_numpy()
                values = col.flatten()
                if pa.types.is_fixed_size_list(values.type):
                    width = values.type.list_size
                    values = values.flatten().to_numpy(zero_copy_only=True).reshape(-1, width)
                else:
                    values = values.to_numpy(zero_copy_only=True)
                # Python ints: slicing with them is faster than with numpy scalars, once per sample.
                views[name] = ((offsets - offsets[0]).tolist(), values)
        except (KeyError, pa.ArrowException) as exc:
            raise CorruptStoreError(f"{self.path}: record batch {b} is unreadable ({exc})") from None
        self._views[b] = views
        return views

    def read(self, row: int, image_id: str | None = None) -> RegionFeatures:
        """The record at `row` (0-based within the shard), arrays as read-only zero-copy views.

        `image_id` (the index's id for the row) is not needed here; the caller compares it.
        """
        if not 0 <= row < self.num_rows:
            raise CorruptStoreError(f"{self.path}: row {row} out of range (shard has {self.num_rows} rows)")
        b = bisect.bisect_right(self._starts_list, row) - 1
        i = row - self._starts_list[b]
        v = self._batch_views(b)
        arrays = {}
        for name in self._array_names:
            offsets, values = v[name]
            arrays[name] = values[offsets[i]:offsets[i + 1]]
        return RegionFeatures(v["image_id"][i], v["image_h"][i], v["image_w"][i], v["num_boxes"][i], **arrays)

    def close(self) -> None:
        """Drop the views and unmap the file."""
        self._views.clear()
        self._file = None
        try:
            self._mmap.close()
        except Exception:  # noqa: BLE001 - views may still reference the map; the OS unmaps at exit
            pass

