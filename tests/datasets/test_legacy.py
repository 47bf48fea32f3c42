"""Legacy importers: every layout round-trips from files written exactly as the original tools write them."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest

from tests.conftest import make_record
from tests.datasets import legacy_layouts as L
from vilbert.datasets.legacy import (
    LEGACY_FORMATS,
    LegacyReader,
    detect_legacy_format,
    iter_captions,
    list_tsv_files,
    open_legacy,
)
from vilbert.datasets.records import RecordFailure, RegionFeatures
from vilbert.errors import (
    ConfigError,
    LegacyFormatError,
    SourceNotFoundError,
    TrustRequiredError,
    UnknownImageError,
    VilbertError,
)

N_BOXES, DIM, N_CLASSES = 4, 8, 11


def _records(n: int = 4, prefix: str = "img", **kw) -> list[RegionFeatures]:
    return [make_record(f"{prefix}{i}", num_boxes=N_BOXES + (i % 2), dim=DIM, num_classes=N_CLASSES, seed=i, **kw)
            for i in range(n)]


def _good(items) -> list[RegionFeatures]:
    return [x for x in items if isinstance(x, RegionFeatures)]


def _failures(items) -> list[RecordFailure]:
    return [x for x in items if isinstance(x, RecordFailure)]


def _assert_same(got: RegionFeatures, want: RegionFeatures, cls_prob: bool = False) -> None:
    assert got.image_id == want.image_id
    assert (got.image_h, got.image_w) == (want.image_h, want.image_w)  # BUTD writes w before h, LXMERT h before w
    assert got.num_boxes == want.num_boxes
    np.testing.assert_array_equal(got.boxes, want.boxes)
    np.testing.assert_array_equal(got.features, want.features)
    assert got.features.dtype == np.float32 and got.boxes.dtype == np.float32
    if cls_prob:
        np.testing.assert_array_equal(got.cls_prob, want.cls_prob)


def _assert_lmdb_closed(path: Path, subdir: bool = True) -> None:
    # py-lmdb >= 2 refuses a second open of a path already open in this process.
    env = lmdb.open(str(path), subdir=subdir, readonly=True, lock=False)
    env.close()


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("with_cls_prob", [False, True], ids=["butd", "vilbert_beta"])
def test_butd_tsv_round_trip(tmp_path, with_cls_prob):
    recs = _records()
    path = L.write_butd_tsv(tmp_path / "feats.tsv", recs, with_cls_prob=with_cls_prob)
    assert path.read_bytes().count(b"\r\n") == len(recs)  # csv.DictWriter line ends, as generate_tsv.py
    assert detect_legacy_format(path) == "butd_tsv"
    reader = open_legacy(path)
    assert reader.format_name == "butd_tsv" and not reader.needs_pickle
    got = list(reader)
    assert len(got) == len(recs) and not _failures(got)
    for g, w in zip(got, recs):
        _assert_same(g, w, cls_prob=with_cls_prob)
        assert (g.cls_prob is not None) == with_cls_prob
    assert reader.provenance() == {"source_format": "butd_tsv", "source": str(path), "detector": None}


def test_butd_tsv_column_order_is_width_first(tmp_path):
    rec = make_record("42", num_boxes=2, dim=DIM, seed=3)
    rec.image_h, rec.image_w = 100, 300
    path = L.write_butd_tsv(tmp_path / "one.tsv", [rec])
    assert path.read_text().split("\t")[:4] == ["42", "300", "100", "2"]
    (got,) = list(open_legacy(path))
    assert (got.image_h, got.image_w) == (100, 300)


def test_butd_per_gpu_set_as_directory_and_glob(tmp_path):
    recs = _records(12)
    d = tmp_path / "out"
    d.mkdir()
    L.write_butd_tsv_set(d / "train.tsv", recs, num_gpus=11)  # train.tsv.0 ... train.tsv.10
    (d / "README.txt").write_text("not a TSV part")
    files = list_tsv_files(d)
    assert [f.name for f in files][:3] == ["train.tsv.0", "train.tsv.1", "train.tsv.2"]
    assert files[-1].name == "train.tsv.10"  # natural order, not text order
    for source in (d, str(d / "train.tsv.*")):
        assert detect_legacy_format(source) == "butd_tsv"
        got = list(open_legacy(source))
        assert not _failures(got)
        assert sorted(r.image_id for r in got) == sorted(r.image_id for r in recs)
    by_id = {r.image_id: r for r in recs}
    for g in _good(open_legacy(d)):
        _assert_same(g, by_id[g.image_id])


@pytest.mark.parametrize("volta", [False, True], ids=["lxmert", "volta"])
def test_lxmert_tsv_round_trip(tmp_path, volta):
    recs = _records(3, with_labels=True)
    path = L.write_lxmert_tsv(tmp_path / "val2014_obj36.tsv", recs, volta=volta)
    first = path.read_bytes().decode().split("\r\n")[0].split("\t")
    assert len(first) == (13 if volta else 10)
    assert first[1:3] == [str(recs[0].image_h), str(recs[0].image_w)]  # height first
    assert detect_legacy_format(path) == "lxmert_tsv"
    got = list(open_legacy(path))
    assert not _failures(got) and len(got) == 3
    for g, w in zip(got, recs):
        _assert_same(g, w, cls_prob=volta)
        assert g.objects_id.dtype == np.int64 and g.attrs_id.dtype == np.int64
        np.testing.assert_array_equal(g.objects_id, w.objects_id)
        np.testing.assert_array_equal(g.objects_conf, w.objects_conf)
        np.testing.assert_array_equal(g.attrs_id, w.attrs_id)
        np.testing.assert_array_equal(g.attrs_conf, w.attrs_conf)
        assert (g.cls_prob is None) == (not volta)


def test_bua_npz_round_trip(tmp_path):
    recs = _records(3, with_labels=True)
    L.write_bua_npz(tmp_path / "npz", recs)
    assert detect_legacy_format(tmp_path / "npz") == "bua_npz"
    reader = open_legacy(tmp_path / "npz", trust_pickle=True)
    assert reader.needs_pickle and reader.count() == 3
    got = list(reader)
    assert not _failures(got)
    for g, w in zip(got, recs):
        _assert_same(g, w)
        assert g.cls_prob is None
        np.testing.assert_array_equal(g.objects_id, w.objects_id)
        np.testing.assert_array_equal(g.attrs_conf, w.attrs_conf)


def test_bua_npz_d2_cls_prob_gets_a_zero_background_column(tmp_path):
    recs = [make_record(f"d2_{i}", num_boxes=3, dim=DIM, num_classes=1601, seed=i) for i in range(2)]
    L.write_bua_npz(tmp_path / "d2", recs, d2=True)
    with np.load(tmp_path / "d2" / "d2_0.npz", allow_pickle=True) as z:
        assert z["info"].item()["cls_prob"].shape == (3, 1600)
    got = list(open_legacy(tmp_path / "d2", "bua_npz", trust_pickle=True))
    assert not _failures(got)
    for g, w in zip(got, recs):
        _assert_same(g, w)
        assert g.cls_prob.shape == (3, 1601)
        np.testing.assert_array_equal(g.cls_prob[:, 0], 0.0)
        np.testing.assert_array_equal(g.cls_prob[:, 1:], w.cls_prob[:, 1:])
        assert g.objects_id is not None and g.attrs_conf is not None and g.objects_conf is None


@pytest.mark.parametrize("variant", ["mt", "beta", "volta", "volta_h5", "mmf"])
def test_vilbert_lmdb_round_trip(tmp_path, variant):
    recs = _records(4, with_labels=True)
    path = L.write_vilbert_lmdb(tmp_path / f"{variant}.lmdb", recs, variant=variant)
    assert (path / "data.mdb").is_file()
    assert detect_legacy_format(path) == "vilbert_lmdb"
    reader = open_legacy(path, trust_pickle=True)
    assert reader.count() == 4
    got = list(reader)
    assert not _failures(got) and len(got) == 4
    for g, w in zip(got, recs):
        _assert_same(g, w, cls_prob=variant in ("beta", "mmf"))
        if variant in ("volta", "volta_h5"):
            np.testing.assert_array_equal(g.objects_id, w.objects_id)
            np.testing.assert_array_equal(g.attrs_conf, w.attrs_conf)
    assert reader.position("img2") == 2
    with pytest.raises(UnknownImageError, match="nope"):
        reader.position("nope")
    _assert_lmdb_closed(path)
    assert len(list(reader)) == 4  # iterating twice reopens cleanly


def test_vilbert_lmdb_env_closed_after_partial_iteration(tmp_path):
    path = L.write_vilbert_lmdb(tmp_path / "mt", _records(4))
    it = iter(open_legacy(path, trust_pickle=True))
    next(it)
    it.close()
    _assert_lmdb_closed(path)


def test_tensorpack_lmdb_round_trip_and_captions(tmp_path):
    recs = _records(5)
    caps = [f"caption number {i}" for i in range(5)]
    path = L.write_tensorpack_lmdb(tmp_path / "training_feat_all.lmdb", recs, caps)
    assert path.is_file()  # tensorpack writes a single-file LMDB for a non-directory path
    assert detect_legacy_format(path) == "tensorpack_lmdb"
    reader = open_legacy(path)  # msgpack: no trust needed
    assert not reader.needs_pickle and reader.count() == 5
    got = list(reader)
    assert not _failures(got)
    for g, w in zip(got, recs):
        _assert_same(g, w, cls_prob=True)
    assert list(iter_captions(path)) == [(r.image_id, c) for r, c in zip(recs, caps)]
    _assert_lmdb_closed(path, subdir=False)


def test_tensorpack_without_keys_walks_the_database(tmp_path, caplog):
    recs = _records(3)
    path = L.write_tensorpack_lmdb(tmp_path / "part.lmdb", recs, write_keys=False)
    assert detect_legacy_format(path) == "tensorpack_lmdb"
    with caplog.at_level(logging.WARNING, logger="vilbert.datasets.legacy"):
        got = list(open_legacy(path))
    assert "__keys__" in caplog.text
    assert [g.image_id for g in got] == [r.image_id for r in recs]


def test_registry_names_and_base_class():
    assert set(LEGACY_FORMATS) == {"butd_tsv", "lxmert_tsv", "bua_npz", "vilbert_lmdb", "tensorpack_lmdb"}
    for name, cls in LEGACY_FORMATS.items():
        assert issubclass(cls, LegacyReader) and cls.format_name == name
    assert {n for n, c in LEGACY_FORMATS.items() if c.needs_pickle} == {"bua_npz", "vilbert_lmdb"}


# ------------------------------------------------------------------------------------------- bad input


def test_tsv_broken_base64_is_a_failure_and_iteration_goes_on(tmp_path):
    recs = _records(4)
    rows = [L.butd_row(r) for r in recs]
    rows[1]["features"] = rows[1]["features"][:-3] + "!!="  # not base64
    rows[2]["boxes"] = rows[2]["boxes"][:-1]  # broken padding
    path = tmp_path / "bad.tsv"
    with open(path, "w", newline="") as f:
        import csv
        w = csv.DictWriter(f, delimiter="\t", fieldnames=L.BUTD_FIELDNAMES)
        for row in rows:
            w.writerow(row)
    got = list(open_legacy(path))
    assert [type(x).__name__ for x in got] == ["RegionFeatures", "RecordFailure", "RecordFailure", "RegionFeatures"]
    f1, f2 = _failures(got)
    assert (f1.image_id, f1.position) == ("img1", 1) and "features" in f1.reason and "base64" in f1.reason
    assert (f2.image_id, f2.position) == ("img2", 2) and "boxes" in f2.reason
    assert str(f1).startswith(f"{path}: record 'img1': ")
    _assert_same(got[3], recs[3])


def test_tsv_arrays_disagreeing_with_num_boxes(tmp_path):
    recs = _records(3)
    rows = [L.butd_row(r) for r in recs]
    rows[0]["num_boxes"] = str(recs[0].num_boxes + 1)  # boxes and features too short for it
    rows[1]["boxes"] = L.b64(recs[1].boxes[:-1], np.float32)  # one box missing
    path = tmp_path / "n.tsv"
    import csv
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, delimiter="\t", fieldnames=L.BUTD_FIELDNAMES)
        for row in rows:
            w.writerow(row)
    got = list(open_legacy(path, "butd_tsv"))
    f0, f1 = _failures(got)
    assert f0.image_id == "img0" and "num_boxes=5" in f0.reason
    assert f1.image_id == "img1" and "'boxes'" in f1.reason
    assert [g.image_id for g in _good(got)] == ["img2"]


def test_tsv_torn_last_line_and_resumed_append(tmp_path):
    recs = _records(5)
    path = L.write_butd_tsv(tmp_path / "torn.tsv.0", recs[:3])
    data = path.read_bytes()
    cut = data[: len(data) - 200]  # a killed extractor: the last row is cut inside its features
    path.write_bytes(cut)
    L.write_butd_tsv(path, recs[3:], mode="a")  # generate_tsv.py resumes by appending
    got = list(open_legacy(path))
    assert [g.image_id for g in _good(got)] == ["img0", "img1", "img4"]
    (fail,) = _failures(got)
    assert fail.image_id == "img2" and fail.source == str(path)


def test_tsv_torn_final_row_only(tmp_path):
    recs = _records(3)
    path = L.write_butd_tsv(tmp_path / "t.tsv", recs)
    text = path.read_text()
    path.write_text(text[: text.rindex("\t") + 1 + 10])  # cut 10 chars into the last column
    got = list(open_legacy(path))
    assert [g.image_id for g in _good(got)] == ["img0", "img1"]
    (fail,) = _failures(got)
    assert fail.image_id == "img2" and fail.position == 2


def test_tsv_row_with_too_few_columns_says_torn(tmp_path):
    recs = _records(2)
    path = L.write_butd_tsv(tmp_path / "c.tsv", recs)
    with open(path, "a", newline="") as f:
        f.write("img9\t640\t480")
    got = list(open_legacy(path))
    fail = _failures(got)[0]
    assert fail.image_id == "img9" and "3 columns, expected 6" in fail.reason and "torn" in fail.reason


def test_tsv_feature_width_change_is_a_failure(tmp_path):
    recs = _records(3)
    rows = [L.butd_row(r) for r in recs]
    # Decodes cleanly and fits num_boxes, but with half the width of the other rows: a corrupted row.
    rows[2]["features"] = L.b64(recs[2].features[:, : DIM // 2], np.float32)
    import csv
    path = tmp_path / "w.tsv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, delimiter="\t", fieldnames=L.BUTD_FIELDNAMES)
        for row in rows:
            w.writerow(row)
    (fail,) = _failures(list(open_legacy(path)))
    assert fail.image_id == "img2" and "earlier records had 8" in fail.reason


def test_lxmert_broken_base64_names_column(tmp_path):
    recs = _records(3)
    rows = [L.lxmert_row(r) for r in recs]
    rows[0]["objects_conf"] = "@@@@"
    import csv
    path = tmp_path / "o.tsv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, delimiter="\t", fieldnames=L.LXMERT_FIELDNAMES)
        for row in rows:
            w.writerow(row)
    got = list(open_legacy(path))
    (fail,) = _failures(got)
    assert fail.image_id == "img0" and "objects_conf" in fail.reason
    assert len(_good(got)) == 2


def test_vilbert_lmdb_missing_keys(tmp_path):
    path = L.write_vilbert_lmdb(tmp_path / "interrupted", _records(2), write_keys=False)
    assert detect_legacy_format(path) == "vilbert_lmdb"
    with pytest.raises(LegacyFormatError, match="no b'keys' entry.*interrupted") as ei:
        open_legacy(path, trust_pickle=True)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    _assert_lmdb_closed(path)


def test_vilbert_lmdb_empty_after_aborted_conversion(tmp_path):
    env = lmdb.open(str(tmp_path / "aborted"), map_size=1 << 20)
    with pytest.raises(RuntimeError):
        with env.begin(write=True) as txn:  # the single write txn dies: nothing is committed
            txn.put(b"1", pickle.dumps({}))
            raise RuntimeError("killed")
    env.close()
    assert detect_legacy_format(tmp_path / "aborted") == "vilbert_lmdb"
    with pytest.raises(LegacyFormatError, match="interrupted"):
        open_legacy(tmp_path / "aborted", trust_pickle=True)


@pytest.mark.parametrize("fmt", ["vilbert_lmdb", "bua_npz"])
def test_pickle_without_trust_reads_nothing(tmp_path, monkeypatch, fmt):
    if fmt == "vilbert_lmdb":
        path = L.write_vilbert_lmdb(tmp_path / "x", _records(2))
    else:
        path = tmp_path / "x"
        L.write_bua_npz(path, _records(2))

    def boom(*a, **k):
        raise AssertionError("unpickled without trust")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(np, "load", boom)
    for fmt_arg in (None, fmt):
        with pytest.raises(TrustRequiredError, match="--trust-pickle") as ei:
            open_legacy(path, fmt_arg)
        assert str(path) in str(ei.value) and "arbitrary code" in str(ei.value)


def test_vilbert_lmdb_bad_values_are_failures(tmp_path):
    recs = _records(3)
    bad_n = L.vilbert_value(recs[0])
    bad_n["num_boxes"] = recs[0].num_boxes + 2
    values = {b"bad_pickle": b"\x80\x04not a pickle", b"bad_n": pickle.dumps(bad_n),
              b"not_dict": pickle.dumps([1, 2])}
    path = L.write_vilbert_lmdb(tmp_path / "v", recs, values=values)
    got = list(open_legacy(path, trust_pickle=True))
    assert [g.image_id for g in _good(got)] == ["img0", "img1", "img2"]
    fails = {f.image_id: f for f in _failures(got)}
    assert set(fails) == {"bad_pickle", "bad_n", "not_dict"}
    assert "pickle" in fails["bad_pickle"].reason
    assert "num_boxes=6" in fails["bad_n"].reason and fails["bad_n"].position == 4
    assert "dict" in fails["not_dict"].reason


def test_tensorpack_pyarrow_serialization_is_refused(tmp_path):
    path = L.write_tensorpack_lmdb(tmp_path / "pa.lmdb", _records(2), serializer="pyarrow")
    assert detect_legacy_format(path) == "tensorpack_lmdb"
    with pytest.raises(LegacyFormatError, match="TENSORPACK_SERIALIZE=msgpack"):
        list(open_legacy(path))


def test_tensorpack_bad_datapoint_is_a_failure(tmp_path):
    recs = _records(3)
    path = L.write_tensorpack_lmdb(tmp_path / "tp.lmdb", recs)
    env = lmdb.open(str(path), subdir=False, map_size=1 << 30)
    with env.begin(write=True) as txn:
        dp = L.tensorpack_datapoint(recs[1], "c")
        dp[3] = str(recs[1].num_boxes + 1)
        txn.put(b"00000001", L.msgpack_dumps(dp))
    env.close()
    got = list(open_legacy(path))
    (fail,) = _failures(got)
    assert fail.image_id == "img1" and fail.position == 1
    assert [g.image_id for g in _good(got)] == ["img0", "img2"]


def test_damaged_npz_is_a_failure(tmp_path):
    d = tmp_path / "npz"
    paths = L.write_bua_npz(d, _records(3))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    got = list(open_legacy(d, trust_pickle=True))
    (fail,) = _failures(got)
    assert fail.image_id == "img1" and fail.source == str(paths[1])
    assert len(_good(got)) == 2


@pytest.mark.parametrize("fmt", [None, "butd_tsv", "vilbert_lmdb", "bua_npz", "tensorpack_lmdb"])
def test_nonexistent_path(tmp_path, fmt):
    missing = tmp_path / "nope"
    assert detect_legacy_format(missing) is None
    with pytest.raises(SourceNotFoundError, match=str(missing)):
        open_legacy(missing, fmt, trust_pickle=True)


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(SourceNotFoundError, match="matches no files"):
        open_legacy(str(tmp_path / "feat.tsv.*"))


def test_unknown_layout(tmp_path):
    junk = tmp_path / "notes.tsv"
    junk.write_text("a\tb\tc\n")
    assert detect_legacy_format(junk) is None
    with pytest.raises(LegacyFormatError, match="butd_tsv, lxmert_tsv, bua_npz") as ei:
        open_legacy(junk)
    assert str(junk) in str(ei.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert detect_legacy_format(empty) is None
    with pytest.raises(LegacyFormatError):
        open_legacy(empty)


def test_unknown_format_name_lists_valid_ones(tmp_path):
    path = L.write_butd_tsv(tmp_path / "f.tsv", _records(1))
    with pytest.raises(ConfigError, match="tensorpack_lmdb"):
        open_legacy(path, "uniter_lmdb")


def test_our_own_store_is_not_a_legacy_dump(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    L.write_butd_tsv(store / "stray.tsv", _records(1))
    assert detect_legacy_format(store) is None


def test_errors_are_vilbert_errors_on_one_line(tmp_path):
    path = L.write_vilbert_lmdb(tmp_path / "v", _records(1))
    for call in (lambda: open_legacy(tmp_path / "missing"), lambda: open_legacy(path)):
        with pytest.raises(VilbertError) as ei:
            call()
        assert "\n" not in str(ei.value)


def test_tsv_torn_first_row_does_not_fix_the_variant(tmp_path):
    recs = _records(3)
    path = tmp_path / "beta.tsv"
    path.write_text("img9\t640\t480\t4\tAAAA\r\n")  # torn first row, then well-formed 7-column rows
    L.write_butd_tsv(path, recs, with_cls_prob=True, mode="a")
    got = list(open_legacy(path, "butd_tsv"))
    (fail,) = _failures(got)
    assert fail.image_id == "img9" and "expected 6" in fail.reason and "torn" in fail.reason
    assert all(g.cls_prob is not None for g in _good(got)) and len(_good(got)) == 3


def test_tsv_py3_bytes_repr_fields_are_accepted(tmp_path):
    rec = make_record("7", num_boxes=2, dim=DIM, seed=1)
    row = L.butd_row(rec)
    row["boxes"], row["features"] = f"b'{row['boxes']}'", f"b'{row['features']}'"
    path = tmp_path / "py3.tsv"
    path.write_text("\t".join(row[k] for k in L.BUTD_FIELDNAMES) + "\r\n")
    (got,) = list(open_legacy(path))
    _assert_same(got, rec)


def test_explicit_format_with_glob_for_a_directory_format(tmp_path):
    with pytest.raises(SourceNotFoundError):
        open_legacy(str(tmp_path / "*.npz"), "bua_npz", trust_pickle=True)


def test_tsv_quoted_image_id_goes_through_csv(tmp_path):
    rec = make_record('a"b\tc', num_boxes=2, dim=DIM, seed=2)
    path = L.write_butd_tsv(tmp_path / "q.tsv", [rec, make_record("plain", num_boxes=2, dim=DIM, seed=3)])
    assert b'"a""b\tc"' in path.read_bytes()  # csv.DictWriter quoting
    got = list(open_legacy(path))
    assert not _failures(got)
    _assert_same(got[0], rec)


def test_npz_num_bbox_disagreeing_with_arrays(tmp_path):
    recs = _records(2)
    d = tmp_path / "npz"
    paths = L.write_bua_npz(d, recs)
    with np.load(paths[0], allow_pickle=True) as z:
        members = {k: z[k] for k in z.files}
    members["num_bbox"] = np.array(recs[0].num_boxes + 3)
    np.savez_compressed(paths[0], **members)
    got = list(open_legacy(d, trust_pickle=True))
    (fail,) = _failures(got)
    assert fail.image_id == "img0" and "num_boxes=7" in fail.reason
    assert [g.image_id for g in _good(got)] == ["img1"]


def test_tsv_base64_of_a_partial_float_is_a_failure(tmp_path):
    recs = _records(2)
    rows = [L.butd_row(r) for r in recs]
    rows[0]["boxes"] = "AAAAAAAA"  # 6 bytes: not a whole number of float32
    path = tmp_path / "p.tsv"
    path.write_text("".join("\t".join(r[k] for k in L.BUTD_FIELDNAMES) + "\r\n" for r in rows))
    got = list(open_legacy(path))
    (fail,) = _failures(got)
    assert fail.image_id == "img0" and "'boxes'" in fail.reason and "6 bytes" in fail.reason
    assert [g.image_id for g in _good(got)] == ["img1"]


def test_npz_with_corrupted_member_data_is_a_failure(tmp_path):
    d = tmp_path / "npz"
    paths = L.write_bua_npz(d, _records(2))
    data = bytearray(paths[0].read_bytes())
    i = data.index(b"x.npy") + 200  # inside the deflated bytes of `x`, headers and directory intact
    data[i:i + 64] = bytes(64)
    paths[0].write_bytes(bytes(data))
    got = list(open_legacy(d, trust_pickle=True))
    (fail,) = _failures(got)
    assert fail.image_id == "img0" and fail.source == str(paths[0])
