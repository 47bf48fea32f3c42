"""LMDB shards: one single-file environment per shard, raw little-endian arrays behind a fixed header."""

from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path

import numpy as np

from vilbert.datasets.records import OPTIONAL_FIELDS, RegionFeatures
from vilbert.errors import CorruptStoreError, MissingDependencyError, RecordError, StoreFullError

try:  # this module and legacy.py are the only lmdb import sites
    import lmdb
except ImportError:  # pragma: no cover - lmdb is a core dependency
    lmdb = None

logger = logging.getLogger(__name__)

# Value layout (little-endian): header, utf-8 image id, then boxes, features and the optional fields in
# OPTIONAL_FIELDS order, each padded to 8 bytes. No pickle anywhere.
VALUE_MAGIC = b"VLBF"
VALUE_VERSION = 1
_HEADER = struct.Struct("<4sHHIIIIIBBH")  # magic, version, header size, N, D, C, h, w, dtype, field mask, id len
_DTYPE_CODES = {"float16": 1, "float32": 2}
_CODE_DTYPES = {v: np.dtype(k).newbyteorder("<") for k, v in _DTYPE_CODES.items()}
_FIELD_BITS = {name: 1 << i for i, name in enumerate(OPTIONAL_FIELDS)}
# Commit every few hundred puts: bounded transaction size, and few commits (feature-formats.md §8).
COMMIT_EVERY = 256


# py-lmdb >= 2 refuses a second open of one path in a process, so read-only environments are shared per
# process with a reference count. The table is inherited across fork(): a child closes the inherited
# handles (which also clears py-lmdb's open-path set) before opening its own.
_ENVS: dict[str, list] = {}  # realpath -> [env, refcount]
_ENVS_PID = os.getpid()
_ENVS_LOCK = threading.Lock()


def _forget_inherited_envs() -> None:
    global _ENVS_PID
    if os.getpid() == _ENVS_PID:
        return
    for env, _ in _ENVS.values():
        try:
            env.close()
        except lmdb.Error:
            pass
    _ENVS.clear()
    _ENVS_PID = os.getpid()


def _acquire_env(path: Path):
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        _forget_inherited_envs()
        entry = _ENVS.get(key)
        if entry is None:
            env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=True, meminit=False,
                            max_readers=1)
            entry = _ENVS[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def _release_env(path: Path) -> None:
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        _forget_inherited_envs()
        entry = _ENVS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _ENVS[key]


def _require_lmdb() -> None:
    if lmdb is None:
        raise MissingDependencyError("the lmdb package is not installed: pip install lmdb")


def row_key(row: int) -> bytes:
    """8-byte big-endian key: sorts like the row number, so puts can use append=True."""
    return row.to_bytes(8, "big")


def _pad(n: int) -> int:
    return (-n) % 8


def encode_record(record: RegionFeatures, fields: dict, out: bytearray | None = None) -> memoryview:
    """Serialise a record already cast to storage dtypes into one LMDB value.

    Args:
        record: the record (storage dtypes).
        fields: the store's optional fields.
        out: a reusable buffer (grown as needed); a fresh one when None.

    Returns:
        A memoryview of the value's bytes inside `out` (valid until `out` is reused).
    """
    ident = record.image_id.encode("utf-8")
    if len(ident) > 0xFFFF:
        raise RecordError(f"record {record.image_id[:40]!r}...: image id is {len(ident)} bytes; LMDB stores hold "
                          "ids up to 65535 bytes")
    mask = 0
    for name in fields:
        mask |= _FIELD_BITS[name]
    width = fields["cls_prob"]["width"] if "cls_prob" in fields else 0
    arrays = [record.boxes, record.features, *(getattr(record, n) for n in OPTIONAL_FIELDS if n in fields)]
    off = _HEADER.size + len(ident)
    off += _pad(off)
    size = off + sum(a.nbytes + _pad(a.nbytes) for a in arrays)
    if out is None:
        out = bytearray(size)
    elif len(out) < size:
        out.extend(bytes(size - len(out)))
    _HEADER.pack_into(out, 0, VALUE_MAGIC, VALUE_VERSION, _HEADER.size, record.num_boxes, record.feature_dim,
                      width, record.image_h, record.image_w, _DTYPE_CODES[str(record.features.dtype)], mask,
                      len(ident))
    out[_HEADER.size:_HEADER.size + len(ident)] = ident
    out[_HEADER.size + len(ident):off] = bytes(off - _HEADER.size - len(ident))
    for arr in arrays:
        n = arr.nbytes
        if n:
            # copy straight into the buffer as little-endian (one copy per array)
            dst = np.frombuffer(out, dtype=arr.dtype.newbyteorder("<"), count=arr.size, offset=off)
            dst[...] = arr.reshape(-1)
        pad = _pad(n)
        out[off + n:off + n + pad] = bytes(pad)
        off += n + pad
    return memoryview(out)[:size]


_F4 = np.dtype("<f4")
# (name, little-endian dtype, 2-d) for the optional fields, in mask-bit order; precomputed because
# decode_record runs once per sample in DataLoader workers.
_OPTIONAL_LE = tuple((name, dt.newbyteorder("<"), name == "cls_prob", _FIELD_BITS[name])
                     for name, dt in OPTIONAL_FIELDS.items())


def _value_layout(n: int, d: int, c: int, code: int, mask: int) -> tuple:
    """((name, start, stop, dtype, shape), ...) of the arrays, relative to the first array's offset."""
    fdt = _CODE_DTYPES[code]
    specs = [("boxes", _F4, n * 4, (n, 4)), ("features", fdt, n * d, (n, d))]
    for name, dt, two_d, bit in _OPTIONAL_LE:
        if mask & bit:
            specs.append((name, dt, n * c if two_d else n, (n, c) if two_d else (n,)))
    layout, off = [], 0
    for name, dt, count, shape in specs:
        nbytes = count * dt.itemsize
        layout.append((name, off, off + nbytes, dt, shape))
        off += nbytes + (-nbytes) % 8
    return tuple(layout)


# Layouts depend only on (N, D, C, dtype, fields): a few dozen per store, computed once per process.
_LAYOUTS: dict[tuple, tuple] = {}


def decode_record(value, where: str = "") -> RegionFeatures:
    """Parse one LMDB value into a record whose arrays are read-only views of `value`.

    Raises:
        CorruptStoreError: bad magic, unknown version or a value shorter than its header promises.
    """
    size = len(value)
    if size < _HEADER.size:
        raise CorruptStoreError(f"{where}: value of {size} bytes is shorter than the record header")
    magic, version, hsize, n, d, c, h, w, code, mask, idlen = _HEADER.unpack_from(value, 0)
    if magic != VALUE_MAGIC or version != VALUE_VERSION or code not in _CODE_DTYPES:
        raise CorruptStoreError(f"{where}: not a vilbert record value (magic {magic!r}, version {version})")
    base = hsize + idlen
    image_id = bytes(value[hsize:base]).decode("utf-8")
    base += (-base) % 8
    key = (n, d, c, code, mask)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _LAYOUTS[key] = _value_layout(n, d, c, code, mask)
    if layout and base + layout[-1][2] > size:
        name = next(name for name, _, stop, _, _ in layout if base + stop > size)
        raise CorruptStoreError(f"{where}: record {image_id!r}: value truncated inside {name!r}")
    u8 = np.frombuffer(value, np.uint8)
    arrays = {name: u8[base + a:base + b].view(dt).reshape(shape) for name, a, b, dt, shape in layout}
    return RegionFeatures(image_id, h, w, n, **arrays)


class LmdbShardWriter:
    """Appends records to one single-file LMDB environment (subdir=False, no lock file).

    Args:
        path: file to write (the caller publishes it under its final name).
        feature_dim, feature_dtype, fields: the store layout (see Manifest).
        map_size: LMDB map size; when it fills up, append() raises StoreFullError.
    """

    def __init__(self, path: str | Path, feature_dim: int, feature_dtype: str, fields: dict, *,
                 map_size: int = 1 << 40):
        _require_lmdb()
        self.path = Path(path)
        self._fields = fields
        # sync off while writing: the caller fsyncs the finished file before publishing it.
        self._env = lmdb.open(str(self.path), subdir=False, map_size=map_size, lock=False, sync=False,
                              metasync=False, meminit=False, readahead=False, max_dbs=0)
        self._txn = self._env.begin(write=True)
        self._uncommitted = 0
        self._buf = bytearray()  # one value buffer reused for every put (py-lmdb copies it into the map)
        self.num_rows = 0
        self.bytes_written = 0

    def append(self, record: RegionFeatures) -> None:
        """Write one record at the next row key.

        Raises:
            StoreFullError: the map is full (the shard is unusable afterwards; the caller discards it).
        """
        value = encode_record(record, self._fields, self._buf)
        try:
            self._txn.put(row_key(self.num_rows), value, append=True)
            self._uncommitted += 1
            if self._uncommitted >= COMMIT_EVERY:
                self._commit()
        except lmdb.MapFullError:
            raise StoreFullError(f"LMDB map of {self._env.info()['map_size']} bytes is full") from None
        self.num_rows += 1
        self.bytes_written += value.nbytes

    def _commit(self) -> None:
        self._txn.commit()
        self._uncommitted = 0
        self._txn = self._env.begin(write=True)

    def close(self) -> None:
        """Commit and close the environment (the caller fsyncs the file before publishing it)."""
        try:
            self._txn.commit()
        except lmdb.MapFullError:
            self.abort()
            raise StoreFullError(f"LMDB map of {self._env.info()['map_size']} bytes is full") from None
        self._env.close()

    def abort(self) -> None:
        """Drop the open transaction and close (the caller deletes the file)."""
        try:
            self._txn.abort()
        except lmdb.Error:
            pass
        self._env.close()


class LmdbShardReader:
    """Random row access into one LMDB shard, opened read-only in the process that reads.

    `readonly=True, lock=False` (no reader table), `readahead=True` (about 4x faster cold for 150-260 KB
    values, feature-formats.md §5). Arrays are read-only views of the value bytes (one copy out of the map).
    """

    def __init__(self, path: str | Path, fields: dict):
        _require_lmdb()
        self.path = Path(path)
        # One long-lived read transaction per thread (a read txn must not be used by two threads at once);
        # the shard is immutable, so a long read txn sees everything and saves a begin/abort per read.
        self._local = threading.local()
        self._txns: list = []
        try:
            self._env = _acquire_env(self.path)
            self._pid = os.getpid()
            self.num_rows = self._env.stat()["entries"]
        except lmdb.Error as exc:
            raise CorruptStoreError(f"{self.path}: unreadable LMDB shard ({exc}); run `vilbert-cli validate`") from None

    def _txn(self):
        txn = getattr(self._local, "txn", None)
        if txn is None:
            txn = self._local.txn = self._env.begin()
            with _ENVS_LOCK:
                self._txns.append(txn)
        return txn

    def read(self, row: int, image_id: str | None = None) -> RegionFeatures:
        """The record at `row`; `image_id` only improves error messages."""
        try:
            value = self._txn().get(row_key(row))
        except lmdb.Error as exc:
            where = f"{self.path}: record {image_id!r}" if image_id is not None else f"{self.path}: row {row}"
            raise CorruptStoreError(f"{where}: LMDB read failed ({exc})") from None
        if value is None:
            where = f"{self.path}: record {image_id!r}" if image_id is not None else f"{self.path}: row {row}"
            raise CorruptStoreError(f"{where}: row {row} is missing from the shard")
        return decode_record(value, f"{self.path}: record {image_id!r}" if image_id is not None else str(self.path))

    def forget_after_fork(self) -> None:
        """In a forked child: close the inherited handles so this process may open the path again."""
        with _ENVS_LOCK:
            _forget_inherited_envs()
        self._env = None
        self._local = threading.local()
        self._txns = []

    def close(self) -> None:
        """Release this reader's reference to the shared environment."""
        if self._env is not None and os.getpid() == self._pid:
            with _ENVS_LOCK:
                txns, self._txns = self._txns, []
            for txn in txns:
                try:
                    txn.abort()
                except lmdb.Error:
                    pass
            self._local = threading.local()
            _release_env(self.path)
        self._env = None
