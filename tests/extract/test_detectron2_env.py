"""The installed detectron2 works for the extraction stage: pure Python, model zoo, six v0.6 fixes, C4 forward."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest

detectron2 = pytest.importorskip(
    "detectron2", reason="detectron2 is not installed; run `.venv/bin/python tools/install_detectron2.py`")
torch = pytest.importorskip("torch")

R101_C4 = "COCO-Detection/faster_rcnn_R_101_C4_3x.yaml"
PKG_DIR = Path(detectron2.__path__[0])
# detectron2._vilbert_build exists when tools/install_detectron2.py built this detectron2.
VILBERT_BUILD = importlib.util.find_spec("detectron2._vilbert_build") is not None


def test_imports_without_compiled_extension():
    from detectron2.modeling import build_model  # noqa: F401  (the import the extraction stage needs)

    spec = importlib.util.find_spec("detectron2._C")
    assert spec is None or spec.origin.endswith(".py"), f"a compiled _C is installed: {spec.origin}"
    assert not list(PKG_DIR.rglob("*.so")), "the pure-Python build must not ship compiled code"


@pytest.mark.skipif(not VILBERT_BUILD, reason="detectron2 was not built by tools/install_detectron2.py")
def test_placeholder_extension_fails_clearly_on_use():
    # Fix 2: `from detectron2 import _C` works; using a compiled op names what is missing.
    from detectron2 import _C

    with pytest.raises(AttributeError, match=r"_C\.box_iou_rotated is unavailable.*compiled ops"):
        _C.box_iou_rotated  # noqa: B018
    assert getattr(_C, "has_cuda", None) is None  # getattr defaults still work (collect_env relies on it)


@pytest.mark.skipif(not VILBERT_BUILD, reason="detectron2 was not built by tools/install_detectron2.py")
def test_build_marker_lists_all_six_fixes():
    from detectron2 import _vilbert_build as build

    if build.SOURCE.startswith("pypi:"):
        assert build.FIXES == ("1", "2", "3", "4", "5", "6")
        assert all(status == "applied" for _, _, status in build.PATCHES)
    else:  # the git commit already carries fixes 2, 3, 4 and 6
        assert "5" in build.FIXES


def test_model_zoo_config_is_packaged_and_resolves_without_pkg_resources(monkeypatch):
    # Fix 3 (configs packaged) and fix 5 (no pkg_resources): make `import pkg_resources` fail, reload.
    monkeypatch.setitem(sys.modules, "pkg_resources", None)
    import detectron2.model_zoo.model_zoo as zoo

    zoo = importlib.reload(zoo)
    path = Path(zoo.get_config_file(R101_C4))
    assert path.is_file() and path.name == "faster_rcnn_R_101_C4_3x.yaml"
    assert (path.parent.parent / "Base-RCNN-C4.yaml").is_file()  # _BASE_ of the R101-C4 config
    assert len(list(path.parent.parent.rglob("*.yaml"))) >= 80  # 92 in v0.6
    with pytest.raises(RuntimeError, match="not available in Model Zoo"):
        zoo.get_config_file("COCO-Detection/no_such_model.yaml")


def test_data_package_imports_with_current_pillow():
    # Fix 4: v0.6 used Image.LINEAR (removed in Pillow 10) as a default argument of ExtentTransform.
    from PIL import Image

    from detectron2.data.transforms import ExtentTransform

    default = inspect.signature(ExtentTransform.__init__).parameters["interp"].default
    assert default == Image.BILINEAR
    out = ExtentTransform((0, 0, 4, 4), (2, 2)).apply_image(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    assert out.shape == (2, 2, 3)


def test_no_removed_numpy_aliases_remain():
    # Fix 6: np.bool / np.int / np.float / np.str were removed in NumPy 1.24.
    alias = re.compile(r"\bnp\.(bool|int|float|str|object)\b(?!_)")
    hits = [f"{p.relative_to(PKG_DIR)}:{i}" for p in PKG_DIR.rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if alias.search(line)]
    assert hits == []
    from detectron2.structures.masks import polygons_to_bitmask  # used np.bool in v0.6

    empty = polygons_to_bitmask([], 3, 4)
    assert empty.dtype == bool and empty.shape == (3, 4) and not empty.any()


def _damped_c4_model(pre_nms: int = 200, post_nms: int = 30):
    """R101-C4 from the model zoo with damped random weights (environment.md 2.4: stock init gives 0 proposals)."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(R101_C4))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = pre_nms
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = post_nms
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv3.weight"):
                p.mul_(0.5)
    return model


def test_c4_faster_rcnn_forward_on_cpu_gives_proposals():
    model = _damped_c4_model()
    h, w = 96, 128
    image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        assert features["res4"].shape[1] == 1024 and torch.isfinite(features["res4"]).all()
        proposals, _ = model.proposal_generator(images, features, None)
        instances, _ = model.roi_heads(images, features, proposals, None)
    boxes = proposals[0].proposal_boxes.tensor
    assert 0 < len(boxes) <= 30
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 3] <= h).all()
    assert instances[0].pred_classes.max() < 80  # COCO head: 80 classes


def test_detectron2_box_ops_are_torchvision_ops():
    # The C4 model's nms and ROIAlign come from torchvision (real C++ ops), not from detectron2._C.
    import torchvision
    from detectron2.layers import ROIAlign, batched_nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.int64), 0.5)
    assert keep.tolist() == [0, 2]
    feats = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    rois = torch.tensor([[0, 0, 0, 4, 4]], dtype=torch.float32)
    ours = ROIAlign((2, 2), 1.0, 0, aligned=True)(feats, rois)
    ref = torchvision.ops.roi_align(feats, rois, (2, 2), 1.0, 0, aligned=True)
    assert torch.equal(ours, ref)


@pytest.mark.slow
def test_c4_forward_at_extraction_size():
    # The extraction geometry: 600 x 800 input, 300 proposals.
    model = _damped_c4_model(pre_nms=6000, post_nms=300)
    image = torch.randint(0, 256, (3, 600, 800), generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad():
        out = model([{"image": image, "height": 600, "width": 800}])
    assert len(out[0]["instances"]) > 0
