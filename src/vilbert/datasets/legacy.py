"""Importers for the field's existing region-feature dumps (BUTD/LXMERT TSV, MILVLG npz, ViLBERT and tensorpack LMDB).

Each reader yields `RegionFeatures` (native float32/int64 arrays; the store writer casts) or, for a record
that cannot be decoded, a `RecordFailure`, and goes on with the next record. Problems with the source as a
whole (missing path, unknown layout, missing key list, pickle without trust) raise a `VilbertError`.
`docs/legacy-formats.md` describes every layout, what is kept and what is dropped.
"""

from __future__ import annotations

import base64
import binascii
import csv
import glob
import logging
import pickle
import re
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional, Union

import numpy as np

from vilbert.datasets.records import RecordFailure, RegionFeatures
from vilbert.errors import (
    ConfigError,
    LegacyFormatError,
    MissingDependencyError,
    RecordError,
    SourceNotFoundError,
    TrustRequiredError,
    UnknownImageError,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
Item = Union[RegionFeatures, RecordFailure]

_GLOB_CHARS = re.compile(r"[*?\[]")
# Per-GPU TSV outputs of generate_tsv.py are "<out>.<gpu>"; plain dumps end in ".tsv".
_TSV_NAME = re.compile(r"^(?P<base>.+?)(?:\.(?P<part>\d+))?$")
_LMDB_MAGIC = b"\xde\xc0\xef\xbe"  # MDB_meta.mm_magic 0xBEEFC0DE, little-endian, at byte 16 of the data file
_TENSORPACK_KEY = re.compile(rb"^\d{8}$")


def _import_lmdb():
    try:
        import lmdb  # the one import site besides datasets/lmdb_store.py (STYLE.md §2)
    except ImportError as exc:  # pragma: no cover - lmdb is a core dependency
        raise MissingDependencyError("reading LMDB dumps needs the 'lmdb' package: pip install lmdb") from exc
    return lmdb


def _trust_message(path: Path, what: str) -> str:
    return (f"{path}: {what} is stored as Python pickles, and unpickling runs arbitrary code; "
            f"convert only dumps you trust, with `vilbert-cli pack --trust-pickle` (trust_pickle=True)")


class _BadField(Exception):
    """Internal: one field of one record cannot be decoded; becomes a RecordFailure."""


# --------------------------------------------------------------------------------------------- base


class LegacyReader:
    """Base class of the legacy importers: iterate records of one dump.

    Attributes:
        format_name: key of this reader in `LEGACY_FORMATS`.
        needs_pickle: True when reading runs `pickle.loads`, so `trust_pickle=True` is required.
        path: the dump as given (a file, a directory or, for TSV sets, a glob pattern).
    """

    format_name: ClassVar[str] = ""
    needs_pickle: ClassVar[bool] = False
    accepts_glob: ClassVar[bool] = False  # True for readers of multi-file sets given as a glob pattern

    def __init__(self, path: PathLike, *, trust_pickle: bool = False):
        self.path = Path(path)
        self.trust_pickle = trust_pickle
        globbed = self.accepts_glob and _GLOB_CHARS.search(str(path))
        if not globbed and not self.path.exists():
            raise SourceNotFoundError(f"{self.path}: no such file or directory")
        if self.needs_pickle and not trust_pickle:
            raise TrustRequiredError(_trust_message(self.path, f"this {self.format_name} dump"))

    @classmethod
    def sniff(cls, path: Path) -> bool:
        """Cheap check (at most the first row or a couple of keys) that `path` has this layout."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Item]:
        raise NotImplementedError

    def count(self) -> Optional[int]:
        """Number of records when known without decoding them (for progress bars), else None."""
        return None

    def provenance(self) -> dict:
        """Provenance entry for the manifest; legacy dumps do not record their detector."""
        return {"source_format": self.format_name, "source": str(self.path), "detector": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def _strip_record_prefix(exc: RecordError, image_id: str) -> str:
    msg = str(exc)
    prefix = f"record {image_id!r}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _finish(rec: RegionFeatures, source: str, position: int) -> Item:
    """Validate a decoded record; an inconsistent one becomes a RecordFailure."""
    try:
        return rec.validate("")
    except RecordError as exc:
        return RecordFailure(source, rec.image_id, position, _strip_record_prefix(exc, rec.image_id))


def _b64_array(value: Any, column: str, dtype: type, shape: tuple) -> np.ndarray:
    """Decode a base64 field (str or bytes) into an array of `shape` (one entry may be -1).

    `num_boxes` is always shape[0]; a byte count that does not fit it is reported, never guessed.
    """
    if isinstance(value, str):
        value = value.encode("ascii", errors="replace")
    if isinstance(value, bytes) and len(value) >= 3 and value[:2] in (b"b'", b'b"') and value[-1:] == value[1:2]:
        # Python 3 ports of generate_tsv.py sometimes wrote str(bytes): "b'AAAB...'".
        value = value[2:-1]
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _BadField(f"column {column!r}: expected a base64 string, found {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _BadField(f"column {column!r}: broken base64 ({exc})") from None
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise _BadField(f"column {column!r}: {len(raw)} bytes is not a whole number of {np.dtype(dtype)} values "
                        f"(truncated?)")
    return _reshape(np.frombuffer(raw, dtype=dtype), column, shape)


def _reshape(arr: np.ndarray, column: str, shape: tuple) -> np.ndarray:
    n = shape[0]
    per_box = int(np.prod([s for s in shape[1:] if s != -1], dtype=np.int64)) if len(shape) > 1 else 1
    total = arr.size
    if -1 in shape[1:]:
        ok = n > 0 and total % n == 0 and total // n > 0 and (total // n) % per_box == 0
        ok = ok or (n == 0 and total == 0)
    else:
        ok = total == n * per_box
    if not ok:
        want = "x".join("D" if s == -1 else str(s) for s in shape)
        raise _BadField(f"column {column!r}: {total} {arr.dtype} values do not fit num_boxes={n} "
                        f"(expected {want})")
    if n == 0 and -1 in shape[1:]:
        return arr.reshape((0, 0))
    return arr.reshape(shape)


def _to_int(value: Any, column: str) -> int:
    try:
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("ascii")
        if isinstance(value, np.ndarray):
            value = value.item()
        return int(value)
    except (TypeError, ValueError, UnicodeDecodeError):
        raise _BadField(f"column {column!r}: expected an integer, found {value!r:.40}") from None


class _DimCheck:
    """Remember the per-box width of variable-width columns; a row that disagrees is torn or broken."""

    def __init__(self) -> None:
        self._dims: dict[str, int] = {}

    def __call__(self, column: str, arr: Optional[np.ndarray]) -> None:
        if arr is None or arr.ndim != 2 or arr.shape[0] == 0:
            return
        d = int(arr.shape[1])
        seen = self._dims.setdefault(column, d)
        if d != seen:
            raise _BadField(f"column {column!r}: {d} values per box, but earlier records had {seen} "
                            f"(a torn or corrupted row?)")


# ---------------------------------------------------------------------------------------------- TSV


def _natural_key(p: Path) -> tuple:
    m = _TSV_NAME.match(p.name)
    part = m.group("part") if m else None
    return (m.group("base") if m else p.name, int(part) if part is not None else -1, p.name)


def _is_tsv_name(p: Path) -> bool:
    return p.suffix == ".tsv" or bool(re.search(r"\.\d+$", p.name))


def list_tsv_files(path: PathLike) -> list[Path]:
    """Resolve a TSV dump: one file, a glob pattern, or a directory of `*.tsv` / per-GPU `<out>.<gpu>` files.

    Args:
        path: file, directory or glob pattern (e.g. "feats/train.tsv.*").

    Returns:
        The files in natural order (`out.2` before `out.10`).

    Raises:
        SourceNotFoundError: nothing matches.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and _is_tsv_name(f)]
        if not files:
            raise SourceNotFoundError(f"{p}: directory holds no '*.tsv' or '<name>.<gpu>' TSV files")
    elif _GLOB_CHARS.search(str(path)):
        files = [Path(f) for f in glob.glob(str(path)) if Path(f).is_file()]
        if not files:
            raise SourceNotFoundError(f"{path}: the pattern matches no files")
    else:
        raise SourceNotFoundError(f"{p}: no such file or directory")
    return sorted(files, key=_natural_key)


def _split_tsv_line(line: bytes) -> Union[list, csv.Error]:
    """Split one row as a tab-separated csv.reader does, without decoding megabytes of base64 to str.

    csv.DictWriter quotes only fields holding a tab, quote or line break, which base64 never does; a line
    with a quote character goes through the csv module (its field size limit raised to sys.maxsize, as
    the original readers do). Unquoted fields stay bytes.
    """
    line = line.rstrip(b"\r\n")
    if b'"' not in line:
        return line.split(b"\t")
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:  # pragma: no cover - 32-bit C long
        csv.field_size_limit(2**31 - 1)
    try:
        return next(csv.reader([line.decode("utf-8", errors="replace")], delimiter="\t"), [])
    except csv.Error as exc:
        return exc


def _first_line_columns(path: Path) -> Optional[list[str]]:
    """The first row's fields, or None when the file is not tab-separated text."""
    try:
        with open(path, "rb") as f:
            head = f.readline()
    except OSError:
        return None
    if not head or b"\0" in head:
        return None
    fields = _split_tsv_line(head)
    if isinstance(fields, csv.Error):
        return None
    try:
        return [f.decode("utf-8") if isinstance(f, bytes) else f for f in fields]
    except UnicodeDecodeError:
        return None


def _is_int(s: str) -> bool:
    return bool(re.fullmatch(r"-?\d+", s.strip()))


class _TsvReader(LegacyReader):
    """Shared row loop of the TSV importers (csv module, tab-separated, as the original tools read them)."""

    # Column layouts this reader accepts, keyed by column count.
    LAYOUTS: ClassVar[dict[int, tuple[str, ...]]] = {}
    accepts_glob = True

    def __init__(self, path: PathLike, *, trust_pickle: bool = False):
        super().__init__(path, trust_pickle=trust_pickle)
        self.files = list_tsv_files(path)

    @classmethod
    def _matches(cls, cols: list[str]) -> bool:
        raise NotImplementedError

    @classmethod
    def sniff(cls, path: Path) -> bool:
        try:
            files = list_tsv_files(path)
        except SourceNotFoundError:
            return False
        cols = _first_line_columns(files[0])
        return cols is not None and len(cols) in cls.LAYOUTS and cls._matches(cols)

    def _decode(self, row: dict[str, Any], dims: _DimCheck) -> RegionFeatures:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Item]:
        dims = _DimCheck()
        for file in self.files:
            yield from self._iter_file(file, dims)

    @staticmethod
    def _rows(file: Path) -> Iterator[Union[list, csv.Error]]:
        with open(file, "rb") as f:
            for line in f:
                yield _split_tsv_line(line)

    def _iter_file(self, file: Path, dims: _DimCheck) -> Iterator[Item]:
        source = str(file)
        names: Optional[tuple[str, ...]] = None
        position = -1
        for fields in self._rows(file):
            position += 1
            if isinstance(fields, csv.Error):
                yield RecordFailure(source, None, position, f"unreadable TSV row ({fields})")
                continue
            if not fields or fields == [b""] or fields == [""]:
                position -= 1  # a blank line is not a record
                continue
            fields = [f.decode("utf-8", errors="replace") if i == 0 and isinstance(f, bytes) else f
                      for i, f in enumerate(fields)]
            image_id = fields[0] or None
            if names is None and len(fields) in self.LAYOUTS:
                # The first well-formed row fixes the variant of this file (e.g. with or without cls_prob).
                names = self.LAYOUTS[len(fields)]
            if names is None or len(fields) != len(names):
                expected = [names] if names is not None else list(self.LAYOUTS.values())
                want = " or ".join(f"{len(n)} ({', '.join(n)})" for n in expected)
                torn = (" (a torn line from an interrupted extractor?)"
                        if len(fields) < max(len(n) for n in expected) else "")
                yield RecordFailure(source, image_id, position,
                                    f"row has {len(fields)} columns, expected {want}{torn}")
                continue
            row = dict(zip(names, fields))
            try:
                rec = self._decode(row, dims)
            except _BadField as exc:
                yield RecordFailure(source, image_id, position, str(exc))
                continue
            yield _finish(rec, source, position)


BUTD_FIELDNAMES = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
BUTD_BETA_FIELDNAMES = BUTD_FIELDNAMES + ("cls_prob",)



def _decode_tsv_row(row: dict[str, Any], dims: _DimCheck, id_col: str, h_col: str, w_col: str,
                    labels: bool = False) -> RegionFeatures:
    """Decode one BUTD-family TSV row (base64 float32 arrays); `labels` adds the LXMERT label columns."""
    n = _to_int(row["num_boxes"], "num_boxes")
    if n < 0:
        raise _BadField(f"column 'num_boxes': negative value {n}")
    extra = {}
    if labels:
        for name, dt in (("objects_id", np.int64), ("objects_conf", np.float32), ("attrs_id", np.int64),
                         ("attrs_conf", np.float32)):
            extra[name] = _b64_array(row[name], name, dt, (n,))
    rec = RegionFeatures(
        image_id=row[id_col],
        image_h=_to_int(row[h_col], h_col),
        image_w=_to_int(row[w_col], w_col),
        num_boxes=n,
        boxes=_b64_array(row["boxes"], "boxes", np.float32, (n, 4)),
        features=_b64_array(row["features"], "features", np.float32, (n, -1)),
        cls_prob=(_b64_array(row["cls_prob"], "cls_prob", np.float32, (n, -1)) if "cls_prob" in row else None),
        **extra,
    )
    dims("features", rec.features)
    dims("cls_prob", rec.cls_prob)
    return rec

class ButdTsvReader(_TsvReader):
    """peteanderson80/bottom-up-attention `tools/generate_tsv.py` TSV, and the vilbert_beta variant.

    Layout (no header, tab-separated, one row per image, one file per GPU named `<out>.<gpu>`):
    `image_id, image_w, image_h, num_boxes, boxes, features` (note: width BEFORE height); `boxes` is
    base64 float32 (N, 4) x1y1x2y2 pixels, `features` base64 float32 (N, D). The vilbert_beta extractor adds
    a 7th column `cls_prob`, base64 float32 (N, C) (C = 1601 with background first).

    Key convention: `image_id` is whatever the extractor wrote: the integer COCO id for the COCO splits
    ("9"), a file stem elsewhere. It is kept verbatim as the record's string id.

    A killed extractor leaves a torn last line, and its resume appends after it; such a row becomes a
    RecordFailure (wrong column count, broken base64, or a feature width that disagrees with earlier rows).
    """

    format_name = "butd_tsv"
    LAYOUTS = {6: BUTD_FIELDNAMES, 7: BUTD_BETA_FIELDNAMES}

    @classmethod
    def _matches(cls, cols: list[str]) -> bool:
        return all(_is_int(c) for c in cols[1:4])

    def _decode(self, row: dict[str, Any], dims: _DimCheck) -> RegionFeatures:
        return _decode_tsv_row(row, dims, "image_id", "image_h", "image_w")


LXMERT_FIELDNAMES = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                     "num_boxes", "boxes", "features")
VOLTA_TSV_FIELDNAMES = LXMERT_FIELDNAMES + ("cls_prob", "attrs", "classes")


class LxmertTsvReader(_TsvReader):
    """airsplay/lxmert "obj36" TSV (`extract_coco_image.py`, read by `src/utils.py: load_obj_tsv`), and volta's.

    Layout (no header, tab-separated): `img_id, img_h, img_w` (height BEFORE width, unlike BUTD),
    `objects_id` base64 int64 (N,), `objects_conf` base64 float32 (N,), `attrs_id` base64 int64 (N,),
    `attrs_conf` base64 float32 (N,), `num_boxes`, `boxes` base64 float32 (N, 4) pixels, `features`
    base64 float32 (N, D) (N = 36 in the released files). The volta variant appends `cls_prob`
    (base64 float32 (N, C)), `attrs` and `classes`; `cls_prob` is kept, `attrs` and `classes` (full
    attribute and class score tables with no field in our record) are dropped without being decoded.

    Key convention: `img_id` is the image file stem (`COCO_val2014_000000000042`, GQA/VG ids), kept verbatim.
    """

    format_name = "lxmert_tsv"
    LAYOUTS = {10: LXMERT_FIELDNAMES, 13: VOLTA_TSV_FIELDNAMES}

    @classmethod
    def _matches(cls, cols: list[str]) -> bool:
        return _is_int(cols[1]) and _is_int(cols[2]) and _is_int(cols[7])

    def _decode(self, row: dict[str, Any], dims: _DimCheck) -> RegionFeatures:
        return _decode_tsv_row(row, dims, "img_id", "img_h", "img_w", labels=True)


# ---------------------------------------------------------------------------------------------- npz


class BuaNpzReader(LegacyReader):
    """MILVLG/bottom-up-attention.pytorch per-image `.npz` (`utils/extract_utils.py`, `extract_d2features.py`).

    Layout: a directory of `np.savez_compressed` files `<name-before-first-dot>.npz` with `x` float32
    (N, D) features, `bbox` float32 (N, 4) pixels, `num_bbox`, `image_h`, `image_w` and `info`, a dict
    stored as a pickled object array: `{image_id, image_h, image_w, num_boxes, objects_id, objects_conf,
    attrs_id, attrs_conf}`. The d2 mode adds `image_h_inner`, `image_w_inner` (dropped: the resized
    input size) and `info = {objects, cls_prob (N, 1600), attrs_id, attrs_scores}`.

    `info` is a pickle, so this reader needs `trust_pickle=True` and refuses otherwise (TrustRequiredError)
    rather than silently dropping the labels and class distributions it holds.

    Mapping: `objects`/`objects_id` -> objects_id, `attrs_scores`/`attrs_conf` -> attrs_conf. A d2
    `cls_prob` has 1600 foreground columns (background removed); it is widened to 1601 by prepending a
    zero background column, so that column j means BUTD class j in every store (the target of masked
    region pretraining is 1601-way, background first). A `cls_prob` that already has 1601 columns is kept.

    Key convention: the record id is the file name before `.npz` (what the extractor derived from the
    image file name, and what `info["image_id"]` holds in the non-d2 mode).
    """

    format_name = "bua_npz"
    needs_pickle = True
    NUM_BUTD_CLASSES: ClassVar[int] = 1601

    def __init__(self, path: PathLike, *, trust_pickle: bool = False):
        super().__init__(path, trust_pickle=trust_pickle)
        if self.path.is_file():
            self.files = [self.path]
        else:
            self.files = sorted(f for f in self.path.iterdir() if f.name.endswith(".npz") and f.is_file())
            if not self.files:
                raise LegacyFormatError(f"{self.path}: directory holds no '*.npz' files")

    @classmethod
    def sniff(cls, path: Path) -> bool:
        if path.is_file():
            return path.name.endswith(".npz") and zipfile.is_zipfile(path)
        if not path.is_dir():
            return False
        first = next((f for f in sorted(path.iterdir()) if f.name.endswith(".npz")), None)
        return first is not None and zipfile.is_zipfile(first)

    def count(self) -> Optional[int]:
        return len(self.files)

    def __iter__(self) -> Iterator[Item]:
        for position, file in enumerate(self.files):
            image_id = file.name[: -len(".npz")]
            try:
                rec = self._read(file, image_id)
            except _BadField as exc:
                yield RecordFailure(str(file), image_id, position, str(exc))
                continue
            yield _finish(rec, str(file), position)

    def _read(self, file: Path, image_id: str) -> RegionFeatures:
        try:
            npz = np.load(file, allow_pickle=True)  # trust was checked in __init__
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise _BadField(f"not a readable .npz ({exc})") from None
        with npz:
            missing = [k for k in ("x", "bbox", "num_bbox", "image_h", "image_w") if k not in npz.files]
            if missing:
                raise _BadField(f"missing arrays {missing} (has {sorted(npz.files)})")
            try:
                x, bbox = npz["x"], npz["bbox"]
                n = _to_int(npz["num_bbox"], "num_bbox")
                h, w = _to_int(npz["image_h"], "image_h"), _to_int(npz["image_w"], "image_w")
                info = npz["info"].item() if "info" in npz.files else {}
            except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, pickle.UnpicklingError,
                    AttributeError, ImportError) as exc:
                raise _BadField(f"damaged .npz member ({type(exc).__name__}: {exc})") from None
        if not isinstance(info, dict):
            raise _BadField(f"'info' is a {type(info).__name__}, expected a dict")
        cls_prob = info.get("cls_prob")
        if cls_prob is not None:
            cls_prob = np.asarray(cls_prob, dtype=np.float32)
            if cls_prob.ndim == 2 and cls_prob.shape[1] == self.NUM_BUTD_CLASSES - 1:
                cls_prob = np.concatenate([np.zeros((cls_prob.shape[0], 1), np.float32), cls_prob], axis=1)

        def opt(*names: str) -> Optional[np.ndarray]:
            for name in names:
                if info.get(name) is not None:
                    return np.asarray(info[name])
            return None

        return RegionFeatures(
            image_id=image_id, image_h=h, image_w=w, num_boxes=n,
            boxes=np.asarray(bbox, dtype=np.float32), features=np.asarray(x),
            cls_prob=cls_prob,
            objects_id=opt("objects_id", "objects"), objects_conf=opt("objects_conf"),
            attrs_id=opt("attrs_id"), attrs_conf=opt("attrs_conf", "attrs_scores"),
        )


# --------------------------------------------------------------------------------------------- LMDB


def _is_lmdb_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[16:20] == _LMDB_MAGIC


def _lmdb_location(path: Path) -> Optional[tuple[str, bool]]:
    """(path to open, subdir flag) when `path` is an LMDB directory or single-file LMDB, else None."""
    if path.is_dir() and _is_lmdb_file(path / "data.mdb"):
        return str(path), True
    if path.is_file() and _is_lmdb_file(path):
        return str(path), False
    return None


def _open_lmdb(path: Path):
    """Open a legacy LMDB read-only without a lock file (the dump may sit on a read-only share)."""
    lmdb = _import_lmdb()
    loc = _lmdb_location(path)
    if loc is None:
        raise LegacyFormatError(f"{path}: not an LMDB environment (expected a directory with data.mdb, "
                                f"or a single-file LMDB)")
    try:
        return lmdb.open(loc[0], subdir=loc[1], readonly=True, lock=False, readahead=False,
                         meminit=False, max_readers=1)
    except lmdb.Error as exc:
        raise LegacyFormatError(f"{path}: cannot open as LMDB ({exc})") from None


def _peek_lmdb(path: Path) -> Optional[str]:
    """Guess the LMDB flavour from its key-list entry (or first key), reading no values beyond one."""
    if _lmdb_location(path) is None:
        return None
    try:
        env = _open_lmdb(path)
    except LegacyFormatError:
        return None
    try:
        with env.begin(buffers=True) as txn:  # memoryviews: a multi-megabyte key list is not copied
            if txn.get(b"keys") is not None:
                return "vilbert_lmdb"
            if txn.get(b"__keys__") is not None:
                return "tensorpack_lmdb"
            cur = txn.cursor()
            if not cur.first():
                # An empty DB: the one write txn of a vilbert/volta/MMF conversion never committed.
                return "vilbert_lmdb"
            key, value = bytes(cur.key()), bytes(cur.value()[:1])
            if _TENSORPACK_KEY.match(key):
                return "tensorpack_lmdb"
            if value[:1] == b"\x80":  # pickle PROTO opcode: a vilbert-style dump without its key list
                return "vilbert_lmdb"
            return None
    finally:
        env.close()


class VilbertLmdbReader(LegacyReader):
    """vilbert-multi-task / vilbert_beta / volta LMDB (and MMF's `lmdb_conversion.py`, same container).

    Layout: a directory with `data.mdb` written in ONE write transaction; values are pickled dicts and the
    special key `b"keys"` holds the pickled list of byte keys, written last. An interrupted conversion
    leaves no `b"keys"` (vilbert-multi-task #11): that is a LegacyFormatError, not a silent empty import.
    Values, by writer:

    - multi-task `script/convert_to_lmdb.py`: `{image_id, image_h, image_w, num_boxes, boxes float32 (N,4),
      features float32 (N,D)}` (cls_prob and objects were dropped by that script);
    - vilbert_beta: the raw TSV row dict, `num_boxes`/`image_h`/`image_w` as strings, `boxes`/`features`
      (and `cls_prob` when extracted) base64 float32;
    - volta: `img_h`/`img_w` names; arrays either base64 (TSV rows) or raw (`h5_to_lmdb.py`: `features,
      boxes, obj_id, obj_conf, attr_id, attr_conf, img_w, img_h, img_id`);
    - MMF: `{features, bbox, image_height, image_width, num_boxes, objects, cls_prob, feature_path}`
      (`objects` and `feature_path` dropped).

    `num_boxes`, when missing, is the number of feature rows (multi-task's loader ignores the stored value
    anyway); when present it must agree with the arrays.

    Key convention: `str(image_id).encode()`: the integer COCO id for COCO/VQA in the released LMDBs, the
    file stem (`COCO_train2014_000000000009`) for multi-task's own extraction, `...jpg` names for VCR. The
    record id is the LMDB key, decoded as UTF-8, since loaders look images up by key.

    Values are pickles: needs `trust_pickle=True`.
    """

    format_name = "vilbert_lmdb"
    needs_pickle = True

    def __init__(self, path: PathLike, *, trust_pickle: bool = False):
        super().__init__(path, trust_pickle=trust_pickle)
        self._keys = self._load_keys()
        self._index: Optional[dict[bytes, int]] = None

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return _peek_lmdb(path) == "vilbert_lmdb"

    def _load_keys(self) -> list[bytes]:
        env = _open_lmdb(self.path)
        try:
            with env.begin() as txn:
                raw = txn.get(b"keys")
        finally:
            env.close()
        if raw is None:
            raise LegacyFormatError(
                f"{self.path}: no b'keys' entry; the LMDB conversion was probably interrupted before its single "
                f"write transaction committed (vilbert-multi-task #11); re-run the conversion")
        try:
            keys = pickle.loads(raw, encoding="latin1")  # trust was checked in __init__
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged key list
            raise LegacyFormatError(
                f"{self.path}: b'keys' is not a readable pickle ({type(exc).__name__}: {exc})") from None
        if not isinstance(keys, (list, tuple)):
            raise LegacyFormatError(f"{self.path}: b'keys' holds a {type(keys).__name__}, expected a list of keys")
        return [k if isinstance(k, bytes) else str(k).encode() for k in keys]

    def count(self) -> Optional[int]:
        return len(self._keys)

    @property
    def keys(self) -> list[bytes]:
        """The key list, in the order the conversion wrote it."""
        return list(self._keys)

    def position(self, image_id: str) -> int:
        """Position of `image_id` in the key list (a dict lookup, never `list.index`)."""
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self._keys)}
        try:
            return self._index[image_id.encode()]
        except KeyError:
            raise UnknownImageError(f"{self.path}: no image {image_id!r} in this LMDB") from None

    def __iter__(self) -> Iterator[Item]:
        env = _open_lmdb(self.path)
        source = str(self.path)
        try:
            with env.begin(buffers=False) as txn:
                for position, key in enumerate(self._keys):
                    image_id = key.decode("utf-8", errors="replace")
                    raw = txn.get(key)
                    if raw is None:
                        yield RecordFailure(source, image_id, position, "listed in b'keys' but has no value")
                        continue
                    try:
                        item = pickle.loads(raw, encoding="latin1")
                    except Exception as exc:  # noqa: BLE001 - turned into a failure record, iteration goes on
                        yield RecordFailure(source, image_id, position,
                                            f"value is not a readable pickle ({type(exc).__name__}: {exc})")
                        continue
                    try:
                        rec = self._decode(item, image_id)
                    except _BadField as exc:
                        yield RecordFailure(source, image_id, position, str(exc))
                        continue
                    yield _finish(rec, source, position)
        finally:
            env.close()  # py-lmdb >= 2 refuses a second open of one path in a process

    @staticmethod
    def _decode(item: Any, image_id: str) -> RegionFeatures:
        if not isinstance(item, dict):
            raise _BadField(f"value is a {type(item).__name__}, expected a dict")

        def pick(*names: str, required: bool = True) -> Any:
            for name in names:
                if name in item and item[name] is not None:
                    return item[name]
            if required:
                raise _BadField(f"value has none of {list(names)} (keys: {sorted(map(str, item))})")
            return None

        h = _to_int(pick("image_h", "img_h", "image_height"), "image_h")
        w = _to_int(pick("image_w", "img_w", "image_width"), "image_w")
        raw_n = pick("num_boxes", "num_bbox", required=False)
        feats_raw = pick("features")
        if raw_n is None:
            if not isinstance(feats_raw, np.ndarray) or feats_raw.ndim != 2:
                raise _BadField("value has no 'num_boxes' and its features are not an (N, D) array")
            n = int(feats_raw.shape[0])
        else:
            n = _to_int(raw_n, "num_boxes")

        def arr(value: Any, column: str, dtype: type, shape: tuple) -> np.ndarray:
            if isinstance(value, np.ndarray):
                if value.ndim != len(shape) or value.shape[0] != n:
                    want = "x".join("D" if s == -1 else str(s) for s in shape)
                    raise _BadField(f"column {column!r}: shape {value.shape} disagrees with num_boxes={n} "
                                    f"(expected {want})")
                return value
            return _b64_array(value, column, dtype, shape)

        def opt(names: tuple[str, ...], dtype: type, shape: tuple) -> Optional[np.ndarray]:
            value = pick(*names, required=False)
            return None if value is None else arr(value, names[0], dtype, shape)

        return RegionFeatures(
            image_id=image_id, image_h=h, image_w=w, num_boxes=n,
            boxes=arr(pick("boxes", "bbox"), "boxes", np.float32, (n, 4)),
            features=arr(feats_raw, "features", np.float32, (n, -1)),
            cls_prob=opt(("cls_prob",), np.float32, (n, -1)),
            objects_id=opt(("objects_id", "obj_id"), np.int64, (n,)),
            objects_conf=opt(("objects_conf", "obj_conf"), np.float32, (n,)),
            attrs_id=opt(("attrs_id", "attr_id"), np.int64, (n,)),
            attrs_conf=opt(("attrs_conf", "attr_conf"), np.float32, (n,)),
        )


def _msgpack_loads(buf: bytes) -> Any:
    try:
        import msgpack
        import msgpack_numpy
    except ImportError as exc:  # pragma: no cover - both are core dependencies
        raise MissingDependencyError(
            "reading tensorpack LMDBs needs msgpack and msgpack-numpy: pip install 'vilbert[legacy]'") from exc
    return msgpack.unpackb(buf, raw=False, object_hook=msgpack_numpy.decode, strict_map_key=False)


def _looks_like_pyarrow_serialized(buf: bytes) -> bool:
    """pyarrow.serialize() output: int32 counts, padded to 8 bytes, then an Arrow IPC stream message.

    A msgpack datapoint starts with an array marker (0x90-0x9f, 0xdc, 0xdd) instead.
    """
    if len(buf) < 16 or buf[0] in range(0x90, 0xA0) or buf[0] in (0xDC, 0xDD):
        return False
    head = buf[:64]
    for off in range(8, 40, 8):
        if head[off:off + 4] == b"\xff\xff\xff\xff":  # IPC continuation marker
            return True
    return False


class TensorpackLmdbReader(LegacyReader):
    """tensorpack `LMDBSerializer` LMDB of Conceptual Captions (vilbert_beta's `training_feat_*.lmdb`).

    Layout: a single-file LMDB (or a directory) with keys `'%08d' % index` and `b'__keys__'` = the
    serialized key list, written at the end; values are datapoints serialized with msgpack +
    msgpack_numpy: `[features f32 (N,D), cls_prob f32 (N,C), boxes f32 (N,4) pixels, num_boxes str,
    image_h str, image_w str, image_id str, caption str]`. msgpack runs no code, so no trust is needed.

    tensorpack serializes with `pyarrow.serialize` instead when pyarrow is importable and
    `TENSORPACK_SERIALIZE` is not `msgpack`; that API is gone from modern pyarrow, so such a dump is a
    LegacyFormatError asking to re-serialize it.

    Without `__keys__` (a conversion killed before its end; tensorpack commits every 5000 puts) the
    reader walks the keys in order with a warning, as tensorpack's `LMDBData` does.

    Key convention: the LMDB key is a row number; the record id is the datapoint's `image_id` (the CRC32
    of the image URL in vilbert_beta's preprocessing). The caption has no field in the record and is
    dropped by `pack`; `iter_captions` returns (image_id, caption) pairs for the training stage.
    """

    format_name = "tensorpack_lmdb"
    needs_pickle = False

    def __init__(self, path: PathLike, *, trust_pickle: bool = False):
        super().__init__(path, trust_pickle=trust_pickle)
        self._keys = self._load_keys()

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return _peek_lmdb(path) == "tensorpack_lmdb"

    def _reserialize_error(self) -> LegacyFormatError:
        return LegacyFormatError(
            f"{self.path}: values were written with tensorpack's pyarrow serializer (pyarrow.serialize, removed "
            f"from modern pyarrow); re-serialize the dump with TENSORPACK_SERIALIZE=msgpack in an old environment "
            f"(tensorpack LMDBSerializer.save) and convert that")

    def _load_keys(self) -> Optional[list[bytes]]:
        env = _open_lmdb(self.path)
        try:
            with env.begin() as txn:
                raw = txn.get(b"__keys__")
                if raw is None:
                    logger.warning("%s: no b'__keys__' entry (conversion interrupted?); walking the keys in order",
                                   self.path)
                    return None
                if _looks_like_pyarrow_serialized(raw):
                    raise self._reserialize_error()
                try:
                    keys = _msgpack_loads(raw)
                except Exception as exc:  # noqa: BLE001 - any msgpack failure means an unreadable key list
                    if _looks_like_pyarrow_serialized(raw):
                        raise self._reserialize_error() from None
                    raise LegacyFormatError(f"{self.path}: b'__keys__' is not msgpack ({type(exc).__name__}: {exc})"
                                            ) from None
        finally:
            env.close()
        if not isinstance(keys, (list, tuple)):
            raise LegacyFormatError(f"{self.path}: b'__keys__' holds a {type(keys).__name__}, expected a list")
        return [k if isinstance(k, bytes) else str(k).encode("ascii") for k in keys]

    def count(self) -> Optional[int]:
        return None if self._keys is None else len(self._keys)

    def _iter_raw(self) -> Iterator[tuple[int, bytes, Optional[bytes]]]:
        env = _open_lmdb(self.path)
        try:
            with env.begin() as txn:
                if self._keys is not None:
                    for position, key in enumerate(self._keys):
                        yield position, key, txn.get(key)
                else:
                    position = 0
                    for key, value in txn.cursor():
                        if key == b"__keys__":
                            continue
                        yield position, key, value
                        position += 1
        finally:
            env.close()

    def _datapoints(self) -> Iterator[Union[tuple[int, str, list], RecordFailure]]:
        source = str(self.path)
        for position, key, raw in self._iter_raw():
            label = f"key {key.decode('ascii', errors='replace')}"
            if raw is None:
                yield RecordFailure(source, None, position, f"{label} is listed in b'__keys__' but has no value")
                continue
            if _looks_like_pyarrow_serialized(raw):
                raise self._reserialize_error()
            try:
                dp = _msgpack_loads(raw)
            except Exception as exc:  # noqa: BLE001 - turned into a failure record, iteration goes on
                yield RecordFailure(source, None, position, f"{label}: value is not msgpack ({type(exc).__name__})")
                continue
            if not isinstance(dp, (list, tuple)) or len(dp) != 8:
                what = f"a list of {len(dp)}" if isinstance(dp, (list, tuple)) else f"a {type(dp).__name__}"
                yield RecordFailure(source, None, position, f"{label}: datapoint is {what}, expected "
                                    f"[features, cls_prob, boxes, num_boxes, image_h, image_w, image_id, caption]")
                continue
            yield position, label, list(dp)

    def __iter__(self) -> Iterator[Item]:
        source = str(self.path)
        for got in self._datapoints():
            if isinstance(got, RecordFailure):
                yield got
                continue
            position, label, dp = got
            features, cls_prob, boxes, num_boxes, image_h, image_w, image_id, _caption = dp
            image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
            try:
                n = _to_int(num_boxes, "num_boxes")

                def arr(value: Any, column: str, shape: tuple) -> np.ndarray:
                    if not isinstance(value, np.ndarray):
                        raise _BadField(f"{label}: column {column!r} is a {type(value).__name__}, expected an array")
                    return _reshape(value, column, shape)

                rec = RegionFeatures(
                    image_id=image_id, image_h=_to_int(image_h, "image_h"), image_w=_to_int(image_w, "image_w"),
                    num_boxes=n, boxes=arr(boxes, "boxes", (n, 4)), features=arr(features, "features", (n, -1)),
                    cls_prob=None if cls_prob is None else arr(cls_prob, "cls_prob", (n, -1)),
                )
            except _BadField as exc:
                yield RecordFailure(source, image_id, position, str(exc))
                continue
            yield _finish(rec, source, position)


def iter_captions(path: PathLike) -> Iterator[tuple[str, str]]:
    """Yield (image_id, caption) pairs from a tensorpack Conceptual Captions LMDB, in stored order.

    Args:
        path: the LMDB (single file or directory).

    Yields:
        (image_id, caption) for every readable datapoint; unreadable ones are logged and skipped.

    Raises:
        SourceNotFoundError, LegacyFormatError: as for `open_legacy(path, "tensorpack_lmdb")`.
    """
    reader = TensorpackLmdbReader(path)
    for got in reader._datapoints():
        if isinstance(got, RecordFailure):
            logger.warning("skipping caption: %s", got)
            continue
        dp = got[2]
        image_id, caption = dp[6], dp[7]
        yield (image_id.decode() if isinstance(image_id, bytes) else str(image_id),
               caption.decode() if isinstance(caption, bytes) else str(caption))


# ----------------------------------------------------------------------------------- registry, entry


LEGACY_FORMATS: dict[str, type[LegacyReader]] = {
    "butd_tsv": ButdTsvReader,
    "lxmert_tsv": LxmertTsvReader,
    "bua_npz": BuaNpzReader,
    "vilbert_lmdb": VilbertLmdbReader,
    "tensorpack_lmdb": TensorpackLmdbReader,
}


def detect_legacy_format(path: PathLike) -> Optional[str]:
    """Name the legacy layout of `path` from cheap clues (first TSV row, file names, LMDB key-list entry).

    Args:
        path: file, directory or glob pattern of TSV files.

    Returns:
        A key of `LEGACY_FORMATS`, or None when the path does not exist or is no legacy dump this module
        recognises (for example one of our own stores, which carries a manifest).
    """
    p = Path(path)
    if p.is_dir() and (p / "manifest.json").exists():
        return None
    if not p.exists() and not _GLOB_CHARS.search(str(path)):
        return None
    if _lmdb_location(p) is not None:
        return _peek_lmdb(p)
    if BuaNpzReader.sniff(p):
        return "bua_npz"
    for name in ("butd_tsv", "lxmert_tsv"):
        if LEGACY_FORMATS[name].sniff(p):
            return name
    return None


def open_legacy(path: PathLike, format: Optional[str] = None, *, trust_pickle: bool = False) -> LegacyReader:
    """Open a legacy dump for iteration.

    Args:
        path: the dump (file, directory, or glob pattern of per-GPU TSV files).
        format: a key of `LEGACY_FORMATS`; detected with `detect_legacy_format` when None.
        trust_pickle: allow formats whose values are pickles (unpickling runs arbitrary code).

    Returns:
        A `LegacyReader`; iterate it for `RegionFeatures` and `RecordFailure` items.

    Raises:
        SourceNotFoundError: the path does not exist (or the pattern matches nothing).
        ConfigError: `format` is not a known name.
        LegacyFormatError: the layout is not recognised, or the dump is damaged as a whole.
        TrustRequiredError: the format needs unpickling and `trust_pickle` is False; nothing was read.
    """
    if format is None:
        format = detect_legacy_format(path)
        if format is None:
            p = Path(path)
            if _GLOB_CHARS.search(str(path)):
                list_tsv_files(path)  # raises when the pattern matches nothing
            elif not p.exists():
                raise SourceNotFoundError(f"{p}: no such file or directory")
            raise LegacyFormatError(
                f"{path}: not a legacy feature dump this release recognises; supported layouts: "
                f"{', '.join(LEGACY_FORMATS)} (see docs/legacy-formats.md); name one explicitly if detection is wrong")
    try:
        cls = LEGACY_FORMATS[format]
    except KeyError:
        raise ConfigError(f"unknown legacy format {format!r}; valid names: {', '.join(LEGACY_FORMATS)}") from None
    return cls(path, trust_pickle=trust_pickle)
