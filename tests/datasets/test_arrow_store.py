import numpy as np
import pyarrow as pa
import pytest

from vilbert.datasets.arrow_store import ROWS_PER_BATCH, ArrowShardReader, ArrowShardWriter
from vilbert.datasets.writer import record_layout
from vilbert.errors import CorruptStoreError
from tests.conftest import make_record


def _write(path, recs, dtype="float16"):
    recs = [r.cast(dtype) for r in recs]
    dim, fields = record_layout(recs[0])
    w = ArrowShardWriter(path, dim, dtype, fields)
    for r in recs:
        w.append(r)
    w.close()
    return recs, fields


def test_round_trip_across_batches(tmp_path):
    src = [make_record(f"r{i}", num_boxes=i % 5, seed=i, with_labels=True) for i in range(ROWS_PER_BATCH * 2 + 3)]
    recs, fields = _write(tmp_path / "s.arrow", src)
    r = ArrowShardReader(tmp_path / "s.arrow", fields)
    assert r.num_rows == len(recs)
    for row in (0, 1, ROWS_PER_BATCH - 1, ROWS_PER_BATCH, len(recs) - 1):
        got, want = r.read(row), recs[row]
        assert (got.image_id, got.image_h, got.image_w, got.num_boxes) == \
               (want.image_id, want.image_h, want.image_w, want.num_boxes)
        for name in ("boxes", "features", *fields):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    r.close()


def test_rows_are_zero_copy_read_only_views(tmp_path):
    _, fields = _write(tmp_path / "s.arrow", [make_record(f"r{i}", num_boxes=4, seed=i) for i in range(10)])
    r = ArrowShardReader(tmp_path / "s.arrow", fields)
    r.read(0)  # build the batch views
    before = pa.total_allocated_bytes()
    rec = r.read(7)
    assert pa.total_allocated_bytes() == before
    assert not rec.features.flags.writeable and not rec.features.flags.owndata
    with pytest.raises(ValueError):
        rec.features[0, 0] = 1


def test_float32_features_kept(tmp_path):
    recs, fields = _write(tmp_path / "s.arrow", [make_record("a", num_boxes=3)], dtype="float32")
    assert ArrowShardReader(tmp_path / "s.arrow", fields).read(0).features.dtype == np.float32


def test_truncated_shard_is_a_clean_error(tmp_path):
    _, fields = _write(tmp_path / "s.arrow", [make_record(f"r{i}", num_boxes=4, seed=i) for i in range(10)])
    data = (tmp_path / "s.arrow").read_bytes()
    (tmp_path / "s.arrow").write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptStoreError, match=r"s.arrow: unreadable Arrow shard"):
        ArrowShardReader(tmp_path / "s.arrow", fields)
