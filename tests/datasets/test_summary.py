import json

import numpy as np

from vilbert.datasets.summary import box_histogram, format_summary, summarize_store
from vilbert.datasets.writer import PackConfig, StoreWriter

DET = {"config": "butd", "weights_file": "w.pth", "weights_sha256": "f" * 64}


def test_summary_of_a_store(tmp_path, records):
    with StoreWriter(tmp_path / "s", PackConfig(format="lmdb", shard_size_bytes=3000), {"detector": DET}) as w:
        for r in records:
            w.write(r)
    s = summarize_store(tmp_path / "s")
    assert s["num_records"] == 12 and s["storage"] == "lmdb" and s["num_shards"] > 1
    assert s["boxes"]["min"] == 3 and s["boxes"]["max"] == 14 and s["boxes"]["total"] == sum(range(3, 15))
    assert sum(c for _, _, c in s["boxes"]["histogram"]) == 12
    assert s["size_bytes"] > sum(r.features.nbytes for r in records) / 2
    assert s["provenance"]["detector"] == DET
    json.dumps(s)
    text = format_summary(s)
    for needle in ("records      12", "16-d float16", "cls_prob", "(N, 11)", "boxes/image  min 3", "w.pth", "lmdb"):
        assert needle in text


def test_histogram_bins():
    assert box_histogram(np.array([2, 2, 3], np.int32)) == [[2, 2, 2], [3, 3, 1]]
    h = box_histogram(np.arange(10, 101, dtype=np.int32), max_bins=4)
    assert len(h) == 4 and h[0][0] == 10 and h[-1][1] == 100 and sum(c for *_, c in h) == 91
    assert box_histogram(np.zeros(0, np.int32)) == []
