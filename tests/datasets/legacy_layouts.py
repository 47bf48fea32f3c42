"""Writers that produce the field's legacy region-feature dumps byte-for-byte as the original tools lay them out.

Each function mirrors one original writer (named in its docstring): the same column order, the same
base64-of-float32 encoding, the same pickle dict keys and value types, tensorpack's msgpack framing, the
key list written last in one write transaction. Tests, the store helper and the demo reuse them to make
small dumps; none of them is used by the library itself.
"""

from __future__ import annotations

import base64
import csv
import pickle
import struct
from pathlib import Path
from typing import Iterable, Optional, Sequence

import lmdb
import msgpack
import msgpack_numpy
import numpy as np

from vilbert.datasets.records import RegionFeatures

BUTD_FIELDNAMES = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
BUTD_BETA_FIELDNAMES = BUTD_FIELDNAMES + ["cls_prob"]
LXMERT_FIELDNAMES = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                     "num_boxes", "boxes", "features"]
VOLTA_TSV_FIELDNAMES = LXMERT_FIELDNAMES + ["cls_prob", "attrs", "classes"]


def b64(arr: np.ndarray, dtype) -> str:
    """base64 of the raw array bytes in `dtype`, as `base64.b64encode(ndarray)` gave in Python 2."""
    return base64.b64encode(np.ascontiguousarray(arr, dtype=dtype).tobytes()).decode("ascii")


def _labels(rec: RegionFeatures, seed: int = 0) -> dict[str, np.ndarray]:
    """The record's labels, or deterministic ones when it has none (LXMERT rows always carry them)."""
    rng = np.random.default_rng(seed)
    n = rec.num_boxes
    return {
        "objects_id": rec.objects_id if rec.objects_id is not None else rng.integers(0, 1600, n),
        "objects_conf": rec.objects_conf if rec.objects_conf is not None else rng.random(n).astype(np.float32),
        "attrs_id": rec.attrs_id if rec.attrs_id is not None else rng.integers(0, 400, n),
        "attrs_conf": rec.attrs_conf if rec.attrs_conf is not None else rng.random(n).astype(np.float32),
    }


def butd_row(rec: RegionFeatures, with_cls_prob: bool = False) -> dict[str, str]:
    """One `generate_tsv.py` row dict (vilbert_beta's when `with_cls_prob`)."""
    row = {
        "image_id": rec.image_id,
        "image_w": str(rec.image_w),
        "image_h": str(rec.image_h),
        "num_boxes": str(rec.num_boxes),
        "boxes": b64(rec.boxes, np.float32),
        "features": b64(rec.features, np.float32),
    }
    if with_cls_prob:
        row["cls_prob"] = b64(rec.cls_prob, np.float32)
    return row


def write_butd_tsv(path: Path, records: Iterable[RegionFeatures], with_cls_prob: bool = False,
                   mode: str = "w") -> Path:
    """peteanderson80/bottom-up-attention `tools/generate_tsv.py`: csv.DictWriter, tab, no header, '\\r\\n'."""
    fields = BUTD_BETA_FIELDNAMES if with_cls_prob else BUTD_FIELDNAMES
    with open(path, mode, newline="") as f:
        writer = csv.DictWriter(f, delimiter="\t", fieldnames=fields)
        for rec in records:
            writer.writerow(butd_row(rec, with_cls_prob))
    return Path(path)


def write_butd_tsv_set(outfile: Path, records: Sequence[RegionFeatures], num_gpus: int = 2) -> list[Path]:
    """The per-GPU set `<outfile>.<gpu>`: image i goes to GPU i % num_gpus, as generate_tsv.py splits."""
    return [write_butd_tsv(Path(f"{outfile}.{g}"), records[g::num_gpus]) for g in range(num_gpus)]


def lxmert_row(rec: RegionFeatures, volta: bool = False) -> dict[str, str]:
    """One LXMERT obj36 row (`extract_coco_image.py`); volta's with cls_prob, attrs, classes appended."""
    lab = _labels(rec)
    row = {
        "img_id": rec.image_id,
        "img_h": str(rec.image_h),
        "img_w": str(rec.image_w),
        "objects_id": b64(lab["objects_id"], np.int64),
        "objects_conf": b64(lab["objects_conf"], np.float32),
        "attrs_id": b64(lab["attrs_id"], np.int64),
        "attrs_conf": b64(lab["attrs_conf"], np.float32),
        "num_boxes": str(rec.num_boxes),
        "boxes": b64(rec.boxes, np.float32),
        "features": b64(rec.features, np.float32),
    }
    if volta:
        n = rec.num_boxes
        row["cls_prob"] = b64(rec.cls_prob, np.float32)
        row["attrs"] = b64(np.full((n, 5), 0.2, np.float32), np.float32)
        row["classes"] = b64(np.full((n, 3), 1 / 3, np.float32), np.float32)
    return row


def write_lxmert_tsv(path: Path, records: Iterable[RegionFeatures], volta: bool = False) -> Path:
    """airsplay/lxmert obj36 TSV (or volta's 13-column variant)."""
    fields = VOLTA_TSV_FIELDNAMES if volta else LXMERT_FIELDNAMES
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, delimiter="\t", fieldnames=fields)
        for rec in records:
            writer.writerow(lxmert_row(rec, volta))
    return Path(path)


def write_bua_npz(out_dir: Path, records: Iterable[RegionFeatures], d2: bool = False) -> list[Path]:
    """MILVLG/bottom-up-attention.pytorch: one `np.savez_compressed` per image, `info` a pickled dict.

    `d2=True` follows `extract_d2features.py`: inner sizes and `info{objects, cls_prob (N, C-1), attrs_id,
    attrs_scores}` (the record's cls_prob without its background column).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rec in records:
        lab = _labels(rec)
        extra = {}
        if d2:
            info = {"objects": lab["objects_id"], "cls_prob": rec.cls_prob[:, 1:],
                    "attrs_id": lab["attrs_id"], "attrs_scores": lab["attrs_conf"]}
            extra = {"image_h_inner": rec.image_h // 2, "image_w_inner": rec.image_w // 2}
        else:
            info = {"image_id": rec.image_id, "image_h": rec.image_h, "image_w": rec.image_w,
                    "num_boxes": rec.num_boxes, **lab}
        stem = out_dir / rec.image_id.split(".")[0]
        np.savez_compressed(stem, x=rec.features.astype(np.float32), bbox=rec.boxes.astype(np.float32),
                            num_bbox=rec.num_boxes, image_h=rec.image_h, image_w=rec.image_w, info=info, **extra)
        paths.append(stem.with_suffix(".npz"))
    return paths


def vilbert_value(rec: RegionFeatures, variant: str = "mt") -> dict:
    """The pickled value dict of one image, as each converter builds it."""
    if variant == "mt":  # vilbert-multi-task script/convert_to_lmdb.py
        return {"image_id": rec.image_id, "image_h": rec.image_h, "image_w": rec.image_w,
                "num_boxes": rec.num_boxes, "boxes": rec.boxes.astype(np.float32),
                "features": rec.features.astype(np.float32)}
    if variant == "beta":  # vilbert_beta: the csv.DictReader row of a generate_tsv.py file (all str)
        row = butd_row(rec, with_cls_prob=rec.cls_prob is not None)
        return dict(row)
    if variant == "volta":  # volta TSV-row dict: LXMERT columns, img_h/img_w names, base64 arrays
        return dict(lxmert_row(rec))
    if variant == "volta_h5":  # volta features_extraction/h5_to_lmdb.py: raw arrays from the h5 group
        lab = _labels(rec)
        return {"features": rec.features.astype(np.float32), "boxes": rec.boxes.astype(np.float32),
                "obj_id": lab["objects_id"], "obj_conf": lab["objects_conf"], "attr_id": lab["attrs_id"],
                "attr_conf": lab["attrs_conf"], "img_w": np.int64(rec.image_w), "img_h": np.int64(rec.image_h),
                "img_id": rec.image_id}
    if variant == "mmf":  # mmf tools/scripts/features/lmdb_conversion.py
        return {"feature_path": rec.image_id, "features": rec.features.astype(np.float32),
                "image_height": rec.image_h, "image_width": rec.image_w, "num_boxes": rec.num_boxes,
                "objects": np.zeros(rec.num_boxes, np.int64), "cls_prob": rec.cls_prob, "bbox": rec.boxes}
    raise ValueError(f"unknown variant {variant!r}")


def write_vilbert_lmdb(path: Path, records: Iterable[RegionFeatures], variant: str = "mt",
                       write_keys: bool = True, values: Optional[dict[bytes, bytes]] = None) -> Path:
    """A vilbert-style LMDB directory: one write txn, `pickle.dumps(dict)` values, `b"keys"` last.

    Args:
        path: directory to create (data.mdb + lock.mdb inside).
        records: images to store under `str(image_id).encode()`.
        variant: "mt", "beta", "volta", "volta_h5" or "mmf" (see `vilbert_value`).
        write_keys: False leaves out `b"keys"`, like an interrupted conversion whose last put never ran.
        values: extra raw key -> value bytes to put (listed in b"keys" too), for damaged-value tests.
    """
    env = lmdb.open(str(path), map_size=1 << 30)
    try:
        with env.begin(write=True) as txn:
            id_list = []
            for rec in records:
                key = str(rec.image_id).encode()
                txn.put(key, pickle.dumps(vilbert_value(rec, variant)))
                id_list.append(key)
            for key, raw in (values or {}).items():
                txn.put(key, raw)
                id_list.append(key)
            if write_keys:
                txn.put("keys".encode(), pickle.dumps(id_list))
    finally:
        env.close()
    return Path(path)


def tensorpack_datapoint(rec: RegionFeatures, caption: str) -> list:
    """vilbert_beta `conceptual_caption_preprocess_sequential_train.py` datapoint, in its order."""
    return [rec.features.astype(np.float32), rec.cls_prob.astype(np.float32), rec.boxes.astype(np.float32),
            str(rec.num_boxes), str(rec.image_h), str(rec.image_w), rec.image_id, caption]


def msgpack_dumps(obj) -> bytes:
    """tensorpack `utils/serialize.py: dumps_msgpack` (msgpack_numpy patched in, use_bin_type=True)."""
    return msgpack.packb(obj, use_bin_type=True, default=msgpack_numpy.encode)


def fake_pyarrow_serialized(obj_len: int = 8) -> bytes:
    """Bytes with the framing of `pyarrow.serialize(obj).to_buffer()` (that API no longer exists).

    SerializedPyObject::WriteTo: int32 num_tensors, int32 num_sparse_tensors, int32 num_ndarrays,
    int32 num_buffers, aligned to 8, then an Arrow IPC stream (continuation 0xFFFFFFFF + length + body).
    """
    head = struct.pack("<iiii", 3, 0, 0, 0)
    body = b"\xff\xff\xff\xff" + struct.pack("<i", 16) + b"\x00" * 16 + b"\x00" * obj_len
    return head + body


def write_tensorpack_lmdb(path: Path, records: Sequence[RegionFeatures], captions: Optional[Sequence[str]] = None,
                          serializer: str = "msgpack", write_keys: bool = True, write_frequency: int = 2) -> Path:
    """tensorpack `LMDBSerializer.save`: keys '%08d', commit every `write_frequency`, `__keys__` at the end.

    A path that is not an existing directory becomes a single-file LMDB (subdir=False), as in tensorpack.
    `serializer="pyarrow"` writes the framing of the old pyarrow serializer instead of msgpack.
    """
    path = Path(path)
    captions = captions or [f"a caption for {r.image_id}" for r in records]
    dumps = msgpack_dumps if serializer == "msgpack" else (lambda obj: fake_pyarrow_serialized())
    db = lmdb.open(str(path), subdir=path.is_dir(), map_size=1 << 30, readonly=False, meminit=False,
                   map_async=True)
    try:
        txn = db.begin(write=True)
        idx = -1
        for idx, (rec, cap) in enumerate(zip(records, captions)):
            txn.put("{:08}".format(idx).encode("ascii"), dumps(tensorpack_datapoint(rec, cap)))
            if (idx + 1) % write_frequency == 0:
                txn.commit()
                txn = db.begin(write=True)
        txn.commit()
        if write_keys:
            keys = ["{:08}".format(k).encode("ascii") for k in range(idx + 1)]
            with db.begin(write=True) as txn:
                txn.put(b"__keys__", dumps(keys))
        db.sync()
    finally:
        db.close()
    return path
