"""Calibration / held-out face crops and the engine table."""
from pathlib import Path

import numpy as np
import pytest

from kpface.errors import EngineUnavailable, InputError
from kpface.landmarks import ARCFACE_TEMPLATE_112
from kpface.runtimes import calibration as cal
from kpface.runtimes.engines import ENGINES, get_engine, help_text, markdown_table

pytest.importorskip("skimage")


def test_crops_shapes_ranges_and_determinism():
    a = cal.recognizer_data(n_calib=12, n_heldout=6, seed=3)
    b = cal.recognizer_data(n_calib=12, n_heldout=6, seed=3)
    c = cal.recognizer_data(n_calib=12, n_heldout=6, seed=4)
    assert a.calibration.images.shape == (12, 3, 112, 112)
    assert a.calibration.keypoints.shape == (12, 5, 2)
    assert a.heldout.images.shape == (6, 3, 112, 112)
    assert a.calibration.images.dtype == np.float32
    assert -1.0 <= a.calibration.images.min() and a.calibration.images.max() <= 1.0
    assert a.calibration.images.std() > 0.2  # real pictures, not flat
    kp = a.calibration.keypoints
    assert (kp > 0).all() and (kp < 1).all()
    # Near the ArcFace template after alignment (jitter is a few percent).
    assert np.abs(kp.mean(0) - ARCFACE_TEMPLATE_112 / 112).max() < 0.05
    np.testing.assert_array_equal(a.calibration.images, b.calibration.images)
    np.testing.assert_array_equal(a.heldout.keypoints, b.heldout.keypoints)
    assert not np.array_equal(a.calibration.images, c.calibration.images)


def test_calibration_and_heldout_faces_are_disjoint():
    d = cal.recognizer_data(n_calib=64, n_heldout=32, seed=0)
    assert not set(d.calibration.sources) & set(d.heldout.sources)
    assert d.description["calibration_faces"] + d.description["heldout_faces"] == 101
    assert "lfw_subset" in d.description["sources"] and "astronaut" in d.description["sources"]


def test_flip_swaps_left_and_right_landmarks():
    img = np.zeros((112, 112, 3), np.uint8)
    img[:, :56] = 200  # bright image-left half
    aug = cal.Augment.none()
    aug.flip = 1.0
    crop, pts = cal.align_crop(img, ARCFACE_TEMPLATE_112, rng=np.random.default_rng(0), aug=aug)
    assert crop[:, 100].mean() > 150 and crop[:, 10].mean() < 50  # mirrored
    assert pts[0, 0] < pts[1, 0] and pts[3, 0] < pts[4, 0]  # still image-left first
    np.testing.assert_allclose(pts[0, 0], 111 - ARCFACE_TEMPLATE_112[1, 0], atol=1e-3)


def test_a_detector_supplies_the_landmarks():
    calls = []

    class Found:
        def __init__(self, lm):
            self.landmarks = lm

    def detect(image):
        calls.append(image.shape)
        h, w = image.shape[:2]
        return [Found(ARCFACE_TEMPLATE_112 * [w / 112, h / 112])]

    d = cal.recognizer_data(n_calib=4, n_heldout=4, detect=detect)
    assert len(calls) == 102  # 100 LFW crops (padded into context), astronaut, camera
    assert d.description["landmarks"].startswith("detector (102 faces)")
    assert "camera" in d.description["sources"]


def test_user_folder(tmp_path):
    import cv2
    from skimage import data
    faces = data.lfw_subset()[:6]
    for i, f in enumerate(faces):
        cv2.imwrite(str(tmp_path / f"{i}.png"), cv2.resize((f * 255).astype(np.uint8), (112, 112)))
    d = cal.recognizer_data(n_calib=8, n_heldout=8, user_images=tmp_path)
    assert d.description["calibration_sources"] == ["user"]
    assert "lfw_subset" in d.description["heldout_sources"]  # the gate always sees real faces
    (tmp_path / "wide.png").write_bytes(cv2.imencode(".png", np.zeros((50, 100, 3), np.uint8))[1])
    with pytest.raises(InputError, match="not a square face crop"):
        cal.recognizer_data(user_images=tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        cal.recognizer_data(user_images=tmp_path / "nope")


def test_image_feeds_for_detector_graphs():
    graph = {"inputs": [{"name": "image", "shape": ["batch", 3, 24, 24]}]}
    feeds = cal.image_feeds({"preprocess": {"mean": [127.5] * 3, "std": [128.0] * 3}}, graph)
    assert sum(len(f["image"]) for f in feeds) == 6
    assert feeds[0]["image"].shape[1:] == (3, 24, 24)


def test_calibration_reads_images_like_everywhere_else(tmp_path):
    import cv2

    from kpface import samples
    from kpface.image import load_image
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.pgm"), np.full((112, 112), 90 + i, np.uint8))
    faces = cal.base_faces(None, tmp_path, use_builtin=False)
    assert [Path(n.split(":", 1)[1]).suffix for n, _, _ in faces] == [".pgm"] * 3
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError) as e:
        cal.recognizer_data(user_images=tmp_path)
    with pytest.raises(InputError) as want:
        load_image(tmp_path / "bad.jpg")
    assert str(e.value) == str(want.value)
    astronaut = [lm for n, _, lm in cal.base_faces(None) if n == "astronaut"]
    np.testing.assert_array_equal(astronaut[0], samples.ASTRONAUT_LANDMARKS)


# --- the engine table ------------------------------------------------------------------------

def test_engine_table_covers_all_four_engines():
    names = [e.name for e in ENGINES]
    assert names == ["onnxruntime", "openvino", "tensorrt", "coreml"]
    for e in ENGINES:
        assert e.suffix.startswith(".") and e.module and e.adapter.startswith("kpface.runtimes.")
        assert set(e.precisions) <= {"fp32", "fp16", "int8"} and e.devices and e.builds_from
        assert e.install.startswith("pip install")
        adapter = e.load_adapter()  # importable without the engine library
        for fn in ("available", "device_key", "load"):
            assert callable(getattr(adapter, fn)), (e.name, fn)
        builder = e.load_builder()  # the module that builds (Core ML's is on the export side)
        for fn in ("available", "device_key", "build"):
            assert callable(getattr(builder, fn)), (e.name, fn)
        ok, why = e.available()
        assert isinstance(ok, bool) and why and "\n" not in why
    table = markdown_table(check=True)
    assert all(f"`{n}`" in table for n in names)
    assert all(n in help_text() for n in names)
    with pytest.raises(InputError, match="choose one of"):
        get_engine("tvm")


def test_missing_engine_says_pip_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    ok, why = get_engine("openvino").available()
    assert not ok and "pip install" in why and "\n" not in why
    with pytest.raises(EngineUnavailable, match="pip install"):
        get_engine("openvino").require()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ok, why = get_engine("tensorrt").available()
    assert not ok and "pip install 'kpface[tensorrt]'" in why
