"""What a quantized or fp16 build keeps in float, decided once for every engine.

Each engine adapter describes its graph (an ONNX model, an OpenVINO model, a TensorRT network)
as a :class:`Graph` of :class:`Node` s: op type, input and output tensor names, and whether the
node is a constant. The two walkers below work on that description only:

* :func:`kprpe_path`: the nodes that depend on the ``keypoints`` input but not on ``image``:
  relative keypoints, the keypoint linear and the gathers that build each block's KP-RPE bias
  table. int8 there would coarsen the bias of every block at once.
* :func:`activation_matmuls`: MatMuls with no constant operand, i.e. the attention products
  q.k and attn.v, whose both sides are activations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True)
class Node:
    name: str
    op: str                          # the engine's op type ("MatMul", "Gather", ...)
    inputs: tuple[str, ...] = ()     # tensor names; "" for an absent optional input
    outputs: tuple[str, ...] = ()
    const: bool = False              # produces a constant (ONNX/OpenVINO Constant, TRT CONSTANT)


@dataclass
class Graph:
    inputs: tuple[str, ...]                               # the graph's input tensors
    nodes: list[Node]
    constants: frozenset[str] = frozenset()               # constant tensors (initializers)
    # Ops that pass a constant first input on as a constant (a weight's Convert / Transpose /
    # FakeQuantize chain); followed for at most ``const_depth`` ops.
    const_through: frozenset[str] = frozenset()
    const_depth: int = 3
    _producer: dict[str, Node] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._producer = {t: n for n in self.nodes for t in n.outputs if t}

    def producer(self, tensor: str) -> Node | None:
        return self._producer.get(tensor)

    def is_constant(self, tensor: str, depth: int | None = None) -> bool:
        """A constant tensor, or one a short chain of ``const_through`` ops makes from one."""
        if tensor in self.constants:
            return True
        node = self._producer.get(tensor)
        if node is None:
            return False
        if node.const:
            return True
        depth = self.const_depth if depth is None else depth
        if depth and node.op in self.const_through and node.inputs and node.inputs[0]:
            return self.is_constant(node.inputs[0], depth - 1)
        return False


def topological(graph: Graph) -> list[Node]:
    """The nodes, producers before consumers (whatever order they were listed in)."""
    pending = {id(n): sum(1 for t in set(n.inputs) if t and graph.producer(t) is not None)
               for n in graph.nodes}
    consumers: dict[str, list[Node]] = {}
    for n in graph.nodes:
        for t in set(n.inputs):
            if t:
                consumers.setdefault(t, []).append(n)
    ready = [n for n in graph.nodes if pending[id(n)] == 0]
    order: list[Node] = []
    while ready:
        node = ready.pop()
        order.append(node)
        for t in node.outputs:
            for c in consumers.get(t, ()):
                pending[id(c)] -= 1
                if pending[id(c)] == 0:
                    ready.append(c)
    if len(order) != len(graph.nodes):
        raise ValueError("the graph has a cycle")
    return order


def input_dependencies(graph: Graph, watched: Iterable[str]) -> dict[str, frozenset[str]]:
    """``{node name: the watched graph inputs it depends on}``."""
    watched = frozenset(watched)
    deps: dict[str, frozenset[str]] = {t: frozenset([t]) for t in graph.inputs if t in watched}
    out: dict[str, frozenset[str]] = {}
    for node in topological(graph):
        acc: frozenset[str] = frozenset()
        for t in node.inputs:
            if t:
                acc |= deps.get(t, frozenset())
        for t in node.outputs:
            deps[t] = acc
        out[node.name] = acc
    return out


def kprpe_path(graph: Graph, source: str = "keypoints", other: str = "image") -> list[str]:
    """Names of the non-constant nodes that depend on input ``source`` but not on ``other``,
    in the graph's own node order."""
    deps = input_dependencies(graph, (source, other))
    return [n.name for n in graph.nodes
            if not n.const and source in deps[n.name] and other not in deps[n.name]]


def activation_matmuls(graph: Graph, ops: Iterable[str] = ("MatMul",)) -> list[str]:
    """Names of the ``ops`` nodes none of whose inputs is a constant."""
    ops = frozenset(ops)
    return [n.name for n in graph.nodes
            if n.op in ops and not any(t and graph.is_constant(t) for t in n.inputs)]
