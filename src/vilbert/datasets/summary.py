"""inspect: a summary of a feature store (counts, box histogram, dtypes, size on disk, provenance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vilbert.datasets.manifest import MANIFEST_NAME


def summarize_store(path) -> dict:
    """Collect what `vilbert-cli inspect` shows, reading only the manifest and index.

    Returns:
        A JSON-serialisable dict: path, storage, format_version, num_records, num_shards, dead_rows,
        feature_dim, feature_dtype, fields, size_bytes (shards + index + manifest), boxes (min, mean, max,
        histogram as [[lo, hi, count], ...]), failures, provenance, created.
    """
    from vilbert.datasets.reader import FeatureStore

    path = Path(path)
    store = FeatureStore.open(path)
    m = store.manifest
    nb = store.num_boxes_array()
    size = sum(s.size_bytes for s in m.shards) + int(m.index.get("size_bytes") or 0) + \
        (path / MANIFEST_NAME).stat().st_size
    return {
        "path": str(path),
        "storage": m.storage,
        "format_version": m.format_version,
        "num_records": m.num_records,
        "num_shards": len(m.shards),
        "dead_rows": m.dead_rows,
        "feature_dim": m.feature_dim,
        "feature_dtype": m.feature_dtype,
        "fields": m.fields,
        "size_bytes": size,
        "boxes": {
            "min": int(nb.min()) if len(nb) else None,
            "mean": round(float(nb.mean()), 2) if len(nb) else None,
            "max": int(nb.max()) if len(nb) else None,
            "total": int(nb.sum()),
            "histogram": box_histogram(nb),
        },
        "failures": m.failures,
        "provenance": m.provenance,
        "created": m.created,
    }


def box_histogram(num_boxes: np.ndarray, max_bins: int = 12) -> list:
    """Boxes-per-image histogram as [[lo, hi, count], ...] (lo == hi when each count gets its own bin)."""
    if len(num_boxes) == 0:
        return []
    lo, hi = int(num_boxes.min()), int(num_boxes.max())
    if hi - lo + 1 <= max_bins:
        counts = np.bincount(num_boxes - lo, minlength=hi - lo + 1)
        return [[lo + i, lo + i, int(c)] for i, c in enumerate(counts)]
    edges = np.linspace(lo, hi + 1, max_bins + 1).astype(np.int64)
    edges = np.unique(edges)
    counts, _ = np.histogram(num_boxes, bins=edges)
    return [[int(a), int(b) - 1, int(c)] for a, b, c in zip(edges[:-1], edges[1:], counts)]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_summary(s: dict) -> str:
    """Human-readable text of summarize_store's dict."""
    lines = [
        f"store        {s['path']}",
        f"storage      {s['storage']} (format version {s['format_version']}), {s['num_shards']} shard(s), "
        f"{_size(s['size_bytes'])} on disk",
        f"records      {s['num_records']}" + (f" (+{s['dead_rows']} dead rows from keep-last)" if s["dead_rows"] else ""),
        f"features     {s['feature_dim']}-d {s['feature_dtype']}; boxes float32 (N, 4) pixels",
    ]
    for name, spec in s["fields"].items():
        shape = f"(N, {spec['width']})" if spec.get("width") else "(N,)"
        lines.append(f"  {name:<13}{spec['dtype']} {shape}")
    b = s["boxes"]
    if b["histogram"]:
        lines.append(f"boxes/image  min {b['min']}, mean {b['mean']}, max {b['max']}, total {b['total']}")
        peak = max(c for _, _, c in b["histogram"]) or 1
        for lo, hi, c in b["histogram"]:
            label = f"{lo}" if lo == hi else f"{lo}-{hi}"
            lines.append(f"  {label:>9} {c:>8} {'#' * max(int(round(40 * c / peak)), 1 if c else 0)}")
    f = s["failures"] or {}
    lines.append(f"failures     {f.get('count', 0)} bad input record(s) skipped when packed")
    prov = s["provenance"] or {}
    det = prov.get("detector")
    lines.append("detector     " + (json.dumps(det, sort_keys=True) if det else "unknown"))
    for src in prov.get("sources", []) or []:
        lines.append(f"  source     {src.get('source_format', '?')}: {src.get('source', '?')}")
    lines.append(f"tool         vilbert {prov.get('tool_version', '?')}, created {s['created']}")
    return "\n".join(lines)
