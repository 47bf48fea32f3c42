"""Install detectron2 into the running interpreter's environment: keep a working one, else build it from source.

Strategy (docs/install.md explains it in full):

1. ``detectron2`` already imports (with ``detectron2.modeling.build_model``): keep it, exit 0.
2. The official repository is reachable (``git ls-remote`` with a short timeout): clone the pinned commit
   ``GIT_COMMIT`` (>= 710e7795, so it imports without ``_C``), apply the fixes it still needs, build a
   wheel and install it. By default the C++/CUDA extension is *not* built (``ext_modules=[]``): the
   R101-C4 Faster R-CNN needs none of it, torchvision provides nms / roi_align / roi_pool. A user with a
   compiler (and nvcc) can pass ``--build-ext`` to get upstream's compiled ops.
3. Otherwise: download the ``pb1-detectron2==0.6`` sdist from PyPI (the upstream v0.6 Python tree
   without its C++ sources; sha256 pinned), apply the six minimal compatibility fixes as verified text
   patches, build a pure-Python wheel named ``detectron2`` (version ``0.6+vilbert.pb1``, so
   ``pip show detectron2`` works), cache it, and install it with its dependencies resolved against
   tools/constraints.txt (so torch is never replaced).

Every path ends with a self-check in a fresh interpreter: import, model-zoo config lookup, and a CPU
forward of the R101-C4 model with damped random weights on a small image.

Standard library only; run it with the target environment's python:
    .venv/bin/python tools/install_detectron2.py [--check-only] [--source {auto,git,pypi}] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("install_detectron2")

# ---------------------------------------------------------------------------------------------------------
# Pins
# ---------------------------------------------------------------------------------------------------------
GIT_URL = "https://github.com/facebookresearch/detectron2.git"
# A main-branch commit after 710e7795 (imports without _C, PR #3909), ff53992b (Pillow >= 10) and the four
# NumPy-alias commits; widely used with torch 2.x. Fix 5 (pkg_resources) is applied when still needed.
GIT_COMMIT = "a1ce2f956a1d2212ad672e3c47d53405c2fe4312"
PYPI_REQUIREMENT = "pb1-detectron2==0.6"
PYPI_SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
PYPI_SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
MODEL_ZOO_CONFIG = "COCO-Detection/faster_rcnn_R_101_C4_3x.yaml"
# Local version labels (PEP 440): the wheel says where its code came from.
PYPI_VERSION_SUFFIX = "+vilbert.pb1"
GIT_VERSION_SUFFIX = "+vilbert.git." + GIT_COMMIT[:7]
# Written into the built package so a later run (and the tests) can tell which fixes it carries.
MARKER_MODULE = "detectron2/_vilbert_build.py"

GIT_PROBE_TIMEOUT_S = 6.0  # a closed network must cost seconds, not minutes
GIT_CLONE_TIMEOUT_S = 600.0
PIP_NET_ARGS = ["--timeout", "20", "--retries", "1"]  # pip's defaults (15 s x 5 retries) stall offline

HERE = Path(__file__).resolve().parent
CONSTRAINTS = HERE / "constraints.txt"


class InstallError(Exception):
    """The installation cannot continue; the message says why and what to do."""


class PatchError(InstallError):
    """A compatibility patch could not be applied exactly as written (its anchor text is missing or ambiguous)."""


# ---------------------------------------------------------------------------------------------------------
# Patches: each one explicit, verified, and named after the upstream commit that made the same fix.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextPatch:
    """Replace ``old`` by ``new`` in one file, exactly ``count`` times.

    Attributes:
        fix: which of the six fixes (environment.md section 2.2) this belongs to, or "name".
        path: file path relative to the source root.
        old: anchor text that must occur exactly ``count`` times.
        new: replacement text.
        count: expected number of occurrences of ``old``.
        upstream: the upstream commit that made the same change, or why there is none.
    """

    fix: str
    path: str
    old: str
    new: str
    count: int = 1
    upstream: str = ""


@dataclasses.dataclass(frozen=True)
class NewFile:
    """Create a file that must not exist yet."""

    fix: str
    path: str
    text: str
    upstream: str = ""


@dataclasses.dataclass(frozen=True)
class MoveDir:
    """Move a directory that must exist to a destination that must not."""

    fix: str
    src: str
    dst: str
    min_files: int = 1  # sanity check on what is moved
    upstream: str = ""


_C_PLACEHOLDER = '''"""Stand-in for detectron2's C++/CUDA extension, which this pure-Python build does not contain.

Written by vilbert's tools/install_detectron2.py (fix 2). Faster R-CNN with torchvision ops needs nothing here;
rotated boxes, deformable convolution and the fast COCOeval do.
"""


def __getattr__(name):
    raise AttributeError(
        f"detectron2._C.{name} is unavailable: this detectron2 was built without its compiled ops; "
        "install detectron2 from source with a compiler to use them (see vilbert docs/install.md)"
    )
'''

# Fix 5 replacement: the config directory sits next to model_zoo.py in the installed package.
_ZOO_OLD_CALL = (
    "    cfg_file = pkg_resources.resource_filename(\n"
    '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
    "    )\n"
)
_ZOO_NEW_CALL = '    cfg_file = os.path.join(os.path.dirname(__file__), "configs", config_path)\n'
_FIX5_UPSTREAM = ("none in the commits environment.md lists; later upstream model_zoo.py (e.g. 03cd759c) "
                  "resolves the path the same way")

# The six fixes for the pb1-detectron2 0.6 sdist (upstream v0.6 code), in environment.md order.
PYPI_PATCHES: tuple = (
    TextPatch("name", "setup.py", 'name="pb1-detectron2",', 'name="detectron2",',
              upstream="packaging: upstream's own distribution name"),
    TextPatch("1", "setup.py", "ext_modules=get_extensions(),", "ext_modules=[],",
              upstream="none: the sdist lacks layers/csrc; upstream still builds _C"),
    NewFile("2", "detectron2/_C.py", _C_PLACEHOLDER,
            upstream="710e7795 (PR #3909) 'Make detectron2 usable without building C extensions'"),
    MoveDir("3", "detectron2/model_zoo/configs", "configs", min_files=100,
            upstream="none: setup.py symlinks top-level configs/ into the package, the sdist only has the copy"),
    TextPatch("4", "detectron2/data/transforms/transform.py", "interp=Image.LINEAR,", "interp=Image.BILINEAR,",
              upstream="ff53992b 'fix PIL.LINEAR warning'"),
    TextPatch("5", "detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "", upstream=_FIX5_UPSTREAM),
    TextPatch("5", "detectron2/model_zoo/model_zoo.py", _ZOO_OLD_CALL, _ZOO_NEW_CALL, upstream=_FIX5_UPSTREAM),
    # Fix 6: NumPy >= 1.24 removed the builtin aliases (19 occurrences).
    TextPatch("6", "detectron2/evaluation/pascal_voc_evaluation.py", ".astype(np.bool)", ".astype(bool)", 2,
              upstream="857d5de2"),
    TextPatch("6", "detectron2/structures/masks.py", "np.bool)", "bool)", 3, upstream="857d5de2"),
    TextPatch("6", "detectron2/utils/visualizer.py", ".astype(np.bool)", ".astype(bool)", 3, upstream="857d5de2"),
    TextPatch("6", "detectron2/utils/video_visualizer.py", "dtype=np.bool)", "dtype=bool)", 1,
              upstream="857d5de2"),
    TextPatch("6", "detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.int)", "dtype=int)", 2,
              upstream="027099d3"),
    TextPatch("6", "detectron2/data/build.py", "dtype=np.int)", "dtype=int)", 1, upstream="027099d3"),
    TextPatch("6", "detectron2/data/build.py", "dtype=np.int\n", "dtype=int\n", 1, upstream="027099d3"),
    TextPatch("6", "detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.float)", "dtype=float)", 2,
              upstream="54dd614e"),
    TextPatch("6", "detectron2/evaluation/sem_seg_evaluation.py", ".astype(np.float)", ".astype(float)", 3,
              upstream="54dd614e"),
    TextPatch("6", "detectron2/data/datasets/pascal_voc.py", "dtype=np.str)", "dtype=str)", 1,
              upstream="654570a2"),
)

# The pinned git commit already has fixes 2, 3 (top-level configs/), 4 and 6; it may still import
# pkg_resources (fix 5), and fix 1 applies unless the user builds the extension.
GIT_PATCHES: tuple = (
    TextPatch("1", "setup.py", "ext_modules=get_extensions(),", "ext_modules=[],",
              upstream="none: upstream builds _C; skipped with --build-ext"),
    TextPatch("5", "detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "", upstream=_FIX5_UPSTREAM),
    TextPatch("5", "detectron2/model_zoo/model_zoo.py", _ZOO_OLD_CALL, _ZOO_NEW_CALL, upstream=_FIX5_UPSTREAM),
)


def apply_text_patch(text: str, patch: TextPatch, *, strict: bool = True) -> tuple[str, str]:
    """Apply one text patch to a file's contents.

    Args:
        text: the file's current contents.
        patch: the patch.
        strict: require the anchor (the pinned sdist). When False (a git checkout), an anchor that does not
            occur at all means upstream already made the fix, which is reported as "already".

    Returns:
        (new_text, status) with status "applied" or "already".

    Raises:
        PatchError: the anchor occurs a different number of times than expected (or, when strict, not at all).
    """
    found = text.count(patch.old)
    if found == patch.count:
        return text.replace(patch.old, patch.new), "applied"
    if found == 0 and not strict:
        return text, "already"
    raise PatchError(
        f"fix {patch.fix}: expected {patch.count} occurrence(s) of {patch.old!r} in {patch.path}, found {found}; "
        "the source is not the pinned version, refusing to build a partly patched detectron2")


def apply_patches(root: Path, patches, *, strict: bool = True, skip_fixes: frozenset = frozenset()) -> list[dict]:
    """Apply patches to a source tree in order.

    Args:
        root: the unpacked source tree.
        patches: TextPatch / NewFile / MoveDir items.
        strict: see apply_text_patch; also applies to NewFile (exists) and MoveDir (source missing).
        skip_fixes: fix ids not to apply (e.g. {"1"} to keep the C++ extension).

    Returns:
        One dict per patch: fix, path, status ("applied", "already", "skipped"), upstream.

    Raises:
        PatchError: a patch does not fit the tree.
    """
    report = []
    for patch in patches:
        if patch.fix in skip_fixes:
            status = "skipped"
        elif isinstance(patch, TextPatch):
            path = root / patch.path
            if not path.is_file():
                raise PatchError(f"fix {patch.fix}: {patch.path} not found in {root}")
            new_text, status = apply_text_patch(path.read_text(encoding="utf-8"), patch, strict=strict)
            if status == "applied":
                path.write_text(new_text, encoding="utf-8")
        elif isinstance(patch, NewFile):
            path = root / patch.path
            if path.exists():
                if strict:
                    raise PatchError(f"fix {patch.fix}: {patch.path} already exists in {root}")
                status = "already"
            else:
                path.write_text(patch.text, encoding="utf-8")
                status = "applied"
        elif isinstance(patch, MoveDir):
            src, dst = root / patch.src, root / patch.dst
            if not src.is_dir() or dst.exists():
                if not strict and dst.is_dir() and not src.exists():
                    status = "already"
                else:
                    raise PatchError(f"fix {patch.fix}: expected directory {patch.src} and no {patch.dst} in {root}")
            else:
                n = sum(1 for p in src.rglob("*") if p.is_file())
                if n < patch.min_files:
                    raise PatchError(f"fix {patch.fix}: {patch.src} holds {n} files, expected >= {patch.min_files}")
                shutil.move(str(src), str(dst))
                status = "applied"
        else:  # pragma: no cover - internal invariant
            raise TypeError(f"unknown patch type {type(patch).__name__}")
        item = patch.path if not isinstance(patch, MoveDir) else f"{patch.src} -> {patch.dst}"
        report.append({"fix": patch.fix, "path": item, "status": status, "upstream": patch.upstream})
        logger.debug("fix %s %s: %s", patch.fix, item, status)
    return report


def patches_fingerprint(source: str, patches, extra: str = "") -> str:
    """A short hash of the source identity and the exact patch set (the wheel cache key)."""
    h = hashlib.sha256()
    h.update(source.encode())
    h.update(extra.encode())
    for p in patches:
        h.update(repr(dataclasses.asdict(p)).encode())
    return h.hexdigest()[:16]


def write_marker(root: Path, *, source: str, fingerprint: str, report: list[dict]) -> None:
    """Write detectron2/_vilbert_build.py into the tree: what was built, from where, with which fixes."""
    fixes = sorted({r["fix"] for r in report if r["status"] in ("applied", "already")} - {"name"})
    text = (
        '"""Written by vilbert tools/install_detectron2.py: how this detectron2 was built."""\n\n'
        f"SOURCE = {source!r}\n"
        f"FINGERPRINT = {fingerprint!r}\n"
        f"FIXES = {tuple(fixes)!r}\n"
        f"PATCHES = {tuple((r['fix'], r['path'], r['status']) for r in report)!r}\n"
    )
    (root / MARKER_MODULE).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Probing and self-check (in a fresh interpreter, so a failed import here never poisons the decision)
# ---------------------------------------------------------------------------------------------------------
_PROBE = r"""
import importlib, importlib.metadata as md, json, sys
out = {"importable": False}
try:
    import detectron2
    from detectron2.modeling import build_model  # noqa: F401
    out["importable"] = True
    out["version"] = getattr(detectron2, "__version__", "?")
    out["path"] = detectron2.__path__[0]
    spec = importlib.util.find_spec("detectron2._C")
    out["compiled_ops"] = bool(spec and spec.origin and not spec.origin.endswith(".py"))
    try:
        m = importlib.import_module("detectron2._vilbert_build")
        out["vilbert_build"] = {"source": m.SOURCE, "fingerprint": m.FINGERPRINT, "fixes": list(m.FIXES)}
    except ImportError:
        out["vilbert_build"] = None
    for name in ("detectron2", "pb1-detectron2"):
        try:
            out["distribution"] = f"{name} {md.version(name)}"
            break
        except md.PackageNotFoundError:
            pass
except Exception as e:  # report, do not crash: the caller decides
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""

# Build the R101-C4 model from the model zoo config on CPU with damped random weights (environment.md
# section 2.4: stock random init yields no proposals) and run one forward on a small image.
_SELF_CHECK = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import detectron2
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
t_import = time.perf_counter() - t0
path = model_zoo.get_config_file(sys.argv[1])
cfg = get_cfg()
cfg.merge_from_file(path)
cfg.MODEL.DEVICE = "cpu"
cfg.MODEL.WEIGHTS = ""
cfg.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]
cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 300
cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
torch.manual_seed(0)
t1 = time.perf_counter()
model = build_model(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("conv3.weight"):
            p.mul_(0.5)
t_build = time.perf_counter() - t1
g = torch.Generator().manual_seed(0)
image = torch.randint(0, 256, (3, 160, 224), generator=g, dtype=torch.uint8).float()
t2 = time.perf_counter()
with torch.no_grad():
    images = model.preprocess_image([{"image": image}])
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    instances, _ = model.roi_heads(images, features, proposals, None)
t_fwd = time.perf_counter() - t2
n = len(proposals[0])
print(json.dumps({"config": path, "proposals": n, "detections": len(instances[0]),
                  "import_s": round(t_import, 2), "build_s": round(t_build, 2), "forward_s": round(t_fwd, 2),
                  "torch": torch.__version__, "detectron2": detectron2.__version__}))
sys.exit(0 if n > 0 else 3)
"""


def _run_python(code: str, *args: str, timeout_s: float = 300.0) -> tuple[int, dict | None, str]:
    """Run code in a fresh interpreter of this environment; return (rc, parsed last JSON line, stderr)."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout_s)
    data = None
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            data = json.loads(line)
            break
        except ValueError:
            continue
    return proc.returncode, data, proc.stderr


def probe() -> dict:
    """Report whether detectron2 imports here, and what it is."""
    rc, data, err = _run_python(_PROBE, timeout_s=120)
    if data is None:
        raise InstallError(f"probing detectron2 failed (exit {rc}): {err.strip()[-500:]}")
    return data


def self_check() -> dict:
    """Import, resolve the R101-C4 model-zoo config and run one small CPU forward.

    Raises:
        InstallError: any step fails or the forward gives no proposals.
    """
    rc, data, err = _run_python(_SELF_CHECK, MODEL_ZOO_CONFIG)
    if rc != 0 or data is None:
        tail = err.strip().splitlines()[-1] if err.strip() else "no output"
        what = "produced no proposals" if rc == 3 else f"failed (exit {rc}): {tail}"
        raise InstallError(f"detectron2 self-check {what}")
    return data


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------
def _run_killable(cmd: list[str], timeout_s: float, env: dict) -> subprocess.CompletedProcess:
    """Run a command in its own process group and kill the whole group on timeout.

    git hands the network to a child (git-remote-https) that would keep our pipes open after a plain kill.

    Raises:
        subprocess.TimeoutExpired: the command ran longer than timeout_s.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def git_reachable(url: str = GIT_URL, timeout_s: float = GIT_PROBE_TIMEOUT_S) -> bool:
    """True if ``git ls-remote`` answers within ``timeout_s`` (respects the user's git/proxy settings)."""
    if shutil.which("git") is None:
        logger.info("git is not installed; skipping the official repository")
        return False
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="true")
    try:
        proc = _run_killable(["git", "ls-remote", "--exit-code", url, "HEAD"], timeout_s, env)
    except subprocess.TimeoutExpired:
        logger.info("%s did not answer within %.0f s", url, timeout_s)
        return False
    if proc.returncode != 0:
        logger.info("%s is not reachable: %s", url, (proc.stderr.strip().splitlines() or ["?"])[-1])
        return False
    return True


def cache_dir() -> Path:
    """Where built wheels are kept: $VILBERT_CACHE/wheels, else ~/.cache/vilbert/wheels."""
    base = os.environ.get("VILBERT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vilbert")
    return Path(base) / "wheels"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip(*args: str, timeout_s: float = 900.0) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    logger.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise InstallError(f"pip {args[0]} timed out after {timeout_s:.0f} s") from e
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise InstallError(f"pip {args[0]} failed (exit {proc.returncode}): " + " | ".join(lines[-4:]))


def fetch_pypi_source(workdir: Path) -> Path:
    """Download the pinned pb1-detectron2 sdist, check its sha256 and unpack it; return the source root."""
    dl = workdir / "download"
    # setup.py imports torch, so metadata preparation must see this environment's torch.
    try:
        _pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", *PIP_NET_ARGS,
             "-d", str(dl), PYPI_REQUIREMENT, timeout_s=300)
    except InstallError as e:
        raise InstallError(f"{e} -- is PyPI reachable? Offline, put a wheel built by this script on another "
                           f"machine into {cache_dir()}/detectron2-<fingerprint>/ (see docs/install.md)") from e
    sdist = dl / PYPI_SDIST_NAME
    if not sdist.is_file():
        raise InstallError(f"pip download did not produce {PYPI_SDIST_NAME} (got {sorted(os.listdir(dl))})")
    digest = _sha256(sdist)
    if digest != PYPI_SDIST_SHA256:
        raise InstallError(f"{sdist.name}: sha256 {digest} != pinned {PYPI_SDIST_SHA256}; refusing to build it")
    with tarfile.open(sdist) as tar:
        try:
            tar.extractall(workdir / "src", filter="data")  # refuses links and paths outside the target
        except TypeError:  # Python < 3.10.12 / 3.11.4 has no extraction filters
            tar.extractall(workdir / "src")
    return workdir / "src" / "pb1-detectron2-0.6"


def fetch_git_source(workdir: Path) -> Path:
    """Clone the official repository at GIT_COMMIT into workdir; return the source root."""
    root = workdir / "detectron2"
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    for cmd in (["git", "clone", "--quiet", "--filter=blob:none", "--no-checkout", GIT_URL, str(root)],
                ["git", "-C", str(root), "checkout", "--quiet", GIT_COMMIT]):
        try:
            proc = _run_killable(cmd, GIT_CLONE_TIMEOUT_S, env)
        except subprocess.TimeoutExpired as e:
            raise InstallError(f"{' '.join(cmd[:2])} timed out") from e
        if proc.returncode != 0:
            raise InstallError(f"{' '.join(cmd[:3])} failed: {proc.stderr.strip()[-300:]}")
    return root


def build_wheel(root: Path, out_dir: Path, version_suffix: str, build_ext: bool) -> Path:
    """Build a wheel from a patched tree with this environment's torch (no build isolation)."""
    env = dict(os.environ, D2_VERSION_SUFFIX=version_suffix)  # upstream setup.py appends it to __version__
    if build_ext and "FORCE_CUDA" not in env and (shutil.which("nvcc") or env.get("CUDA_HOME")):
        env["FORCE_CUDA"] = "1"  # build the CUDA kernels even on a build machine without a visible GPU
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--no-deps",
           "--no-build-isolation", "--no-cache-dir", "-w", str(out_dir), str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600 if build_ext else 600)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise InstallError("building the detectron2 wheel failed: " + " | ".join(lines[-4:]))
    wheels = sorted(out_dir.glob("detectron2-*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"expected one detectron2 wheel in {out_dir}, found {[w.name for w in wheels]}")
    return wheels[0]


def verify_wheel(wheel: Path, *, pure: bool) -> None:
    """Check the wheel holds the R101-C4 config, the marker module and (pure build) no compiled code."""
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    need = [f"detectron2/model_zoo/configs/{MODEL_ZOO_CONFIG}", MARKER_MODULE]
    missing = [n for n in need if n not in names]
    if missing:
        raise InstallError(f"{wheel.name} lacks {missing}; the build did not package what it should")
    if pure and any(n.endswith((".so", ".pyd")) for n in names):
        raise InstallError(f"{wheel.name} contains compiled code although ext_modules=[] was patched in")


def _store_in_cache(wheel: Path, dest_dir: Path) -> Path:
    """Copy a wheel into the cache atomically (temp name, fsync, rename)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / wheel.name
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".tmp-", suffix=".whl")
    try:
        with os.fdopen(fd, "wb") as out, open(wheel, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def cached_wheel(dest_dir: Path) -> Path | None:
    """The cached wheel in dest_dir, if exactly one is there."""
    wheels = sorted(dest_dir.glob("detectron2-*.whl")) if dest_dir.is_dir() else []
    return wheels[0] if len(wheels) == 1 else None


def install_wheel(wheel: Path) -> None:
    """pip-install the wheel and its dependencies, with the project's pins as constraints.

    Two steps: the wheel itself with --force-reinstall --no-deps (the version string of a rebuilt wheel may
    equal the installed one, and --force-reinstall with dependencies would reinstall torch), then the
    dependencies, resolved against tools/constraints.txt.
    """
    _pip("install", "--no-deps", "--force-reinstall", str(wheel))
    args = ["install", *PIP_NET_ARGS]
    if CONSTRAINTS.is_file():
        args += ["-c", str(CONSTRAINTS)]
    else:
        logger.warning("%s not found: dependencies are resolved without the project's pins", CONSTRAINTS)
    _pip(*args, str(wheel))


def obtain_and_install(source: str, *, build_ext: bool) -> dict:
    """Build (or take from the cache) and install detectron2 from "git" or "pypi"; return what was done."""
    if source == "git":
        patches, strict, label = GIT_PATCHES, False, f"git:{GIT_URL}@{GIT_COMMIT}"
        suffix = GIT_VERSION_SUFFIX + (".ext" if build_ext else "")
    else:
        patches, strict, label, suffix = PYPI_PATCHES, True, f"pypi:{PYPI_REQUIREMENT}", PYPI_VERSION_SUFFIX
    skip = frozenset({"1"}) if build_ext else frozenset()
    fingerprint = expected_fingerprint(label, build_ext)
    dest_dir = cache_dir() / f"detectron2-{fingerprint}"
    wheel = None if build_ext else cached_wheel(dest_dir)  # compiled builds depend on torch/CUDA: no cache
    done = {"source": label, "fingerprint": fingerprint, "cached": wheel is not None}
    if wheel is None:
        with tempfile.TemporaryDirectory(prefix="vilbert-d2-") as tmp:
            work = Path(tmp)
            t0 = time.perf_counter()
            root = fetch_git_source(work) if source == "git" else fetch_pypi_source(work)
            logger.info("fetched %s in %.1f s", label, time.perf_counter() - t0)
            report = apply_patches(root, patches, strict=strict, skip_fixes=skip)
            for r in report:
                logger.info("  fix %-4s %-50s %s  [upstream: %s]", r["fix"], r["path"], r["status"], r["upstream"])
            write_marker(root, source=label, fingerprint=fingerprint, report=report)
            t1 = time.perf_counter()
            built = build_wheel(root, work / "dist", suffix, build_ext)
            verify_wheel(built, pure=not build_ext)
            logger.info("built %s in %.1f s", built.name, time.perf_counter() - t1)
            wheel = built if build_ext else _store_in_cache(built, dest_dir)
            if build_ext:
                install_wheel(wheel)
                done["wheel"] = str(wheel.name)
                return done
    else:
        logger.info("using cached wheel %s", wheel)
    install_wheel(wheel)
    done["wheel"] = str(wheel)
    return done


def pip_check() -> str | None:
    """Run ``pip check``; return its complaint, or None when clean."""
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "check"],
                          capture_output=True, text=True, timeout=120)
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()


def expected_fingerprint(source_label: str, build_ext: bool = False) -> str | None:
    """The fingerprint this script gives a build of the source recorded in a marker (None: unknown source)."""
    if source_label.startswith("pypi:"):
        patches, suffix = PYPI_PATCHES, PYPI_VERSION_SUFFIX
    elif source_label == f"git:{GIT_URL}@{GIT_COMMIT}":
        patches, suffix = GIT_PATCHES, GIT_VERSION_SUFFIX + (".ext" if build_ext else "")
    else:
        return None
    return patches_fingerprint(source_label + ":" + PYPI_SDIST_SHA256, patches,
                               extra=f"{suffix}|ext={build_ext}|{sys.version_info[:2]}")


def choose_source(requested: str, reachable=None) -> str:
    """Resolve --source: "git" and "pypi" as given; "auto" takes git when the repository answers.

    Args:
        requested: "auto", "git" or "pypi".
        reachable: callable returning whether the official repository answers (default: git_reachable).

    Raises:
        InstallError: "git" was asked for and is unreachable, or the name is unknown.
    """
    reachable = reachable or git_reachable
    if requested in ("git", "pypi"):
        if requested == "git" and not reachable():
            raise InstallError(f"--source git: {GIT_URL} is not reachable; use --source pypi or auto")
        return requested
    if requested != "auto":
        raise InstallError(f"unknown source {requested!r}; choose auto, git or pypi")
    return "git" if reachable() else "pypi"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-only", action="store_true",
                        help="only report whether detectron2 works here (runs the self-check); install nothing")
    parser.add_argument("--source", choices=("auto", "git", "pypi"), default="auto",
                        help="auto: the official repository when reachable, else the patched PyPI sdist")
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 already imports")
    parser.add_argument("--build-ext", action="store_true",
                        help="git source only: also compile detectron2's C++/CUDA ops (needs a compiler; "
                             "FORCE_CUDA=1 is set when nvcc is found)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="install_detectron2: %(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    try:
        state = probe()
        if args.check_only:
            if not state["importable"]:
                raise InstallError(f"detectron2 does not import here ({state.get('error', 'not installed')}); "
                                   f"run {Path(__file__).name} without --check-only")
            result = self_check()
            logger.info("detectron2 %s OK at %s (%s); self-check: %s", state["version"], state["path"],
                        state.get("distribution", "no distribution metadata"), json.dumps(result))
            return 0
        if state["importable"] and not args.force:
            build = state.get("vilbert_build")
            expected = build and expected_fingerprint(build["source"], bool(state.get("compiled_ops")))
            stale = build and expected not in (None, build["fingerprint"])
            if not stale:
                logger.info("detectron2 %s already importable from %s (%s%s); nothing to do", state["version"],
                            state["path"], state.get("distribution", "no distribution metadata"),
                            f", built by vilbert from {build['source']}" if build else "")
                return 0
            logger.info("installed detectron2 was built by an older version of this script; rebuilding")
        elif not state["importable"] and "error" in state and "No module named 'detectron2'" not in state["error"]:
            logger.info("detectron2 is present but broken (%s); reinstalling", state["error"])
        if args.build_ext and args.source == "pypi":
            raise InstallError("--build-ext needs the C++ sources, which only the git source has")
        source = choose_source("git" if args.build_ext and args.source == "auto" else args.source)
        logger.info("installing detectron2 from %s", "the official repository" if source == "git" else "PyPI")
        try:
            done = obtain_and_install(source, build_ext=args.build_ext)
        except InstallError as e:
            if not (source == "git" and args.source == "auto" and not args.build_ext):
                raise
            logger.warning("installing from the official repository failed (%s); falling back to PyPI", e)
            done = obtain_and_install("pypi", build_ext=False)
        result = self_check()
        complaint = pip_check()
        if complaint:
            logger.warning("pip check is not clean after installing detectron2:\n%s", complaint)
        logger.info("installed detectron2 %s from %s (%s) in %.1f s; self-check: %s", result["detectron2"],
                    done["source"], "cached wheel" if done["cached"] else "fresh build",
                    time.perf_counter() - t0, json.dumps(result))
        return 0
    except (InstallError, subprocess.TimeoutExpired, OSError) as e:
        logger.error("failed: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
