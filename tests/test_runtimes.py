"""Builds on every engine that runs here, their accuracy gates, and opening builds.

The model is a vit_kprpe_tiny with a more realistic random init (see
``runtimes_support.realistic_tiny``), exported once per session.
"""
import json
import shutil
import sys

import numpy as np
import pytest

from kpface.errors import AccuracyGateError, EngineUnavailable, InputError, ModelError
from kpface.runtimes import open_session
from kpface.export_cli import calibration_detector, detector_factory
from kpface.runtimes.build import build
from kpface.runtimes.gates import GATES
from kpface.runtimes.onnxruntime_rt import OrtSession
from runtimes_support import export_realistic_tiny

N_CALIB, N_HELDOUT = 48, 24


def have(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="session")
def tiny_kprpe(tmp_path_factory):
    return export_realistic_tiny(tmp_path_factory.mktemp("rt") / "recognizer")


@pytest.fixture(scope="session")
def held_feeds(tiny_kprpe):
    from kpface.manifest import load_manifest
    from kpface.runtimes.calibration import recognizer_data
    data = recognizer_data(load_manifest(tiny_kprpe), n_calib=0, n_heldout=8, seed=5)
    return next(data.heldout.feeds(["image", "keypoints"]))


@pytest.fixture
def model_copy(tiny_kprpe, tmp_path):
    dst = tmp_path / "recognizer"
    shutil.copytree(tiny_kprpe, dst, ignore=shutil.ignore_patterns("builds"))
    return dst


@pytest.fixture
def gray_folder(tmp_path):
    """A 'calibration set' of flat grey squares: useless statistics for int8."""
    import cv2
    d = tmp_path / "gray"
    d.mkdir()
    for i in range(3):
        cv2.imwrite(str(d / f"g{i}.png"), np.full((112, 112, 3), 120 + i, np.uint8))
    return d


ENGINES_HERE = [("onnxruntime", p) for p in ("fp32", "fp16", "int8")]
ENGINES_HERE += [pytest.param("openvino", p, marks=pytest.mark.skipif(
    not (have("openvino") and have("nncf")), reason="openvino / nncf not installed"))
    for p in ("fp32", "fp16", "int8")]


@pytest.mark.parametrize("runtime,precision", ENGINES_HERE)
def test_build_passes_gate_and_opens(tiny_kprpe, held_feeds, runtime, precision):
    info = build(tiny_kprpe, runtime, precision, detector=None, n_calib=N_CALIB,
                 n_heldout=N_HELDOUT, threads=2)
    acc = info["accuracy"]
    assert info["gate"] == "passed" and acc["passed"]
    assert acc["mean"] >= GATES[precision]["mean"] and acc["min"] >= GATES[precision]["min"]
    if precision == "fp32":
        assert acc["min"] > 0.99999
    d = tiny_kprpe / "builds" / f"{runtime}-{precision}-cpu"
    assert info["dir"] == str(d)
    record = json.loads((d / "build.json").read_text())
    assert record["runtime"] == runtime and record["precision"] == precision
    assert record["device_key"] == "cpu" and record["files"]
    assert record["model"]["onnx_sha256"]["model"]
    assert record["versions"]
    if precision == "int8":
        cal = record["calibration"]
        assert cal["calibration_crops"] == N_CALIB and "lfw_subset" in cal["sources"]
        assert record["graphs"]["model"]["float_nodes_kprpe"] > 0  # KP-RPE path kept float
    sess = open_session(tiny_kprpe, runtime=runtime, precision=precision, threads=2)
    assert sess.provider.startswith("CPUExecutionProvider" if runtime == "onnxruntime"
                                    else "OpenVINO:CPU")
    got = sess.run(held_feeds)["embedding"]
    ref = OrtSession(tiny_kprpe / "model.onnx", threads=2).run(held_feeds)["embedding"]
    assert got.shape == ref.shape and got.dtype == np.float32
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= GATES[precision]["min"]


@pytest.mark.parametrize("runtime", [
    "onnxruntime",
    pytest.param("openvino", marks=pytest.mark.skipif(not have("nncf"), reason="nncf not installed"))])
def test_useless_calibration_fails_the_gate(model_copy, gray_folder, runtime):
    with pytest.raises(AccuracyGateError) as e:
        build(model_copy, runtime, "int8", calib_images=gray_folder, detector=None,
              n_calib=16, n_heldout=N_HELDOUT, threads=2)
    msg = str(e.value)
    assert "\n" not in msg and "cosine vs fp32 mean" in msg and "--force" in msg
    assert not (model_copy / "builds" / f"{runtime}-int8-cpu").exists()
    with pytest.raises(ModelError, match="kpface build"):
        open_session(model_copy, runtime=runtime, precision="int8")


def test_force_installs_a_failed_build(model_copy, gray_folder):
    info = build(model_copy, "onnxruntime", "int8", calib_images=gray_folder, force=True,
                 detector=None, n_calib=16, n_heldout=N_HELDOUT, threads=2)
    assert info["gate"] == "forced" and info["accuracy"]["passed"] is False
    assert info["accuracy"]["min"] < GATES["int8"]["min"]
    record = json.loads((model_copy / "builds" / "onnxruntime-int8-cpu" / "build.json").read_text())
    assert record["gate"] == "forced" and "user" in record["calibration"]["calibration_sources"]
    assert "lfw_subset" in record["calibration"]["heldout_sources"]  # gate measured real faces
    open_session(model_copy, runtime="onnxruntime", precision="int8")


def test_tampered_build_is_refused(model_copy):
    build(model_copy, "onnxruntime", "fp16", detector=None, n_heldout=8, threads=2)
    path = model_copy / "builds" / "onnxruntime-fp16-cpu" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match") as e:
        open_session(model_copy, runtime="onnxruntime", precision="fp16")
    assert "kpface build" in str(e.value) and "\n" not in str(e.value)


def test_build_of_another_model_is_refused(model_copy):
    build(model_copy, "onnxruntime", "fp16", detector=None, n_heldout=8, threads=2)
    bj = model_copy / "builds" / "onnxruntime-fp16-cpu" / "build.json"
    record = json.loads(bj.read_text())
    record["model"]["onnx_sha256"]["model"] = "0" * 64
    bj.write_text(json.dumps(record))
    with pytest.raises(ModelError, match="built from another"):
        open_session(model_copy, runtime="onnxruntime", precision="fp16")


def test_missing_build_names_the_command(model_copy):
    with pytest.raises(ModelError) as e:
        open_session(model_copy, runtime="onnxruntime", precision="int8")
    assert f"kpface build {model_copy} --runtime onnxruntime --precision int8" in str(e.value)


def test_unknown_runtime_and_precision(model_copy):
    with pytest.raises(InputError, match="choose one of"):
        open_session(model_copy, runtime="tflite", precision="int8")
    with pytest.raises(InputError, match="choose one of"):
        build(model_copy, "onnxruntime", "int4")


def test_default_session_is_unchanged(tiny_kprpe):
    sess = open_session(tiny_kprpe)
    assert isinstance(sess, OrtSession) and sess.provider == "CPUExecutionProvider"


def test_gpu_provider_fallback_is_reported(tiny_kprpe, monkeypatch):
    from kpface.runtimes import onnxruntime_rt
    ok, why = onnxruntime_rt.available("cuda")
    if not ok:
        assert "onnxruntime-gpu" in why and "\n" not in why
        with pytest.raises(EngineUnavailable, match="onnxruntime-gpu"):
            open_session(tiny_kprpe, device="cuda")
    # A CUDA provider that is listed but cannot start falls back to CPU: detected, not silent.
    monkeypatch.setattr(onnxruntime_rt, "available", lambda device=None, purpose="run": (True, ""))
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(EngineUnavailable, match="fell back to CPUExecutionProvider"):
            onnxruntime_rt.open_onnx(tiny_kprpe / "model.onnx", device="cuda")


# --- Core ML ---------------------------------------------------------------------------------

needs_coremltools = pytest.mark.skipif(not have("coremltools"), reason="coremltools not installed")


def _mil_ops(package) -> list[tuple[str, list[str]]]:
    """(op type, output names) of a saved ML program's main function."""
    import coremltools as ct
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    fn = spec.mlProgram.functions["main"]
    return [(op.type, [o.name for o in op.outputs])
            for op in fn.block_specializations[fn.opset].operations]


@needs_coremltools
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_coreml_conversion_and_spec(tiny_kprpe, precision, monkeypatch):
    import kpface.export.coreml_convert as cc
    # The tiny model's keypoint linear (1,960 values) is below coremltools' default size
    # threshold: lower it so that int8 would quantize it if it were not kept in float.
    monkeypatch.setattr(cc, "WEIGHT_THRESHOLD", 1024)
    info = build(tiny_kprpe, "coreml", precision, detector=None, n_heldout=N_HELDOUT, threads=2)
    g = info["graphs"]["model"]
    assert g["file"] == "model.mlpackage" and g["weights_from"].endswith("weights.safetensors")
    spec = g["spec"]
    assert set(spec["inputs"]) == {"image", "keypoints"} and spec["outputs"] == ["embedding"]
    assert spec["inputs"]["image"]["shapes"] == [[1, 3, 112, 112], [8, 3, 112, 112]]
    assert spec["inputs"]["keypoints"]["shapes"] == [[1, 5, 2], [8, 5, 2]]
    assert all(v["fp32"] for v in spec["inputs"].values())
    d = tiny_kprpe / "builds" / f"coreml-{precision}-apple"
    assert (d / "model.mlpackage").is_dir() and (d / "build.json").is_file()
    assert info["accuracy"]["passed"]
    if sys.platform != "darwin":
        assert "stand" in info["accuracy"]["method"]
        # Measured on a torch stand-in, not on Core ML: never "passed".
        assert info["gate"] == "simulated"
        assert json.loads((d / "build.json").read_text())["gate"] == "simulated"
    if precision == "int8":
        assert g["float_weights"] == ["keypoint_linear_bias", "keypoint_linear_weight"]
        quantized = [name for kind, names in _mil_ops(d / "model.mlpackage")
                     if kind.startswith("constexpr") for name in names]
        assert any(n.startswith("blocks_0_attn_qkv_weight") for n in quantized), quantized
        assert not any(n.startswith("keypoint_linear") for n in quantized), quantized
    from kpface.runtimes.coreml_rt import check_spec
    from kpface.manifest import load_manifest
    check_spec(d / "model.mlpackage", load_manifest(tiny_kprpe)["graphs"]["model"])


@needs_coremltools
def test_coreml_needs_weights_it_can_reload(tiny_recognizer, tmp_path):
    """The session's plain tiny export has random weights and no weights.safetensors."""
    dst = tmp_path / "rec"
    shutil.copytree(tiny_recognizer, dst, ignore=shutil.ignore_patterns("builds"))
    with pytest.raises(ModelError, match="save_weights"):
        build(dst, "coreml", "fp16", detector=None, n_heldout=4)


@needs_coremltools
def test_coreml_prediction(tiny_kprpe, held_feeds, caplog):
    if sys.platform != "darwin":
        if not (tiny_kprpe / "builds" / "coreml-fp16-apple").is_dir():
            build(tiny_kprpe, "coreml", "fp16", detector=None, n_heldout=N_HELDOUT)
        with caplog.at_level("WARNING", logger="kpface.runtimes.session"):
            with pytest.raises(EngineUnavailable, match="needs macOS"):
                open_session(tiny_kprpe, runtime="coreml", precision="fp16")
        assert "accuracy gate was simulated" in caplog.text  # opening says so
        pytest.skip("Core ML prediction needs macOS")
    if not (tiny_kprpe / "builds" / "coreml-fp16-apple").is_dir():
        build(tiny_kprpe, "coreml", "fp16", detector=None, n_heldout=N_HELDOUT)
    sess = open_session(tiny_kprpe, runtime="coreml", precision="fp16")
    out = sess.run(held_feeds)["embedding"]
    assert out.shape == (len(held_feeds["image"]), 512)


# --- TensorRT --------------------------------------------------------------------------------

def _trt_here():
    from kpface.runtimes import tensorrt_rt
    return tensorrt_rt.available()


def test_tensorrt_without_gpu_says_why(model_copy):
    ok, why = _trt_here()
    if ok:
        pytest.skip("TensorRT is usable here; the refusal path is not reachable")
    assert "\n" not in why and ("pip install" in why or "GPU" in why)
    with pytest.raises(EngineUnavailable):
        build(model_copy, "tensorrt", "fp16", detector=None)


@pytest.mark.skipif(not _trt_here()[0], reason="needs an NVIDIA GPU / tensorrt")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_build_and_run(tiny_kprpe, held_feeds, precision):
    info = build(tiny_kprpe, "tensorrt", precision, detector=None, n_calib=N_CALIB,
                 n_heldout=N_HELDOUT)
    assert info["accuracy"]["passed"]
    g = info["graphs"]["model"]
    assert g["tensorrt_version"] and g["compute_capability"]
    sess = open_session(tiny_kprpe, runtime="tensorrt", precision=precision)
    assert sess.provider.startswith("TensorRT:")
    assert sess.run(held_feeds)["embedding"].shape == (8, 512)


# --- a published-size model (about 2 minutes on 2 cores) -----------------------------------

def test_small_int8_onnxruntime(tmp_path):
    import torch

    from kpface.export import registry
    from kpface.export.checkpoint import save_weights
    from kpface.export.onnx_export import export_model
    torch.manual_seed(0)
    model = registry.get("vit_kprpe_small").factory().eval()
    with torch.no_grad():
        model.keypoint_linear.weight.normal_(0, 0.5)
        model.keypoint_linear.bias.normal_(0, 0.5)
    save_weights(model, tmp_path / "w.safetensors", "vit_kprpe_small")
    export_model("vit_kprpe_small", tmp_path / "small", weights=tmp_path / "w.safetensors")
    info = build(tmp_path / "small", "onnxruntime", "int8", detector=None, n_calib=64,
                 n_heldout=32, threads=2)
    assert info["accuracy"]["passed"]


# --- detectors (fp32 / fp16, every graph) --------------------------------------------------

def test_detector_build_every_graph(models_dir, tmp_path):
    det_dir = tmp_path / "detector"
    shutil.copytree(models_dir / "detector", det_dir, ignore=shutil.ignore_patterns("builds"))
    info = build(det_dir, "onnxruntime", "fp16", threads=2,
                 make_detector=detector_factory(det_dir, threads=2))
    assert set(info["graphs"]) == {"pnet", "rnet", "onet"}
    assert set(info["accuracy"]["graphs"]) == {"pnet", "rnet", "onet"}
    assert info["accuracy"]["passed"] and info["accuracy"]["min"] >= 0.999
    det = info["accuracy"]["detections"]
    assert det["faces"] >= 2 and det["missed"] == 0 and det["extra"] == 0
    assert det["iou_min"] >= 0.9 and det["landmark_nme_max"] <= 0.05
    from kpface.detect import load_detector
    import cv2
    from skimage import data
    img = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    # The pyramid from 20 px (facenet-pytorch's): under others (the default 0.1 of the side,
    # 51 px here) NMS picks between near-equal fp16 / fp32 candidates, 1.8-2.3 px apart.
    ref = load_detector(det_dir, min_face=20).detect(img)
    got = load_detector(det_dir, precision="fp16", min_face=20).detect(img)
    assert len(got) == len(ref) == 1
    np.testing.assert_allclose(got[0].box, ref[0].box, atol=1.0)
    with pytest.raises(InputError, match="recognizers only"):
        build(det_dir, "onnxruntime", "int8")


def test_calibration_faces_come_from_the_pipeline_detector(models_dir, tmp_path):
    """In a models directory, the recognizer's int8 calibration uses detector/ to find faces."""
    root = tmp_path / "models"
    for stage in ("detector", "recognizer"):
        shutil.copytree(models_dir / stage, root / stage, ignore=shutil.ignore_patterns("builds"))
    detect = calibration_detector("auto", root / "recognizer", threads=2)  # `--detector auto`
    info = build(root / "recognizer", "onnxruntime", "int8", detector=detect, n_calib=16,
                 n_heldout=8, threads=2)
    assert info["calibration"]["landmarks"].startswith("detector (")
    assert info["accuracy"]["passed"]


def test_detector_build_refused_when_detections_differ(models_dir, tmp_path, monkeypatch):
    import kpface.runtimes.gates as b
    det_dir = tmp_path / "detector"
    shutil.copytree(models_dir / "detector", det_dir, ignore=shutil.ignore_patterns("builds"))
    monkeypatch.setitem(b.DETECTION_GATES, "iou_min", 1.01)  # no build can reach it
    with pytest.raises(AccuracyGateError, match="detections: 0 missed, 0 extra, box IoU min"):
        build(det_dir, "onnxruntime", "fp16", threads=2,
              make_detector=detector_factory(det_dir, threads=2))
    assert not (det_dir / "builds" / "onnxruntime-fp16-cpu").exists()
