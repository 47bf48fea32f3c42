import json

import pytest
from click.testing import CliRunner

import vilbert
from vilbert.cli import cli
from vilbert.datasets.reader import FeatureStore
from vilbert.datasets.writer import PackConfig, StoreWriter
from vilbert.errors import SourceNotFoundError
from tests.conftest import make_record


@pytest.fixture
def runner():
    return CliRunner()


def _store(path, n=6, prefix="img", fmt="arrow"):
    with StoreWriter(path, PackConfig(format=fmt)) as w:
        for i in range(n):
            w.write(make_record(f"{prefix}{i}", num_boxes=1 + i, seed=i))
    return str(path)


@pytest.mark.parametrize("args", [["--help"], ["pack", "--help"], ["inspect", "--help"], ["validate", "--help"]])
def test_help_everywhere(runner, args):
    res = runner.invoke(cli, args)
    assert res.exit_code == 0 and "Usage:" in res.output


def test_version(runner):
    res = runner.invoke(cli, ["--version"])
    assert res.exit_code == 0 and vilbert.__version__ in res.output


def test_help_imports_no_heavy_modules():
    import subprocess
    import sys
    code = ("import sys; from vilbert.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'lmdb', 'h5py', 'detectron2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("fmt", ["arrow", "lmdb", "hdf5"])
def test_pack_inspect_validate(runner, tmp_path, fmt):
    a, b = _store(tmp_path / "a"), _store(tmp_path / "b", prefix="other", fmt="lmdb")
    out = str(tmp_path / "out")
    res = runner.invoke(cli, ["pack", "--format", fmt, "--from", a, b, "--out", out, "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert "packed 12 records" in res.output
    store = FeatureStore.open(out)
    assert len(store) == 12 and store.manifest.feature_dtype == "float32" and store.manifest.storage == fmt
    res = runner.invoke(cli, ["inspect", out])
    assert res.exit_code == 0 and "records      12" in res.output and "boxes/image" in res.output
    res = runner.invoke(cli, ["inspect", "--json", out])
    assert json.loads(res.output)["num_records"] == 12
    res = runner.invoke(cli, ["validate", out])
    assert res.exit_code == 0 and "ok:" in res.output and "12 records" in res.output


def test_repeated_from_option(runner, tmp_path):
    a, b = _store(tmp_path / "a"), _store(tmp_path / "b", prefix="x")
    res = runner.invoke(cli, ["pack", "--from", a, "--from", b, "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert len(FeatureStore.open(tmp_path / "o")) == 12


def test_missing_path_is_one_line_error(runner, tmp_path):
    res = runner.invoke(cli, ["pack", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "nope: no such file or directory" in lines[-1]
    assert "Traceback" not in res.output


def test_debug_shows_the_exception(runner, tmp_path):
    res = runner.invoke(cli, ["--debug", "inspect", str(tmp_path / "nope")])
    assert res.exit_code != 0 and isinstance(res.exception, SourceNotFoundError)


def test_validate_names_damaged_shard_and_exits_nonzero(runner, tmp_path):
    path = _store(tmp_path / "s")
    store = FeatureStore.open(path)
    shard = tmp_path / "s" / store.manifest.shards[0].name
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = runner.invoke(cli, ["validate", path])
    assert res.exit_code == 1
    assert "damaged:" in res.output and "part-00000.arrow" in res.output and "'img0'" in res.output


def test_bad_records_exit_one_unless_allowed(runner, tmp_path):
    import h5py
    with h5py.File(tmp_path / "v.h5", "w") as f:
        for i in range(4):
            r = make_record(f"h{i}", num_boxes=3, num_classes=None, seed=i)
            g = f.create_group(r.image_id)
            g["features"], g["img_h"], g["img_w"] = r.features, r.image_h, r.image_w
            g["boxes"] = r.boxes if i != 2 else r.boxes[:, :2]
    src = str(tmp_path / "v.h5")
    res = runner.invoke(cli, ["pack", "--from", src, "--out", str(tmp_path / "o1")])
    assert res.exit_code == 1 and "packed 3 records" in res.output
    assert "failed: " in res.output and "v.h5: record 'h2'" in res.output
    assert len(FeatureStore.open(tmp_path / "o1")) == 3  # the good records are published
    res = runner.invoke(cli, ["pack", "--from", src, "--out", str(tmp_path / "o2"), "--max-failures", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["pack", "--from", src, "--out", str(tmp_path / "o3"), "--max-failures", "-1"])
    assert res.exit_code == 0, res.output


def test_existing_store_needs_overwrite(runner, tmp_path):
    a = _store(tmp_path / "a")
    out = str(tmp_path / "o")
    assert runner.invoke(cli, ["pack", "--from", a, "--out", out]).exit_code == 0
    res = runner.invoke(cli, ["pack", "--from", a, "--out", out])
    assert res.exit_code == 1 and "--overwrite" in res.output
    assert runner.invoke(cli, ["pack", "--from", a, "--out", out, "--overwrite", "--format", "lmdb"]).exit_code == 0


def test_lmdb_map_full_via_cli(runner, tmp_path):
    with StoreWriter(tmp_path / "a", PackConfig()) as w:
        for i in range(6):
            w.write(make_record(f"m{i}", num_boxes=60 if i >= 3 else 20, dim=512, seed=i))
    res = runner.invoke(cli, ["pack", "--format", "lmdb", "--from", str(tmp_path / "a"), "--out",
                              str(tmp_path / "o"), "--lmdb-map-size-mb", "0.0625", "--shard-size-mb", "0.04"])
    assert res.exit_code == 1
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "part-0000" in line and "record 'm3'" in line and "full" in line


def test_legacy_bad_inputs_via_cli(runner, tmp_path):
    from tests.datasets import legacy_layouts
    recs = [make_record(f"t{i}", num_boxes=3, dim=32, num_classes=None, seed=i) for i in range(3)]
    # A vilbert LMDB whose key list was never written (an interrupted conversion).
    db = legacy_layouts.write_vilbert_lmdb(tmp_path / "mt.lmdb", recs, write_keys=False)
    res = runner.invoke(cli, ["pack", "--from", str(db), "--trust-pickle", "--out", str(tmp_path / "o1")])
    assert res.exit_code == 1
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "mt.lmdb" in line and "keys" in line
    assert not (tmp_path / "o1" / "manifest.json").exists()
    # Pickled values without --trust-pickle: refused, nothing written.
    db2 = legacy_layouts.write_vilbert_lmdb(tmp_path / "mt2.lmdb", recs)
    res = runner.invoke(cli, ["pack", "--from", str(db2), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "--trust-pickle" in res.output and not (tmp_path / "o2").exists()
    # A TSV row with broken base64: that record is named, the others are packed.
    tsv = legacy_layouts.write_butd_tsv(tmp_path / "feats.tsv", recs)
    lines = tsv.read_bytes().split(b"\r\n")
    cols = lines[1].split(b"\t")
    cols[5] = cols[5][:-7] + b"!!!"
    lines[1] = b"\t".join(cols)
    tsv.write_bytes(b"\r\n".join(lines))
    res = runner.invoke(cli, ["pack", "--from", str(tsv), "--out", str(tmp_path / "o3")])
    assert res.exit_code == 1 and "feats.tsv: record 't1'" in res.output
    assert list(FeatureStore.open(tmp_path / "o3").image_ids) == ["t0", "t2"]
