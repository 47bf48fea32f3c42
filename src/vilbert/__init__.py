"""vilbert: ViLBERT region features, feature stores, training and evaluation."""

__version__ = "0.1.0"
