"""Random-access read speed of our Arrow and LMDB stores against a vilbert-multi-task-style pickle LMDB and a raw memmap copy.

Usage (from the repository root):

    .venv/bin/python bench/loader.py --num-records 20000 --data-dir /tmp/vilbert-bench --markdown out.md

Builds four page-cached copies of the same synthetic records (36 boxes x 2048 fp16 features, fp32 boxes,
36 x 1601 fp16 class probabilities by default), then times random single-record reads in one process:

Each reader first reads every record once in random order (the "first touch": page-cache hits, but every
4 KB page still costs this process a minor fault to map it), then the timed passes measure the steady state
of a long-running worker:

* ``record``: look the image id up, read the record, and copy its arrays into a preallocated output buffer
  (what a collate into a pinned batch does; views that were not copied would cost nothing and prove nothing);
* ``view``: look the image id up and build the full ViLBERT input (37 rows: [IMG] + 36 regions, float32,
  5-d spatials, image mask), with ``ImageFeatureView`` for our stores and the raw memmap, and with the
  reference code's own [IMG]/location/padding steps for the pickle reader.

Readers: ``arrow`` and ``lmdb`` (our FeatureStore), ``pickle-lmdb`` (a faithful re-creation of
vilbert-multi-task's ``ImageFeaturesH5Reader``: pickled float32 dicts, a pickled ``b"keys"`` list,
``list.index`` lookup, one read txn per get), ``memmap`` (a raw ``np.memmap`` row copy of the same bytes as
our records: the floor set by memory copying). Pytest never collects this file; it asserts no timings.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from vilbert.datasets.image_features import ImageFeatureView, build_image_inputs  # noqa: E402
from vilbert.datasets.records import RegionFeatures  # noqa: E402
from vilbert.datasets.sample import SampleConfig, iter_sample_records  # noqa: E402


def machine_line() -> str:
    """One line naming CPU model, cores, RAM, OS, Python, date (UTC) and git commit."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = f"{int(line.split()[1]) / 1024 ** 2:.0f}"
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False).stdout.strip()
        commit += "+dirty" if dirty else ""
    except OSError:
        commit = "unknown"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gb} GB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; {date}; commit {commit}")


def warm_files(paths: Sequence[Path], chunk: int = 16 << 20) -> int:
    """Read every file under ``paths`` once so it sits in the page cache; return the bytes read."""
    total = 0
    buf = bytearray(chunk)
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(buf)
                    if not n:
                        break
                    total += n
    return total


def dir_bytes(path: Path) -> int:
    """Bytes on disk of a file or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------
# Stores


def _records(args: argparse.Namespace):
    cfg = SampleConfig(num_images=args.num_records, seed=0, min_boxes=args.num_boxes, max_boxes=args.num_boxes,
                       num_classes=1601 if args.cls_prob else 0, with_labels=False, pool_size=64,
                       id_prefix="COCO_train2014_")
    return cfg, iter_sample_records(cfg)


def build_ours(path: Path, fmt: str, args: argparse.Namespace) -> None:
    """Our store, written through StoreWriter (the same path `pack` takes)."""
    from vilbert.datasets.sample import write_sample_store
    from vilbert.datasets.writer import PackConfig

    cfg, _ = _records(args)
    write_sample_store(path, cfg, PackConfig(format=fmt))


def build_memmap(path: Path, args: argparse.Namespace) -> None:
    """One raw file of fixed-size rows holding the same bytes as our records (features, boxes, cls_prob)."""
    path.mkdir(parents=True, exist_ok=True)
    ids, hw = [], []
    with open(path / "rows.bin.tmp", "wb") as fh:
        for rec in _records(args)[1]:
            ids.append(rec.image_id)
            hw.append((rec.image_h, rec.image_w))
            fh.write(memoryview(np.ascontiguousarray(rec.features)).cast("B"))
            fh.write(memoryview(rec.boxes).cast("B"))
            if rec.cls_prob is not None:
                fh.write(memoryview(np.ascontiguousarray(rec.cls_prob)).cast("B"))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path / "rows.bin.tmp", path / "rows.bin")
    np.save(path / "hw.npy", np.asarray(hw, np.int64))
    (path / "ids.txt").write_text("\n".join(ids))


def build_pickle_lmdb(path: Path, args: argparse.Namespace) -> None:
    """A vilbert-multi-task-style LMDB: pickled float32 dicts, key list pickled under b"keys" (written last)."""
    import lmdb

    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 40)
    keys = []
    txn = env.begin(write=True)
    for i, rec in enumerate(_records(args)[1]):
        key = str(rec.image_id).encode()
        item = {"image_id": rec.image_id, "image_h": rec.image_h, "image_w": rec.image_w,
                "num_boxes": rec.num_boxes, "boxes": rec.boxes.astype(np.float32),
                "features": rec.features.astype(np.float32)}  # convert_to_lmdb.py stores float32
        if rec.cls_prob is not None:  # kept here (vilbert_beta / CC style) so both sides hold the same fields
            item["cls_prob"] = rec.cls_prob.astype(np.float32)
        txn.put(key, pickle.dumps(item))
        keys.append(key)
        if (i + 1) % 1000 == 0:  # the reference uses one txn; chunked commits only spare memory here
            txn.commit()
            txn = env.begin(write=True)
    txn.put(b"keys", pickle.dumps(keys))
    txn.commit()
    env.sync(True)
    env.close()


# --------------------------------------------------------------------------------------------------------
# Readers: read(image_id, out) copies one record into preallocated buffers; view(image_id) builds ViLBERT input


def _out_buffers(num_boxes: int, dim: int, cls: bool, dtype) -> dict[str, np.ndarray]:
    out = {"features": np.empty((num_boxes, dim), dtype), "boxes": np.empty((num_boxes, 4), np.float32)}
    if cls:
        out["cls_prob"] = np.empty((num_boxes, 1601), dtype)
    return out


def _to_torch(inputs: dict) -> dict:
    import torch

    return {k: torch.from_numpy(inputs[k]) for k in ("features", "spatials", "boxes", "image_mask")}


class MemmapReader:
    """The floor: a dict lookup and one ``np.memmap`` row copy of the record's bytes."""

    name = "memmap row copy"

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        self.ids = (path / "ids.txt").read_text().split("\n")
        self.index = {k: i for i, k in enumerate(self.ids)}
        self.hw = np.load(path / "hw.npy")
        n, d = args.num_boxes, 2048
        self.fb, self.bb = n * d * 2, n * 16
        self.cb = n * 1601 * 2 if args.cls_prob else 0
        self.row_bytes = self.fb + self.bb + self.cb
        self.mm = np.memmap(path / "rows.bin", np.uint8, "r", shape=(len(self.ids), self.row_bytes))
        self.n, self.d = n, d
        self.out_row = np.empty(self.row_bytes, np.uint8)
        self.payload = self.row_bytes

    def read(self, image_id: str) -> None:
        np.copyto(self.out_row, self.mm[self.index[image_id]])

    def view(self, image_id: str) -> dict:
        i = self.index[image_id]
        row = self.mm[i]
        rec = RegionFeatures(image_id=image_id, image_h=int(self.hw[i, 0]), image_w=int(self.hw[i, 1]),
                             num_boxes=self.n, boxes=row[self.fb:self.fb + self.bb].view(np.float32).reshape(self.n, 4),
                             features=row[:self.fb].view(np.float16).reshape(self.n, self.d))
        return _to_torch(build_image_inputs(rec, 37))

    def close(self) -> None:
        del self.mm


class OurStoreReader:
    """Our FeatureStore (Arrow or LMDB) and ImageFeatureView."""

    def __init__(self, path: Path, args: argparse.Namespace, name: str) -> None:
        from vilbert.datasets.reader import FeatureStore

        self.name = name
        self.store = FeatureStore.open(path)
        self.vw = ImageFeatureView(self.store, max_regions=37)
        self.out = _out_buffers(args.num_boxes, 2048, args.cls_prob, np.float16)
        self.payload = sum(a.nbytes for a in self.out.values())

    def read(self, image_id: str) -> None:
        rec = self.store.get(image_id)
        out = self.out
        np.copyto(out["features"], rec.features)
        np.copyto(out["boxes"], rec.boxes)
        if "cls_prob" in out:
            np.copyto(out["cls_prob"], rec.cls_prob)

    def view(self, image_id: str) -> dict:
        return _to_torch(self.vw.get(image_id))

    def close(self) -> None:
        self.store.close()


class PickleLMDBReader:
    """A re-creation of vilbert-multi-task's ``ImageFeaturesH5Reader`` (LMDB branch, ``in_memory=False``).

    Opened as the reference opens it; ``list.index`` on the pickled key list for every lookup; one read
    transaction and one ``pickle.loads`` per get. ``view`` adds the reference's [IMG] mean, 5-d locations
    and its task datasets' zero padding to ``max_region_num`` (float64 numpy, then ``torch.tensor(...).float()``).
    """

    name = "pickle-LMDB (vilbert-multi-task style)"

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        import lmdb

        self.env = lmdb.open(str(path), max_readers=1, readonly=True, lock=False, readahead=False, meminit=False)
        with self.env.begin(write=False) as txn:
            self._image_ids = pickle.loads(txn.get("keys".encode()))
        self.out = _out_buffers(args.num_boxes, 2048, args.cls_prob, np.float32)
        self.payload = sum(a.nbytes for a in self.out.values())
        self.max_region_num = 37

    def _item(self, image_id: str) -> dict:
        image_id = str(image_id).encode()
        index = self._image_ids.index(image_id)  # noqa: F841  (the reference's O(N) lookup)
        with self.env.begin(write=False) as txn:
            return pickle.loads(txn.get(image_id))

    def read(self, image_id: str) -> None:
        item = self._item(image_id)
        out = self.out
        np.copyto(out["features"], item["features"].reshape(-1, 2048))
        np.copyto(out["boxes"], item["boxes"].reshape(-1, 4))
        if "cls_prob" in out:
            np.copyto(out["cls_prob"], item["cls_prob"])

    def _getitem(self, image_id: str):
        item = self._item(image_id)
        image_h, image_w = int(item["image_h"]), int(item["image_w"])
        features = item["features"].reshape(-1, 2048)
        boxes = item["boxes"].reshape(-1, 4)
        num_boxes = features.shape[0]
        g_feat = np.sum(features, axis=0) / num_boxes
        num_boxes = num_boxes + 1
        features = np.concatenate([np.expand_dims(g_feat, axis=0), features], axis=0)
        image_location = np.zeros((boxes.shape[0], 5), dtype=np.float32)
        image_location[:, :4] = boxes
        image_location[:, 4] = ((image_location[:, 3] - image_location[:, 1])
                                * (image_location[:, 2] - image_location[:, 0]) / (float(image_w) * float(image_h)))
        image_location_ori = image_location.copy()
        image_location[:, 0] = image_location[:, 0] / float(image_w)
        image_location[:, 1] = image_location[:, 1] / float(image_h)
        image_location[:, 2] = image_location[:, 2] / float(image_w)
        image_location[:, 3] = image_location[:, 3] / float(image_h)
        g_location = np.array([0, 0, 1, 1, 1])
        image_location = np.concatenate([np.expand_dims(g_location, axis=0), image_location], axis=0)
        g_location_ori = np.array([0, 0, image_w, image_h, image_w * image_h])
        image_location_ori = np.concatenate([np.expand_dims(g_location_ori, axis=0), image_location_ori], axis=0)
        return features, num_boxes, image_location, image_location_ori

    def view(self, image_id: str) -> dict:
        import torch

        features, num_boxes, boxes, _ = self._getitem(image_id)
        mix_num_boxes = min(int(num_boxes), self.max_region_num)
        mix_boxes_pad = np.zeros((self.max_region_num, 5))
        mix_features_pad = np.zeros((self.max_region_num, 2048))
        image_mask = [1] * (int(mix_num_boxes))
        while len(image_mask) < self.max_region_num:
            image_mask.append(0)
        mix_boxes_pad[:mix_num_boxes] = boxes[:mix_num_boxes]
        mix_features_pad[:mix_num_boxes] = features[:mix_num_boxes]
        return {"features": torch.tensor(mix_features_pad).float(), "image_mask": torch.tensor(image_mask).long(),
                "spatials": torch.tensor(mix_boxes_pad).float()}

    def close(self) -> None:
        self.env.close()


# --------------------------------------------------------------------------------------------------------
# Driver

STORES = {  # name -> (subdirectory, builder)
    "memmap": ("memmap", build_memmap),
    "arrow": ("arrow", lambda p, a: build_ours(p, "arrow", a)),
    "lmdb": ("lmdb", lambda p, a: build_ours(p, "lmdb", a)),
    "pickle-lmdb": ("pickle-lmdb", build_pickle_lmdb),
}


def open_reader(name: str, path: Path, args: argparse.Namespace):
    if name == "memmap":
        return MemmapReader(path, args)
    if name == "pickle-lmdb":
        return PickleLMDBReader(path, args)
    return OurStoreReader(path, args, f"ours: {name}")


def time_calls(fn: Callable[[str], object], ids: Sequence[str], repeat: int) -> list[float]:
    """Samples/s of calling ``fn`` on every id, ``repeat`` times."""
    rates = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        for image_id in ids:
            fn(image_id)
        rates.append(len(ids) / (time.perf_counter() - t0))
    return rates


def estimate_bytes(args: argparse.Namespace) -> int:
    per = args.num_boxes * (2048 * 2 + 16 + (1601 * 2 if args.cls_prob else 0))
    return int(args.num_records * per * (3 + 2) * 1.05)  # 3 fp16 copies + one fp32 pickle copy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-records", type=int, default=20000)
    parser.add_argument("--num-boxes", type=int, default=36)
    parser.add_argument("--no-cls-prob", dest="cls_prob", action="store_false", help="features + boxes only")
    parser.add_argument("--reads", type=int, default=4000, help="random reads per timed pass")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per reader and mode (median reported)")
    parser.add_argument("--readers", default="memmap,arrow,lmdb,pickle-lmdb")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/vilbert-bench-loader"))
    parser.add_argument("--keep", action="store_true", help="keep the stores (a re-run with the same settings reuses them)")
    parser.add_argument("--markdown", type=Path, help="append the results as markdown to this file")
    args = parser.parse_args(argv)
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    for r in readers:
        if r not in STORES:
            parser.error(f"unknown reader {r!r}; choose from {', '.join(STORES)}")

    tag = f"n{args.num_records}-b{args.num_boxes}-{'cls' if args.cls_prob else 'nocls'}"
    root = args.data_dir / tag
    root.mkdir(parents=True, exist_ok=True)
    need = estimate_bytes(args) - sum(dir_bytes(root / STORES[r][0]) for r in readers if (root / STORES[r][0] / ".done").exists())
    free = shutil.disk_usage(root).free
    if need > free:
        print(f"error: need about {need / 1e9:.1f} GB under {root}, only {free / 1e9:.1f} GB free; "
              f"use --data-dir or fewer --num-records", file=sys.stderr)
        return 1
    import torch

    torch.set_num_threads(1)  # what a DataLoader worker runs with; the machine's other core is not ours
    print(machine_line())
    for r in readers:
        sub = root / STORES[r][0]
        if (sub / ".done").exists():
            print(f"reusing {sub}")
            continue
        shutil.rmtree(sub, ignore_errors=True)
        t0 = time.perf_counter()
        STORES[r][1](sub, args)
        (sub / ".done").write_text("ok")
        print(f"built {r} in {time.perf_counter() - t0:.1f} s ({dir_bytes(sub) / 1e9:.2f} GB)")

    rng = np.random.default_rng(1)
    all_ids = [f"COCO_train2014_{i:06d}" for i in range(args.num_records)]
    ids = [all_ids[i] for i in rng.integers(0, args.num_records, args.reads)]
    results = {}
    for r in readers:
        sub = root / STORES[r][0]
        t0 = time.perf_counter()
        warmed = warm_files([sub])
        print(f"warmed {r}: {warmed / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
        reader = open_reader(r, sub, args)
        # First touch: every record once, in random order. The pages are in the page cache, but this process
        # has not mapped them yet, so each 4 KB page costs a minor fault (mmap readers: memmap, Arrow, LMDB).
        # A long-running worker reaches the steady state measured next.
        first = time_calls(reader.read, [all_ids[i] for i in rng.permutation(args.num_records)], 1)[0]
        rec_rates = time_calls(reader.read, ids, args.repeat)
        view_rates = time_calls(reader.view, ids, args.repeat)
        results[r] = (reader.name, reader.payload, statistics.median(rec_rates), statistics.median(view_rates),
                      rec_rates, view_rates, first)
        print(f"{reader.name}: first touch {first:,.0f}/s, record {statistics.median(rec_rates):,.0f}/s, "
              f"view {statistics.median(view_rates):,.0f}/s")
        reader.close()
        del reader
        gc.collect()

    header = ["reader", "payload KB", "record reads/s (best)", "MB/s", "vs pickle-LMDB", "vs memmap",
              "ViLBERT view/s (best)", "view vs pickle-LMDB", "view vs memmap", "first-touch reads/s"]
    rows = []
    base = results.get("pickle-lmdb")
    floor = results.get("memmap")
    for r in readers:
        name, payload, rec, view, rec_all, view_all, first = results[r]
        rows.append([
            name, f"{payload / 1e3:.0f}", f"{rec:,.0f} ({max(rec_all):,.0f})", f"{rec * payload / 1e6:,.0f}",
            f"{rec / base[2]:.1f}x" if base else "-", f"{rec / floor[2]:.0%}" if floor else "-",
            f"{view:,.0f} ({max(view_all):,.0f})", f"{view / base[3]:.1f}x" if base else "-", f"{view / floor[3]:.0%}" if floor else "-",
            f"{first:,.0f}",
        ])
    table = markdown_table(header, rows)
    cls = " + 36x1601 fp16 cls_prob" if args.cls_prob else ""
    text = (f"\n### Loader, {args.num_records} records of {args.num_boxes}x2048 fp16{cls}, page-cached\n\n"
            f"Machine: {machine_line()}\n\n"
            f"Steady state: after one first-touch pass over all records, {args.reads} random reads per pass, "
            f"median of {args.repeat} passes (best pass in brackets; ratios use medians), one process, "
            f"torch.set_num_threads(1).\n\n{table}\n\n"
            "All passes (samples/s, record / view): "
            + "; ".join(f"{r}: {[round(x) for x in results[r][4]]} / {[round(x) for x in results[r][5]]}"
                        for r in readers) + "\n")
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(text)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root} (use --keep to reuse it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
