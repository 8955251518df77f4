"""Issue 13, honest gates: a simulated gate is never "passed"; TensorRT int8 by explicit
quantization (Q/DQ graph checks, the flags a fake builder is given, the calibration cache
staged and hashed, CUDA streams destroyed on close); what a build needs is one declared extra.

TensorRT itself needs an NVIDIA GPU: these tests run its build code against a fake
``tensorrt`` module and fake CUDA runtime (the real build-and-run test in test_runtimes.py
skips naming the missing GPU / tensorrt). Its engine-table status stays "untested".
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from kpface.cli import main as cli_main
from kpface.errors import EngineUnavailable, ModelError
from kpface.manifest import load_manifest, sha256_file
from kpface.runtimes import floatscope, onnxruntime_rt, tensorrt_qdq, tensorrt_rt
from kpface.runtimes.build import build
from kpface.runtimes.calibration import recognizer_data
from kpface.runtimes.engines import get_engine
from kpface.runtimes.session import load_build, open_build

sys.path.insert(0, str(Path(__file__).parent))
from runtimes_support import export_realistic_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return export_realistic_tiny(tmp_path_factory.mktemp("trt") / "recognizer")


@pytest.fixture(scope="module")
def calib(tiny):
    return recognizer_data(load_manifest(tiny), n_calib=16, n_heldout=8, seed=3)


# --- a simulated gate -------------------------------------------------------------------------

def test_a_simulated_gate_warns_when_opened(tiny, tmp_path, caplog):
    import shutil
    d = tmp_path / "rec"
    shutil.copytree(tiny, d, ignore=shutil.ignore_patterns("builds"))
    build(d, "onnxruntime", "fp32", n_calib=0, n_heldout=4, threads=1)
    bdir, info = load_build(d, "onnxruntime", "fp32")
    assert info["gate"] == "passed"  # measured on the engine itself
    with caplog.at_level("WARNING", logger="kpface.runtimes.session"):
        open_build(d, "onnxruntime", "fp32", threads=1).close()
    assert "simulated" not in caplog.text
    info["gate"] = "simulated"
    (bdir / "build.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING", logger="kpface.runtimes.session"):
        open_build(d, "onnxruntime", "fp32", threads=1).close()
    assert "accuracy gate was simulated" in caplog.text


def test_build_prints_a_simulated_gate_as_such(tiny, monkeypatch, capsys):
    import kpface.runtimes.build as rb
    fake = {"gate": "simulated", "dir": "X", "accuracy": {
        "method": "Core ML cannot predict on linux: torch fp32 ... stands in", "passed": True}}
    monkeypatch.setattr(rb, "build", lambda *a, **k: fake)
    monkeypatch.setattr(type(get_engine("coreml")), "require", lambda *a, **k: None)
    assert cli_main(["build", str(tiny), "--runtime", "coreml", "--precision", "fp16",
                     "--detector", "none"]) == 0
    out = capsys.readouterr().out
    assert "gate: simulated, not measured on coreml itself" in out


# --- TensorRT: the Q/DQ graph -----------------------------------------------------------------

def _consumers(model):
    out = {}
    for n in model.graph.node:
        for t in n.input:
            out.setdefault(t, []).append(n)
    return out


def test_qdq_graph_is_tensorrt_explicit_quantization_with_the_shared_float_scope(
        tiny, calib, tmp_path):
    src = tiny / "model.onnx"
    info = tensorrt_qdq.make_qdq(src, tmp_path, "model", calib.calibration, None, True,
                                 lambda m: None)
    q = onnx.load(str(tmp_path / info["qdq_onnx"]))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    qnodes = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qnodes
    for n in qnodes:  # signed int8, symmetric: zero points present, int8 and 0
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), (n.name, zp.dtype)
    producer = {t: n for n in q.graph.node for t in n.output}
    consumers = _consumers(q)
    dq_users = {c.op_type for n in q.graph.node if n.op_type == "DequantizeLinear"
                for c in consumers.get(n.output[0], [])}
    assert dq_users <= {"MatMul", "Gemm", "Conv"}, dq_users  # Q/DQ on weighted-op inputs only
    # The float scope every engine keeps, computed on the original graph.
    original = onnx.load(str(src))
    graph = onnxruntime_rt.describe(original)
    kprpe = set(floatscope.kprpe_path(graph))
    attention = set(floatscope.activation_matmuls(graph))
    assert kprpe and attention
    kept = {n.name for n in original.graph.node
            if n.op_type in ("LayerNormalization", "Softmax", "Add")} | kprpe | attention
    by_name = {n.name: n for n in q.graph.node}
    # Shape inference before quantizing folds some constant-only KP-RPE nodes away; the
    # attention products, LayerNorms and Softmaxes are all still there.
    assert attention <= set(by_name)
    for kind in ("LayerNormalization", "Softmax"):
        assert (sum(n.op_type == kind for n in q.graph.node)
                == sum(n.op_type == kind for n in original.graph.node) > 0)
    checked = 0
    for name in kept & set(by_name):
        node = by_name[name]
        fed = [producer[t].op_type for t in node.input if t in producer]
        assert "DequantizeLinear" not in fed, (name, node.op_type)
        checked += 1
    assert checked >= len(attention) + 10
    quantized = [n for n in q.graph.node if n.op_type == "MatMul"
                 and any(t in producer and producer[t].op_type == "DequantizeLinear"
                         for t in n.input)]
    assert len(quantized) >= 4  # qkv, proj, fc1, fc2 of each block
    calib_json = json.loads((tmp_path / info["calibration_cache"]).read_text())
    assert calib_json["calibration_key"] == info["calibration_key"]
    assert calib_json["activation_scales"]


# --- TensorRT: the builder as a fake records it -----------------------------------------------

class _Enum:
    def __init__(self, **values):
        self.__dict__.update(values)


class FakeTRT:
    """Just enough of the tensorrt module for kpface's build(); records what it is given."""

    __version__ = "10.99-fake"
    NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=5)
    BuilderFlag = _Enum(FP16="FP16", INT8="INT8", PREFER_PRECISION_CONSTRAINTS="PREFER")
    MemoryPoolType = _Enum(WORKSPACE="WORKSPACE")
    LayerType = _Enum(NORMALIZATION="NORM", SOFTMAX="SOFTMAX", REDUCE="REDUCE",
                      CONSTANT="CONSTANT")
    float32, float16 = "float32", "float16"

    def __init__(self):
        self.calls = {"create_network": [], "flags": [], "parsed": [], "calibrator": False}

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def Builder(self, logger):
        trt = self

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self):
                self.inputs, self.num_layers = [], 0

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Config:
            def set_memory_pool_limit(self, *a):
                pass

            def set_flag(self, flag):
                trt.calls["flags"].append(flag)

            def add_optimization_profile(self, p):
                pass

            def __setattr__(self, name, value):
                if name == "int8_calibrator":
                    trt.calls["calibrator"] = True
                object.__setattr__(self, name, value)

        class Profile:
            def set_shape(self, *a):
                pass

        class Builder:
            def create_network(self, flags):
                trt.calls["create_network"].append(flags)
                trt.network = Network()
                return trt.network

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"fake serialized engine"
        self.Tensor = Tensor
        return Builder()

    def OnnxParser(self, network, logger):
        trt = self

        class Parser:
            num_errors = 0

            def parse_from_file(self, path):
                trt.calls["parsed"].append(path)
                m = onnx.load(path)
                for i in m.graph.input:
                    dims = [d.dim_value if d.HasField("dim_value") else -1
                            for d in i.type.tensor_type.shape.dim]
                    network.inputs.append(trt.Tensor(i.name, dims))
                return True
        return Parser()


class FakeCudart:
    cudaError_t = _Enum(cudaSuccess=0)

    def __init__(self):
        self.destroyed, self.freed = [], []

    def cudaSetDevice(self, i):
        return (0,)

    def cudaGetDeviceCount(self):
        return (0, 1)

    def cudaStreamDestroy(self, stream):
        self.destroyed.append(stream)
        return (0,)

    def cudaFree(self, ptr):
        self.freed.append(ptr)
        return (0,)


@pytest.fixture
def fake_trt(monkeypatch):
    trt, cudart = FakeTRT(), FakeCudart()
    gpu = {"index": 0, "name": "Fake GPU", "compute_capability": "8.9", "sm": "sm89"}
    monkeypatch.setattr(tensorrt_rt, "_trt", lambda: trt)
    monkeypatch.setattr(tensorrt_rt, "_cudart", lambda: cudart)
    monkeypatch.setattr(tensorrt_rt, "gpu_info", lambda device=None: gpu)

    def load(build_dir, threads=None, info=None, device=None):
        # The gate of this fake build runs the Q/DQ graph on ONNX Runtime.
        return onnxruntime_rt.OrtSession(Path(build_dir) / info["qdq_onnx"], threads=1)
    monkeypatch.setattr(tensorrt_rt, "load", load)
    return trt, cudart


def test_tensorrt_int8_build_uses_qdq_strong_typing_and_stages_its_cache(tiny, tmp_path,
                                                                         fake_trt, monkeypatch):
    import shutil
    trt, _ = fake_trt
    d = tmp_path / "rec"
    shutil.copytree(tiny, d, ignore=shutil.ignore_patterns("builds"))
    info = build(d, "tensorrt", "int8", n_calib=16, n_heldout=8, threads=1)
    # Explicit quantization: a strongly typed network parsed from the Q/DQ graph, no
    # precision flags, no implicit-int8 calibrator.
    assert trt.calls["create_network"] == [1 << 5]
    assert trt.calls["flags"] == [] and trt.calls["calibrator"] is False
    staged = Path(trt.calls["parsed"][0])
    assert staged.name == "model.qdq.onnx" and ".tensorrt-int8-sm89.partial-" in staged.parent.name
    g = info["graphs"]["model"]
    assert g["strongly_typed"] and g["qdq_onnx"] == "model.qdq.onnx"
    bdir = Path(info["dir"])
    record = json.loads((bdir / "build.json").read_text())
    for name in ("model.engine", "model.qdq.onnx", "model.calib.json"):  # in the build, hashed
        assert record["files"][name] == sha256_file(bdir / name)
    assert not list((d / "builds").glob("*.calib"))  # nothing outside the build directory
    # The next build of the same model on the same crops reuses the checked cache.
    monkeypatch.setattr(onnxruntime_rt, "quantize_int8",
                        lambda *a, **k: pytest.fail("calibrated again"))
    again = build(d, "tensorrt", "int8", n_calib=16, n_heldout=8, threads=1)
    assert again["graphs"]["model"]["quantization"]["reused_from"] == "tensorrt-int8-sm89"
    assert again["files"]["model.qdq.onnx"] == record["files"]["model.qdq.onnx"]


def test_tensorrt_session_close_destroys_its_stream(fake_trt):
    import threading
    _, cudart = fake_trt
    sess = tensorrt_rt.TensorRTSession.__new__(tensorrt_rt.TensorRTSession)
    buf = tensorrt_rt._Buffer()
    buf.ptr, buf.nbytes = 4242, 16
    sess._buffers, sess._stream, sess._lock = {"image": buf}, "stream-1", threading.Lock()
    sess._engine = sess._context = object()
    sess.output_names = ["embedding"]
    with sess:
        pass
    assert cudart.destroyed == ["stream-1"] and cudart.freed == [4242]
    sess.close()  # idempotent
    assert cudart.destroyed == ["stream-1"]
    with pytest.raises(ModelError, match="closed"):
        sess.run({"image": np.zeros((1, 3, 112, 112), np.float32)})


def test_tensorrt_status_stays_untested():
    assert get_engine("tensorrt").status.startswith("untested")


# --- what a build needs -------------------------------------------------------------------------

def test_a_missing_build_package_names_the_extra(tiny, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "skimage", None)
    ok, why = get_engine("onnxruntime").available(purpose="build")
    assert not ok and "scikit-image" in why and "pip install 'kpface[build]'" in why
    assert get_engine("onnxruntime").available()[0]  # running needs neither
    with pytest.raises(EngineUnavailable, match=r"kpface\[build\]"):
        build(tiny, "onnxruntime", "int8")
    code = cli_main(["build", str(tiny), "--runtime", "onnxruntime", "--precision", "int8"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("kpface: ")]
    assert code == 2 and len(lines) == 1 and "kpface[build]" in lines[0], err
    assert "internal error" not in err
    print(f"\nrefusal (missing build package): {lines[0]}")


def test_build_extra_is_declared_and_included():
    from setuptools.config.setupcfg import read_configuration
    extras = read_configuration(str(Path(__file__).parents[1] / "setup.cfg"))[
        "options"]["extras_require"]
    assert {"onnx>=1.16", "scikit-image>=0.22"} <= set(extras["build"])
    for extra in ("openvino", "coreml", "tensorrt", "dev"):
        assert "kpface[build]" in extras[extra], extra


# --- no silent fallbacks -------------------------------------------------------------------------

def test_the_recognizer_reads_the_output_it_was_told_to_read(tiny):
    """Already so before issue 13 (kept under test): the embedding is the graph output named
    ``embedding``, never "the first output"; without it the recognizer refuses."""
    from kpface.models import Recognizer
    from kpface.runtimes import open_session
    from kpface.samples import ASTRONAUT_LANDMARKS, astronaut_bgr
    sess = open_session(tiny, threads=1)

    class Decoy:
        input_names, provider = sess.input_names, sess.provider
        output_names = ["decoy", "embedding"]

        def __init__(self, keep=True):
            self.keep = keep

        def run(self, feeds):
            out = sess.run(feeds)
            got = {"decoy": np.ones_like(out["embedding"])}
            if self.keep:
                got["embedding"] = out["embedding"]
            return got
    m = load_manifest(tiny)
    crop, pts, _ = Recognizer(manifest=m, session=sess).crop(astronaut_bgr(),
                                                             ASTRONAUT_LANDMARKS)
    want = Recognizer(manifest=m, session=sess).embed([crop], [pts])
    got = Recognizer(manifest=m, session=Decoy()).embed([crop], [pts])
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ModelError, match="no 'embedding'"):
        Recognizer(manifest=m, session=Decoy(keep=False)).embed([crop], [pts])
