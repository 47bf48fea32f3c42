import json

import numpy as np
import pytest

from vilbert.datasets.manifest import load_manifest
from vilbert.datasets.reader import FeatureStore
from vilbert.datasets.writer import PackConfig, StoreWriter
from vilbert.errors import ConfigError, DuplicateImageError, RecordError, StoreError
from tests.conftest import make_record


@pytest.mark.parametrize("field,value", [("format", "parquet"), ("feature_dtype", "int8"),
                                         ("on_duplicate", "merge"), ("shard_size_bytes", 0)])
def test_config_check_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        PackConfig(**{field: value}).check()


@pytest.mark.parametrize("fmt", ["arrow", "lmdb", "hdf5"])
def test_shards_roll_over_and_manifest_describes_them(tmp_path, fmt, records):
    with StoreWriter(tmp_path / "s", PackConfig(format=fmt, shard_size_bytes=2000), {"detector": None}) as w:
        for r in records:
            assert w.write(r)
    m = load_manifest(tmp_path / "s")
    assert m.storage == fmt and m.num_records == len(records) and len(m.shards) > 2
    assert sum(s.num_records for s in m.shards) == len(records)
    assert m.feature_dim == 16 and m.feature_dtype == "float16"
    assert m.fields == {"cls_prob": {"dtype": "float16", "width": 11}}
    assert m.provenance["tool_version"] and m.provenance["detector"] is None
    left = sorted(p.name for p in (tmp_path / "s" / "shards").iterdir())
    assert left == sorted(s.name.split("/")[1] for s in m.shards)  # no temp files or sidecars left


def test_float32_on_request(tmp_path, records):
    with StoreWriter(tmp_path / "s", PackConfig(feature_dtype="float32")) as w:
        w.write(records[0])
    store = FeatureStore.open(tmp_path / "s")
    assert store[0].features.dtype == np.float32
    np.testing.assert_array_equal(store[0].features, records[0].features)


def test_bad_record_raises_and_writes_nothing(tmp_path, records):
    bad = make_record("bad", num_boxes=4)
    bad.boxes = bad.boxes[:3]
    with StoreWriter(tmp_path / "s") as w:
        w.write(records[0])
        with pytest.raises(RecordError, match=r"record 'bad': boxes has shape \(3, 4\), expected \(4, 4\)"):
            w.write(bad)
        w.write(records[1])
    assert FeatureStore.open(tmp_path / "s").image_ids[:] == [records[0].image_id, records[1].image_id]


def test_layout_mismatch_is_a_record_error(tmp_path):
    with StoreWriter(tmp_path / "s") as w:
        w.write(make_record("a", dim=16))
        with pytest.raises(RecordError, match="record 'b': features are 8-d but the store holds 16-d"):
            w.write(make_record("b", dim=8))
        with pytest.raises(RecordError, match="record 'c': optional fields"):
            w.write(make_record("c", num_classes=None))


def test_duplicate_error(tmp_path, records):
    w = StoreWriter(tmp_path / "s")
    w.write(records[0])
    with pytest.raises(DuplicateImageError, match=rf"record '{records[0].image_id}' appears twice.*keep-first"):
        w.write(records[0])


def test_keep_first_and_keep_last(tmp_path):
    a1, b, a2 = make_record("a", 3, seed=1), make_record("b", 2, seed=2), make_record("a", 5, seed=3)
    with StoreWriter(tmp_path / "first", PackConfig(on_duplicate="keep-first")) as w:
        assert [w.write(r) for r in (a1, b, a2)] == [True, True, False]
    with StoreWriter(tmp_path / "last", PackConfig(on_duplicate="keep-last", shard_size_bytes=1)) as w:
        assert [w.write(r) for r in (a1, b, a2)] == [True, True, True]
    first, last = FeatureStore.open(tmp_path / "first"), FeatureStore.open(tmp_path / "last")
    assert first.image_ids[:] == last.image_ids[:] == ["a", "b"]
    assert first.get("a").num_boxes == 3 and last.get("a").num_boxes == 5
    assert last.manifest.dead_rows == 1 and last.num_boxes_array().tolist() == [5, 2]


def test_refuses_existing_store_and_foreign_directory(tmp_path, records):
    with StoreWriter(tmp_path / "s") as w:
        w.write(records[0])
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    with pytest.raises(StoreError, match="already holds a complete feature store; pass --overwrite"):
        StoreWriter(tmp_path / "s")
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and is not a feature store"):
        StoreWriter(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").exists()
    with StoreWriter(tmp_path / "s", overwrite=True) as w:
        w.write(records[1])
    assert FeatureStore.open(tmp_path / "s").image_ids[:] == [records[1].image_id]


def test_empty_store(tmp_path):
    StoreWriter(tmp_path / "s").close()
    store = FeatureStore.open(tmp_path / "s")
    assert len(store) == 0 and store.manifest.feature_dim is None and store.num_boxes_array().shape == (0,)


def test_exception_keeps_completed_shards_and_resume_continues(tmp_path, records):
    cfg = PackConfig(shard_size_bytes=1500)
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "s", cfg, fingerprint="cmd-1") as w:
            for r in records[:7]:
                w.write(r)
            raise RuntimeError("killed")
    shards = tmp_path / "s" / "shards"
    done = sorted(p.name for p in shards.glob("*.done.json"))
    assert done and not (tmp_path / "s" / "manifest.json").exists()
    assert not list(shards.glob("*.tmp"))
    with pytest.raises(StoreError, match="partial output of a different command"):
        StoreWriter(tmp_path / "s", cfg, fingerprint="cmd-2")
    w = StoreWriter(tmp_path / "s", cfg, fingerprint="cmd-1")
    skip = w.resumed_items
    assert 0 < skip < 7
    for r in records[skip:]:
        w.write(r)
    w.close()
    store = FeatureStore.open(tmp_path / "s")
    assert store.image_ids[:] == [r.image_id for r in records]
    sidecar = json.loads((shards.parent / "manifest.json").read_text())
    assert sidecar["num_records"] == len(records)


def test_partial_output_of_other_settings_is_refused(tmp_path, records):
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "s", PackConfig(shard_size_bytes=1500), fingerprint="f") as w:
            for r in records[:6]:
                w.write(r)
            raise RuntimeError
    with pytest.raises(StoreError, match="partial output of an earlier run"):
        StoreWriter(tmp_path / "s", PackConfig(shard_size_bytes=1500))
    with pytest.raises(StoreError, match="'float16' features; pass --overwrite"):
        StoreWriter(tmp_path / "s", PackConfig(shard_size_bytes=1500, feature_dtype="float32"), fingerprint="f")
    with StoreWriter(tmp_path / "s", PackConfig(feature_dtype="float32"), overwrite=True) as w:
        w.write(records[0])
    assert FeatureStore.open(tmp_path / "s")[0].features.dtype == np.float32


def test_failed_shard_publish_surfaces_early_and_publishes_nothing(tmp_path, monkeypatch):
    import vilbert.datasets.writer as writer_mod
    real_publish = writer_mod.publish

    def failing_publish(tmp, final):
        if str(final).endswith("part-00000.arrow"):
            raise OSError(28, "No space left on device")
        return real_publish(tmp, final)

    monkeypatch.setattr(writer_mod, "publish", failing_publish)
    w = StoreWriter(tmp_path / "s", PackConfig(shard_size_bytes=1500))
    with pytest.raises(StoreError, match=r"part-00000\.arrow: could not publish the shard"):
        for i in range(40):
            w.write(make_record(f"r{i}", num_boxes=6, seed=i))
    # it failed while the second shard finished, long before 40 records
    assert i < 10
    w.abort()
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_lmdb_overlong_id_is_a_record_error(tmp_path):
    w = StoreWriter(tmp_path / "s", PackConfig(format="lmdb"))
    w.write(make_record("ok", num_boxes=2))
    with pytest.raises(RecordError, match="65535"):
        w.write(make_record("x" * 70000, num_boxes=2))
    w.write(make_record("ok2", num_boxes=2))
    assert w.close().num_records == 2
