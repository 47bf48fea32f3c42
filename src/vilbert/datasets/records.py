"""The region-feature record: one image's boxes, features and detector outputs."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from vilbert.errors import RecordError

# Optional per-box fields, in storage order, with the dtype each is stored in.
OPTIONAL_FIELDS: dict[str, np.dtype] = {
    "cls_prob": np.dtype(np.float16),  # (N, C) detector class distribution, C = 1601 for BUTD
    "objects_id": np.dtype(np.int32),  # (N,) argmax class (background excluded)
    "objects_conf": np.dtype(np.float32),  # (N,)
    "attrs_id": np.dtype(np.int32),  # (N,) argmax attribute
    "attrs_conf": np.dtype(np.float32),  # (N,)
}
FEATURE_DTYPES = ("float16", "float32")
_FEATURE_NP_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))  # compared per record: faster than str(dtype)


@dataclasses.dataclass
class RegionFeatures:
    """One image's detections.

    Attributes:
        image_id: string key of the image (unique within a store).
        image_h: original image height in pixels.
        image_w: original image width in pixels.
        num_boxes: number of boxes N; every array's first dimension equals it.
        boxes: (N, 4) float32, x1 y1 x2 y2 in original pixels.
        features: (N, D) float16 or float32 region features (D = 2048 for the BUTD detector).
        cls_prob: optional (N, C) float16 class distribution (C = 1601, background first).
        objects_id, objects_conf, attrs_id, attrs_conf: optional (N,) detector labels and scores.
    """

    image_id: str
    image_h: int
    image_w: int
    num_boxes: int
    boxes: np.ndarray
    features: np.ndarray
    cls_prob: Optional[np.ndarray] = None
    objects_id: Optional[np.ndarray] = None
    objects_conf: Optional[np.ndarray] = None
    attrs_id: Optional[np.ndarray] = None
    attrs_conf: Optional[np.ndarray] = None

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def present_fields(self) -> tuple[str, ...]:
        """Names of the optional fields this record carries, in storage order."""
        return tuple(name for name in OPTIONAL_FIELDS if getattr(self, name) is not None)

    def validate(self, source: str = "") -> "RegionFeatures":
        """Check shapes and sizes; raise RecordError naming `source` and the record if wrong.

        Returns self, so readers can write `return RegionFeatures(...).validate(path)`.
        """
        where = f"{source}: " if source else ""
        rid = f"record {self.image_id!r}"
        if not isinstance(self.image_id, str) or not self.image_id:
            raise RecordError(f"{where}{rid}: image_id must be a non-empty string, got {self.image_id!r}")
        n = self.num_boxes
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise RecordError(f"{where}{rid}: num_boxes must be a non-negative int, got {n!r}")
        if int(self.image_h) <= 0 or int(self.image_w) <= 0:
            raise RecordError(f"{where}{rid}: image size must be positive, got h={self.image_h} w={self.image_w}")
        if self.boxes.ndim != 2 or self.boxes.shape != (n, 4):
            raise RecordError(f"{where}{rid}: boxes has shape {self.boxes.shape}, expected ({n}, 4) for num_boxes={n}")
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise RecordError(
                f"{where}{rid}: features has shape {self.features.shape}, expected ({n}, D) for num_boxes={n}"
            )
        if self.features.dtype not in _FEATURE_NP_DTYPES:
            raise RecordError(f"{where}{rid}: features dtype {self.features.dtype} is not float16 or float32")
        for name in OPTIONAL_FIELDS:
            arr = getattr(self, name)
            if arr is None:
                continue
            want_ndim = 2 if name == "cls_prob" else 1
            if arr.ndim != want_ndim or arr.shape[0] != n:
                raise RecordError(
                    f"{where}{rid}: {name} has shape {arr.shape}, expected first dimension {n} and {want_ndim} dims"
                )
        return self

    def cast(self, feature_dtype: str = "float16") -> "RegionFeatures":
        """Return a copy-on-need record with storage dtypes (features in `feature_dtype`)."""
        if feature_dtype not in FEATURE_DTYPES:
            raise RecordError(f"feature dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
        kw = {
            "boxes": np.ascontiguousarray(self.boxes, dtype=np.float32),
            "features": np.ascontiguousarray(self.features, dtype=feature_dtype),
        }
        for name, dt in OPTIONAL_FIELDS.items():
            arr = getattr(self, name)
            kw[name] = None if arr is None else np.ascontiguousarray(arr, dtype=dt)
        return dataclasses.replace(self, image_h=int(self.image_h), image_w=int(self.image_w),
                                   num_boxes=int(self.num_boxes), **kw)


@dataclasses.dataclass(frozen=True)
class RecordFailure:
    """A record that could not be read or written; long jobs collect these and report them at the end.

    Attributes:
        source: file or store the record came from.
        image_id: the record's id when known.
        position: the record's position in its source (row, line or key index) when known.
        reason: one line saying what is wrong.
    """

    source: str
    image_id: Optional[str]
    position: Optional[int]
    reason: str

    def __str__(self) -> str:
        what = f"record {self.image_id!r}" if self.image_id is not None else f"record #{self.position}"
        return f"{self.source}: {what}: {self.reason}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
