import json
import os
import signal
import subprocess
import sys
import time

import h5py
import pytest

from vilbert.datasets.pack import pack
from vilbert.datasets.reader import FeatureStore
from vilbert.datasets.validate import validate_store
from vilbert.datasets.writer import PackConfig
from tests.conftest import make_record
from tests.conftest import make_record

NUM = 200


def _volta_h5(path, n=NUM):
    with h5py.File(path, "w") as f:
        for i in range(n):
            r = make_record(f"im{i:04d}", num_boxes=1 + i % 5, dim=64, num_classes=None, seed=i)
            g = f.create_group(r.image_id)
            g["features"], g["boxes"], g["img_h"], g["img_w"] = r.features, r.boxes, r.image_h, r.image_w
    return path


def _cmd(src, out, fmt):
    return [sys.executable, "-m", "vilbert.cli", "--quiet", "pack", "--format", fmt, "--from", str(src),
            "--out", str(out), "--shard-size-mb", "0.002"]


def _check_complete(out):
    report = validate_store(out)
    assert report.ok, report.problems
    ids = list(FeatureStore.open(out).image_ids)
    assert ids == [f"im{i:04d}" for i in range(NUM)]  # every id exactly once, in stream order


@pytest.mark.parametrize("fmt", ["arrow", "lmdb", "hdf5"])
def test_sigkilled_pack_cli_resumes_to_a_valid_store(tmp_path, fmt):
    src = _volta_h5(tmp_path / "src.h5")
    out = tmp_path / "out"
    interrupted = 0
    for kill_after_shards in (1, 3, 6):
        proc = subprocess.Popen(_cmd(src, out, fmt), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.glob("shards/*.done.json"))) >= kill_after_shards:
                break
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if (out / "manifest.json").exists():
            break  # finished before the kill point
        interrupted += 1
        with pytest.raises(Exception):
            FeatureStore.open(out)  # nothing half-published
    assert interrupted >= 1, "no run was killed midway: make the source larger"
    done = subprocess.run(_cmd(src, out, fmt), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _check_complete(out)
    assert not list((out / "shards").glob("*.tmp")) and not list((out / "shards").glob("*.done.json"))


class _Boom(Exception):
    pass


def test_crash_between_shard_rename_and_sidecar(tmp_path):
    """A shard renamed into place whose completion record never got written is redone, not kept twice."""
    src = _volta_h5(tmp_path / "src.h5")
    out = tmp_path / "out"
    cfg = PackConfig(shard_size_bytes=2000)
    pack([src], out, cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    # Rebuild the state of a crash: no manifest/index, sidecars for the first 3 shards only, the 4th
    # shard published without sidecar, and a temp file of the 5th.
    (out / "manifest.json").unlink()
    (out / "index.arrow").unlink()
    shard_dir = out / "shards"
    names = [s["name"].split("/")[1] for s in manifest["shards"]]
    for name in names[5:]:
        (shard_dir / name).unlink()
    (shard_dir / names[4]).rename(shard_dir / (names[4] + ".tmp"))
    from vilbert.datasets.pack import pack_fingerprint
    fp = pack_fingerprint([src], cfg, None)
    consumed = 0
    for i, s in enumerate(manifest["shards"][:3]):
        store_rows = s["num_records"]
        ids = [f"im{j:04d}" for j in range(consumed, consumed + store_rows)]
        consumed += store_rows
        sidecar = {"shard": s["name"], "storage": "arrow", "format_version": 1, "fingerprint": fp,
                   "num_records": store_rows, "size_bytes": s["size_bytes"], "sha256": s["sha256"],
                   "stream_end": consumed, "layout": {"feature_dim": 64, "feature_dtype": "float16", "fields": {}},
                   "ids": ids, "num_boxes": [1 + int(j[2:]) % 5 for j in ids],
                   "failures": {"count": 0, "examples": []}}
        (shard_dir / (names[i] + ".done.json")).write_text(json.dumps(sidecar))
    result = pack([src], out, cfg)
    assert result.num_resumed == consumed
    _check_complete(out)


def test_generator_crash_then_resume(tmp_path, monkeypatch):
    src = _volta_h5(tmp_path / "src.h5", n=NUM)
    out = tmp_path / "out"
    cfg = PackConfig(format="lmdb", shard_size_bytes=3000)
    from vilbert.datasets import hdf5_store

    real_iter = hdf5_store.Hdf5Source.__iter__

    def crashing_iter(self):
        for i, item in enumerate(real_iter(self)):
            if i == 90:
                raise _Boom("power cut")
            yield item

    monkeypatch.setattr(hdf5_store.Hdf5Source, "__iter__", crashing_iter)
    with pytest.raises(_Boom):
        pack([src], out, cfg)
    assert list((out / "shards").glob("*.done.json")) and not (out / "manifest.json").exists()
    monkeypatch.setattr(hdf5_store.Hdf5Source, "__iter__", real_iter)
    result = pack([src], out, cfg)
    assert 0 < result.num_resumed <= 90
    _check_complete(out)


def test_resume_from_a_store_reads_only_what_is_left(tmp_path, monkeypatch):
    from vilbert.datasets.pack import StoreSource
    from vilbert.datasets.writer import StoreWriter
    src, out = tmp_path / "src", tmp_path / "out"
    with StoreWriter(src, PackConfig()) as w:
        for i in range(60):
            w.write(make_record(f"s{i:02d}", num_boxes=4, seed=i))
    cfg = PackConfig(format="arrow", shard_size_bytes=3000)
    real_iter_from = StoreSource.iter_from

    def crashing(self, start):
        for i, item in enumerate(real_iter_from(self, start)):
            if i == 40:
                raise _Boom("power cut")
            yield item

    monkeypatch.setattr(StoreSource, "iter_from", crashing)
    with pytest.raises(_Boom):
        pack([src], out, cfg)
    monkeypatch.setattr(StoreSource, "iter_from", real_iter_from)
    reads = []
    real_getitem = FeatureStore.__getitem__
    monkeypatch.setattr(FeatureStore, "__getitem__", lambda self, p: reads.append(p) or real_getitem(self, p))
    result = pack([src], out, cfg)
    assert 0 < result.num_resumed <= 40
    # the first item is peeked (layout checks), then only the uncovered positions are read
    assert reads == [0] + list(range(result.num_resumed, 60))
    assert validate_store(out).ok
    assert list(FeatureStore.open(out).image_ids) == [f"s{i:02d}" for i in range(60)]
