"""Region-feature records, feature stores (Arrow, LMDB, HDF5), legacy importers and loaders.

Public names are loaded on first use, so importing `vilbert.datasets.records` (as extraction workers do)
does not pull in pyarrow, h5py, lmdb or torch.
"""

import importlib

_EXPORTS = {
    "RegionFeatures": "records",
    "RecordFailure": "records",
    "FeatureStore": "reader",
    "StoreWriter": "writer",
    "PackConfig": "writer",
    "pack": "pack",
    "PackResult": "pack",
    "validate_store": "validate",
    "summarize_store": "summary",
    "ImageFeatureView": "image_features",
    "build_image_inputs": "image_features",
    "mean_region_feature": "image_features",
    "spatial_features": "image_features",
    "RegionFeatureDataset": "loader",  # imports torch
    "collate_regions": "loader",
    "LEGACY_FORMATS": "legacy",
    "detect_legacy_format": "legacy",
    "open_legacy": "legacy",
    "iter_captions": "legacy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vilbert.datasets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vilbert.datasets.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
