"""A small synthetic feature store (random but plausible BUTD-like records) for the demo, tests and benchmarks."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from vilbert.datasets.records import RegionFeatures
from vilbert.errors import ConfigError, VilbertError

logger = logging.getLogger(__name__)

# provenance["detector"]: a signature no real detector has, so `pack` never mixes samples with real features.
SAMPLE_DETECTOR = {
    "name": "synthetic",
    "config": "vilbert.datasets.sample: random features, no detector",
    "weights_file": None,
    "weights_sha256": None,
}


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """What the synthetic records look like."""

    num_images: int = 200  # records to write
    seed: int = 0  # everything is a function of the seed
    min_boxes: int = 10  # boxes per image are uniform in [min_boxes, max_boxes]
    max_boxes: int = 36
    feature_dim: int = 2048  # D of the features (2048 for the BUTD detector)
    num_classes: int = 1601  # cls_prob width, background first; 0 = no cls_prob
    num_attributes: int = 401  # attribute vocabulary, background first
    with_labels: bool = True  # write objects_id/conf and attrs_id/conf
    pool_size: int = 0  # > 0: draw feature/cls_prob rows from a pool of this many random blocks (fast, for benchmarks)
    id_prefix: str = "sample"  # image ids are f"{id_prefix}{index:06d}"

    def __post_init__(self) -> None:
        if self.num_images < 0:
            raise ConfigError(f"num_images must be >= 0, got {self.num_images}")
        if not 0 <= self.min_boxes <= self.max_boxes:
            raise ConfigError(f"need 0 <= min_boxes <= max_boxes, got {self.min_boxes}..{self.max_boxes}")
        if self.feature_dim < 1:
            raise ConfigError(f"feature_dim must be >= 1, got {self.feature_dim}")
        if self.num_classes == 1 or self.num_classes < 0:
            raise ConfigError(f"num_classes must be 0 (no cls_prob) or >= 2, got {self.num_classes}")
        if self.pool_size < 0:
            raise ConfigError(f"pool_size must be >= 0, got {self.pool_size}")


def _random_block(rng: np.random.Generator, n: int, cfg: SampleConfig) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(n, D) float16 features and (n, C) float16 class probabilities that look like BUTD output."""
    # Mean-pooled ReLU outputs: non-negative, about half zeros, a long tail.
    feats = np.maximum(rng.standard_normal((n, cfg.feature_dim), dtype=np.float32), 0.0)
    feats *= rng.exponential(1.0, size=(n, 1)).astype(np.float32)
    cls_prob = None
    if cfg.num_classes:
        logits = rng.standard_normal((n, cfg.num_classes), dtype=np.float32)
        logits[np.arange(n), rng.integers(1, cfg.num_classes, n)] += rng.uniform(4.0, 10.0, n).astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        cls_prob = probs.astype(np.float16)
    return feats.astype(np.float16), cls_prob


def iter_sample_records(config: SampleConfig = SampleConfig()) -> Iterator[RegionFeatures]:
    """Yield ``config.num_images`` synthetic records (features float16, boxes float32, sizes varied).

    Image sizes span portrait, landscape and square photos (short side 240-800, aspect up to 2.5);
    boxes lie inside the image with at least 2 pixels per side. With ``pool_size`` the feature and
    class-probability rows are sliced from a fixed pool of random blocks, which makes 20k-record
    benchmark stores quick to generate (the bytes differ per record only by the slice taken).
    """
    rng = np.random.default_rng(config.seed)
    pool: list[tuple[np.ndarray, Optional[np.ndarray]]] = []
    if config.pool_size:
        pool = [_random_block(rng, config.max_boxes, config) for _ in range(config.pool_size)]
    for index in range(config.num_images):
        n = int(rng.integers(config.min_boxes, config.max_boxes + 1))
        short = int(rng.integers(240, 801))
        long_side = int(min(short * rng.uniform(1.0, 2.5), 1600))
        h, w = (short, long_side) if rng.random() < 0.6 else (long_side, short)
        bw = rng.uniform(2.0, w, n)
        bh = rng.uniform(2.0, h, n)
        x1 = rng.uniform(0.0, w - bw)
        y1 = rng.uniform(0.0, h - bh)
        boxes = np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype(np.float32)  # (n, 4) pixels
        if pool:
            feats, cls_prob = pool[int(rng.integers(len(pool)))]
            feats = feats[:n]
            cls_prob = None if cls_prob is None else cls_prob[:n]
        else:
            feats, cls_prob = _random_block(rng, n, config)
        extra = {}
        if config.with_labels:
            if cls_prob is not None:
                fg = cls_prob[:, 1:].astype(np.float32)  # background excluded, as the detector reports
                objects_id = fg.argmax(axis=1).astype(np.int32)
                objects_conf = fg[np.arange(n), objects_id].astype(np.float32)
            else:
                objects_id = rng.integers(0, 1600, n).astype(np.int32)
                objects_conf = rng.uniform(0.2, 1.0, n).astype(np.float32)
            extra = dict(
                objects_id=objects_id,
                objects_conf=objects_conf,
                attrs_id=rng.integers(0, max(config.num_attributes - 1, 1), n).astype(np.int32),
                attrs_conf=rng.uniform(0.0, 1.0, n).astype(np.float32),
            )
        yield RegionFeatures(
            image_id=f"{config.id_prefix}{index:06d}", image_h=h, image_w=w, num_boxes=n, boxes=boxes,
            features=feats, cls_prob=cls_prob, **extra,
        )


def sample_provenance(config: SampleConfig) -> dict:
    """The provenance a synthetic store carries: it names the data as synthetic and the generator settings."""
    from vilbert import __version__

    return {
        "detector": dict(SAMPLE_DETECTOR),
        "source_format": "synthetic",
        "synthetic": True,
        "note": "random features from vilbert.datasets.sample; not extracted from images",
        "generator": "vilbert.datasets.sample",
        "sample_config": dataclasses.asdict(config),
        "tool_version": __version__,
    }


def write_sample_store(out: str | Path, config: SampleConfig = SampleConfig(), pack_config=None, *,
                       overwrite: bool = False):
    """Write a synthetic store through StoreWriter.

    Args:
        out: the store directory to create.
        config: what to generate.
        pack_config: a ``PackConfig`` (format, feature dtype, shard size); default Arrow, float16.
        overwrite: replace a store already at ``out``.

    Returns:
        The published ``Manifest``.

    Raises:
        StoreError: ``out`` already holds a store or other files and ``overwrite`` is False.
    """
    from vilbert.datasets.writer import PackConfig, StoreWriter

    pack_config = pack_config if pack_config is not None else PackConfig()
    with StoreWriter(out, pack_config, provenance=sample_provenance(config), overwrite=overwrite) as writer:
        for record in iter_sample_records(config):
            writer.write(record)
        manifest = writer.close()
    logger.info("wrote %d synthetic records to %s", config.num_images, out)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vilbert.datasets.sample --out DIR [--num-images 200] [--seed 0]``."""
    parser = argparse.ArgumentParser(prog="python -m vilbert.datasets.sample", description=__doc__)
    parser.add_argument("--out", required=True, help="store directory to create")
    parser.add_argument("--num-images", type=int, default=SampleConfig.num_images)
    parser.add_argument("--seed", type=int, default=SampleConfig.seed)
    parser.add_argument("--min-boxes", type=int, default=SampleConfig.min_boxes)
    parser.add_argument("--max-boxes", type=int, default=SampleConfig.max_boxes)
    parser.add_argument("--feature-dim", type=int, default=SampleConfig.feature_dim)
    parser.add_argument("--num-classes", type=int, default=SampleConfig.num_classes,
                        help="cls_prob width; 0 writes no cls_prob")
    parser.add_argument("--pool-size", type=int, default=SampleConfig.pool_size,
                        help="reuse a pool of this many random blocks (fast large stores for benchmarks)")
    parser.add_argument("--format", default="arrow", choices=["arrow", "lmdb", "hdf5"])
    parser.add_argument("--feature-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--overwrite", action="store_true", help="replace a store already at --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from vilbert.datasets.writer import PackConfig

        config = SampleConfig(num_images=args.num_images, seed=args.seed, min_boxes=args.min_boxes,
                              max_boxes=args.max_boxes, feature_dim=args.feature_dim,
                              num_classes=args.num_classes, pool_size=args.pool_size)
        manifest = write_sample_store(args.out, config,
                                      PackConfig(format=args.format, feature_dtype=args.feature_dtype),
                                      overwrite=args.overwrite)
    except VilbertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {manifest.num_records} synthetic records ({manifest.storage}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
