import numpy as np
import pytest

from vilbert.datasets.records import RecordFailure, RegionFeatures
from vilbert.errors import RecordError
from tests.conftest import make_record


def test_validate_accepts_consistent_record():
    rec = make_record("a", num_boxes=4, with_labels=True)
    assert rec.validate("x.tsv") is rec
    assert rec.present_fields() == ("cls_prob", "objects_id", "objects_conf", "attrs_id", "attrs_conf")


@pytest.mark.parametrize("field,bad", [("boxes", np.zeros((3, 4), np.float32)),
                                       ("features", np.zeros((5, 8), np.float32)),
                                       ("cls_prob", np.zeros((2, 11), np.float32))])
def test_validate_names_source_record_and_field(field, bad):
    rec = make_record("img7", num_boxes=4)
    setattr(rec, field, bad)
    with pytest.raises(RecordError, match=r"feats\.tsv: record 'img7': " + field):
        rec.validate("feats.tsv")


def test_cast_sets_storage_dtypes():
    rec = make_record("a", with_labels=True).cast("float16")
    assert rec.features.dtype == np.float16 and rec.cls_prob.dtype == np.float16
    assert rec.objects_id.dtype == np.int32 and rec.boxes.dtype == np.float32


def test_failure_message():
    f = RecordFailure("a.tsv", None, 3, "broken base64 in column 'features'")
    assert str(f) == "a.tsv: record #3: broken base64 in column 'features'"
