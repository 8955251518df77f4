"""Part fViT on the engines: the landmark path kept in float (kpface.runtimes.floatscope), the
landmark gate, builds in both sampling forms, the engine table's sampling-form choice, Core ML
conversion and the TensorRT code path without a GPU.

The model is a part_fvit_tiny with the "realistic" random init of runtimes_support (BatchNorm
statistics from real faces, points that move with the face, a CLS token that does not drown the
patches), exported once per module in each sampling form.
"""
import importlib.util
import json
import shutil
import sys
import types

import numpy as np
import pytest

from kpface.errors import InputError
from kpface.runtimes import engines, floatscope, gates
from kpface.runtimes.build import build
from runtimes_support import export_realistic_part_fvit

FORMS = ("gridsample", "gather")
N_CALIB, N_HELDOUT = 32, 16
WEIGHT_OPS = {"MatMul", "Gemm", "Conv"}


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{form: model dir} of the realistic part_fvit_tiny."""
    root = tmp_path_factory.mktemp("pfv_engines")
    return {form: export_realistic_part_fvit(root / form / "recognizer", sampling=form)
            for form in FORMS}


@pytest.fixture
def copy_of(tiny, tmp_path):
    def make(form):
        dst = tmp_path / form / "recognizer"
        shutil.copytree(tiny[form], dst, ignore=shutil.ignore_patterns("builds"))
        return dst
    return make


# --- the landmark path (floatscope) ------------------------------------------------------

def forward_from(nodes, start, stop_ops):
    """Names of the nodes reached forward from tensor ``start`` without passing a node whose
    op is in ``stop_ops`` (those are not listed): ``nodes`` = (name, op, inputs, outputs)."""
    by_input = {}
    for name, op, ins, outs in nodes:
        for t in ins:
            by_input.setdefault(t, []).append((name, op, outs))
    seen, todo = set(), [start]
    while todo:
        for name, op, outs in by_input.get(todo.pop(), ()):
            if name not in seen and op not in stop_ops:
                seen.add(name)
                todo += list(outs)
    return seen


def backward_from(nodes, tensor):
    """Names of the nodes ``tensor`` depends on (``nodes`` as above)."""
    producer = {t: (name, ins) for name, _, ins, outs in nodes for t in outs}
    seen, todo = set(), [tensor]
    while todo:
        hit = producer.get(todo.pop())
        if hit and hit[0] not in seen:
            seen.add(hit[0])
            todo += list(hit[1])
    return seen


def expected_scope(nodes, head, landmarks, weight_ops):
    """The definition, searched here: (the CNN, head and min-max: all that ``landmarks``
    depends on | without the CNN: the head and what its output reaches) + what the points
    reach before the next weight op."""
    after = forward_from(nodes, landmarks, weight_ops)
    return (backward_from(nodes, landmarks) | after,
            {head[0]} | forward_from(nodes, head[1], weight_ops))


@pytest.mark.parametrize("form", FORMS)
def test_landmark_path_of_the_onnx_graph(tiny, form):
    import onnx

    from kpface.runtimes.onnxruntime_rt import describe
    model = onnx.load(str(tiny[form] / "model.onnx"))
    graph = describe(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    heads = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(heads) == 1  # output_layer: [B, 160] x [160, 392]
    nodes = [(n.name, n.op_type, list(n.input), list(n.output)) for n in model.graph.node
             if n.op_type != "Constant"]
    full, head_only = expected_scope(nodes, (heads[0].name, heads[0].output[0]), "landmarks",
                                     WEIGHT_OPS)
    got = floatscope.landmark_path(graph)
    assert set(got) == full
    assert set(floatscope.landmark_path(graph, cnn=False)) == head_only
    assert floatscope.landmark_scope(graph, "head") == floatscope.landmark_path(graph, cnn=False)
    assert floatscope.landmark_scope(graph, False) == []
    with pytest.raises(InputError, match="true, false or head"):
        floatscope.landmark_scope(graph, "yes")
    kinds = [ops[n] for n in got]
    assert kinds.count("Conv") == 46 and {"Gemm", "ReduceMin", "ReduceMax", "Div"} <= set(kinds)
    assert ({"GridSample"} if form == "gridsample" else {"GatherElements", "Floor"}) <= set(kinds)
    assert kinds.count("MatMul") == 16  # the squeeze-excite linears; not the patch embedding
    assert not set(kinds) & {"LayerNormalization", "Softmax"}
    assert "Conv" not in {ops[n] for n in head_only}
    assert floatscope.landmark_path(graph, output="no_such_output") == []


@pytest.mark.skipif(not have("openvino"), reason="openvino not installed")
@pytest.mark.parametrize("form", FORMS)
def test_landmark_path_of_the_openvino_model(tiny, form):
    import openvino as ov

    from kpface.runtimes.openvino_rt import WEIGHT_OPS as OV_WEIGHTS, describe
    model = ov.convert_model(str(tiny[form] / "model.onnx"))
    graph = describe(model)
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() not in ("Parameter",
                                                                              "Constant")]
    kind = {op.get_friendly_name(): op.get_type_name() for op in ops}
    # The head: the only MatMul with 2 x 196 outputs per image.
    heads = [op for op in ops if op.get_type_name() == "MatMul"
             and op.get_output_partial_shape(0)[-1].get_length() == 392]
    assert len(heads) == 1
    nodes = [(op.get_friendly_name(), op.get_type_name(),
              [f"{v.get_node().get_name()}:{v.get_index()}" for v in op.input_values()
               if v.get_node().get_type_name() not in ("Parameter", "Constant")],
              [f"{op.get_name()}:{i}" for i in range(op.get_output_size())]) for op in ops]
    result = next(r for r in model.get_results() if "landmarks" in r.input_value(0).get_names())
    points = f"{result.input_value(0).get_node().get_name()}:{result.input_value(0).get_index()}"
    full, head_only = expected_scope(nodes, (heads[0].get_friendly_name(),
                                             f"{heads[0].get_name()}:0"), points, OV_WEIGHTS)
    got = floatscope.landmark_path(graph, weight_ops=OV_WEIGHTS)
    assert set(got) == full
    assert set(floatscope.landmark_path(graph, weight_ops=OV_WEIGHTS, cnn=False)) == head_only
    sampler = "GridSample" if form == "gridsample" else "GatherElements"
    kinds = {kind[n] for n in got}
    assert sampler in kinds and {"Convolution", "GroupConvolution"} <= kinds
    assert not kinds & {"MVN", "Softmax", "ScaledDotProductAttention"}


class _LayerType:
    """The TensorRT layer types the fake network below uses (str() like trt's enum)."""

    def __init__(self, name):
        self.name = name

    def __str__(self):
        return f"LayerType.{self.name}"

    def __eq__(self, other):
        return isinstance(other, _LayerType) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


LT = types.SimpleNamespace(**{n: _LayerType(n) for n in (
    "CONSTANT", "CONVOLUTION", "MATRIX_MULTIPLY", "REDUCE", "ELEMENTWISE", "SHUFFLE",
    "GRID_SAMPLE", "NORMALIZATION", "SOFTMAX")})


class _Tensor:
    def __init__(self, name, dtype="float32"):
        self.name, self.dtype = name, dtype


class _Layer:
    def __init__(self, name, type_, ins, outs):
        self.name, self.type, self.precision = name, type_, None
        self._ins = [_Tensor(t) for t in ins]
        self._outs = [_Tensor(t) for t in outs]
        self.num_inputs, self.num_outputs = len(ins), len(outs)
        self.output_types = {}

    def get_input(self, j):
        return self._ins[j]

    def get_output(self, j):
        return self._outs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


class _Network:
    def __init__(self, inputs, outputs, layers):
        self._in, self._out, self._layers = inputs, outputs, layers
        self.num_inputs, self.num_outputs, self.num_layers = len(inputs), len(outputs), len(layers)

    def get_input(self, i):
        return _Tensor(self._in[i])

    def get_output(self, i):
        return _Tensor(self._out[i])

    def get_layer(self, i):
        return self._layers[i]


def test_tensorrt_pins_the_landmark_path_without_tensorrt():
    """What a parsed Part fViT network looks like to the adapter: CNN conv, head matmul,
    min-max, GridSample, patch embedding, a LayerNorm. The CNN through the sampler (and the
    LayerNorm) are pinned to fp32; the patch embedding is not."""
    from kpface.runtimes import tensorrt_rt
    layers = [
        _Layer("w", LT.CONSTANT, [], ["w"]),
        _Layer("cnn", LT.CONVOLUTION, ["image", "w"], ["feat"]),
        _Layer("pool", LT.REDUCE, ["feat"], ["pooled"]),
        _Layer("head", LT.MATRIX_MULTIPLY, ["pooled", "w"], ["t"]),
        _Layer("min", LT.REDUCE, ["t"], ["lo"]),
        _Layer("max", LT.REDUCE, ["t"], ["hi"]),
        _Layer("sub", LT.ELEMENTWISE, ["t", "lo"], ["num"]),
        _Layer("range", LT.ELEMENTWISE, ["hi", "lo"], ["den"]),
        _Layer("div", LT.ELEMENTWISE, ["num", "den"], ["landmarks"]),
        _Layer("grid", LT.ELEMENTWISE, ["landmarks", "w"], ["g"]),
        _Layer("sample", LT.GRID_SAMPLE, ["image", "g"], ["mosaic"]),
        _Layer("tokens", LT.SHUFFLE, ["mosaic"], ["tok"]),
        _Layer("patch", LT.MATRIX_MULTIPLY, ["tok", "w"], ["x"]),
        _Layer("ln", LT.NORMALIZATION, ["x"], ["embedding"]),
    ]
    net = _Network(["image"], ["embedding", "landmarks"], layers)
    trt = types.SimpleNamespace(LayerType=LT, float32="float32", float16="float16")
    kept = tensorrt_rt._float_layers(net, trt)
    assert [layer.name for layer in kept] == ["cnn", "pool", "head", "min", "max", "sub",
                                              "range", "div", "grid", "sample", "tokens", "ln"]
    assert tensorrt_rt._pin_fp32(kept, trt) == len(kept)
    assert all(layer.precision == "float32" for layer in kept)


# --- the landmark gate -----------------------------------------------------------------------

def test_landmark_error_and_its_gate_by_hand():
    ref = np.zeros((2, 100, 2))
    cand = ref.copy()
    cand[0, :3] = (3.0, 4.0)      # 3 points 5 px off
    cand[1, 2] = (0.0, 1.0)       # 1 px
    e = gates.landmark_error(ref, cand)
    assert e["mean"] == pytest.approx(16 / 200) and e["max"] == pytest.approx(5.0)
    assert e["p99"] == pytest.approx(5.0)  # 3 of 200 distances are 5: above the 99th rank
    assert e["worst_input_mean"] == pytest.approx(15 / 100) and e["points"] == 100
    acc = {"model": {"n": 2, "mean": 0.999, "min": 0.998, "landmarks": e}}
    s = gates.decide("recognizer", "int8", acc)
    assert not s["passed"] and s["landmarks"]["gate"] == gates.LANDMARK_GATES["int8"]
    text = gates.figures(s)
    assert "landmarks vs fp32 mean 0.080 px" in text and "p99 5.000 px (gate <= 4)" in text
    e_ok = gates.landmark_error(ref, ref + 0.1)
    assert gates.decide("recognizer", "int8",
                        {"model": {"n": 2, "mean": 0.999, "min": 0.998, "landmarks": e_ok}})["passed"]


# --- builds ----------------------------------------------------------------------------------

BUILDS = [("gridsample", "onnxruntime", "fp16"), ("gridsample", "onnxruntime", "int8"),
          ("gather", "onnxruntime", "int8")]
BUILDS += [pytest.param(f, "openvino", p, marks=pytest.mark.skipif(
    not (have("openvino") and have("nncf")), reason="openvino / nncf not installed"))
    for f, p in (("gridsample", "int8"), ("gather", "fp16"))]


@pytest.mark.parametrize("form,runtime,precision", BUILDS)
def test_builds_keep_the_landmark_path_float_and_gate_the_points(tiny, form, runtime, precision):
    info = build(tiny[form], runtime, precision, detector=None, n_calib=N_CALIB,
                 n_heldout=N_HELDOUT, threads=2)
    acc = info["accuracy"]
    assert acc["passed"], acc
    lm = acc["landmarks"]
    assert lm["unit"] == "px" and lm["points"] == 196 and lm["gate"] == gates.LANDMARK_GATES[precision]
    assert 0 <= lm["mean"] <= lm["p99"] <= lm["gate"]["p99"] and lm["p99"] <= lm["max"]
    if runtime == "onnxruntime":  # the landmark path runs in fp32 there: fp32's points
        assert lm["max"] < 1e-3
    g = info["graphs"]["model"]
    if precision == "int8":
        assert g["float_nodes_landmarks"] > 5
    elif runtime == "onnxruntime":
        assert g["fp32_nodes_landmarks"] > 5
    from kpface.runtimes import open_session
    sess = open_session(tiny[form], runtime=runtime, precision=precision)
    assert set(sess.output_names) == {"embedding", "landmarks"}


def test_quantizing_the_landmark_path_is_an_option(tiny, tmp_path):
    """keep_landmarks_float=false leaves the landmark head to the quantizer: the build
    records no float landmark nodes (the figures of both are in the README)."""
    d = tmp_path / "recognizer"
    shutil.copytree(tiny["gridsample"], d, ignore=shutil.ignore_patterns("builds"))
    info = build(d, "onnxruntime", "int8", detector=None, n_calib=N_CALIB, n_heldout=N_HELDOUT,
                 threads=2, force=True, options={"keep_landmarks_float": False})
    assert info["graphs"]["model"]["float_nodes_landmarks"] == 0
    assert "landmarks" in info["accuracy"]


# --- the sampling form per engine ------------------------------------------------------------

@pytest.fixture
def without_gridsample(monkeypatch):
    """The engine table with ONNX Runtime and Core ML lacking GridSample."""
    from dataclasses import replace
    table = dict(engines._BY_NAME)
    for name in ("onnxruntime", "coreml"):
        table[name] = replace(table[name], lacks=("GridSample",))
    monkeypatch.setattr(engines, "_BY_NAME", table)
    monkeypatch.setattr(engines, "ENGINES", tuple(table.values()))
    return table


def test_the_table_lists_gridsample_support_of_every_engine():
    for e in engines.ENGINES:
        assert "GridSample" in e.ops or "GridSample" in e.lacks, e.name
    head = [c.strip() for c in engines.markdown_table().splitlines()[0].split("|")]
    assert "ops" in head
    assert engines.export_options_for("onnxruntime", {"sampling": ("gridsample", "gather")}) == {}


def test_an_engine_without_gridsample_gets_the_gather_form(without_gridsample, copy_of):
    accepted = {"sampling": ("gridsample", "gather")}
    assert engines.export_options_for("onnxruntime", accepted) == {"sampling": "gather"}
    assert engines.export_options_for("onnxruntime", {}) == {}  # an arch without the option
    assert engines.export_options_for("openvino", accepted) == {}
    md = engines.markdown_table()
    assert "no GridSample: export with sampling=gather" in md
    # Building the GridSample graph is refused before any work, naming the way out...
    grid = copy_of("gridsample")
    with pytest.raises(InputError) as e:
        build(grid, "onnxruntime", "fp16", detector=None)
    msg = str(e.value)
    assert "has no GridSample" in msg and "--for onnxruntime" in msg and "sampling=gather" in msg
    assert "\n" not in msg and not (grid / "builds").exists()
    # ... and the gather graph builds.
    info = build(copy_of("gather"), "onnxruntime", "fp32", detector=None, n_heldout=4)
    assert info["accuracy"]["passed"]


def test_export_for_an_engine_chooses_its_form(without_gridsample, tmp_path, capsys):
    from kpface.cli import main
    rc = main(["-q", "export", "recognizer", "--arch", "part_fvit_tiny", "--for",
               "onnxruntime", "--out", str(tmp_path / "a")])
    assert rc == 0
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["export_options"] == {"sampling": "gather"}
    capsys.readouterr()
    rc = main(["-q", "export", "recognizer", "--arch", "part_fvit_tiny", "--for",
               "onnxruntime", "--option", "sampling=gridsample", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "sampling=gather" in err[0]
    assert not (tmp_path / "b").exists()
    rc = main(["-q", "export", "recognizer", "--arch", "part_fvit_tiny", "--for", "openvino",
               "--out", str(tmp_path / "c")])
    assert rc == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["export_options"] == {"sampling": "gridsample"}


# --- Core ML and TensorRT --------------------------------------------------------------------

needs_coremltools = pytest.mark.skipif(not have("coremltools"), reason="coremltools not installed")


@needs_coremltools
@pytest.mark.parametrize("form", FORMS)
def test_coreml_converts_both_forms(tiny, form):
    """Conversion and the saved spec (both outputs, enumerated batches). Core ML predicts on
    macOS only: the gate measures the torch stand-in; prediction itself is untested here."""
    info = build(tiny[form], "coreml", "fp16", detector=None, n_heldout=N_HELDOUT, threads=2)
    g = info["graphs"]["model"]
    assert g["sampling"] == form
    assert g["spec"]["outputs"] == ["embedding", "landmarks"]
    assert g["spec"]["inputs"]["image"]["shapes"] == [[1, 3, 112, 112], [8, 3, 112, 112]]
    assert "landmarks" in info["accuracy"] and info["accuracy"]["passed"]
    if sys.platform != "darwin":
        assert "stand" in info["accuracy"]["method"]


@needs_coremltools
def test_coreml_without_gridsample_converts_the_gather_form(without_gridsample, copy_of):
    info = build(copy_of("gridsample"), "coreml", "fp32", detector=None, n_heldout=4)
    assert info["graphs"]["model"]["sampling"] == "gather" and info["accuracy"]["passed"]


def test_tensorrt_build_without_a_gpu_says_why(copy_of):
    from kpface.errors import EngineUnavailable
    from kpface.runtimes import tensorrt_rt
    ok, why = tensorrt_rt.available()
    if ok:
        pytest.skip("TensorRT is usable here; the refusal path is not reachable")
    with pytest.raises(EngineUnavailable) as e:
        build(copy_of("gather"), "tensorrt", "fp16", detector=None)
    assert "\n" not in str(e.value)


def test_calibration_feeds_part_fvit_aligned_crops_and_no_keypoints():
    """Part fViT's manifest: ArcFace-aligned 112x112 RGB crops in [-1, 1], graph input
    ``image`` only. The feed equals the crop the pipeline's own alignment and normaliser make."""
    import cv2

    from kpface import samples
    from kpface.align import crop_face
    from kpface.export import registry
    from kpface.preprocess import Normalizer
    from kpface.runtimes.calibration import Augment, make_faceset
    manifest = dict(registry.get("part_fvit").manifest, name="part_fvit")
    faces = [("astronaut", samples.astronaut_bgr(), samples.ASTRONAUT_LANDMARKS)]
    fs = make_faceset(faces, 1, np.random.default_rng(0), Augment.none(), manifest)
    feeds = list(fs.feeds(["image"], batch=8))
    assert len(feeds) == 1 and list(feeds[0]) == ["image"]
    x = feeds[0]["image"]
    assert x.shape == (1, 3, 112, 112) and x.dtype == np.float32 and -1 <= x.min() < x.max() <= 1
    crop, _, _ = crop_face(samples.astronaut_bgr(), samples.ASTRONAUT_LANDMARKS, size=112,
                           convention="aligned")
    want = (cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32) - 127.5) / 127.5
    # Calibration reflects the border where the pipeline paints it black: compare the inside.
    np.testing.assert_allclose(x[0].transpose(1, 2, 0)[8:-8, 8:-8], want[8:-8, 8:-8], atol=1e-5)
    assert Normalizer.from_manifest(manifest).size == (112, 112)
