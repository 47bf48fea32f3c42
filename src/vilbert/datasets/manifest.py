"""The store manifest (manifest.json) and its global id index sidecar (index.arrow)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from vilbert.datasets.atomic import fsync_dir, publish, tmp_path_for, write_json_atomic
from vilbert.errors import CorruptStoreError, SchemaVersionError, SourceNotFoundError

logger = logging.getLogger(__name__)

FORMAT_NAME = "vilbert-feature-store"
# Bump when the on-disk layout changes in a way old readers cannot read; readers refuse unknown versions.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.arrow"
SHARD_DIR = "shards"
STORAGES = ("arrow", "lmdb", "hdf5")
SHARD_EXT = {"arrow": "arrow", "lmdb": "lmdb", "hdf5": "h5"}


def shard_name(storage: str, number: int) -> str:
    """Deterministic shard file name, relative to the store directory (e.g. 'shards/part-00000.arrow')."""
    return f"{SHARD_DIR}/part-{number:05d}.{SHARD_EXT[storage]}"


def utc_now() -> str:
    """Current UTC time as ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One published shard.

    Attributes:
        name: path relative to the store directory.
        num_records: rows in the shard (dead rows of keep-last duplicates included).
        size_bytes: file size.
        sha256: hex digest of the file.
    """

    name: str
    num_records: int
    size_bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What manifest.json holds. See docs/feature-format.md for the meaning of every field.

    Attributes:
        storage: 'arrow', 'lmdb' or 'hdf5'.
        num_records: records reachable through the index.
        feature_dim: D of `features` (None for an empty store).
        feature_dtype: 'float16' or 'float32'.
        fields: optional fields present in every record: name -> {'dtype': str, 'width': int | None}
            (width is the second dimension of 2-d fields such as cls_prob, None for (N,) fields).
        shards: published shards in order.
        index: {'name', 'sha256', 'size_bytes'} of the id index sidecar.
        provenance: {'detector': dict | None, 'sources': [...], 'tool_version': str, ...}.
        failures: {'count': int, 'examples': [RecordFailure.to_json(), ...]} (first 20).
        dead_rows: rows left unindexed by --on-duplicate keep-last.
        created: ISO 8601 UTC time the manifest was published.
        format_version: on-disk layout version (FORMAT_VERSION).
    """

    storage: str
    num_records: int
    feature_dim: Optional[int]
    feature_dtype: str
    fields: dict
    shards: tuple
    index: dict
    provenance: dict
    failures: dict = dataclasses.field(default_factory=lambda: {"count": 0, "examples": []})
    dead_rows: int = 0
    created: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def detector(self) -> Optional[dict]:
        """The detector signature from provenance (None when unknown)."""
        return (self.provenance or {}).get("detector")

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "storage": self.storage,
            "num_records": self.num_records,
            "feature_dim": self.feature_dim,
            "feature_dtype": self.feature_dtype,
            "fields": self.fields,
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "index": self.index,
            "dead_rows": self.dead_rows,
            "provenance": self.provenance,
            "failures": self.failures,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, obj: Any, source: str = "manifest.json") -> "Manifest":
        """Parse and check a manifest dict.

        Raises:
            SchemaVersionError: unknown format name or version.
            CorruptStoreError: a required key is missing or has the wrong type.
        """
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise CorruptStoreError(f"{source}: not a {FORMAT_NAME} manifest (format={obj.get('format') if isinstance(obj, dict) else None!r})")
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise SchemaVersionError(
                f"{source}: format_version {version!r} is not supported by this release "
                f"(it reads version {FORMAT_VERSION}); upgrade vilbert or re-pack the store"
            )
        try:
            storage = obj["storage"]
            if storage not in STORAGES:
                raise CorruptStoreError(f"{source}: unknown storage {storage!r}, expected one of {STORAGES}")
            shards = tuple(ShardInfo(str(s["name"]), int(s["num_records"]), int(s["size_bytes"]), str(s["sha256"]))
                           for s in obj["shards"])
            return cls(
                storage=storage,
                num_records=int(obj["num_records"]),
                feature_dim=None if obj["feature_dim"] is None else int(obj["feature_dim"]),
                feature_dtype=str(obj["feature_dtype"]),
                fields=dict(obj.get("fields") or {}),
                shards=shards,
                index=dict(obj["index"]),
                provenance=dict(obj.get("provenance") or {}),
                failures=dict(obj.get("failures") or {"count": 0, "examples": []}),
                dead_rows=int(obj.get("dead_rows", 0)),
                created=str(obj.get("created", "")),
                format_version=int(version),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from None


def is_store(path: str | Path) -> bool:
    """True when `path` is a directory holding a manifest.json."""
    return (Path(path) / MANIFEST_NAME).is_file()


def load_manifest(store_dir: str | Path) -> Manifest:
    """Read and check `<store_dir>/manifest.json`.

    Raises:
        SourceNotFoundError: the directory or its manifest does not exist.
        SchemaVersionError / CorruptStoreError: see Manifest.from_json.
    """
    store_dir = Path(store_dir)
    if not store_dir.exists():
        raise SourceNotFoundError(f"{store_dir}: no such store (path does not exist)")
    path = store_dir / MANIFEST_NAME
    if not path.is_file():
        raise SourceNotFoundError(
            f"{path}: missing; {store_dir} is not a feature store (or its pack never finished: re-run it)"
        )
    try:
        obj = json.loads(path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptStoreError(f"{path}: not valid JSON ({exc})") from None
    return Manifest.from_json(obj, str(path))


def write_manifest(store_dir: str | Path, manifest: Manifest) -> None:
    """Publish the manifest atomically (the last step of writing a store)."""
    write_json_atomic(Path(store_dir) / MANIFEST_NAME, manifest.to_json())


# ---------------------------------------------------------------------------------------------- index
INDEX_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("shard", pa.int32()),
    ("row", pa.int64()),
    ("num_boxes", pa.int32()),
])


@dataclasses.dataclass
class StoreIndex:
    """The global id index in position order.

    Attributes:
        image_ids: pyarrow StringArray (P,) of ids.
        shard: (P,) int32 shard number per position.
        row: (P,) int64 row inside the shard.
        num_boxes: (P,) int32 box count per position.
    """

    image_ids: pa.Array
    shard: np.ndarray
    row: np.ndarray
    num_boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.shard)


def write_index(path: str | Path, image_ids: list, shard, row, num_boxes) -> None:
    """Write the index as an Arrow IPC file, atomically."""
    path = Path(path)
    table = pa.table({
        "image_id": pa.array(list(image_ids), pa.string()),
        "shard": pa.array(np.asarray(shard, np.int32)),
        "row": pa.array(np.asarray(row, np.int64)),
        "num_boxes": pa.array(np.asarray(num_boxes, np.int32)),
    }, schema=INDEX_SCHEMA)
    tmp = tmp_path_for(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, INDEX_SCHEMA) as w:
        w.write_table(table, max_chunksize=1 << 20)
    publish(tmp, path)
    fsync_dir(path.parent)


def read_index(path: str | Path) -> StoreIndex:
    """Read the index sidecar fully into memory.

    Raises:
        CorruptStoreError: missing, truncated or with the wrong columns.
    """
    path = Path(path)
    try:
        with pa.OSFile(str(path), "rb") as f:
            table = pa.ipc.open_file(f).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise CorruptStoreError(f"{path}: cannot read the index ({exc}); run `vilbert-cli validate`") from None
    if not table.schema.equals(INDEX_SCHEMA):
        raise CorruptStoreError(f"{path}: index columns are {table.schema.names}, expected {INDEX_SCHEMA.names}")
    table = table.combine_chunks()

    def col(name, dt):
        return table.column(name).chunk(0).to_numpy().astype(dt, copy=False) if table.num_rows else np.zeros(0, dt)

    ids = table.column("image_id").chunk(0) if table.num_rows else pa.array([], pa.string())
    return StoreIndex(ids, col("shard", np.int32), col("row", np.int64), col("num_boxes", np.int32))
