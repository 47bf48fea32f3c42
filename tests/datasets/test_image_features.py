import numpy as np
import pytest
import torch

from vilbert.datasets.image_features import (
    ImageFeatureView,
    build_image_inputs,
    mean_region_feature,
    spatial_features,
)
from vilbert.datasets.records import RegionFeatures
from vilbert.errors import ConfigError, RecordError, UnknownImageError


def _record(image_id="img", boxes=None, feats=None, h=100, w=200, dtype=np.float16):
    if boxes is None:
        boxes = [[20, 10, 120, 60], [0, 0, 200, 100]]
    if feats is None:
        feats = [[1, 2, 3], [3, 4, 5]]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    feats = np.asarray(feats, dtype)
    feats = feats.reshape(len(boxes), feats.shape[-1] if feats.ndim == 2 else -1)
    return RegionFeatures(image_id=image_id, image_h=h, image_w=w, num_boxes=len(boxes), boxes=boxes,
                          features=feats)


class _ListStore:
    """The slice of the FeatureStore API the view uses, over a list of records."""

    def __init__(self, recs):
        self.recs = list(recs)
        self.by_id = {r.image_id: r for r in self.recs}

    def get(self, image_id):
        if image_id not in self.by_id:
            raise UnknownImageError(f"list store: unknown image id {image_id!r}")
        return self.by_id[image_id]

    def __getitem__(self, pos):
        return self.recs[pos]


def test_spatial_features_golden():
    got = spatial_features(np.array([[20, 10, 120, 60], [0, 0, 200, 100], [50, 50, 50, 80]]), 100, 200)
    want = np.array([[0.1, 0.1, 0.6, 0.6, 0.25],
                     [0.0, 0.0, 1.0, 1.0, 1.0],
                     [0.25, 0.5, 0.25, 0.8, 0.0]], np.float32)
    assert got.dtype == np.float32 and got.shape == (3, 5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def test_spatial_features_no_plus_one_in_area():
    # a 1x1-pixel box in a 10x10 image has area 0.01 (with +1 it would be 0.04)
    got = spatial_features(np.array([[3, 3, 4, 4]], np.float32), 10, 10)
    assert got[0, 4] == pytest.approx(0.01)


def test_spatial_features_rejects_bad_input():
    with pytest.raises(RecordError, match=r"\(N, 4\)"):
        spatial_features(np.zeros((3, 5)), 10, 10)
    with pytest.raises(RecordError, match="positive"):
        spatial_features(np.zeros((1, 4)), 0, 10)


def test_mean_region_feature_numpy_and_denominator():
    f = np.array([[1, 2], [3, 4], [0, 0]], np.float16)
    np.testing.assert_array_equal(mean_region_feature(f), np.array([4 / 3, 2], np.float32))
    # pretraining after masking: row 2 zeroed, divide by the 2 unmasked rows
    np.testing.assert_array_equal(mean_region_feature(f, denominator=2), np.array([2, 3], np.float32))
    assert mean_region_feature(f).dtype == np.float32
    np.testing.assert_array_equal(mean_region_feature(np.zeros((0, 2), np.float16)), np.zeros(2, np.float32))


def test_mean_region_feature_torch_with_tensor_count():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float16)
    got = mean_region_feature(f, denominator=torch.tensor(0))  # clamped to 1
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.tensor([4.0, 6.0]))
    assert torch.equal(mean_region_feature(f), torch.tensor([2.0, 3.0]))


def test_build_image_inputs_golden():
    out = build_image_inputs(_record(), max_regions=4)
    np.testing.assert_array_equal(out["features"], np.array(
        [[2, 3, 4], [1, 2, 3], [3, 4, 5], [0, 0, 0]], np.float32))
    np.testing.assert_allclose(out["spatials"], np.array(
        [[0, 0, 1, 1, 1], [0.1, 0.1, 0.6, 0.6, 0.25], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], np.float32), atol=1e-7)
    np.testing.assert_array_equal(out["boxes"], np.array(
        [[0, 0, 200, 100], [20, 10, 120, 60], [0, 0, 200, 100], [0, 0, 0, 0]], np.float32))
    np.testing.assert_array_equal(out["image_mask"], [1, 1, 1, 0])
    assert out["image_mask"].dtype == np.int64
    assert out["features"].dtype == np.float32 and out["spatials"].dtype == np.float32
    assert (out["num_regions"], out["num_detections"], out["num_gt"]) == (3, 2, 0)
    assert (out["image_h"], out["image_w"]) == (100, 200)


def test_build_image_inputs_truncates_but_global_is_mean_of_all_boxes():
    out = build_image_inputs(_record(), max_regions=2)
    np.testing.assert_array_equal(out["features"], np.array([[2, 3, 4], [1, 2, 3]], np.float32))
    np.testing.assert_array_equal(out["image_mask"], [1, 1])
    assert out["num_regions"] == 2 and out["num_detections"] == 1


def test_build_image_inputs_without_global():
    out = build_image_inputs(_record(), max_regions=3, add_global=False)
    np.testing.assert_array_equal(out["features"], np.array([[1, 2, 3], [3, 4, 5], [0, 0, 0]], np.float32))
    np.testing.assert_allclose(out["spatials"][0], [0.1, 0.1, 0.6, 0.6, 0.25], atol=1e-7)
    np.testing.assert_array_equal(out["image_mask"], [1, 1, 0])
    assert out["num_regions"] == 2


def test_build_image_inputs_appends_gt_after_detections():
    gt = _record(boxes=[[50, 50, 150, 100]], feats=[[10, 10, 10]])
    out = build_image_inputs(_record(), max_regions=5, gt_record=gt)
    np.testing.assert_array_equal(out["features"], np.array(
        [[2, 3, 4], [1, 2, 3], [3, 4, 5], [10, 10, 10], [0, 0, 0]], np.float32))  # [IMG] over detections only
    np.testing.assert_allclose(out["spatials"][3], [0.25, 0.5, 0.75, 1.0, 0.25], atol=1e-7)
    np.testing.assert_array_equal(out["boxes"][3], [50, 50, 150, 100])
    np.testing.assert_array_equal(out["image_mask"], [1, 1, 1, 1, 0])
    assert (out["num_regions"], out["num_detections"], out["num_gt"]) == (4, 2, 1)


def test_build_image_inputs_global_over_gt_vcr():
    gt = _record(boxes=[[50, 50, 150, 100]], feats=[[10, 10, 10]])
    out = build_image_inputs(_record(), max_regions=5, gt_record=gt, global_over_gt=True)
    np.testing.assert_allclose(out["features"][0], [14 / 3, 16 / 3, 6], rtol=1e-6)


def test_build_image_inputs_gt_truncated_first():
    gt = _record(boxes=[[50, 50, 150, 100]], feats=[[10, 10, 10]])
    out = build_image_inputs(_record(), max_regions=3, gt_record=gt)
    assert (out["num_detections"], out["num_gt"]) == (2, 0)
    np.testing.assert_array_equal(out["image_mask"], [1, 1, 1])


def test_build_image_inputs_zero_boxes():
    rec = _record(boxes=np.zeros((0, 4)), feats=np.zeros((0, 3)))
    out = build_image_inputs(rec, max_regions=3)
    np.testing.assert_array_equal(out["features"], np.zeros((3, 3), np.float32))
    np.testing.assert_array_equal(out["image_mask"], [1, 0, 0])
    assert out["num_regions"] == 1


def test_build_image_inputs_errors():
    with pytest.raises(ConfigError, match="max_regions"):
        build_image_inputs(_record(), max_regions=1)
    with pytest.raises(ConfigError, match="global_over_gt"):
        build_image_inputs(_record(), global_over_gt=True)
    with pytest.raises(RecordError, match="'img'.*dimension"):
        build_image_inputs(_record(), gt_record=_record(feats=[[1, 2], [3, 4]]))
    with pytest.raises(RecordError, match="'img'.*image size"):
        build_image_inputs(_record(), gt_record=_record(h=99))


def test_build_image_inputs_does_not_write_to_read_only_views():
    rec = _record()
    rec.features.flags.writeable = False
    rec.boxes.flags.writeable = False
    out = build_image_inputs(rec, max_regions=4)
    out["features"][:] = 0  # the output owns its memory
    assert rec.features[0, 0] == 1


def test_view_by_id_and_position(record_factory):
    recs = [record_factory(f"r{i}", num_boxes=3 + i, dim=8, seed=i, dtype="float16") for i in range(4)]
    view = ImageFeatureView(_ListStore(recs), max_regions=6)
    for pos, rec in enumerate(recs):
        a, b = view("r%d" % pos), view.at(pos)
        want = build_image_inputs(rec, 6)
        for k in ("features", "spatials", "boxes", "image_mask"):
            np.testing.assert_array_equal(a[k], want[k])
            np.testing.assert_array_equal(b[k], want[k])
    with pytest.raises(UnknownImageError, match="'nope'"):
        view.get("nope")


def test_view_with_gt_store_and_missing_gt(record_factory):
    det = _ListStore([_record("a"), _record("b")])
    gt = _ListStore([_record("a", boxes=[[50, 50, 150, 100]], feats=[[10, 10, 10]])])
    view = ImageFeatureView(det, max_regions=5, gt_store=gt)
    assert view("a")["num_gt"] == 1
    with pytest.raises(UnknownImageError, match="'b'"):
        view("b")
    with pytest.raises(ConfigError):
        ImageFeatureView(det, global_over_gt=True)


def test_float16_cast_paths_agree(monkeypatch):
    """The torch cast (used when torch is installed) and the numpy fallback give identical float32 values."""
    import vilbert.datasets.image_features as imf

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 16, size=(6, 64), dtype=np.uint16)  # every kind of float16: subnormal, inf, nan
    bits[0, :4] = [0x0001, 0x03FF, 0x7C00, 0xFC00]
    feats = bits.view(np.float16)
    feats.flags.writeable = False  # like an Arrow view
    rec = _record(boxes=np.tile([[0, 0, 10, 10]], (6, 1)), feats=feats)
    rec.features = feats
    with_torch = build_image_inputs(rec, max_regions=8, add_global=False)["features"]
    monkeypatch.setattr(imf, "_TORCH", False)
    with_numpy = build_image_inputs(rec, max_regions=8, add_global=False)["features"]
    np.testing.assert_array_equal(with_torch, with_numpy)
    np.testing.assert_array_equal(with_numpy[:6], feats.astype(np.float32))
