"""Shared fixtures: tiny synthetic region-feature records."""

from __future__ import annotations

import numpy as np
import pytest

from vilbert.datasets.records import RegionFeatures


def make_record(
    image_id: str,
    num_boxes: int = 5,
    dim: int = 16,
    num_classes: int | None = 11,
    seed: int | None = None,
    dtype: str = "float32",
    with_labels: bool = False,
) -> RegionFeatures:
    """A random but valid record: boxes inside a random image, features, optional class probs."""
    rng = np.random.default_rng(seed if seed is not None else abs(hash(image_id)) % (2**32))
    h, w = int(rng.integers(50, 400)), int(rng.integers(50, 400))
    x1 = rng.uniform(0, w / 2, num_boxes)
    y1 = rng.uniform(0, h / 2, num_boxes)
    x2 = np.minimum(x1 + rng.uniform(1, w / 2, num_boxes), w)
    y2 = np.minimum(y1 + rng.uniform(1, h / 2, num_boxes), h)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    feats = rng.random((num_boxes, dim)).astype(dtype)
    cls_prob = None
    if num_classes:
        logits = rng.normal(size=(num_boxes, num_classes))
        cls_prob = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    extra = {}
    if with_labels:
        extra = dict(
            objects_id=rng.integers(0, 1600, num_boxes).astype(np.int64),
            objects_conf=rng.random(num_boxes).astype(np.float32),
            attrs_id=rng.integers(0, 400, num_boxes).astype(np.int64),
            attrs_conf=rng.random(num_boxes).astype(np.float32),
        )
    return RegionFeatures(image_id=image_id, image_h=h, image_w=w, num_boxes=num_boxes,
                          boxes=boxes, features=feats, cls_prob=cls_prob, **extra)


@pytest.fixture
def record_factory():
    """Return `make_record` so tests can build as many records as they need."""
    return make_record


@pytest.fixture
def records():
    """Twelve records with 3..14 boxes, 16-d features and 11-way class probabilities."""
    return [make_record(f"img{i:03d}", num_boxes=3 + i, seed=i) for i in range(12)]
