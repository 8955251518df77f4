"""The one float-scope walker (kpface.runtimes.floatscope) and the three engine descriptions.

The walker is checked against a hand-made graph whose answer is written down; each engine's
description against a forward reachability search written here from the definition ("reached
from keypoints and not from image"), independent of the walker's backward dependency sets.
"""
import importlib.util
import types
from enum import Enum

import pytest

from kpface.runtimes import floatscope
from kpface.runtimes.floatscope import Graph, Node


def hand_made() -> Graph:
    """A KP-RPE-shaped block, listed out of order on purpose.

    keypoints -> sub(kp, grid) -> kp_linear(MatMul, weight W) -> gather(table) = bias
    image -> patch(MatMul, weight through Transpose(Convert(W2))) -> q, k (MatMul W3)
    q.k (MatMul, both activations) + bias -> softmax -> attn.v (MatMul, both activations)
    a Shape of keypoints feeding a Reshape of the image path (depends on both)
    """
    nodes = [
        Node("attn_v", "MatMul", ("probs", "v"), ("out",)),
        Node("qk", "MatMul", ("q", "k"), ("logits",)),
        Node("add_bias", "Add", ("logits", "bias"), ("biased",)),
        Node("softmax", "Softmax", ("biased",), ("probs",)),
        Node("rel", "Sub", ("keypoints", "grid"), ("rel_kp",)),
        Node("kp_linear", "MatMul", ("rel_kp", "W"), ("kp_feat",)),
        Node("gather", "Gather", ("kp_feat", "idx"), ("bias",)),
        Node("grid_const", "Constant", (), ("grid",), const=True),
        Node("w2_convert", "Convert", ("W2",), ("W2f",)),
        Node("w2_transpose", "Transpose", ("W2f", "perm"), ("W2t",)),
        Node("patch", "MatMul", ("image", "W2t"), ("x",)),
        Node("kp_shape", "Shape", ("keypoints",), ("kshape",)),
        Node("reshape", "Reshape", ("x", "kshape"), ("xr",)),
        Node("q_proj", "MatMul", ("xr", "W3"), ("q",)),
        Node("k_proj", "MatMul", ("xr", "W3"), ("k",)),
        Node("v_proj", "MatMul", ("xr", ""), ("v",)),  # an absent optional input
    ]
    return Graph(("image", "keypoints"), nodes, constants=frozenset({"W", "W2", "W3", "idx",
                                                                     "perm"}))


def test_kprpe_path_on_a_hand_made_graph():
    g = hand_made()
    # In the graph's own order; grid_const is a constant, reshape also depends on the image.
    assert floatscope.kprpe_path(g) == ["rel", "kp_linear", "gather", "kp_shape"]
    assert floatscope.kprpe_path(g, source="image", other="keypoints") == ["patch"]


def test_activation_matmuls_follow_weight_chains_only_as_deep_as_allowed():
    g = hand_made()
    # Without const_through, the patch MatMul's Transpose(Convert(W2)) weight is not constant.
    assert floatscope.activation_matmuls(g) == ["attn_v", "qk", "patch", "v_proj"]
    g.const_through = frozenset({"Convert", "Transpose"})
    assert floatscope.activation_matmuls(g) == ["attn_v", "qk", "v_proj"]
    g.const_depth = 1  # Transpose is followed, the Convert behind it is not
    assert floatscope.activation_matmuls(g) == ["attn_v", "qk", "patch", "v_proj"]
    assert floatscope.activation_matmuls(g, ops=("Gather",)) == []  # idx is constant


def test_a_cycle_is_refused():
    g = Graph(("a",), [Node("n1", "Add", ("a", "t2"), ("t1",)),
                       Node("n2", "Relu", ("t1",), ("t2",))])
    with pytest.raises(ValueError, match="cycle"):
        floatscope.kprpe_path(g, source="a", other="b")


# --- the engine descriptions --------------------------------------------------------------

def reached_from(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every node reachable from tensor ``start`` along ``edges`` (tensor -> consumer nodes,
    node -> its output tensors share the same dict), breadth first."""
    seen, todo = set(), [start]
    while todo:
        item = todo.pop()
        for nxt in edges.get(item, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def forward_scope(nodes) -> set[str]:
    """Names of the nodes reached from keypoints and not from image, by forward search over
    ``nodes``: (name, input tensors, output tensors)."""
    edges: dict[tuple, set[tuple]] = {}
    for name, ins, outs in nodes:
        for t in ins:
            edges.setdefault(("t", t), set()).add(("n", name))
        for t in outs:
            edges.setdefault(("n", name), set()).add(("t", t))
    kp = reached_from(edges, ("t", "keypoints"))
    im = reached_from(edges, ("t", "image"))
    return {n for kind, n in kp - im if kind == "n"}


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from runtimes_support import export_realistic_tiny
    return export_realistic_tiny(tmp_path_factory.mktemp("fs") / "recognizer") / "model.onnx"


def test_onnx_description(tiny_onnx):
    import onnx

    from kpface.export import registry
    from kpface.runtimes.onnxruntime_rt import describe
    model = onnx.load(str(tiny_onnx))
    got = floatscope.kprpe_path(describe(model))
    want = forward_scope([(n.name, n.input, n.output) for n in model.graph.node])
    assert got and set(got) == want
    ops = {n.name: n.op_type for n in model.graph.node}
    # Each block's bias gather and its keypoint-table MatMul (the key-row layout: one per block).
    depth = len(registry.get("vit_kprpe_tiny").factory().blocks)
    kinds = [ops[n] for n in got]
    assert kinds.count("Gather") >= depth and kinds.count("MatMul") == depth
    # q.k and attn.v of every block: two MatMuls between activations per block.
    assert len(floatscope.activation_matmuls(describe(model))) == 2 * depth


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_openvino_description(tiny_onnx):
    import openvino as ov

    from kpface.runtimes.openvino_rt import describe
    model = ov.convert_model(str(tiny_onnx))
    got = floatscope.kprpe_path(describe(model))
    ops = model.get_ordered_ops()
    # Tensors by producing op; a Parameter's output is the graph input of its name.
    def source(v):
        node = v.get_node()
        return node.get_friendly_name() if node.get_type_name() == "Parameter" else node.get_name()
    want = forward_scope([(op.get_name(), [source(v) for v in op.input_values()],
                           [op.get_name()]) for op in ops if op.get_type_name() != "Parameter"])
    names = {op.get_name(): op.get_friendly_name() for op in ops}
    assert got and set(got) == {names[n] for n in want}
    # convert_model fuses attention into ScaledDotProductAttention: no MatMul between
    # activations is left (the adapter ignores that op type instead).
    assert floatscope.activation_matmuls(describe(model)) == []
    assert any(op.get_type_name() == "ScaledDotProductAttention" for op in ops)


class _LayerType(Enum):
    CONSTANT = 1
    MATRIX_MULTIPLY = 2
    GATHER = 3
    ELEMENTWISE = 4
    NORMALIZATION = 5
    SOFTMAX = 6
    REDUCE = 7
    CONVOLUTION = 8


class _Tensor:
    def __init__(self, name):
        self.name = name


class _Layer:
    def __init__(self, name, type_, ins, outs):
        self.name, self.type = name, type_
        self._ins = [_Tensor(t) if t else None for t in ins]
        self._outs = [_Tensor(t) for t in outs]
        self.num_inputs, self.num_outputs = len(ins), len(outs)

    def get_input(self, j):
        return self._ins[j]

    def get_output(self, j):
        return self._outs[j]


class _Network:
    """The few INetworkDefinition calls the TensorRT adapter's description makes."""

    def __init__(self, inputs, layers, outputs=()):
        self._inputs, self._layers = [_Tensor(t) for t in inputs], layers
        self._outputs = [_Tensor(t) for t in outputs]
        self.num_inputs, self.num_layers = len(inputs), len(layers)
        self.num_outputs = len(outputs)

    def get_output(self, i):
        return self._outputs[i]

    def get_input(self, i):
        return self._inputs[i]

    def get_layer(self, i):
        return self._layers[i]


def test_tensorrt_description_without_tensorrt():
    from kpface.runtimes import tensorrt_rt
    L = _LayerType
    layers = [
        _Layer("table", L.CONSTANT, [], ["tab"]),
        _Layer("kp_linear", L.MATRIX_MULTIPLY, ["keypoints", "tab"], ["kpf"]),
        _Layer("gather", L.GATHER, ["kpf", None], ["bias"]),
        _Layer("patch", L.MATRIX_MULTIPLY, ["image", "tab"], ["x"]),
        _Layer("ln", L.NORMALIZATION, ["x"], ["xn"]),
        _Layer("block0/norm1/mean", L.REDUCE, ["xn"], ["m"]),
        _Layer("pool/mean", L.REDUCE, ["xn"], ["p"]),
        _Layer("add_bias", L.ELEMENTWISE, ["xn", "bias"], ["y"]),
        _Layer("softmax", L.SOFTMAX, ["y"], ["probs"]),
    ]
    trt = types.SimpleNamespace(LayerType=L)
    g = tensorrt_rt.describe(_Network(["image", "keypoints"], layers), trt)
    assert [g.nodes[int(i)].inputs for i in floatscope.kprpe_path(g)] == [
        ("keypoints", "tab"), ("kpf", "")]
    kept = [layer.name for layer in tensorrt_rt._float_layers(
        _Network(["image", "keypoints"], layers), trt)]
    assert kept == ["kp_linear", "gather", "ln", "block0/norm1/mean", "softmax"]
