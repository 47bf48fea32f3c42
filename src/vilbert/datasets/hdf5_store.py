"""HDF5 shards in the volta per-image-group layout, and import of volta-style HDF5 files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from vilbert.datasets.records import RecordFailure, RegionFeatures
from vilbert.errors import CorruptStoreError, LegacyFormatError, MissingDependencyError, RecordError

try:
    import h5py
except ImportError:  # pragma: no cover - h5py is a core dependency
    h5py = None

logger = logging.getLogger(__name__)

# Our field names -> dataset names in volta's large_tsv_to_h5.py output.
H5_NAMES = {"cls_prob": "cls_prob", "objects_id": "obj_id", "objects_conf": "obj_conf",
            "attrs_id": "attr_id", "attrs_conf": "attr_conf"}


def _require_h5py() -> None:
    if h5py is None:
        raise MissingDependencyError("the h5py package is not installed: pip install h5py")


def group_name(image_id: str) -> str:
    """HDF5 group name for an id: '/' would nest groups and '.' is reserved, so both are %-escaped."""
    name = image_id.replace("%", "%25").replace("/", "%2F")
    return "%2E" if name == "." else name


class Hdf5ShardWriter:
    """Writes one HDF5 file with a group per image (datasets features, boxes, cls_prob, obj_id, obj_conf,
    attr_id, attr_conf, img_h, img_w, num_boxes; attribute image_id keeps the unescaped id).

    Args:
        path: file to write (the caller publishes it under its final name).
        feature_dim, feature_dtype, fields: the store layout (see Manifest).
    """

    def __init__(self, path: str | Path, feature_dim: int, feature_dtype: str, fields: dict):
        _require_h5py()
        self.path = Path(path)
        self._fields = fields
        self._file = h5py.File(self.path, "w")
        self.num_rows = 0
        self.bytes_written = 0

    def append(self, record: RegionFeatures) -> None:
        name = group_name(record.image_id)
        if name in self._file:  # keep-last duplicate inside this shard: the index points at the new one
            del self._file[name]
        g = self._file.create_group(name)
        g.attrs["image_id"] = record.image_id
        # Contiguous (unchunked) datasets: one pread per array (feature-formats.md §6).
        g.create_dataset("features", data=record.features)
        g.create_dataset("boxes", data=record.boxes)
        for field in self._fields:
            g.create_dataset(H5_NAMES[field], data=getattr(record, field))
        g.create_dataset("img_h", data=np.int32(record.image_h))
        g.create_dataset("img_w", data=np.int32(record.image_w))
        g.create_dataset("num_boxes", data=np.int32(record.num_boxes))
        self.num_rows += 1
        self.bytes_written += record.features.nbytes + record.boxes.nbytes + sum(
            getattr(record, f).nbytes for f in self._fields)

    def close(self) -> None:
        self._file.close()

    def abort(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away
            pass


def _scalar(g, name: str, alt: tuple = ()):
    for key in (name, *alt):
        if key in g:
            return int(np.asarray(g[key][()]).reshape(-1)[0])
        if key in g.attrs:
            return int(np.asarray(g.attrs[key]).reshape(-1)[0])
    return None


def read_group(g, image_id: str, where: str) -> RegionFeatures:
    """Build a record from one per-image group (ours or volta's).

    Raises:
        RecordError: required datasets are missing or shapes disagree.
    """
    try:
        features = g["features"][()]
        boxes = g["boxes"][()]
    except KeyError as exc:
        raise RecordError(f"{where}: record {image_id!r}: missing dataset ({exc})") from None
    h = _scalar(g, "img_h", ("image_h",))
    w = _scalar(g, "img_w", ("image_w",))
    if h is None or w is None:
        raise RecordError(f"{where}: record {image_id!r}: missing img_h / img_w")
    n = _scalar(g, "num_boxes", ("num_bbox",))
    kw = {}
    for field, h5name in H5_NAMES.items():
        if h5name in g:
            kw[field] = g[h5name][()]
    return RegionFeatures(image_id=image_id, image_h=h, image_w=w,
                          num_boxes=int(features.shape[0]) if n is None else n,
                          boxes=boxes, features=features, **kw).validate(where)


class Hdf5ShardReader:
    """Reads records of one HDF5 shard by image id; the file is opened in the process that reads
    (h5py handles are not fork-safe)."""

    def __init__(self, path: str | Path, fields: dict):
        _require_h5py()
        self.path = Path(path)
        self._fields = fields
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise CorruptStoreError(f"{self.path}: unreadable HDF5 shard ({exc}); run `vilbert-cli validate`") from None
        self.num_rows = len(self._file)

    def read(self, row: int, image_id: str | None = None) -> RegionFeatures:
        """The record of `image_id` (HDF5 groups are addressed by id; `row` is not used)."""
        try:
            g = self._file[group_name(image_id)]
        except KeyError:
            raise CorruptStoreError(f"{self.path}: record {image_id!r}: group missing from the shard") from None
        try:
            return read_group(g, image_id, str(self.path))
        except (RecordError, OSError) as exc:
            raise CorruptStoreError(str(exc)) from None

    def forget_after_fork(self) -> None:
        """In a forked child: drop the inherited handle without touching the parent's HDF5 state."""
        self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def is_hdf5_file(path: str | Path) -> bool:
    """True for a file starting with the HDF5 signature."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


class Hdf5Source:
    """Iterates an HDF5 file in the volta per-image-group layout (or one of our HDF5 shards) as records.

    Args:
        path: the .h5 file.

    Raises:
        SourceNotFoundError / LegacyFormatError on open: missing file, not HDF5, or no per-image groups.
    """

    format_name = "hdf5"
    needs_pickle = False

    def __init__(self, path: str | Path):
        _require_h5py()
        self.path = Path(path)
        if not is_hdf5_file(self.path):
            raise LegacyFormatError(f"{self.path}: not an HDF5 file")

    def __iter__(self) -> Iterator[RegionFeatures | RecordFailure]:
        src = str(self.path)
        with h5py.File(self.path, "r") as f:
            for pos, name in enumerate(f.keys()):
                g = f[name]
                image_id = str(g.attrs["image_id"]) if "image_id" in g.attrs else name
                if not isinstance(g, h5py.Group):
                    yield RecordFailure(src, image_id, pos, "not a per-image group")
                    continue
                try:
                    yield read_group(g, image_id, src)
                except (RecordError, OSError, ValueError, TypeError) as exc:
                    reason = str(exc).split(f"record {image_id!r}: ", 1)[-1]
                    yield RecordFailure(src, image_id, pos, reason)

    def provenance(self) -> dict:
        return {"source_format": "hdf5", "source": str(self.path), "detector": None}
