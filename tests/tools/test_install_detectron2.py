"""Unit tests of tools/install_detectron2.py: verified patches, source choice, wheel cache, decisions of main()."""

from __future__ import annotations

import dataclasses
import importlib.util
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "install_detectron2.py"


@pytest.fixture(scope="module")
def inst():
    spec = importlib.util.spec_from_file_location("install_detectron2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# ---------------------------------------------------------------------------------------------------------
# Text patches
# ---------------------------------------------------------------------------------------------------------
def test_text_patch_replaces_exactly_the_expected_occurrences(inst):
    patch = inst.TextPatch("6", "a.py", "dtype=np.int)", "dtype=int)", count=2)
    text = "x = f(dtype=np.int)\ny = g(dtype=np.int)\nz = h(dtype=np.int64)\n"
    new, status = inst.apply_text_patch(text, patch)
    assert status == "applied"
    assert new == "x = f(dtype=int)\ny = g(dtype=int)\nz = h(dtype=np.int64)\n"


def test_text_patch_missing_anchor_raises_naming_fix_and_file(inst):
    patch = inst.TextPatch("4", "detectron2/data/transforms/transform.py", "interp=Image.LINEAR,", "x")
    with pytest.raises(inst.PatchError, match=r"fix 4: expected 1 occurrence\(s\) of 'interp=Image.LINEAR,' "
                                              r"in detectron2/data/transforms/transform\.py, found 0"):
        inst.apply_text_patch("def f(interp=Image.BILINEAR, fill=0): pass\n", patch)


@pytest.mark.parametrize("strict", [True, False])
def test_text_patch_wrong_count_raises_even_when_lenient(inst, strict):
    patch = inst.TextPatch("6", "m.py", "np.bool)", "bool)", count=3)
    with pytest.raises(inst.PatchError, match="expected 3 .* found 2"):
        inst.apply_text_patch("a(np.bool)\nb(np.bool)\n", patch, strict=strict)


def test_text_patch_lenient_reports_fix_already_upstream(inst):
    patch = inst.TextPatch("5", "model_zoo.py", "import pkg_resources\n", "")
    text = "import os\nimport torch\n"
    assert inst.apply_text_patch(text, patch, strict=False) == (text, "already")
    with pytest.raises(inst.PatchError):
        inst.apply_text_patch(text, patch, strict=True)


def _fake_sdist_tree(inst, root: Path) -> None:
    """A tree in which every PyPI patch anchor occurs exactly as often as the real sdist has it."""
    files: dict[str, list[str]] = {}
    for p in inst.PYPI_PATCHES:
        if isinstance(p, inst.TextPatch):
            files.setdefault(p.path, []).extend([p.old] * p.count)
        elif isinstance(p, inst.MoveDir):
            for i in range(p.min_files):
                f = root / p.src / "COCO-Detection" / f"cfg_{i}.yaml"
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(f"i: {i}\n")
    for rel, parts in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n#--\n".join(parts) + "\n")


def test_pypi_patch_set_applies_once_and_refuses_a_second_time(inst, tmp_path):
    _fake_sdist_tree(inst, tmp_path)
    report = inst.apply_patches(tmp_path, inst.PYPI_PATCHES, strict=True)
    assert [r["status"] for r in report] == ["applied"] * len(inst.PYPI_PATCHES)
    assert {r["fix"] for r in report} == {"name", "1", "2", "3", "4", "5", "6"}
    assert all(r["upstream"] for r in report), "every patch names its upstream commit (or why there is none)"
    setup = (tmp_path / "setup.py").read_text()
    assert 'name="detectron2",' in setup and "ext_modules=[]," in setup and "get_extensions()" not in setup
    zoo = (tmp_path / "detectron2/model_zoo/model_zoo.py").read_text()
    assert "pkg_resources" not in zoo and "os.path.dirname(__file__)" in zoo
    assert (tmp_path / "detectron2/_C.py").is_file()
    assert (tmp_path / "configs/COCO-Detection").is_dir() and not (tmp_path / "detectron2/model_zoo/configs").exists()
    for rel in ("detectron2/structures/masks.py", "detectron2/evaluation/sem_seg_evaluation.py",
                "detectron2/data/build.py", "detectron2/data/datasets/pascal_voc.py"):
        assert "np.bool" not in (tmp_path / rel).read_text()
        assert "np.int" not in (tmp_path / rel).read_text() and "np.float" not in (tmp_path / rel).read_text()
    # strict: a tree that is not the pinned sdist (here: already patched) is refused, not half-patched
    with pytest.raises(inst.PatchError):
        inst.apply_patches(tmp_path, inst.PYPI_PATCHES, strict=True)
    # lenient (git checkout): everything is reported as already fixed
    again = inst.apply_patches(tmp_path, inst.PYPI_PATCHES, strict=False)
    assert {r["status"] for r in again} == {"already"}


def test_skip_fix_1_keeps_the_extension_build(inst, tmp_path):
    (tmp_path / "setup.py").write_text("setup(\n    ext_modules=get_extensions(),\n)\n")
    (tmp_path / "detectron2/model_zoo").mkdir(parents=True)
    (tmp_path / "detectron2/model_zoo/model_zoo.py").write_text("import os\n")  # fix 5 already upstream
    report = inst.apply_patches(tmp_path, inst.GIT_PATCHES, strict=False, skip_fixes=frozenset({"1"}))
    assert [r["status"] for r in report] == ["skipped", "already", "already"]
    assert "ext_modules=get_extensions()," in (tmp_path / "setup.py").read_text()


def test_missing_file_and_tree_preconditions_raise(inst, tmp_path):
    with pytest.raises(inst.PatchError, match="fix 4: .*transform.py not found"):
        inst.apply_patches(tmp_path, [inst.TextPatch("4", "detectron2/data/transforms/transform.py", "a", "b")])
    (tmp_path / "src_cfg").mkdir()
    (tmp_path / "src_cfg" / "one.yaml").write_text("a: 1\n")
    with pytest.raises(inst.PatchError, match="holds 1 files, expected >= 5"):
        inst.apply_patches(tmp_path, [inst.MoveDir("3", "src_cfg", "configs", min_files=5)])
    (tmp_path / "_C.py").write_text("")
    with pytest.raises(inst.PatchError, match="fix 2: _C.py already exists"):
        inst.apply_patches(tmp_path, [inst.NewFile("2", "_C.py", "x")])


def test_fingerprint_tracks_source_and_patch_text(inst):
    base = inst.patches_fingerprint("pypi:x", inst.PYPI_PATCHES)
    assert base == inst.patches_fingerprint("pypi:x", inst.PYPI_PATCHES)
    assert base != inst.patches_fingerprint("pypi:y", inst.PYPI_PATCHES)
    changed = list(inst.PYPI_PATCHES)
    changed[1] = dataclasses.replace(changed[1], new="ext_modules=[] ,")
    assert base != inst.patches_fingerprint("pypi:x", changed)


def test_marker_module_records_build(inst, tmp_path):
    (tmp_path / "detectron2").mkdir()
    report = [{"fix": "name", "path": "setup.py", "status": "applied"},
              {"fix": "5", "path": "m.py", "status": "already"}, {"fix": "1", "path": "setup.py", "status": "skipped"}]
    inst.write_marker(tmp_path, source="git:u@c", fingerprint="abc", report=report)
    ns: dict = {}
    exec((tmp_path / inst.MARKER_MODULE).read_text(), ns)
    assert ns["SOURCE"] == "git:u@c" and ns["FINGERPRINT"] == "abc" and ns["FIXES"] == ("5",)


# ---------------------------------------------------------------------------------------------------------
# Sources, wheels, cache
# ---------------------------------------------------------------------------------------------------------
def test_choose_source(inst):
    calls = []

    def reachable(answer):
        def f():
            calls.append(answer)
            return answer
        return f

    assert inst.choose_source("auto", reachable(True)) == "git"
    assert inst.choose_source("auto", reachable(False)) == "pypi"
    assert inst.choose_source("pypi", reachable(True)) == "pypi"
    assert calls == [True, False]  # pypi never probes the network
    with pytest.raises(inst.InstallError, match="--source git: .* not reachable"):
        inst.choose_source("git", reachable(False))


@pytest.mark.skipif(not __import__("shutil").which("git"), reason="git not installed")
def test_git_probe_fails_fast_when_the_server_never_answers(inst):
    # A listening socket that never speaks HTTP: git would wait for minutes; the probe gives up on time.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/detectron2.git"
        t0 = time.monotonic()
        assert inst.git_reachable(url, timeout_s=1.0) is False
        assert time.monotonic() - t0 < 10
    # connection refused: immediate
    assert inst.git_reachable(url, timeout_s=5.0) is False


def _zip(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            z.writestr(n, "")
    return path


def test_verify_wheel(inst, tmp_path):
    good = [f"detectron2/model_zoo/configs/{inst.MODEL_ZOO_CONFIG}", inst.MARKER_MODULE, "detectron2/__init__.py"]
    inst.verify_wheel(_zip(tmp_path / "good.whl", good), pure=True)
    with pytest.raises(inst.InstallError, match="lacks .*faster_rcnn_R_101_C4_3x.yaml"):
        inst.verify_wheel(_zip(tmp_path / "noconf.whl", good[1:]), pure=True)
    compiled = _zip(tmp_path / "so.whl", good + ["detectron2/_C.cpython-311-x86_64-linux-gnu.so"])
    with pytest.raises(inst.InstallError, match="compiled code"):
        inst.verify_wheel(compiled, pure=True)
    inst.verify_wheel(compiled, pure=False)


def test_wheel_cache_is_written_atomically(inst, tmp_path, monkeypatch):
    monkeypatch.setenv("VILBERT_CACHE", str(tmp_path / "cache"))
    assert inst.cache_dir() == tmp_path / "cache" / "wheels"
    built = tmp_path / "detectron2-0.6+vilbert.pb1-py3-none-any.whl"
    built.write_bytes(b"PK wheel bytes")
    dest_dir = inst.cache_dir() / "detectron2-abc"
    assert inst.cached_wheel(dest_dir) is None
    stored = inst._store_in_cache(built, dest_dir)
    assert stored.read_bytes() == b"PK wheel bytes"
    assert inst.cached_wheel(dest_dir) == stored
    assert [p.name for p in dest_dir.iterdir()] == [built.name]  # no temp file left behind


# ---------------------------------------------------------------------------------------------------------
# main(): decisions, with the expensive steps replaced
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_steps(inst, monkeypatch):
    calls: list = []
    monkeypatch.setattr(inst, "obtain_and_install",
                        lambda source, build_ext: calls.append(("install", source, build_ext))
                        or {"source": source, "cached": True})
    monkeypatch.setattr(inst, "self_check", lambda: calls.append(("self_check",)) or {"detectron2": "0.6"})
    monkeypatch.setattr(inst, "pip_check", lambda: None)
    monkeypatch.setattr(inst, "git_reachable", lambda *a, **k: False)
    return calls


def _state(inst, build=None):
    return {"importable": True, "version": "0.6", "path": "/x/detectron2", "distribution": "detectron2 0.6",
            "vilbert_build": build}


def test_main_keeps_a_working_detectron2(inst, fake_steps, monkeypatch):
    monkeypatch.setattr(inst, "probe", lambda: _state(inst))  # a user's own detectron2 (no vilbert marker)
    assert inst.main([]) == 0
    label = f"pypi:{inst.PYPI_REQUIREMENT}"
    monkeypatch.setattr(inst, "probe", lambda: _state(inst, {"source": label,
                                                             "fingerprint": inst.expected_fingerprint(label)}))
    assert inst.main([]) == 0
    assert fake_steps == []


def test_main_rebuilds_a_stale_vilbert_build(inst, fake_steps, monkeypatch):
    label = f"pypi:{inst.PYPI_REQUIREMENT}"
    monkeypatch.setattr(inst, "probe", lambda: _state(inst, {"source": label, "fingerprint": "old"}))
    assert inst.main([]) == 0
    assert fake_steps == [("install", "pypi", False), ("self_check",)]


def test_main_installs_when_missing_and_falls_back_from_git(inst, fake_steps, monkeypatch):
    monkeypatch.setattr(inst, "probe", lambda: {"importable": False, "error": "No module named 'detectron2'"})
    monkeypatch.setattr(inst, "git_reachable", lambda *a, **k: True)

    def obtain(source, build_ext):
        fake_steps.append(("install", source, build_ext))
        if source == "git":
            raise inst.InstallError("git clone failed")
        return {"source": source, "cached": False}

    monkeypatch.setattr(inst, "obtain_and_install", obtain)
    assert inst.main(["--source", "auto"]) == 0
    assert fake_steps == [("install", "git", False), ("install", "pypi", False), ("self_check",)]


def test_main_fails_with_a_clear_message(inst, fake_steps, monkeypatch, caplog):
    monkeypatch.setattr(inst, "probe", lambda: {"importable": False, "error": "No module named 'detectron2'"})
    assert inst.main(["--source", "pypi", "--build-ext"]) == 1
    assert "--build-ext needs the C++ sources" in caplog.text
    assert inst.main(["--check-only"]) == 1
    assert "does not import here" in caplog.text
    assert inst.main(["--source", "git"]) == 1  # unreachable: no fallback when git was asked for
    assert "not reachable" in caplog.text
    assert fake_steps == []


@pytest.mark.slow  # a fresh interpreter importing torch and detectron2: ~5 s
def test_script_run_is_a_quick_no_op_when_detectron2_works():
    pytest.importorskip("detectron2")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "already importable" in proc.stderr and "nothing to do" in proc.stderr


def test_installed_vilbert_build_carries_every_pypi_patch(inst):
    """The installed files no longer contain any anchor text of the PyPI patches (each one took effect)."""
    pytest.importorskip("detectron2")
    if importlib.util.find_spec("detectron2._vilbert_build") is None:
        pytest.skip("detectron2 was not built by tools/install_detectron2.py")
    import detectron2
    from detectron2 import _vilbert_build

    if not _vilbert_build.SOURCE.startswith("pypi:"):
        pytest.skip("built from git")
    site = Path(detectron2.__path__[0]).parent
    for p in inst.PYPI_PATCHES:
        if isinstance(p, inst.TextPatch) and p.path.startswith("detectron2/"):
            assert p.old not in (site / p.path).read_text(), f"fix {p.fix} missing in {p.path}"
    assert (site / "detectron2/_C.py").is_file()
    assert (site / "detectron2/model_zoo/configs" / inst.MODEL_ZOO_CONFIG).is_file()
