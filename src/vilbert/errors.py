"""The exception hierarchy: every error the toolkit raises on purpose derives from VilbertError."""


class VilbertError(Exception):
    """Root of all deliberate errors. The CLI prints these as one line and exits with status 1."""


class ConfigError(VilbertError, ValueError):
    """A configuration value or key is invalid (unknown key, bad value)."""


class SourceNotFoundError(VilbertError, FileNotFoundError):
    """An input path does not exist or is not what was expected."""


class StoreError(VilbertError):
    """A feature store cannot be read or written as asked."""


class SchemaVersionError(StoreError):
    """A store or record carries a format version this release does not know."""


class CorruptStoreError(StoreError):
    """A shard, index or manifest is truncated, tampered with or inconsistent."""


class RecordError(VilbertError, ValueError):
    """One record is malformed (arrays disagree with num_boxes, bad dtype, broken encoding)."""


class UnknownImageError(VilbertError, KeyError):
    """An image id is not in the store."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class DuplicateImageError(StoreError):
    """The same image id arrived twice and the duplicate policy is 'error'."""


class IncompatibleSourcesError(StoreError):
    """Sources made by different detectors (or with different feature shapes) would be mixed."""


class StoreFullError(StoreError):
    """A shard ran out of space (for LMDB: the map filled up)."""


class TrustRequiredError(VilbertError, PermissionError):
    """Reading this input would unpickle data, which can run arbitrary code; needs --trust-pickle."""


class LegacyFormatError(VilbertError, ValueError):
    """A legacy dump does not have the layout its format promises (missing key list, wrong columns)."""


class MissingDependencyError(VilbertError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class CheckpointError(VilbertError, ValueError):
    """A checkpoint file cannot be read or does not fit the model (missing, unexpected or mis-shaped keys)."""
