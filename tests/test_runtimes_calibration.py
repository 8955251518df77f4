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
    pre = {"mean": [127.5] * 3, "std": [128.0] * 3, "color": "RGB"}
    feeds = cal.image_feeds({"preprocess": pre}, graph)
    assert sum(len(f["image"]) for f in feeds) == 6
    assert feeds[0]["image"].shape[1:] == (3, 24, 24)
    x = feeds[0]["image"]
    assert x.min() >= -127.5 / 128 - 1e-6 and x.max() <= 127.5 / 128 + 1e-6  # the manifest's std
    from kpface.errors import ModelError
    for missing in ("mean", "std", "color"):  # nothing is guessed
        with pytest.raises(ModelError):
            cal.image_feeds({"preprocess": {k: v for k, v in pre.items() if k != missing}}, graph)


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


DLIB_MANIFEST = {"name": "dlib", "preprocess": {"size": [150, 150], "color": "RGB",
                                                "mean": [122.782, 117.001, 104.298],
                                                "std": [256.0] * 3},
                 "alignment": {"method": "dlib_face_chip", "size": 150, "padding": 0.25}}


def test_a_manifest_alignment_gives_dlib_face_chips():
    """dlib_resnet_v1's manifest: calibration and held-out crops are the pipeline's face chips
    (kpface.facechip), not resized ArcFace crops."""
    from kpface import samples
    from kpface.facechip import chip_template, face_chip
    d = cal.recognizer_data(DLIB_MANIFEST, n_calib=8, n_heldout=4, seed=0)
    assert d.calibration.images.shape == (8, 3, 150, 150)
    assert d.description["kind"] == "dlib_face_chip crops"
    # Unjittered, the chip is exactly the pipeline's.
    a = samples.astronaut_bgr()
    chip, pts = cal.chip_crop(a, samples.ASTRONAUT_LANDMARKS)
    want, m = face_chip(a, samples.ASTRONAUT_LANDMARKS)
    np.testing.assert_array_equal(chip, want)
    # Jittered crops keep the points near the chip template (a few percent of the chip).
    kp = d.calibration.keypoints
    assert np.abs(kp.mean(0) - chip_template() / 150).max() < 0.06
    # A chip reaching past a 25x25 LFW crop is filled by reflection, not black.
    lfw = samples.lfw_subset_bgr()[0]
    small, _ = cal.chip_crop(lfw, samples.lfw_subset_landmarks(25, 25))
    assert small.shape == (150, 150, 3) and (small.reshape(-1, 3).max(1) == 0).mean() < 0.01
    with pytest.raises(InputError, match="cannot cut"):
        cal.crop_fn({**DLIB_MANIFEST, "alignment": {"method": "other"}})


def test_chip_jitter_moves_the_chip_as_the_jitter_says():
    """The jitter is applied through the five points: the chip of the moved points equals the
    unjittered chip warped by the jitter (up to interpolation), and the points follow."""
    import cv2
    from kpface import samples
    a = samples.astronaut_bgr()
    rng = np.random.default_rng(1)
    aug = cal.Augment(flip=0.0, brightness=0.0, contrast=0.0)
    chip, pts = cal.chip_crop(a, samples.ASTRONAUT_LANDMARKS, rng=rng, aug=aug)
    j = cal._jitter(np.random.default_rng(1), aug, 150)
    plain, plain_pts = cal.chip_crop(a, samples.ASTRONAUT_LANDMARKS)
    warped = cv2.warpAffine(plain, j, (150, 150), flags=cv2.INTER_LINEAR)
    inner = (slice(30, 120), slice(30, 120))
    assert np.abs(warped[inner].astype(int) - chip[inner]).mean() < 4
    moved = plain_pts @ j[:, :2].T + j[:, 2]
    # dlib sizes its chip rectangle as (size * scale - 1): a twentieth of a pixel off exact.
    np.testing.assert_allclose(pts, moved, atol=0.1)


def test_ort_quantize_outputs_option():
    from kpface.runtimes.onnxruntime_rt import DEFAULT_QUANTIZED_OUTPUTS, output_types
    assert DEFAULT_QUANTIZED_OUTPUTS == ["Conv"]
    assert output_types(True) == ["Conv", "MatMul", "Gemm"] and output_types(False) == []
    assert output_types(["Gemm", "Conv"]) == ["Conv", "Gemm"] and output_types("MatMul") == ["MatMul"]
    with pytest.raises(InputError, match="quantize_outputs"):
        output_types(["Relu"])


def test_ort_op_types_option_is_checked_before_quantizing(tmp_path):
    from kpface.runtimes.onnxruntime_rt import quantize_int8
    with pytest.raises(InputError, match="op_types"):
        quantize_int8(tmp_path / "none.onnx", tmp_path / "out.onnx", None,
                      {"op_types": ["Add"]})
