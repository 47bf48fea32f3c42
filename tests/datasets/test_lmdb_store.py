import os
import pickle

import numpy as np
import pytest

from vilbert.datasets.lmdb_store import VALUE_MAGIC, decode_record, encode_record, row_key
from vilbert.datasets.reader import FeatureStore
from vilbert.datasets.writer import PackConfig, StoreWriter, record_layout
from vilbert.errors import CorruptStoreError, StoreFullError
from tests.conftest import make_record


def test_value_round_trip_is_raw_little_endian_without_pickle():
    rec = make_record("img/1", num_boxes=5, with_labels=True).cast("float16")
    _, fields = record_layout(rec)
    value = bytes(encode_record(rec, fields))
    assert value[:4] == VALUE_MAGIC and b"\x80\x04\x95" not in value[:64]  # no pickle header
    got = decode_record(value, "x")
    assert got.image_id == "img/1" and got.num_boxes == 5
    for name in ("boxes", "features", *fields):
        np.testing.assert_array_equal(getattr(got, name), getattr(rec, name))
        assert getattr(got, name).dtype == getattr(rec, name).dtype


def test_row_keys_sort_like_rows():
    keys = [row_key(i) for i in (0, 1, 255, 256, 70000)]
    assert keys == sorted(keys) and all(len(k) == 8 for k in keys)


@pytest.mark.parametrize("value", [b"short", pickle.dumps({"features": 1}) + b"\0" * 40])
def test_foreign_values_are_refused(value):
    with pytest.raises(CorruptStoreError, match="x"):
        decode_record(value, "x")


def test_truncated_value_names_record():
    rec = make_record("r9", num_boxes=5).cast("float16")
    value = bytes(encode_record(rec, record_layout(rec)[1]))
    with pytest.raises(CorruptStoreError, match="record 'r9': value truncated"):
        decode_record(value[:-200], "x")


def test_shards_are_single_files_without_lock(tmp_path, records):
    with StoreWriter(tmp_path / "s", PackConfig(format="lmdb", shard_size_bytes=2000)) as w:
        for r in records:
            w.write(r)
    names = sorted(p.name for p in (tmp_path / "s" / "shards").iterdir())
    assert names and all(n.startswith("part-") and n.endswith(".lmdb") for n in names)
    assert all((tmp_path / "s" / "shards" / n).is_file() for n in names)


def test_map_full_names_shard_and_record_and_keeps_completed_shards(tmp_path):
    # ~21 KB values fill two-record shards; from r6 on, one ~62 KB value cannot fit a 64 KiB map.
    recs = [make_record(f"r{i}", num_boxes=20 if i < 6 else 60, dim=512, seed=i) for i in range(12)]
    small = PackConfig(format="lmdb", shard_size_bytes=40_000, lmdb_map_size=64 * 1024)
    w = StoreWriter(tmp_path / "s", small, fingerprint="same")
    with pytest.raises(StoreFullError, match=r"part-00003\.lmdb: record 'r6': LMDB map of \d+ bytes is full"):
        for r in recs:
            w.write(r)
    shards = tmp_path / "s" / "shards"
    done = sorted(shards.glob("*.done.json"))
    assert done, "the shards completed before the map filled are kept"
    assert not list(shards.glob("*.tmp"))
    # Re-running with a larger map resumes after the completed shards.
    big = PackConfig(format="lmdb", shard_size_bytes=40_000, lmdb_map_size=1 << 30)
    w = StoreWriter(tmp_path / "s", big, fingerprint="same")
    assert w.resumed_items == 6
    for r in recs[w.resumed_items:]:
        w.write(r)
    w.close()
    store = FeatureStore.open(tmp_path / "s")
    assert list(store.image_ids) == [r.image_id for r in recs]


def test_two_stores_on_one_path_in_one_process(tmp_path, records):
    with StoreWriter(tmp_path / "s", PackConfig(format="lmdb")) as w:
        for r in records:
            w.write(r)
    a, b = FeatureStore.open(tmp_path / "s"), FeatureStore.open(tmp_path / "s")
    assert a[0].image_id == b[0].image_id
    a.close()
    assert b[1].image_id == records[1].image_id  # b's environment survives a.close()
    b.close()


def test_fork_child_reopens_shard_parent_holds(tmp_path, records):
    with StoreWriter(tmp_path / "s", PackConfig(format="lmdb")) as w:
        for r in records:
            w.write(r)
    store = FeatureStore.open(tmp_path / "s")
    store[0]
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            ok = store.get(records[5].image_id).num_boxes == records[5].num_boxes
        except Exception:  # noqa: BLE001
            ok = False
        os.write(wfd, b"1" if ok else b"0")
        os._exit(0)
    os.close(wfd)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    assert store[2].image_id == records[2].image_id
