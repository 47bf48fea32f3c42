import h5py
import numpy as np
import pytest

from vilbert.datasets.hdf5_store import Hdf5Source, group_name
from vilbert.datasets.pack import pack
from vilbert.datasets.reader import FeatureStore
from vilbert.datasets.records import RecordFailure
from vilbert.datasets.writer import PackConfig, StoreWriter
from vilbert.errors import LegacyFormatError
from tests.conftest import make_record


def _volta_h5(path, recs, broken=()):
    """An HDF5 file as volta's large_tsv_to_h5.py writes it: one group per image id."""
    with h5py.File(path, "w") as f:
        for r in recs:
            g = f.create_group(r.image_id)
            g["features"] = r.features
            g["boxes"] = r.boxes if r.image_id not in broken else r.boxes[:1]
            g["obj_id"], g["obj_conf"] = r.objects_id, r.objects_conf
            g["attr_id"], g["attr_conf"] = r.attrs_id, r.attrs_conf
            g["img_w"], g["img_h"] = r.image_w, r.image_h


def test_store_files_read_like_volta_h5(tmp_path, records):
    with StoreWriter(tmp_path / "s", PackConfig(format="hdf5")) as w:
        for r in records:
            w.write(r)
    with h5py.File(tmp_path / "s" / "shards" / "part-00000.h5", "r") as f:
        g = f[records[2].image_id]
        assert set(g) >= {"features", "boxes", "cls_prob", "img_h", "img_w", "num_boxes"}
        assert g["features"].shape == (records[2].num_boxes, 16) and g["features"].dtype == np.float16
        assert int(g["img_h"][()]) == records[2].image_h


def test_group_names_escape_slashes():
    assert group_name("a/b") == "a%2Fb" and group_name("50%") == "50%25" and group_name(".") == "%2E"


def test_import_volta_layout(tmp_path):
    recs = [make_record(f"{i}", num_boxes=3 + i, seed=i, num_classes=None, with_labels=True) for i in range(5)]
    _volta_h5(tmp_path / "v.h5", recs, broken={"3"})
    items = list(Hdf5Source(tmp_path / "v.h5"))
    fails = [x for x in items if isinstance(x, RecordFailure)]
    assert [f.image_id for f in fails] == ["3"] and "boxes has shape (1, 4)" in fails[0].reason
    result = pack([tmp_path / "v.h5"], tmp_path / "out", PackConfig(format="arrow"))
    assert result.num_written == 4 and result.num_failures == 1
    store = FeatureStore.open(tmp_path / "out")
    got = store.get("4")
    np.testing.assert_array_equal(got.objects_id, recs[4].objects_id.astype(np.int32))
    np.testing.assert_array_equal(got.boxes, recs[4].boxes)
    assert got.num_boxes == 7 and (got.image_h, got.image_w) == (recs[4].image_h, recs[4].image_w)


def test_non_hdf5_file_is_refused(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    with pytest.raises(LegacyFormatError, match="x.h5: not an HDF5 file"):
        Hdf5Source(tmp_path / "x.h5")


def test_round_trip_hdf5_store_back_into_arrow(tmp_path, records):
    with StoreWriter(tmp_path / "h", PackConfig(format="hdf5", shard_size_bytes=2500)) as w:
        for r in records:
            w.write(r)
    pack([tmp_path / "h" / "shards" / "part-00000.h5"], tmp_path / "a")
    first = FeatureStore.open(tmp_path / "a")
    assert len(first) >= 1 and set(first.image_ids) <= {r.image_id for r in records}
