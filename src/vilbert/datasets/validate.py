"""validate: re-hash shards and check the manifest, index and every record of a feature store."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from vilbert.datasets.atomic import sha256_file
from vilbert.datasets.manifest import INDEX_NAME, load_manifest, read_index
from vilbert.errors import VilbertError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ValidationReport:
    """Outcome of validate_store.

    Attributes:
        path: the store.
        num_records: records in the manifest.
        num_shards: shards in the manifest.
        records_checked: records read and checked.
        problems: one line per problem, each naming the file and, where it applies, the record.
        damaged_shards: names of shards with a problem.
    """

    path: str
    num_records: int = 0
    num_shards: int = 0
    records_checked: int = 0
    problems: list = dataclasses.field(default_factory=list)
    damaged_shards: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_store(path, *, check_records: bool = True, max_problems: int = 1000) -> ValidationReport:
    """Check a store end to end.

    Re-hashes every shard and the index against the manifest, checks the index (count, duplicate ids,
    references), and reads every indexed record of each intact shard, checking its arrays against num_boxes,
    the feature dimension and dtype, and the optional fields the manifest lists. Records of a shard whose
    hash does not match are not decoded (the bytes cannot be trusted); they are named instead.

    Args:
        path: store directory.
        check_records: also decode every record (off: hashes and index only).
        max_problems: stop collecting after this many problems.

    Returns:
        ValidationReport; `.ok` is False when anything is wrong.

    Raises:
        SourceNotFoundError / SchemaVersionError / CorruptStoreError: the manifest itself is unreadable.
    """
    from vilbert.datasets.reader import FeatureStore

    path = Path(path)
    manifest = load_manifest(path)
    report = ValidationReport(str(path), manifest.num_records, len(manifest.shards))
    problems = report.problems

    def problem(msg: str, shard: str | None = None) -> None:
        if len(problems) < max_problems:
            problems.append(msg)
        if shard is not None and shard not in report.damaged_shards:
            report.damaged_shards.append(shard)

    # Index file.
    index_path = path / manifest.index.get("name", INDEX_NAME)
    if not index_path.is_file():
        problem(f"{index_path}: index is missing")
        return report
    if sha256_file(index_path) != manifest.index.get("sha256"):
        problem(f"{index_path}: sha256 differs from the manifest (index truncated or tampered with)")
        return report
    try:
        index = read_index(index_path)
    except VilbertError as exc:
        problem(str(exc))
        return report
    if len(index) != manifest.num_records:
        problem(f"{index_path}: {len(index)} entries, the manifest says {manifest.num_records}")
    ids = index.image_ids.to_pylist()
    if len(set(ids)) != len(ids):
        seen, dups = set(), []
        for i in ids:
            if i in seen:
                dups.append(i)
            seen.add(i)
        problem(f"{index_path}: duplicate image ids {dups[:5]}")
    if len(index) and (index.shard.min() < 0 or index.shard.max() >= len(manifest.shards)):
        problem(f"{index_path}: refers to shards outside the manifest's {len(manifest.shards)}")
        return report
    pairs = index.shard.astype(np.int64) * (1 << 40) + index.row
    if len(np.unique(pairs)) != len(pairs):
        problem(f"{index_path}: several ids point at the same shard row")

    # Shards.
    intact = []
    for n, info in enumerate(manifest.shards):
        shard_path = path / info.name
        members = np.flatnonzero(index.shard == n)
        named = ", ".join(repr(ids[i]) for i in members[:5]) + (" ..." if len(members) > 5 else "")
        if not shard_path.is_file():
            problem(f"{shard_path}: shard is missing; records {named} are lost", info.name)
            continue
        size = shard_path.stat().st_size
        if size != info.size_bytes:
            problem(f"{shard_path}: {size} bytes, the manifest says {info.size_bytes} (truncated or replaced); "
                    f"affected records: {named}", info.name)
            continue
        if sha256_file(shard_path) != info.sha256:
            problem(f"{shard_path}: sha256 differs from the manifest (corrupted or tampered with); "
                    f"affected records: {named}", info.name)
            continue
        intact.append(n)

    if not check_records:
        return report
    store = FeatureStore(path, manifest, index)
    try:
        fields = manifest.fields
        for n in intact:
            info = manifest.shards[n]
            shard_path = path / info.name
            try:
                reader = store._reader(n)  # noqa: SLF001 - validate is the reader's own checker
            except VilbertError as exc:
                problem(str(exc), info.name)
                continue
            if manifest.storage != "hdf5" and reader.num_rows != info.num_records:
                problem(f"{shard_path}: holds {reader.num_rows} rows, the manifest says {info.num_records}", info.name)
            for pos in np.flatnonzero(index.shard == n):
                image_id = ids[pos]
                try:
                    rec = store[int(pos)]
                    rec.validate(str(shard_path))
                    _check_layout(rec, manifest, fields)
                except (VilbertError, ValueError, KeyError, IndexError) as exc:
                    msg = str(exc)
                    if f"record {image_id!r}" not in msg:
                        msg = f"{shard_path}: record {image_id!r}: {msg}"
                    problem(msg, info.name)
                report.records_checked += 1
    finally:
        store.close()
    return report


def _check_layout(rec, manifest, fields: dict) -> None:
    from vilbert.errors import RecordError

    rid = f"record {rec.image_id!r}"
    if manifest.feature_dim is not None and rec.features.shape[1] != manifest.feature_dim:
        raise RecordError(f"{rid}: features are {rec.features.shape[1]}-d, the manifest says {manifest.feature_dim}")
    if str(rec.features.dtype) != manifest.feature_dtype:
        raise RecordError(f"{rid}: features are {rec.features.dtype}, the manifest says {manifest.feature_dtype}")
    present = set(rec.present_fields())
    if present != set(fields):
        raise RecordError(f"{rid}: has fields {sorted(present)}, the manifest lists {sorted(fields)}")
    for name, spec in fields.items():
        arr = getattr(rec, name)
        if spec.get("width") and arr.shape[1] != spec["width"]:
            raise RecordError(f"{rid}: {name} is {arr.shape[1]} wide, the manifest says {spec['width']}")
