"""pack: merge stores, HDF5 files and legacy dumps into one feature store, resumably."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Iterator, Optional

from vilbert.datasets.hdf5_store import Hdf5Source, is_hdf5_file
from vilbert.datasets.manifest import Manifest, is_store
from vilbert.datasets.records import RecordFailure, RegionFeatures
from vilbert.datasets.writer import PackConfig, StoreWriter
from vilbert.errors import (
    ConfigError, IncompatibleSourcesError, LegacyFormatError, RecordError, SourceNotFoundError, StoreError,
)

logger = logging.getLogger(__name__)

MAX_REPORTED_FAILURES = 1000


@dataclasses.dataclass
class PackResult:
    """What pack() did.

    Attributes:
        manifest: the published manifest.
        num_written: records in the output store.
        failures: bad records seen by this run (at most MAX_REPORTED_FAILURES; `num_failures` counts all).
        num_failures: failures over the whole pack, resumed shards included.
        num_resumed: stream items skipped because completed shards of an earlier run cover them.
        elapsed_s: wall time of this run.
    """

    manifest: Manifest
    num_written: int
    failures: list
    num_failures: int
    num_resumed: int = 0
    elapsed_s: float = 0.0


class StoreSource:
    """Iterates an existing feature store (a directory with manifest.json) in position order."""

    format_name = "store"
    needs_pickle = False

    def __init__(self, path: str | Path):
        from vilbert.datasets.reader import FeatureStore
        self.path = Path(path)
        self.store = FeatureStore.open(self.path)

    def __len__(self) -> int:
        return len(self.store)

    def __iter__(self) -> Iterator[RegionFeatures | RecordFailure]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[RegionFeatures | RecordFailure]:
        """Items from position `start` on, without reading the ones before (a resumed pack skips them)."""
        for pos in range(start, len(self.store)):
            yield self.store[pos]
        self.store.close()

    def provenance(self) -> dict:
        m = self.store.manifest
        return {"source_format": "store", "source": str(self.path), "detector": m.detector,
                "feature_dim": m.feature_dim, "fields": m.fields if m.num_records else None}


def open_source(path, source_format: str | None = None, *, trust_pickle: bool = False):
    """Open one pack input: a store directory, an HDF5 file (volta layout) or a legacy dump.

    Args:
        path: the input.
        source_format: force a format: 'store', 'hdf5' or a key of vilbert.datasets.legacy.LEGACY_FORMATS.
        trust_pickle: allow formats that unpickle.

    Raises:
        SourceNotFoundError: the path does not exist.
        LegacyFormatError: the format cannot be recognised (the message lists --source-format choices).
        TrustRequiredError: the format unpickles and `trust_pickle` is False.
    """
    path = Path(path)
    if not path.exists() and not _is_pattern(path):
        raise SourceNotFoundError(f"{path}: no such file or directory")
    if source_format == "store" or (source_format is None and is_store(path)):
        return StoreSource(path)
    if source_format == "hdf5" or (source_format is None and path.is_file() and is_hdf5_file(path)):
        return Hdf5Source(path)
    try:
        from vilbert.datasets import legacy
    except ImportError:  # the legacy importers ship in the same package; guard for partial installs
        legacy = None
    if legacy is not None:
        fmt = source_format or legacy.detect_legacy_format(path)
        if fmt is not None:
            if fmt not in legacy.LEGACY_FORMATS:
                raise ConfigError(f"--source-format {fmt!r} is not one of {_choices(legacy)}")
            return legacy.open_legacy(path, fmt, trust_pickle=trust_pickle)
    raise LegacyFormatError(f"{path}: cannot tell what this is (not a feature store, HDF5 file or known dump); "
                            f"pass --source-format, one of {_choices(legacy)}")


def _is_pattern(path: Path) -> bool:
    """A glob pattern (legacy per-GPU TSV sets may be given as `feats.tsv.*`)."""
    return any(c in str(path) for c in "*?[")


def _choices(legacy) -> str:
    names = ["store", "hdf5"] + (sorted(legacy.LEGACY_FORMATS) if legacy is not None else [])
    return ", ".join(names)


def _detector_key(det: Optional[dict]) -> Optional[str]:
    """A detector's identity: its config and weights hash (box-selection settings do not change it)."""
    if det is None:
        return None
    ident = {"config": det.get("config"), "weights_sha256": det.get("weights_sha256"),
             "weights_file": None if det.get("weights_sha256") else det.get("weights_file")}
    return json.dumps(ident, sort_keys=True, default=str)


def check_detectors(provs: list[dict], allow_mixed: bool) -> Optional[dict]:
    """The common detector of the sources, or raise IncompatibleSourcesError.

    Known vs different known, or known vs unknown, fails unless `allow_mixed`; unknown + unknown is allowed
    with a warning. Returns the shared detector dict, or None when unknown or mixed.
    """
    keys = [_detector_key(p.get("detector")) for p in provs]
    known = {k for k in keys if k is not None}
    if len(known) == 1 and None not in keys:
        return provs[0]["detector"]
    if not known:
        if len(provs) > 1:
            logger.warning("merging %d sources whose detector is unknown; make sure they come from the same "
                           "detector", len(provs))
        return None
    desc = "; ".join(f"{p['source']}: {'unknown detector' if k is None else 'detector ' + hashlib.sha1(k.encode()).hexdigest()[:8]}"
                     for p, k in zip(provs, keys))
    if not allow_mixed:
        raise IncompatibleSourcesError(f"sources come from different or unknown detectors ({desc}); "
                                       "features of different detectors must not be mixed: pack them separately or "
                                       "pass --allow-mixed-detectors")
    logger.warning("mixing detectors as asked (--allow-mixed-detectors): %s", desc)
    return None


def pack_fingerprint(sources: list[Path], config: PackConfig, source_format: str | None) -> str:
    """Identity of a pack command, so that a re-run resumes only the same command.

    Covers the sources (resolved path, size and mtime of files and manifests) and the settings that change
    the bytes written; lmdb_map_size and max_failures may change between a run and its resume.
    """
    items = []
    for p in sources:
        targets = [Path(t) for t in sorted(glob.glob(str(p)))] if _is_pattern(p) and not p.exists() else [p]
        for t in targets:
            stat_target = t / "manifest.json" if t.is_dir() and (t / "manifest.json").exists() else t
            st = stat_target.stat()
            items.append([str(t.resolve()), st.st_size if stat_target.is_file() else None, st.st_mtime_ns])
    cfg = {k: getattr(config, k) for k in ("format", "feature_dtype", "shard_size_bytes", "on_duplicate",
                                            "allow_mixed_detectors")}
    blob = json.dumps({"sources": items, "config": cfg, "source_format": source_format}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def pack(sources, out, config: PackConfig = PackConfig(), *, trust_pickle: bool = False,
         source_format: str | None = None, progress: bool = False, overwrite: bool = False) -> PackResult:
    """Convert and merge `sources` into the feature store `out`.

    Sources are read in the order given, each in its own deterministic order. Bad records are skipped and
    reported (PackResult.failures, manifest failures); the store of good records is published. A run killed
    midway is resumed by running the same command again.

    Args:
        sources: store directories, HDF5 files (volta layout) or legacy dumps.
        out: output store directory.
        config: storage settings.
        trust_pickle: allow sources that need unpickling (runs code from the file: only for trusted files).
        source_format: force the format of every source (see open_source).
        progress: show a tqdm progress bar on stderr.
        overwrite: replace an existing store or unrelated partial output in `out`.

    Returns:
        PackResult.

    Raises:
        SourceNotFoundError, LegacyFormatError, TrustRequiredError: a source cannot be read (before writing).
        IncompatibleSourcesError: different detectors (unless allowed) or different feature dimensions.
        DuplicateImageError: a repeated id under on_duplicate='error'.
        StoreError: `out` is an existing store (without `overwrite`), or one of the sources.
        StoreFullError: an LMDB shard filled up (completed shards are kept; re-run with a larger map).
    """
    t0 = time.monotonic()
    config = config.check()
    paths = [Path(s) for s in sources]
    if not paths:
        raise ConfigError("pack needs at least one source (--from PATH)")
    out = Path(out)
    for p in paths:
        if not p.exists() and not _is_pattern(p):
            raise SourceNotFoundError(f"{p}: no such file or directory")
        if out.exists() and p.resolve() == out.resolve():
            raise StoreError(f"{p}: is both a source and the output; choose another --out")
    # Open everything and pull the first item of each source before writing, so source-level problems
    # (wrong layout, missing key list, pickle without trust) fail with nothing written.
    opened, firsts, provs = [], [], []
    for p in paths:
        src = open_source(p, source_format, trust_pickle=trust_pickle)
        it = iter(src)
        first = list(itertools.islice(it, 1))
        opened.append((src, itertools.chain(first, it)))
        provs.append(src.provenance())
    dims = {prov.get("feature_dim") for prov in provs if prov.get("feature_dim") is not None}
    if len(dims) > 1:
        raise IncompatibleSourcesError(f"sources have different feature dimensions {sorted(dims)}: "
                                       + "; ".join(f"{p['source']}: {p.get('feature_dim')}" for p in provs))
    layouts = {json.dumps(p["fields"], sort_keys=True) for p in provs if p.get("fields") is not None}
    if len(layouts) > 1:
        raise IncompatibleSourcesError("sources carry different optional fields: " + "; ".join(
            f"{p['source']}: {sorted(p['fields'])}" for p in provs if p.get("fields") is not None)
            + "; every record of a store has the same fields: pack them separately")
    detector = check_detectors(provs, config.allow_mixed_detectors)
    provenance = {"detector": detector, "sources": provs}
    fingerprint = pack_fingerprint(paths, config, source_format)
    total = _total_items(opened)

    failures: list[RecordFailure] = []
    with StoreWriter(out, config, provenance, fingerprint=fingerprint, overwrite=overwrite) as writer:
        skip = writer.resumed_items
        bar = _progress_bar(total, progress, skip)
        consumed = 0
        for (src, items), prov in zip(opened, provs):
            source_name = prov.get("source", str(src.path))
            start = 0
            if skip > consumed and hasattr(src, "iter_from"):
                # Resuming: jump over the items the completed shards cover instead of decoding them.
                start = min(skip - consumed, len(src))
                items, consumed = src.iter_from(start), consumed + start
            for pos, item in enumerate(items, start):
                consumed += 1
                if consumed <= skip:
                    continue
                if isinstance(item, RecordFailure):
                    writer.add_failure(item)
                    if len(failures) < MAX_REPORTED_FAILURES:
                        failures.append(item)
                else:
                    dim = writer.feature_dim
                    if dim is not None and item.features.ndim == 2 and item.features.shape[1] != dim:
                        raise IncompatibleSourcesError(
                            f"{source_name}: record {item.image_id!r}: features are {item.features.shape[1]}-d, "
                            f"the store being packed holds {dim}-d features; pack them separately")
                    try:
                        writer.write(item)
                    except RecordError as exc:
                        reason = str(exc).split(f"record {item.image_id!r}: ", 1)[-1]
                        fail = RecordFailure(source_name, item.image_id, pos, reason)
                        writer.add_failure(fail)
                        if len(failures) < MAX_REPORTED_FAILURES:
                            failures.append(fail)
                if bar is not None:
                    bar.update(1)
                    if consumed % 256 == 0:
                        bar.set_postfix(failed=writer.num_failures, refresh=False)
        if bar is not None:
            bar.close()
        manifest = writer.close()
    result = PackResult(manifest=manifest, num_written=manifest.num_records, failures=failures,
                        num_failures=int(manifest.failures.get("count", 0)), num_resumed=skip,
                        elapsed_s=time.monotonic() - t0)
    logger.debug("packed %d records into %s (%s) in %.1f s; %d failure(s)%s", result.num_written, out,
                config.format, result.elapsed_s, result.num_failures,
                f"; resumed after {skip} items" if skip else "")
    return result


def _total_items(opened) -> Optional[int]:
    total = 0
    for src, _ in opened:
        count = src.count() if hasattr(src, "count") else len(src) if hasattr(src, "__len__") else None
        if count is None:
            return None
        total += count
    return total


def _progress_bar(total, enabled: bool, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="rec", desc="pack", dynamic_ncols=True)
