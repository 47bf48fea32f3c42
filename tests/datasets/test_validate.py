import json

import pytest

from vilbert.datasets.arrow_store import ArrowShardWriter
from vilbert.datasets.atomic import sha256_file
from vilbert.datasets.records import RegionFeatures
from vilbert.datasets.reader import FeatureStore
from vilbert.datasets.validate import validate_store
from vilbert.datasets.writer import PackConfig, StoreWriter, record_layout
from vilbert.errors import CorruptStoreError, SchemaVersionError


@pytest.fixture(params=["arrow", "lmdb", "hdf5"])
def store_path(request, tmp_path, records):
    with StoreWriter(tmp_path / "s", PackConfig(format=request.param, shard_size_bytes=2500)) as w:
        for r in records:
            w.write(r)
    return tmp_path / "s"


def test_intact_store_validates(store_path, records):
    report = validate_store(store_path)
    assert report.ok, report.problems
    assert report.records_checked == len(records) and report.num_shards > 1


def _flip_byte(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_shard_named_with_its_records(store_path):
    m = FeatureStore.open(store_path).manifest
    shard = store_path / m.shards[1].name
    _flip_byte(shard, shard.stat().st_size // 2)
    report = validate_store(store_path)
    assert not report.ok and report.damaged_shards == [m.shards[1].name]
    assert "part-00001" in report.problems[0] and "sha256 differs" in report.problems[0]
    assert "affected records: 'img" in report.problems[0]


def test_truncated_and_missing_shards(store_path):
    m = FeatureStore.open(store_path).manifest
    first, last = store_path / m.shards[0].name, store_path / m.shards[-1].name
    first.write_bytes(first.read_bytes()[:-10])
    last.unlink()
    report = validate_store(store_path)
    assert report.damaged_shards == [m.shards[0].name, m.shards[-1].name]
    assert "truncated or replaced" in report.problems[0] and "shard is missing" in report.problems[1]


def test_tampered_index(store_path):
    _flip_byte(store_path / "index.arrow", 200)
    report = validate_store(store_path)
    assert not report.ok and "index.arrow: sha256 differs" in report.problems[0]


def test_unknown_schema_version(store_path):
    obj = json.loads((store_path / "manifest.json").read_text())
    obj["format_version"] = 2
    (store_path / "manifest.json").write_text(json.dumps(obj))
    with pytest.raises(SchemaVersionError, match="format_version 2"):
        validate_store(store_path)


def test_record_disagreeing_with_num_boxes(tmp_path, records):
    """A shard whose hash is right but whose record claims more boxes than its arrays hold."""
    with StoreWriter(tmp_path / "s", PackConfig(format="arrow")) as w:
        for r in records[:3]:
            w.write(r)
    m = FeatureStore.open(tmp_path / "s").manifest
    shard = tmp_path / "s" / m.shards[0].name
    good = [r.cast("float16") for r in records[:3]]
    bad = RegionFeatures(**{**good[1].__dict__, "num_boxes": good[1].num_boxes + 1})
    dim, fields = record_layout(good[0])
    sw = ArrowShardWriter(shard, dim, "float16", fields)  # bypasses validation on purpose
    for r in (good[0], bad, good[2]):
        sw.append(r)
    sw.close()
    obj = json.loads((tmp_path / "s" / "manifest.json").read_text())
    obj["shards"][0].update(sha256=sha256_file(shard), size_bytes=shard.stat().st_size)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(obj))
    report = validate_store(tmp_path / "s")
    assert len(report.problems) == 1
    assert "part-00000.arrow" in report.problems[0] and f"record {bad.image_id!r}" in report.problems[0]
    store = FeatureStore.open(tmp_path / "s")
    with pytest.raises(CorruptStoreError, match=rf"part-00000.arrow: record {bad.image_id!r}"):
        store.get(bad.image_id)
    assert store.get(good[2].image_id).num_boxes == good[2].num_boxes
