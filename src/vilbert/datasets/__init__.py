"""Region-feature records, feature stores (Arrow, LMDB, HDF5), legacy importers and loaders."""

from vilbert.datasets.records import RecordFailure, RegionFeatures

__all__ = ["RecordFailure", "RegionFeatures"]
