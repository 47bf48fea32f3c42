import numpy as np
import pytest

from vilbert.datasets.sample import SampleConfig, iter_sample_records, main, write_sample_store
from vilbert.errors import ConfigError

SMALL = dict(feature_dim=32, num_classes=17, num_attributes=9)


def test_records_are_plausible_and_valid():
    recs = list(iter_sample_records(SampleConfig(num_images=40, seed=3, **SMALL)))
    assert len(recs) == 40
    assert len({r.image_id for r in recs}) == 40
    sizes = {(r.image_h, r.image_w) for r in recs}
    assert len(sizes) > 30  # image sizes vary
    assert any(r.image_h > r.image_w for r in recs) and any(r.image_w > r.image_h for r in recs)
    for r in recs:
        r.validate("sample")
        assert 10 <= r.num_boxes <= 36
        assert r.features.dtype == np.float16 and r.features.shape == (r.num_boxes, 32)
        assert r.boxes.dtype == np.float32
        b = r.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= r.image_w).all() and (b[:, 3] <= r.image_h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (r.features >= 0).all()
        assert r.cls_prob.dtype == np.float16 and r.cls_prob.shape == (r.num_boxes, 17)
        np.testing.assert_allclose(r.cls_prob.astype(np.float32).sum(1), 1.0, atol=1e-2)
        # objects_id indexes the foreground classes (background column excluded)
        np.testing.assert_array_equal(r.objects_id, r.cls_prob[:, 1:].astype(np.float32).argmax(1))
        assert r.present_fields() == ("cls_prob", "objects_id", "objects_conf", "attrs_id", "attrs_conf")


def test_records_depend_only_on_the_seed():
    a = list(iter_sample_records(SampleConfig(num_images=5, seed=1, **SMALL)))
    b = list(iter_sample_records(SampleConfig(num_images=5, seed=1, **SMALL)))
    c = list(iter_sample_records(SampleConfig(num_images=5, seed=2, **SMALL)))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.features, y.features)
        np.testing.assert_array_equal(x.boxes, y.boxes)
    assert not all(np.array_equal(x.boxes, y.boxes) for x, y in zip(a, c))


def test_pool_mode_and_fixed_box_count():
    cfg = SampleConfig(num_images=20, min_boxes=36, max_boxes=36, pool_size=3, num_classes=0, with_labels=False,
                       feature_dim=8)
    recs = list(iter_sample_records(cfg))
    assert all(r.num_boxes == 36 and r.cls_prob is None and r.objects_id is None for r in recs)
    distinct = {r.features.tobytes() for r in recs}
    assert len(distinct) <= 3
    for r in recs:
        r.validate("pool")


@pytest.mark.parametrize("bad", [dict(num_images=-1), dict(min_boxes=5, max_boxes=4), dict(num_classes=1),
                                 dict(feature_dim=0), dict(pool_size=-2)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        SampleConfig(**bad)


def test_write_sample_store_round_trip(tmp_path):
    from vilbert.datasets.reader import FeatureStore

    cfg = SampleConfig(num_images=12, seed=5, **SMALL)
    write_sample_store(tmp_path / "s", cfg)
    store = FeatureStore.open(tmp_path / "s")
    try:
        assert len(store) == 12
        prov = store.manifest.provenance
        assert prov["detector"]["name"] == "synthetic" and prov["synthetic"] is True
        assert store.manifest.feature_dim == 32
        for want in iter_sample_records(cfg):
            got = store.get(want.image_id)
            assert (got.image_h, got.image_w, got.num_boxes) == (want.image_h, want.image_w, want.num_boxes)
            np.testing.assert_array_equal(got.features, want.features)
            np.testing.assert_array_equal(got.boxes, want.boxes)
            np.testing.assert_array_equal(got.cls_prob, want.cls_prob)
            np.testing.assert_array_equal(got.objects_id, want.objects_id)
        np.testing.assert_array_equal(store.num_boxes_array(), [r.num_boxes for r in iter_sample_records(cfg)])
    finally:
        store.close()


def test_module_main_writes_an_lmdb_store(tmp_path, capsys):
    from vilbert.datasets.reader import FeatureStore

    out = tmp_path / "cli"
    assert main(["--out", str(out), "--num-images", "4", "--seed", "2", "--feature-dim", "8", "--num-classes", "5",
                 "--format", "lmdb"]) == 0
    assert "4 synthetic records" in capsys.readouterr().out
    store = FeatureStore.open(out)
    try:
        assert len(store) == 4 and store.manifest.storage == "lmdb"
    finally:
        store.close()


def test_sample_store_is_never_silently_mixed_with_real_features(tmp_path):
    from vilbert.datasets.pack import pack
    from vilbert.datasets.writer import PackConfig, StoreWriter
    from vilbert.errors import IncompatibleSourcesError
    from tests.conftest import make_record

    write_sample_store(tmp_path / "s", SampleConfig(num_images=2, **SMALL))
    real = StoreWriter(tmp_path / "real", provenance={"detector": {"config": "butd-r101-c4.yaml",
                                                                    "weights_sha256": "ab" * 32}})
    real.write(make_record("other", dim=32, num_classes=17))
    real.close()
    with pytest.raises(IncompatibleSourcesError):
        pack([tmp_path / "s", tmp_path / "real"], tmp_path / "merged", PackConfig())


def test_existing_output_needs_overwrite(tmp_path):
    from vilbert.errors import StoreError

    cfg = SampleConfig(num_images=2, **SMALL)
    write_sample_store(tmp_path / "s", cfg)
    with pytest.raises(StoreError):
        write_sample_store(tmp_path / "s", cfg)
    assert write_sample_store(tmp_path / "s", SampleConfig(num_images=3, **SMALL), overwrite=True).num_records == 3
