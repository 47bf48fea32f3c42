"""Write throughput of StoreWriter (Arrow and LMDB) against a plain sequential write of the same bytes with fsync.

Usage (from the repository root):

    .venv/bin/python bench/pack.py --num-records 8000 --data-dir /tmp/vilbert-bench --markdown out.md

The records (36 boxes x 2048 fp16 features, fp32 boxes, 36 x 1601 fp16 class probabilities by default) are
generated once into memory from a pool of random blocks, so generation is not timed. Each pass then writes
them all, through ``StoreWriter`` (shards, index, sha256, fsync, rename, manifest: everything ``pack`` does
after reading its sources) or through one ``open(...).write`` per array into a single file, fsync'd at the
end (the floor set by the disk). Throughput is payload bytes (the record arrays) per second of wall time.
Passes alternate between writers so that a noisy neighbour hurts all of them alike. Pytest never collects
this file; it asserts no timings.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import REPO, dir_bytes, machine_line, markdown_table  # noqa: E402  (bench/loader.py)

sys.path.insert(0, str(REPO / "src"))
from vilbert.datasets.records import OPTIONAL_FIELDS  # noqa: E402
from vilbert.datasets.sample import SampleConfig, iter_sample_records  # noqa: E402


def _arrays(rec):
    yield rec.features
    yield rec.boxes
    for name in OPTIONAL_FIELDS:
        arr = getattr(rec, name)
        if arr is not None:
            yield arr


def payload_bytes(records) -> int:
    return sum(a.nbytes for rec in records for a in _arrays(rec))


def write_plain(path: Path, records) -> None:
    """The floor: every array appended to one file, one fsync at the end, then a rename."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "plain.bin.tmp"
    with open(tmp, "wb") as fh:
        for rec in records:
            for arr in _arrays(rec):
                fh.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path / "plain.bin")


def write_plain_hashed(path: Path, records) -> None:
    """The floor when every byte must also be hashed (a store's manifest holds each shard's sha256)."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "plain.bin.tmp"
    digest = hashlib.sha256()
    with open(tmp, "wb") as fh:
        for rec in records:
            for arr in _arrays(rec):
                view = memoryview(np.ascontiguousarray(arr)).cast("B")
                fh.write(view)
                digest.update(view)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path / "plain.bin")
    (path / "plain.sha256").write_text(digest.hexdigest())


def write_store(path: Path, records, fmt: str) -> None:
    from vilbert.datasets.writer import PackConfig, StoreWriter

    writer = StoreWriter(path, PackConfig(format=fmt), provenance={"detector": "synthetic", "bench": "pack"})
    for rec in records:
        writer.write(rec)
    writer.close()


WRITERS = {
    "plain": "plain sequential write + fsync",
    "plain-sha256": "plain sequential write + sha256 + fsync",
    "arrow": "StoreWriter (arrow)",
    "lmdb": "StoreWriter (lmdb)",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-records", type=int, default=8000)
    parser.add_argument("--num-boxes", type=int, default=36)
    parser.add_argument("--no-cls-prob", dest="cls_prob", action="store_false")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per writer (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per writer before its timed ones")
    parser.add_argument("--writers", default="plain,plain-sha256,arrow,lmdb")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/vilbert-bench-pack"))
    parser.add_argument("--markdown", type=Path, help="append the results as markdown to this file")
    args = parser.parse_args(argv)
    writers = [w.strip() for w in args.writers.split(",") if w.strip()]
    for w in writers:
        if w not in WRITERS:
            parser.error(f"unknown writer {w!r}; choose from {', '.join(WRITERS)}")

    cfg = SampleConfig(num_images=args.num_records, seed=0, min_boxes=args.num_boxes, max_boxes=args.num_boxes,
                       num_classes=1601 if args.cls_prob else 0, with_labels=True, pool_size=64)
    records = list(iter_sample_records(cfg))
    # pool slices share memory; give every record its own arrays so each write reads distinct memory
    records = [type(r)(**{**r.__dict__, "features": r.features.copy(),
                          "cls_prob": None if r.cls_prob is None else r.cls_prob.copy()}) for r in records]
    payload = payload_bytes(records)
    need = int(payload * 1.1)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(args.data_dir).free < need:
        print(f"error: need about {need / 1e9:.1f} GB free under {args.data_dir}", file=sys.stderr)
        return 1
    print(machine_line())
    print(f"{len(records)} records, payload {payload / 1e9:.2f} GB")

    rates: dict[str, list[float]] = {w: [] for w in writers}
    sizes: dict[str, int] = {}
    # Each writer gets untimed warm-up passes, then its timed passes back to back. On this VM, memory the
    # guest has not touched for a while is slow to touch again (pages handed back to the host), and which
    # writer ran just before changed a pass by up to 4x when writers were interleaved; blocks compare
    # steady states.
    for w in writers:
        for i in range(args.warmup + args.repeat):
            out = args.data_dir / f"out-{w}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            t0 = time.perf_counter()
            if w == "plain":
                write_plain(out, records)
            elif w == "plain-sha256":
                write_plain_hashed(out, records)
            else:
                write_store(out, records, w)
            dt = time.perf_counter() - t0
            sizes[w] = dir_bytes(out)
            warm = i < args.warmup
            if not warm:
                rates[w].append(payload / dt / 1e6)
            print(f"{w}{' (warm-up)' if warm else ''}: {payload / dt / 1e6:,.0f} MB/s ({dt:.1f} s, "
                  f"{sizes[w] / 1e9:.2f} GB on disk)")
            shutil.rmtree(out, ignore_errors=True)

    floor = statistics.median(rates["plain"]) if "plain" in rates else None
    hashed = statistics.median(rates["plain-sha256"]) if "plain-sha256" in rates else None
    rows = []
    for w in writers:
        med = statistics.median(rates[w])
        rows.append([WRITERS[w], f"{med:,.0f}", f"{med / floor:.0%}" if floor else "-",
                     f"{med / hashed:.0%}" if hashed else "-",
                     f"{sizes[w] / 1e9:.2f}", ", ".join(f"{x:,.0f}" for x in rates[w])])
    table = markdown_table(["writer", "MB/s (median)", "vs plain write", "vs plain write + sha256", "GB on disk",
                            "all passes MB/s"], rows)
    cls = " + 36x1601 fp16 cls_prob + labels" if args.cls_prob else ""
    text = (f"\n### Pack, {len(records)} records of {args.num_boxes}x2048 fp16{cls} ({payload / 1e9:.2f} GB)\n\n"
            f"Machine: {machine_line()}\n\n{args.warmup} warm-up pass(es) then median of {args.repeat} passes per writer, back to back.\n\n{table}\n")
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(text)
    shutil.rmtree(args.data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
