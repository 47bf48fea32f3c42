import multiprocessing as mp
import pickle

import numpy as np
import pytest

from vilbert.datasets.reader import FeatureStore
from vilbert.datasets.writer import PackConfig, StoreWriter
from vilbert.errors import CorruptStoreError, SourceNotFoundError, UnknownImageError

FORMATS = ["arrow", "lmdb", "hdf5"]


def _store(path, records, fmt, **kw):
    with StoreWriter(path, PackConfig(format=fmt, shard_size_bytes=3000, **kw)) as w:
        for r in records:
            w.write(r)
    return FeatureStore.open(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_by_id_and_position(tmp_path, records, fmt):
    store = _store(tmp_path / "s", records, fmt)
    assert len(store) == len(records) and store.manifest.storage == fmt
    assert list(store.image_ids) == [r.image_id for r in records]
    assert store.num_boxes_array().tolist() == [r.num_boxes for r in records]
    for i, want in enumerate(records):
        for got in (store[i], store.get(want.image_id)):
            assert got.image_id == want.image_id and got.num_boxes == want.num_boxes
            assert (got.image_h, got.image_w) == (want.image_h, want.image_w)
            np.testing.assert_array_equal(got.boxes, want.boxes)
            assert got.features.dtype == np.float16
            np.testing.assert_array_equal(got.features, want.features.astype(np.float16))
            np.testing.assert_array_equal(got.cls_prob, want.cls_prob.astype(np.float16))
    assert store[-1].image_id == records[-1].image_id
    assert records[3].image_id in store and "nope" not in store
    assert store.position(records[5].image_id) == 5
    store.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_optional_labels_and_odd_ids(tmp_path, fmt, record_factory):
    recs = [record_factory(i, num_boxes=n, with_labels=True) for i, n in (("a/b/c.jpg", 3), ("%2F", 0), (".", 1))]
    store = _store(tmp_path / "s", recs, fmt)
    for want in recs:
        got = store.get(want.image_id)
        assert got.num_boxes == want.num_boxes and got.features.shape == (want.num_boxes, 16)
        np.testing.assert_array_equal(got.objects_id, want.objects_id.astype(np.int32))
        np.testing.assert_array_equal(got.attrs_conf, want.attrs_conf)


def test_unknown_id_and_position(tmp_path, records):
    store = _store(tmp_path / "s", records, "arrow")
    with pytest.raises(UnknownImageError, match=r"s: record 'zzz': no such image id in the store \(12 records\)"):
        store.get("zzz")
    with pytest.raises(IndexError, match="position 12 out of range"):
        store[12]


def test_open_missing_path(tmp_path):
    with pytest.raises(SourceNotFoundError, match="nope: no such store"):
        FeatureStore.open(tmp_path / "nope")


def test_truncated_index_or_unknown_version_fails_on_open(tmp_path, records):
    import json
    from vilbert.errors import SchemaVersionError
    _store(tmp_path / "s", records, "arrow")
    index = tmp_path / "s" / "index.arrow"
    index.write_bytes(index.read_bytes()[:-50])
    with pytest.raises(CorruptStoreError, match="index.arrow: is .* bytes, the manifest says"):
        FeatureStore.open(tmp_path / "s")
    manifest = tmp_path / "s" / "manifest.json"
    obj = json.loads(manifest.read_text())
    obj["format_version"] = 7
    manifest.write_text(json.dumps(obj))
    with pytest.raises(SchemaVersionError, match="manifest.json: format_version 7"):
        FeatureStore.open(tmp_path / "s")


def test_pickles_to_path_only(tmp_path, records):
    store = _store(tmp_path / "s", records, "lmdb")
    store[0]  # opens a shard in this process
    blob = pickle.dumps(store)
    assert len(blob) < 300 and b"lmdb.Environment" not in blob
    clone = pickle.loads(blob)
    assert clone.get(records[4].image_id).num_boxes == records[4].num_boxes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("truncate", [True, False])
def test_damaged_shard_is_a_clean_error(tmp_path, records, fmt, truncate):
    store = _store(tmp_path / "s", records, fmt)
    shard = tmp_path / "s" / store.manifest.shards[0].name
    if truncate:
        shard.write_bytes(shard.read_bytes()[:-64])
        match = "truncated or replaced"
    else:
        shard.unlink()
        match = "shard is missing"
    fresh = FeatureStore.open(tmp_path / "s")
    with pytest.raises(CorruptStoreError, match=f"part-00000.*{match}"):
        fresh[0]
    assert fresh[len(records) - 1].image_id == records[-1].image_id  # other shards still read


def _read_all(store, ids, out):
    out.put([(store.get(i).image_id, float(np.asarray(store.get(i).features, np.float32).sum())) for i in ids])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_child_processes_read_after_parent_opened_shards(tmp_path, records, fmt, method):
    store = _store(tmp_path / "s", records, fmt)
    ids = [r.image_id for r in records]
    expected = [(i, float(np.asarray(store.get(i).features, np.float32).sum())) for i in ids]  # parent holds shards
    ctx = mp.get_context(method)
    q = ctx.Queue()
    procs = [ctx.Process(target=_read_all, args=(store, ids, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [expected, expected]
    assert store.get(ids[0]).image_id == ids[0]  # the parent's handles still work
