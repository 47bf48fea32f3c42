import json

import numpy as np
import pytest

from vilbert.datasets.manifest import (
    FORMAT_VERSION, Manifest, ShardInfo, load_manifest, read_index, shard_name, write_index, write_manifest,
)
from vilbert.errors import CorruptStoreError, SchemaVersionError, SourceNotFoundError


def _manifest(**kw):
    base = dict(storage="arrow", num_records=2, feature_dim=16, feature_dtype="float16",
                fields={"cls_prob": {"dtype": "float16", "width": 11}},
                shards=(ShardInfo("shards/part-00000.arrow", 2, 123, "ab" * 32),),
                index={"name": "index.arrow", "sha256": "cd" * 32, "size_bytes": 10},
                provenance={"detector": None, "sources": [], "tool_version": "0.1.0"}, created="now")
    base.update(kw)
    return Manifest(**base)


def test_manifest_round_trip(tmp_path):
    m = _manifest()
    write_manifest(tmp_path, m)
    obj = json.loads((tmp_path / "manifest.json").read_text())
    assert obj["format"] == "vilbert-feature-store" and obj["format_version"] == FORMAT_VERSION
    assert load_manifest(tmp_path) == m
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_version_is_refused(tmp_path):
    write_manifest(tmp_path, _manifest())
    obj = json.loads((tmp_path / "manifest.json").read_text())
    obj["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(obj))
    with pytest.raises(SchemaVersionError, match=r"manifest.json: format_version 99 .*reads version 1"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("text,match", [("{not json", "not valid JSON"),
                                        ('{"format": "other"}', "not a vilbert-feature-store"),
                                        ('{"format": "vilbert-feature-store", "format_version": 1}', "malformed")])
def test_bad_manifest_is_corrupt(tmp_path, text, match):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(CorruptStoreError, match=match):
        load_manifest(tmp_path)


def test_missing_store_and_missing_manifest(tmp_path):
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(SourceNotFoundError, match="not a feature store"):
        load_manifest(tmp_path)


def test_index_round_trip(tmp_path):
    write_index(tmp_path / "index.arrow", ["a", "b/c", "d"], [0, 0, 1], [0, 1, 0], [3, 0, 36])
    idx = read_index(tmp_path / "index.arrow")
    assert idx.image_ids.to_pylist() == ["a", "b/c", "d"]
    assert idx.shard.tolist() == [0, 0, 1] and idx.row.tolist() == [0, 1, 0]
    assert idx.num_boxes.dtype == np.int32 and idx.num_boxes.tolist() == [3, 0, 36]


def test_empty_index_and_truncated_index(tmp_path):
    write_index(tmp_path / "e.arrow", [], [], [], [])
    assert len(read_index(tmp_path / "e.arrow")) == 0
    write_index(tmp_path / "i.arrow", ["a"], [0], [0], [1])
    data = (tmp_path / "i.arrow").read_bytes()
    (tmp_path / "i.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptStoreError, match="i.arrow: cannot read the index"):
        read_index(tmp_path / "i.arrow")


def test_shard_names_are_deterministic():
    assert shard_name("arrow", 3) == "shards/part-00003.arrow"
    assert shard_name("lmdb", 0) == "shards/part-00000.lmdb"
    assert shard_name("hdf5", 12) == "shards/part-00012.h5"
