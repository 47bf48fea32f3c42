"""Region-feature extraction with the bottom-up-attention detector (see docs/roadmap)."""
