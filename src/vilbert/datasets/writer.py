"""StoreWriter: writes records into a sharded feature store, crash-safely and resumably."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import vilbert
from vilbert.datasets.atomic import (
    TMP_SUFFIX, fsync_dir, fsync_file, publish, sha256_and_fsync, sha256_file, tmp_path_for, write_json_atomic,
)
from vilbert.datasets.manifest import (
    FORMAT_VERSION, INDEX_NAME, MANIFEST_NAME, SHARD_DIR, STORAGES, Manifest, ShardInfo, shard_name, utc_now,
    write_index, write_manifest,
)
from vilbert.datasets.records import FEATURE_DTYPES, OPTIONAL_FIELDS, RecordFailure, RegionFeatures
from vilbert.errors import ConfigError, DuplicateImageError, RecordError, StoreError, StoreFullError

logger = logging.getLogger(__name__)

DONE_SUFFIX = ".done.json"
ON_DUPLICATE = ("error", "keep-first", "keep-last")
MAX_FAILURE_EXAMPLES = 20


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """How records are stored.

    Attributes:
        format: shard storage, 'arrow' | 'lmdb' | 'hdf5'.
        feature_dtype: dtype `features` are stored in, 'float16' or 'float32'.
        shard_size_bytes: start a new shard once the current one holds about this many array bytes.
        on_duplicate: a repeated image_id is an 'error', or keeps the first / last record.
        allow_mixed_detectors: pack sources made by different detectors into one store.
        lmdb_map_size: map size per LMDB shard; a full map is a StoreFullError naming shard and record.
        max_failures: bad input records tolerated before `vilbert-cli pack` exits 1 (-1: no limit); the
            store keeps the good records either way.
    """

    format: str = "arrow"
    feature_dtype: str = "float16"
    shard_size_bytes: int = 1 << 30
    on_duplicate: str = "error"
    allow_mixed_detectors: bool = False
    lmdb_map_size: int = 1 << 40
    max_failures: int = 0

    def check(self) -> "PackConfig":
        """Raise ConfigError naming the bad field; return self."""
        if self.format not in STORAGES:
            raise ConfigError(f"format {self.format!r} is not one of {', '.join(STORAGES)}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"feature_dtype {self.feature_dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
        if self.on_duplicate not in ON_DUPLICATE:
            raise ConfigError(f"on_duplicate {self.on_duplicate!r} is not one of {', '.join(ON_DUPLICATE)}")
        if self.shard_size_bytes <= 0:
            raise ConfigError(f"shard_size_bytes must be positive, got {self.shard_size_bytes}")
        if self.lmdb_map_size <= 0:
            raise ConfigError(f"lmdb_map_size must be positive, got {self.lmdb_map_size}")
        return self


# numpy's dtype.name is slow enough to matter once per field per record.
_FIELD_DTYPE_NAMES = {name: dt.name for name, dt in OPTIONAL_FIELDS.items()}


def record_layout(record: RegionFeatures) -> tuple[int, dict]:
    """(feature_dim, fields) of a record, in the form Manifest.fields uses."""
    fields = {}
    for name in record.present_fields():
        arr = getattr(record, name)
        fields[name] = {"dtype": _FIELD_DTYPE_NAMES[name], "width": int(arr.shape[1]) if arr.ndim == 2 else None}
    return record.feature_dim, fields


def open_shard_writer(storage: str, path: Path, feature_dim: int, feature_dtype: str, fields: dict,
                      config: PackConfig):
    """A format-specific shard writer (`append`, `close`, `abort`, `num_rows`, `bytes_written`)."""
    if storage == "arrow":
        from vilbert.datasets.arrow_store import ArrowShardWriter
        return ArrowShardWriter(path, feature_dim, feature_dtype, fields)
    if storage == "lmdb":
        from vilbert.datasets.lmdb_store import LmdbShardWriter
        return LmdbShardWriter(path, feature_dim, feature_dtype, fields, map_size=config.lmdb_map_size)
    from vilbert.datasets.hdf5_store import Hdf5ShardWriter
    return Hdf5ShardWriter(path, feature_dim, feature_dtype, fields)


class StoreWriter:
    """Writes a feature store directory: shards, then the index, then manifest.json.

    Each shard is written under a temp name, fsynced and renamed; then a completion sidecar
    (`shards/part-NNNNN.done.json`) records its rows, hash and the stream position it covers. The index and
    manifest are published by close(). A writer killed at any moment leaves either the old state or
    completed shards: constructing a StoreWriter on the same directory with the same `fingerprint` keeps the
    completed shards, deletes partial files, and reports in `resumed_items` how many stream items (records
    and failures, in the order they were given to write()/add_failure()) are already covered, so the caller
    skips them and goes on.

    Args:
        out_dir: store directory (created if needed).
        config: storage settings.
        provenance: {'detector': dict | None, 'sources': [...], ...}; tool_version is added.
        fingerprint: identifies the producing command; needed to resume partial output.
        overwrite: delete an existing store or partial output in `out_dir` first.

    Raises:
        StoreError: `out_dir` holds a complete store, partial output of another command, or unrelated files,
            and `overwrite` is False.
    """

    def __init__(self, out_dir, config: PackConfig = PackConfig(), provenance: dict | None = None, *,
                 fingerprint: str | None = None, overwrite: bool = False):
        self.config = config.check()
        self.out_dir = Path(out_dir)
        self.provenance = dict(provenance or {})
        self.provenance.setdefault("detector", None)
        self.fingerprint = fingerprint
        self._shard_dir = self.out_dir / SHARD_DIR
        # Layout, fixed by the first record (or by resumed shards).
        self._feature_dim: Optional[int] = None
        self._fields: Optional[dict] = None
        # Index in position order.
        self._ids: list[str] = []
        self._shard_of: list[int] = []
        self._row_of: list[int] = []
        self._nbox_of: list[int] = []
        self._position: dict[str, int] = {}
        self._dead_rows = 0
        self._shards: list[ShardInfo] = []
        self._failure_count = 0
        self._failure_examples: list[dict] = []
        self._span_failures: list[dict] = []
        self._span_failure_count = 0
        self._consumed = 0
        self._current = None
        self._current_ids: list[str] = []
        self._current_nboxes: list[int] = []
        self._closed = False
        self._finisher: ThreadPoolExecutor | None = None
        self.resumed_items = 0
        self._prepare(overwrite)

    # ------------------------------------------------------------------ set-up and resume
    def _prepare(self, overwrite: bool) -> None:
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise StoreError(f"{out}: exists and is not a directory; choose another --out")
        if out.is_dir():
            ours = {MANIFEST_NAME, INDEX_NAME, SHARD_DIR, MANIFEST_NAME + TMP_SUFFIX, INDEX_NAME + TMP_SUFFIX}
            foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
            if foreign:
                raise StoreError(f"{out}: directory is not empty and is not a feature store (found {foreign[:3]}); "
                                 "choose an empty or new --out")
            if (out / MANIFEST_NAME).exists():
                if not overwrite:
                    raise StoreError(f"{out}: already holds a complete feature store; pass --overwrite to replace it")
                self._wipe()
            elif self._shard_dir.is_dir() and any(self._shard_dir.iterdir()):
                if overwrite:
                    self._wipe()
                else:
                    self._resume()
        self._shard_dir.mkdir(parents=True, exist_ok=True)

    def _wipe(self) -> None:
        logger.info("removing the existing store in %s (--overwrite)", self.out_dir)
        for name in (MANIFEST_NAME, INDEX_NAME, MANIFEST_NAME + TMP_SUFFIX, INDEX_NAME + TMP_SUFFIX):
            (self.out_dir / name).unlink(missing_ok=True)
        fsync_dir(self.out_dir)  # the store is gone before its shards are: never a manifest without shards
        shutil.rmtree(self._shard_dir, ignore_errors=True)

    def _resume(self) -> None:
        done = sorted(self._shard_dir.glob("part-*" + DONE_SUFFIX))
        sidecars = []
        for path in done:
            try:
                sidecars.append(json.loads(path.read_text("utf-8")))
            except (OSError, ValueError) as exc:
                raise StoreError(f"{path}: unreadable completion record ({exc}); pass --overwrite to start over") from None
        for sc in sidecars:
            if self.fingerprint is None:
                raise StoreError(f"{self.out_dir}: holds partial output of an earlier run; resume it with the same "
                                 "command (fingerprint), or pass --overwrite to start over")
            if sc.get("fingerprint") != self.fingerprint:
                raise StoreError(
                    f"{self.out_dir}: holds partial output of a different command (sources or settings differ); "
                    "re-run the original command to resume it, or pass --overwrite to start over")
            if sc.get("storage") != self.config.format or sc.get("format_version") != FORMAT_VERSION \
                    or sc.get("layout", {}).get("feature_dtype") != self.config.feature_dtype:
                raise StoreError(f"{self.out_dir}: partial output is {sc.get('storage')!r} with "
                                 f"{sc.get('layout', {}).get('feature_dtype')!r} features; pass --overwrite to start over")
        # Keep the longest prefix of consecutive complete shards; everything else is partial and goes.
        keep = []
        for i, sc in enumerate(sidecars):
            path = self.out_dir / sc["shard"]
            if sc["shard"] != shard_name(self.config.format, i) or not path.is_file() \
                    or path.stat().st_size != sc["size_bytes"]:
                break
            keep.append(sc)
        keep_names = {sc["shard"] for sc in keep} | {sc["shard"] + DONE_SUFFIX for sc in keep}
        keep_names = {Path(n).name for n in keep_names}
        for p in self._shard_dir.iterdir():
            if p.name not in keep_names:
                logger.info("resume: removing partial file %s", p)
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        for sc in keep:
            self._adopt_shard(sc)
        self.resumed_items = self._consumed
        if keep:
            logger.info("resuming %s: %d complete shard(s), %d records, %d stream items already consumed",
                        self.out_dir, len(keep), len(self._ids), self.resumed_items)

    def _adopt_shard(self, sc: dict) -> None:
        number = len(self._shards)
        layout = sc["layout"]
        if self._feature_dim is None:
            self._feature_dim, self._fields = layout["feature_dim"], layout["fields"]
        for row, (image_id, nb) in enumerate(zip(sc["ids"], sc["num_boxes"])):
            self._index_row(image_id, number, row, nb)
        self._shards.append(ShardInfo(sc["shard"], sc["num_records"], sc["size_bytes"], sc["sha256"]))
        self._add_failure_summary(sc["failures"]["count"], sc["failures"]["examples"])
        self._consumed = sc["stream_end"]

    def _index_row(self, image_id: str, shard: int, row: int, nb: int) -> None:
        pos = self._position.get(image_id)
        if pos is None:
            self._position[image_id] = len(self._ids)
            self._ids.append(image_id)
            self._shard_of.append(shard)
            self._row_of.append(row)
            self._nbox_of.append(nb)
        else:  # keep-last: the new row replaces the old one at the same position
            self._shard_of[pos], self._row_of[pos], self._nbox_of[pos] = shard, row, nb
            self._dead_rows += 1

    def _add_failure_summary(self, count: int, examples: list) -> None:
        self._failure_count += count
        room = MAX_FAILURE_EXAMPLES - len(self._failure_examples)
        self._failure_examples.extend(examples[:max(room, 0)])

    # ------------------------------------------------------------------ public API
    @property
    def num_written(self) -> int:
        """Records reachable through the index so far (resumed ones included)."""
        return len(self._ids)

    @property
    def feature_dim(self) -> Optional[int]:
        """D of the store, fixed by the first record (None before it)."""
        return self._feature_dim

    @property
    def num_failures(self) -> int:
        return self._failure_count + self._span_failure_count

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._position

    def write(self, record: RegionFeatures) -> bool:
        """Add one record.

        Args:
            record: any dtypes; it is validated and cast to the store dtypes (features to feature_dtype).

        Returns:
            False when the record was skipped as a duplicate under 'keep-first', else True.

        Raises:
            RecordError: the record is malformed or does not match the store layout (nothing was written;
                the caller may record a failure and go on).
            DuplicateImageError: the id is already in the store and on_duplicate is 'error'.
            StoreFullError: the shard ran out of space (LMDB map full); completed shards are kept.
        """
        self._check_open()
        record = record.validate().cast(self.config.feature_dtype)
        dim, fields = record_layout(record)
        if self._feature_dim is None:
            self._feature_dim, self._fields = dim, fields
        elif dim != self._feature_dim:
            raise RecordError(f"record {record.image_id!r}: features are {dim}-d but the store holds "
                              f"{self._feature_dim}-d features")
        elif fields != self._fields:
            raise RecordError(f"record {record.image_id!r}: optional fields {fields} differ from the store's "
                              f"{self._fields}")
        if record.image_id in self._position:
            policy = self.config.on_duplicate
            if policy == "error":
                raise DuplicateImageError(
                    f"{self.out_dir}: record {record.image_id!r} appears twice; "
                    "pass --on-duplicate keep-first or keep-last to choose one")
            if policy == "keep-first":
                self._consumed += 1
                logger.debug("skipping duplicate %r (keep-first)", record.image_id)
                return False
        if self._current is None:
            self._start_shard()
        try:
            self._current.append(record)
        except StoreFullError as exc:
            name = shard_name(self.config.format, len(self._shards))
            self.abort()
            raise StoreFullError(f"{self.out_dir / name}: record {record.image_id!r}: {exc}; completed shards "
                                 "are kept: re-run with a larger --lmdb-map-size-mb (or a smaller --shard-size-mb)"
                                 ) from None
        self._index_row(record.image_id, len(self._shards), self._current.num_rows - 1, record.num_boxes)
        self._current_ids.append(record.image_id)
        self._current_nboxes.append(record.num_boxes)
        self._consumed += 1
        if self._current.bytes_written >= self.config.shard_size_bytes:
            self._finish_shard()
        return True

    def add_failure(self, failure: RecordFailure) -> None:
        """Count a bad input record (one stream item) so that it is reported in the manifest."""
        self._check_open()
        self._span_failure_count += 1
        if len(self._span_failures) < MAX_FAILURE_EXAMPLES:
            self._span_failures.append(failure.to_json())
        self._consumed += 1

    def close(self) -> Manifest:
        """Finish the last shard and publish the index and then the manifest.

        Returns:
            The published Manifest.
        """
        self._check_open()
        if self._current is not None and self._current.num_rows:
            self._finish_shard()
        elif self._current is not None:
            self._discard_current()
        self._wait_for_shards()
        self._add_failure_summary(self._span_failure_count, self._span_failures)
        self._span_failures, self._span_failure_count = [], 0
        index_path = self.out_dir / INDEX_NAME
        write_index(index_path, self._ids, self._shard_of, self._row_of, self._nbox_of)
        prov = dict(self.provenance)
        prov.setdefault("tool_version", vilbert.__version__)
        manifest = Manifest(
            storage=self.config.format,
            num_records=len(self._ids),
            feature_dim=self._feature_dim,
            feature_dtype=self.config.feature_dtype,
            fields=self._fields or {},
            shards=tuple(self._shards),
            index={"name": INDEX_NAME, "sha256": sha256_file(index_path), "size_bytes": index_path.stat().st_size},
            provenance=prov,
            failures={"count": self._failure_count, "examples": self._failure_examples},
            dead_rows=self._dead_rows,
            created=utc_now(),
        )
        write_manifest(self.out_dir, manifest)
        for p in self._shard_dir.glob("*" + DONE_SUFFIX):  # the manifest now describes the shards
            p.unlink()
        self._closed = True
        logger.debug("published %s: %d records in %d shard(s), %d failure(s)", self.out_dir, manifest.num_records,
                    len(self._shards), self._failure_count)
        return manifest

    def _discard_current(self) -> None:
        """Throw away the shard being written (a resumed run redoes its records)."""
        if self._current is not None:
            self._current.abort()
            _remove(self._current.path)
            self._current = None

    def abort(self) -> None:
        """Stop without publishing: the current shard is discarded, completed shards stay for a resume."""
        if self._closed:
            return
        self._closed = True
        self._discard_current()
        try:
            self._wait_for_shards()
        except Exception as exc:  # noqa: BLE001 - already failing; a shard without a completion record is redone
            logger.warning("while aborting, a finished shard could not be published: %s", exc)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()

    # ------------------------------------------------------------------ shards
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.out_dir}: writer is closed")

    def _start_shard(self) -> None:
        final = self.out_dir / shard_name(self.config.format, len(self._shards))
        tmp = tmp_path_for(final)
        _remove(tmp)
        self._current = open_shard_writer(self.config.format, tmp, self._feature_dim, self.config.feature_dtype,
                                          self._fields, self.config)
        self._current_ids, self._current_nboxes = [], []

    def _finish_shard(self) -> None:
        w = self._current
        name = shard_name(self.config.format, len(self._shards))
        self._current = None
        sidecar = {
            "shard": name,
            "storage": self.config.format,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "num_records": w.num_rows,
            "stream_end": self._consumed,
            "layout": {"feature_dim": self._feature_dim, "feature_dtype": self.config.feature_dtype,
                       "fields": self._fields},
            "ids": self._current_ids,
            "num_boxes": [int(n) for n in self._current_nboxes],
            "failures": {"count": self._span_failure_count, "examples": self._span_failures},
        }
        self._current_ids, self._current_nboxes = [], []  # the sidecar owns the old lists now
        final = self.out_dir / name
        try:
            w.close()  # on this thread: an LMDB write transaction must end on the thread that began it
        except StoreFullError as exc:
            raise StoreFullError(f"{final}: {exc}; completed shards are kept: re-run with a larger "
                                 "--lmdb-map-size-mb (or a smaller --shard-size-mb)") from None
        # fsync, hashing and publishing run on a background thread while the next shard is written. At most
        # one shard is in flight, so a failure surfaces at the next shard, not at the end of the job.
        if self._shards and isinstance(self._shards[-1], Future):
            self._shards[-1] = self._shards[-1].result()
        if self._finisher is None:
            self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-finish")
        self._shards.append(self._finisher.submit(self._complete_shard, w, final, sidecar))
        self._add_failure_summary(self._span_failure_count, self._span_failures)
        self._span_failures, self._span_failure_count = [], 0

    def _complete_shard(self, w, final: Path, sidecar: dict) -> ShardInfo:
        """Hash a closed shard, publish it (fsync, rename) and write its completion record."""
        name = sidecar["shard"]
        try:
            sidecar["size_bytes"] = w.path.stat().st_size
            if hasattr(w, "digest"):
                # Arrow shards are hashed while written: flush to disk while the hasher reads the tail.
                fsync_file(w.path)
                sidecar["sha256"] = w.digest()
            else:
                # LMDB and HDF5 rewrite pages while writing, so they are hashed once closed.
                sidecar["sha256"] = sha256_and_fsync(w.path)
            publish(w.path, final)  # complete once its completion record exists
            write_json_atomic(self._shard_dir / (Path(name).name + DONE_SUFFIX), sidecar)
        except OSError as exc:
            raise StoreError(f"{final}: could not publish the shard ({exc}); completed shards are kept, "
                             "re-run the same command to resume") from None
        logger.debug("shard %s closed: %d rows, %d bytes", name, w.num_rows, sidecar["size_bytes"])
        return ShardInfo(name, sidecar["num_records"], sidecar["size_bytes"], sidecar["sha256"])

    def _wait_for_shards(self) -> None:
        """Wait for background shard finishing; every published shard then has its completion record."""
        try:
            self._shards = [s.result() if isinstance(s, Future) else s for s in self._shards]
        finally:
            if self._finisher is not None:
                self._finisher.shutdown(wait=True)
                self._finisher = None


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)
    # LMDB single-file environments may leave a '-lock' companion when opened with locking.
    lock = Path(str(path) + "-lock")
    if lock.exists():
        lock.unlink(missing_ok=True)
