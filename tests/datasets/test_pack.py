import numpy as np
import pytest

from vilbert.datasets.manifest import load_manifest
from vilbert.datasets.pack import check_detectors, pack
from vilbert.datasets.reader import FeatureStore
from vilbert.datasets.writer import PackConfig, StoreWriter
from vilbert.errors import (
    DuplicateImageError, IncompatibleSourcesError, LegacyFormatError, SourceNotFoundError, StoreError,
    TrustRequiredError,
)
from tests.datasets import legacy_layouts
from tests.conftest import make_record

DET_A = {"config": "butd-r101-c4", "weights_file": "a.pth", "weights_sha256": "a" * 64,
         "selection": {"min_boxes": 10, "max_boxes": 36, "conf_thresh": 0.2}}
DET_B = dict(DET_A, weights_file="b.pth", weights_sha256="b" * 64)


def _store(path, recs, detector=None, fmt="arrow"):
    with StoreWriter(path, PackConfig(format=fmt), {"detector": detector}) as w:
        for r in recs:
            w.write(r)
    return path


def _recs(prefix, n, **kw):
    return [make_record(f"{prefix}{i}", num_boxes=1 + i % 4, seed=i, **kw) for i in range(n)]


@pytest.mark.parametrize("fmt", ["arrow", "lmdb", "hdf5"])
def test_merge_two_stores(tmp_path, fmt):
    a = _store(tmp_path / "a", _recs("a", 5), DET_A, fmt="lmdb")
    b = _store(tmp_path / "b", _recs("b", 4), dict(DET_A, selection={"min_boxes": 36}))
    res = pack([a, b], tmp_path / "out", PackConfig(format=fmt))
    assert res.num_written == 9 and res.num_failures == 0 and res.failures == []
    store = FeatureStore.open(tmp_path / "out")
    assert list(store.image_ids) == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(4)]
    m = store.manifest
    assert m.storage == fmt and m.detector == DET_A
    assert [s["source_format"] for s in m.provenance["sources"]] == ["store", "store"]
    np.testing.assert_array_equal(store.get("b3").features, FeatureStore.open(b).get("b3").features)


def test_detector_rules():
    unknown = {"source": "u", "detector": None}
    a, b = {"source": "a", "detector": DET_A}, {"source": "b", "detector": DET_B}
    assert check_detectors([a, dict(a, source="a2")], False) == DET_A
    assert check_detectors([unknown, dict(unknown, source="u2")], False) is None
    for pair in ([a, b], [a, unknown]):
        with pytest.raises(IncompatibleSourcesError, match="--allow-mixed-detectors"):
            check_detectors(pair, False)
        assert check_detectors(pair, True) is None


def test_mixed_detectors_fail_before_writing(tmp_path):
    a = _store(tmp_path / "a", _recs("a", 2), DET_A)
    b = _store(tmp_path / "b", _recs("b", 2), DET_B)
    with pytest.raises(IncompatibleSourcesError, match=r"a: detector .*b: detector"):
        pack([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    res = pack([a, b], tmp_path / "out", PackConfig(allow_mixed_detectors=True))
    assert res.num_written == 4 and res.manifest.detector is None


def test_different_feature_dims_always_fail(tmp_path):
    a = _store(tmp_path / "a", _recs("a", 2, dim=16))
    b = _store(tmp_path / "b", _recs("b", 2, dim=8))
    with pytest.raises(IncompatibleSourcesError, match=r"different feature dimensions \[8, 16\]"):
        pack([a, b], tmp_path / "out", PackConfig(allow_mixed_detectors=True))


def test_different_optional_fields_fail_before_writing(tmp_path):
    a = _store(tmp_path / "a", _recs("a", 2))
    b = _store(tmp_path / "b", _recs("b", 2, num_classes=None))
    with pytest.raises(IncompatibleSourcesError, match=r"different optional fields: .*a: \['cls_prob'\]; .*b: \[\]"):
        pack([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_duplicates_across_sources(tmp_path):
    a = _store(tmp_path / "a", _recs("x", 3))
    b = _store(tmp_path / "b", [make_record("x1", num_boxes=7, seed=99)])
    with pytest.raises(DuplicateImageError, match="record 'x1' appears twice"):
        pack([a, b], tmp_path / "o1")
    assert not (tmp_path / "o1" / "manifest.json").exists()
    pack([a, b], tmp_path / "o2", PackConfig(on_duplicate="keep-first"))
    pack([a, b], tmp_path / "o3", PackConfig(on_duplicate="keep-last"))
    assert FeatureStore.open(tmp_path / "o2").get("x1").num_boxes == 2
    assert FeatureStore.open(tmp_path / "o3").get("x1").num_boxes == 7


def test_missing_and_unrecognised_sources(tmp_path):
    a = _store(tmp_path / "a", _recs("a", 2))
    with pytest.raises(SourceNotFoundError, match="nope: no such file or directory"):
        pack([a, tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "junk.bin").write_bytes(b"\0" * 100)
    with pytest.raises(LegacyFormatError, match="junk.bin: cannot tell what this is.*--source-format"):
        pack([tmp_path / "junk.bin"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_source_equal_to_out_is_refused(tmp_path):
    a = _store(tmp_path / "a", _recs("a", 2))
    with pytest.raises(StoreError, match="both a source and the output"):
        pack([a], a, overwrite=True)
    assert FeatureStore.open(a)[0].image_id == "a0"


def test_existing_output_store_is_kept_without_overwrite(tmp_path):
    a = _store(tmp_path / "a", _recs("a", 2))
    pack([a], tmp_path / "out")
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    with pytest.raises(StoreError, match="pass --overwrite"):
        pack([a], tmp_path / "out", PackConfig(format="lmdb"))
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before
    assert pack([a], tmp_path / "out", PackConfig(format="lmdb"), overwrite=True).manifest.storage == "lmdb"


def test_legacy_tsv_with_broken_row_is_reported(tmp_path):
    recs = _recs("t", 4, dim=2048, num_classes=None)
    tsv = legacy_layouts.write_butd_tsv(tmp_path / "feats.tsv", recs)
    lines = tsv.read_bytes().split(b"\r\n")
    cols = lines[1].split(b"\t")
    cols[5] = cols[5][:-7] + b"!!!"  # break the base64 features of record t1
    lines[1] = b"\t".join(cols)
    tsv.write_bytes(b"\r\n".join(lines))
    res = pack([tsv], tmp_path / "out")
    assert res.num_written == 3 and res.num_failures == 1
    assert "t1" in str(res.failures[0]) and "feats.tsv" in str(res.failures[0])
    m = load_manifest(tmp_path / "out")
    assert m.failures["count"] == 1 and m.failures["examples"][0]["image_id"] == "t1"
    assert m.provenance["sources"][0]["source_format"] == "butd_tsv"
    assert list(FeatureStore.open(tmp_path / "out").image_ids) == ["t0", "t2", "t3"]


def test_pickled_legacy_needs_trust(tmp_path):
    recs = _recs("v", 3, dim=2048, num_classes=None)
    db = legacy_layouts.write_vilbert_lmdb(tmp_path / "mt.lmdb", recs)
    with pytest.raises(TrustRequiredError, match="--trust-pickle"):
        pack([db], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    res = pack([db], tmp_path / "out", trust_pickle=True, progress=True)
    assert res.num_written == 3
    np.testing.assert_allclose(FeatureStore.open(tmp_path / "out").get("v2").features,
                               recs[2].features.astype(np.float16))
