import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import make_record
from vilbert.datasets.image_features import ImageFeatureView
from vilbert.datasets.loader import RegionFeatureDataset, collate_regions
from vilbert.errors import UnknownImageError

FORMATS = ["arrow", "lmdb", "hdf5"]
NUM = 10
MAX_REGIONS = 8


def _write(path, fmt, recs):
    from vilbert.datasets.writer import PackConfig, StoreWriter

    writer = StoreWriter(path, PackConfig(format=fmt), provenance={"detector": "test-detector"})
    for r in recs:
        writer.write(r)
    writer.close()
    return path


@pytest.fixture(scope="module", params=FORMATS)
def store_path(request, tmp_path_factory):
    recs = [make_record(f"img{i:02d}", num_boxes=2 + i, dim=16, seed=i) for i in range(NUM)]  # 2..11 boxes
    return _write(tmp_path_factory.mktemp(request.param) / "store", request.param, recs)


IDS = [f"img{i:02d}" for i in range(NUM)]


@pytest.fixture(scope="module")
def want(store_path):
    """What direct reads through a separate FeatureStore give (read before any dataset opens the store)."""
    return _direct(store_path, IDS)


@pytest.fixture(autouse=True)
def _release_shared_stores():
    """Close the shards the loader's shared stores opened, so a failing test cannot leak them to the next."""
    yield
    from vilbert.datasets import loader

    for _, store in loader._SHARED_STORES.values():
        store.close()


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory):
    recs = [make_record(f"img{i:02d}", num_boxes=2, dim=16, seed=i, num_classes=None) for i in range(NUM)]
    for r in recs:  # GT boxes of the same image: same size as the detections' record
        det = make_record(r.image_id, num_boxes=2 + int(r.image_id[3:]), dim=16, seed=int(r.image_id[3:]))
        r.image_h, r.image_w = det.image_h, det.image_w
    return _write(tmp_path_factory.mktemp("gt") / "gt", "arrow", recs)


def _direct(path, ids, gt=None, max_regions=MAX_REGIONS):
    from vilbert.datasets.reader import FeatureStore

    store = FeatureStore.open(path)
    gt_store = FeatureStore.open(gt) if gt is not None else None
    try:
        view = ImageFeatureView(store, max_regions, gt_store=gt_store)
        return {i: {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in view(i).items()} for i in ids}
    finally:
        store.close()
        if gt_store is not None:
            gt_store.close()


def _check_batches(batches, want):
    seen = []
    for batch in batches:
        assert batch["features"].dtype == torch.float32 and batch["image_mask"].dtype == torch.int64
        for j, image_id in enumerate(batch["image_id"]):
            seen.append(image_id)
            w = want[image_id]
            for key in ("features", "spatials", "boxes", "image_mask"):
                np.testing.assert_array_equal(batch[key][j].numpy(), w[key], err_msg=f"{image_id} {key}")
            assert int(batch["num_regions"][j]) == w["num_regions"]
    assert sorted(seen) == sorted(want)


@pytest.mark.filterwarnings("error")  # e.g. torch's non-writable-array warning on Arrow's read-only views
def test_items_match_the_view(store_path, want):
    ds = RegionFeatureDataset(store_path, max_regions=MAX_REGIONS)
    assert len(ds) == NUM
    for pos in range(NUM):
        item = ds[pos]
        assert item["image_id"] == f"img{pos:02d}"
        assert item["features"].shape == (MAX_REGIONS, 16) and item["features"].dtype == torch.float32
        assert item["spatials"].shape == (MAX_REGIONS, 5) and item["boxes"].shape == (MAX_REGIONS, 4)
        assert item["features"].numpy().flags.writeable
        for key in ("features", "spatials", "boxes", "image_mask"):
            np.testing.assert_array_equal(item[key].numpy(), want[item["image_id"]][key])
        assert item["num_regions"] == min(1 + 2 + pos, MAX_REGIONS)


def test_image_ids_subset_order_and_unknown_id(store_path):
    ds = RegionFeatureDataset(store_path, image_ids=["img07", "img01"], max_regions=MAX_REGIONS)
    assert len(ds) == 2 and [ds[0]["image_id"], ds[1]["image_id"]] == ["img07", "img01"]
    np.testing.assert_array_equal(ds.num_boxes_array(), [9, 3])
    np.testing.assert_array_equal(RegionFeatureDataset(store_path).num_boxes_array(), np.arange(NUM) + 2)
    with pytest.raises(UnknownImageError, match="nope"):
        RegionFeatureDataset(store_path, image_ids=["img01", "nope"])


def test_pickles_only_paths(store_path, want):
    ds = RegionFeatureDataset(store_path, max_regions=MAX_REGIONS)
    ds[0]  # shards are open in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 2000
    assert b"FeatureStore" not in blob
    clone = pickle.loads(blob)
    assert clone._view is None
    # the copy reads in the same process while the original's shards are open (LMDB refuses a second open
    # of one path per process: datasets of one process share its FeatureStore)
    np.testing.assert_array_equal(clone[3]["features"].numpy(), want["img03"]["features"])
    np.testing.assert_array_equal(ds[4]["features"].numpy(), want["img04"]["features"])


def test_two_datasets_over_one_store_in_one_process(store_path, want):
    train = RegionFeatureDataset(store_path, image_ids=IDS[:6], max_regions=MAX_REGIONS)
    val = RegionFeatureDataset(store_path, image_ids=IDS[6:], max_regions=MAX_REGIONS)
    np.testing.assert_array_equal(train[0]["features"].numpy(), want["img00"]["features"])
    np.testing.assert_array_equal(val[0]["features"].numpy(), want["img06"]["features"])
    train.close()  # closing one releases shards; the other reopens them on demand
    np.testing.assert_array_equal(val[1]["features"].numpy(), want["img07"]["features"])


def test_repacked_store_is_reopened(tmp_path):
    path = _write(tmp_path / "s", "lmdb", [make_record("a", num_boxes=2, dim=4, seed=1)])
    ds = RegionFeatureDataset(path, max_regions=4)
    assert ds[0]["image_id"] == "a"
    from vilbert.datasets.writer import PackConfig, StoreWriter

    writer = StoreWriter(path, PackConfig(format="lmdb"), provenance={"detector": None}, overwrite=True)
    writer.write(make_record("b", num_boxes=3, dim=4, seed=2))
    writer.close()
    ds2 = RegionFeatureDataset(path, max_regions=4)
    assert len(ds2) == 1 and ds2[0]["image_id"] == "b" and ds2[0]["num_detections"] == 3


def test_collate_shapes(store_path):
    ds = RegionFeatureDataset(store_path, max_regions=MAX_REGIONS)
    batch = collate_regions([ds[0], ds[5]])
    assert batch["image_id"] == ["img00", "img05"]
    assert batch["features"].shape == (2, MAX_REGIONS, 16)
    assert batch["spatials"].shape == (2, MAX_REGIONS, 5) and batch["boxes"].shape == (2, MAX_REGIONS, 4)
    assert batch["image_mask"].shape == (2, MAX_REGIONS)
    assert batch["num_regions"].tolist() == [3, 8] and batch["num_regions"].dtype == torch.int64
    assert batch["image_mask"].sum(1).tolist() == [3, 8]


@pytest.mark.filterwarnings("error")
def test_dataloader_in_process(store_path, want):
    ds = RegionFeatureDataset(store_path, max_regions=MAX_REGIONS)
    _check_batches(DataLoader(ds, batch_size=3, shuffle=True, collate_fn=collate_regions), want)


@pytest.mark.parametrize("read_in_parent", [False, True])
def test_dataloader_fork_workers(store_path, want, read_in_parent):
    ds = RegionFeatureDataset(store_path, max_regions=MAX_REGIONS)
    if read_in_parent:  # shards (for LMDB: the environment) already open in the parent before the fork
        ds[0]
        ds[NUM - 1]
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork", collate_fn=collate_regions)
    for _ in range(2):  # two epochs: fresh workers each time
        _check_batches(loader, want)
    if read_in_parent:  # and the parent still reads after its workers did
        np.testing.assert_array_equal(ds[4]["features"].numpy(), want["img04"]["features"])


def test_dataloader_spawn_workers(store_path, want):
    ds = RegionFeatureDataset(store_path, max_regions=MAX_REGIONS)
    ds[2]  # the parent has read first
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="spawn",
                        collate_fn=collate_regions)
    _check_batches(loader, want)


def test_gt_store_appended(store_path, gt_path):
    from vilbert.datasets import loader

    for _, store in loader._SHARED_STORES.values():
        store.close()  # the direct reads below open the same paths with separate FeatureStores
    want = _direct(store_path, IDS, gt=gt_path, max_regions=16)
    ds = RegionFeatureDataset(store_path, max_regions=16, gt_store_path=gt_path)
    item = ds[1]  # 3 detections + 2 GT boxes
    assert (item["num_detections"], item["num_gt"], item["num_regions"]) == (3, 2, 6)
    _check_batches(DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="fork",
                              collate_fn=collate_regions), want)
