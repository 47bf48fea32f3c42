"""The ViLBERT view of a region-feature record: [IMG] token, 5-d spatials, padding and image mask."""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from vilbert.datasets.records import RegionFeatures
from vilbert.errors import ConfigError, RecordError

logger = logging.getLogger(__name__)

# Location of the [IMG] row: the whole image, normalised (vilbert-multi-task
# `_image_features_reader.py` and vilbert_beta use [0, 0, 1, 1, 1]).
GLOBAL_LOCATION = np.array([0.0, 0.0, 1.0, 1.0, 1.0], dtype=np.float32)

# ViLBERT's default: 36 detections + the [IMG] row (volta 36+1; vilbert-multi-task uses 100+1).
DEFAULT_MAX_REGIONS = 37


def _copy_rows(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy ``src`` rows into the float32 array ``dst``, casting float16 on the way.

    numpy's float16 -> float32 cast is scalar (~100 us for 36 x 2048 on a Xeon core); torch's is vectorised
    (~10 us). The source may be a read-only zero-copy view (Arrow, memmap): DLPack hands it to torch without
    a copy and without torch's non-writable-array warning, and torch only reads it.
    """
    if src.shape[0] == 0:
        return
    if src.dtype == np.float16:
        torch = _torch()
        if torch is not None:
            try:
                src_t = torch.from_dlpack(src)
            except BufferError:  # numpy < 2.1 cannot export read-only arrays through DLPack
                src_t = None
            if src_t is not None:
                torch.from_numpy(dst).copy_(src_t)
                return
    np.copyto(dst, src, casting="unsafe")


_TORCH: Any = None


def _torch() -> Any:
    """torch if installed (it is for training), else None; imported on first use only."""
    global _TORCH
    if _TORCH is None:
        try:
            import torch
        except ImportError:  # the numpy cast is slower but exact; no extra needed for the view
            torch = False
        _TORCH = torch
    return _TORCH or None


def spatial_features(boxes: np.ndarray, image_h: float, image_w: float) -> np.ndarray:
    """Return ViLBERT's 5-d location of each box.

    The vector is ``[x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W*H)]`` with boxes in original pixels and
    no +1 in the area, as in vilbert_beta, vilbert-multi-task and volta.

    Args:
        boxes: (N, 4) x1 y1 x2 y2 in original pixels (any float dtype).
        image_h: original image height in pixels (> 0).
        image_w: original image width in pixels (> 0).

    Returns:
        (N, 5) float32 array.

    Raises:
        RecordError: the boxes are not (N, 4) or the image size is not positive.
    """
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise RecordError(f"boxes must have shape (N, 4), got {boxes.shape}")
    h, w = float(image_h), float(image_w)
    if h <= 0 or w <= 0:
        raise RecordError(f"image size must be positive, got h={image_h} w={image_w}")
    out = np.empty((boxes.shape[0], 5), dtype=np.float32)
    # Each coordinate is one correctly rounded division, the same value float64 maths rounds to.
    np.divide(boxes, np.array([w, h, w, h], dtype=np.float32), out=out[:, :4], casting="unsafe")
    b = boxes.astype(np.float64, copy=False)  # float64 area so it matches hand-computed values exactly
    out[:, 4] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
    return out


def mean_region_feature(features: Any, denominator: Optional[float] = None) -> Any:
    """Return the [IMG] feature: the sum of region rows divided by ``denominator``.

    Downstream loaders use the plain mean (``denominator=None``, i.e. the number of rows). Pretraining
    takes the mean *after* region masking: zero the masked rows first, then pass the count the reference
    code divides by (vilbert_beta: the number of real boxes; vilbert-multi-task: the number of unmasked
    rows). The denominator is clamped to at least 1, so an image without boxes gives a zero vector.

    Works on numpy arrays and on torch tensors (the sum is taken in float32 in both cases).

    Args:
        features: (N, D) region features, float16 or float32 (numpy array or torch tensor).
        denominator: what to divide the sum by; defaults to N.

    Returns:
        (D,) float32 array (or tensor, for tensor input).
    """
    n = features.shape[0] if denominator is None else denominator
    if isinstance(features, np.ndarray):
        total = features.sum(axis=0, dtype=np.float32)
        return total / np.float32(max(float(n), 1.0))
    # torch.Tensor (duck-typed so this module does not import torch)
    total = features.float().sum(dim=0)
    if hasattr(n, "clamp"):  # a tensor count, e.g. (mask == 0).sum()
        return total / n.clamp(min=1).to(total.dtype)
    return total / max(float(n), 1.0)


def build_image_inputs(
    record: RegionFeatures,
    max_regions: int = DEFAULT_MAX_REGIONS,
    gt_record: Optional[RegionFeatures] = None,
    add_global: bool = True,
    global_over_gt: bool = False,
) -> dict[str, Any]:
    """Build what ViLBERT's visual stream consumes from one record.

    Rows are ``[IMG]`` (if ``add_global``), then the detections, then the ground-truth boxes of
    ``gt_record`` (its own rows; a GT store has no [IMG] of its own), truncated to ``max_regions`` with
    detections first and zero-padded after. This is the layout of the official RefCOCO / VCR loaders,
    which drop the GT reader's [IMG] row and append its boxes after the detections.

    The [IMG] feature is the mean of *all* stored detection features (computed before truncation, as the
    official reader does); with ``global_over_gt`` it is the mean over detections and GT boxes together
    (VCR). Its location is ``[0, 0, 1, 1, 1]`` and its pixel box ``[0, 0, W, H]``.

    Args:
        record: the image's detections (features float16 or float32).
        max_regions: number of output rows, [IMG] included.
        gt_record: optional ground-truth boxes of the same image from a second store.
        add_global: prepend the [IMG] row.
        global_over_gt: average the [IMG] feature over detections and GT boxes (needs ``gt_record``).

    Returns:
        A dict of numpy arrays:
            ``features``: (max_regions, D) float32, zero rows after the real ones;
            ``spatials``: (max_regions, 5) float32 normalised locations;
            ``boxes``: (max_regions, 4) float32 pixel boxes (x1 y1 x2 y2), for grounding and drawing;
            ``image_mask``: (max_regions,) int64, 1 for real rows including [IMG];
            ``num_regions``: int, real rows including [IMG];
            ``num_detections``: int, detection rows kept; ``num_gt``: int, GT rows kept (they follow the
            detections, so GT row j is at ``int(add_global) + num_detections + j``);
            ``image_h``, ``image_w``: int.

    Raises:
        ConfigError: ``max_regions`` leaves no room, or ``global_over_gt`` without a GT record.
        RecordError: the GT record disagrees with the record (feature size or image size).
    """
    first = 1 if add_global else 0
    if max_regions < first + 1:
        raise ConfigError(f"max_regions must be at least {first + 1} (add_global={add_global}), got {max_regions}")
    if global_over_gt and gt_record is None:
        raise ConfigError("global_over_gt=True needs a ground-truth record (gt_store / gt_record)")
    feats = record.features  # (N, D)
    dim = int(feats.shape[1])
    h, w = int(record.image_h), int(record.image_w)
    if gt_record is not None:
        if int(gt_record.features.shape[1]) != dim:
            raise RecordError(
                f"record {record.image_id!r}: GT features have dimension {gt_record.features.shape[1]}, "
                f"detections {dim}; use a GT store made by the same detector"
            )
        if (int(gt_record.image_h), int(gt_record.image_w)) != (h, w):
            raise RecordError(
                f"record {record.image_id!r}: GT image size {gt_record.image_h}x{gt_record.image_w} differs "
                f"from the detections' {h}x{w}"
            )

    out_feats = np.zeros((max_regions, dim), dtype=np.float32)  # (R, D)
    out_boxes = np.zeros((max_regions, 4), dtype=np.float32)  # (R, 4) pixels
    capacity = max_regions - first
    n_det_all = int(record.num_boxes)
    n_det = min(n_det_all, capacity)
    _copy_rows(out_feats[first:first + n_det], feats[:n_det])  # one pass: copy and cast to float32
    out_boxes[first:first + n_det] = record.boxes[:n_det]
    n_gt = 0
    if gt_record is not None:
        n_gt = min(int(gt_record.num_boxes), capacity - n_det)
        _copy_rows(out_feats[first + n_det:first + n_det + n_gt], gt_record.features[:n_gt])
        out_boxes[first + n_det:first + n_det + n_gt] = gt_record.boxes[:n_gt]
    num_regions = first + n_det + n_gt

    spatials = np.zeros((max_regions, 5), dtype=np.float32)  # (R, 5)
    spatials[first:num_regions] = spatial_features(out_boxes[first:num_regions], h, w)
    if add_global:
        if global_over_gt:
            n_gt_all = int(gt_record.num_boxes)
            total = np.zeros(dim, dtype=np.float32)
            if n_det_all:
                total += feats.sum(axis=0, dtype=np.float32)
            if n_gt_all:
                total += gt_record.features.sum(axis=0, dtype=np.float32)
            out_feats[0] = total / np.float32(max(n_det_all + n_gt_all, 1))
        elif n_det == n_det_all:
            out_feats[0] = mean_region_feature(out_feats[1:1 + n_det], denominator=n_det_all)
        else:  # truncated: the official [IMG] is still the mean of every stored box (rare: cast them all)
            all_rows = np.empty(feats.shape, dtype=np.float32)
            _copy_rows(all_rows, feats)
            out_feats[0] = mean_region_feature(all_rows)
        spatials[0] = GLOBAL_LOCATION
        out_boxes[0] = (0.0, 0.0, w, h)
    image_mask = np.zeros(max_regions, dtype=np.int64)
    image_mask[:num_regions] = 1
    return {
        "features": out_feats,
        "spatials": spatials,
        "boxes": out_boxes,
        "image_mask": image_mask,
        "num_regions": num_regions,
        "num_detections": n_det,
        "num_gt": n_gt,
        "image_h": h,
        "image_w": w,
    }


class ImageFeatureView:
    """ViLBERT inputs for image ids of a feature store (optionally with GT boxes from a second store).

    Args:
        store: a ``FeatureStore`` (or anything with ``get(image_id)`` / ``[pos]`` returning RegionFeatures).
        max_regions: number of output rows, [IMG] included.
        gt_store: optional store of ground-truth boxes, looked up by the same image id.
        add_global: prepend the [IMG] row.
        global_over_gt: average the [IMG] feature over detections and GT boxes (VCR).
    """

    def __init__(
        self,
        store: Any,
        max_regions: int = DEFAULT_MAX_REGIONS,
        gt_store: Any = None,
        add_global: bool = True,
        global_over_gt: bool = False,
    ) -> None:
        first = 1 if add_global else 0
        if max_regions < first + 1:
            raise ConfigError(
                f"max_regions must be at least {first + 1} (add_global={add_global}), got {max_regions}"
            )
        if global_over_gt and gt_store is None:
            raise ConfigError("global_over_gt=True needs a gt_store")
        self.store = store
        self.gt_store = gt_store
        self.max_regions = int(max_regions)
        self.add_global = bool(add_global)
        self.global_over_gt = bool(global_over_gt)

    def get(self, image_id: str) -> dict[str, Any]:
        """Return the ViLBERT inputs of ``image_id`` (see ``build_image_inputs``).

        Raises:
            UnknownImageError: the id is in neither the store nor (when given) the GT store.
        """
        return self.build(self.store.get(image_id))

    __call__ = get

    def at(self, position: int) -> dict[str, Any]:
        """Return the ViLBERT inputs of the record at ``position`` in the store."""
        return self.build(self.store[position])

    def build(self, record: RegionFeatures) -> dict[str, Any]:
        """Return the ViLBERT inputs of ``record``, with its GT boxes from ``gt_store`` when one is set."""
        gt = self.gt_store.get(record.image_id) if self.gt_store is not None else None
        return build_image_inputs(record, self.max_regions, gt_record=gt, add_global=self.add_global,
                                  global_over_gt=self.global_over_gt)
