"""What a quantized or fp16 build keeps in float, decided once for every engine.

Each engine adapter describes its graph (an ONNX model, an OpenVINO model, a TensorRT network)
as a :class:`Graph` of :class:`Node` s: op type, input and output tensor names, and whether the
node is a constant. The two walkers below work on that description only:

* :func:`kprpe_path`: the nodes that depend on the ``keypoints`` input but not on ``image``:
  relative keypoints, the keypoint linear and the gathers that build each block's KP-RPE bias
  table. int8 there would coarsen the bias of every block at once.
* :func:`activation_matmuls`: MatMuls with no constant operand, i.e. the attention products
  q.k and attn.v, whose both sides are activations.
* :func:`landmark_path`: Part fViT's landmark CNN, head and min-max rescale (everything the
  ``landmarks`` output depends on) and the sampling path (from the points to the next weight
  op: the grid or gather indices, GridSample / GatherElements, the gather form's blend). A
  point that moves moves its patch, and through the min-max one extreme value moves them all:
  int8 in the CNN moved points by 3.7 px on average, up to 79 px (README, "LAFS Part fViT").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from kpface.errors import InputError


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
    outputs: dict[str, str] = field(default_factory=dict)  # graph output name -> tensor
    _producer: dict[str, Node] = field(default_factory=dict, init=False, repr=False)
    _consumers: dict[str, list[Node]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._producer = {t: n for n in self.nodes for t in n.outputs if t}
        for n in self.nodes:
            for t in set(n.inputs):
                if t:
                    self._consumers.setdefault(t, []).append(n)

    def consumers(self, tensor: str) -> list[Node]:
        return self._consumers.get(tensor, [])

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
    ready = [n for n in graph.nodes if pending[id(n)] == 0]
    order: list[Node] = []
    while ready:
        node = ready.pop()
        order.append(node)
        for t in node.outputs:
            for c in graph.consumers(t):
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


WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv"})  # ONNX; adapters pass their own op names


def landmark_path(graph: Graph, output: str = "landmarks",
                  weight_ops: Iterable[str] = WEIGHT_OPS, cnn: bool = True) -> list[str]:
    """Names of Part fViT's landmark nodes, in graph order:

    * upstream of graph output ``output``: everything it depends on, i.e. the landmark CNN,
      its head and the per-image min-max; with ``cnn=False`` only back to and including the
      first weight op met (the head, ``output_layer``), so the CNN trunk is left out;
    * downstream of ``output``'s tensor up to, not including, the next weight op (the patch
      embedding): the sampling grid (or the gather form's indices, mask and fractions), the
      sampler and the gather form's bilinear blend.

    Empty when the graph has no such output. Constants are never listed.
    """
    tensor = graph.outputs.get(output)
    if tensor is None:
        return []
    weight_ops = frozenset(weight_ops)
    keep: set[str] = set()
    stack = [graph.producer(tensor)]
    while stack:  # up: the points' arithmetic, the head and (with cnn) the CNN
        node = stack.pop()
        if node is None or node.const or node.name in keep:
            continue
        keep.add(node.name)
        if cnn or node.op not in weight_ops:
            stack += [graph.producer(t) for t in node.inputs if t and not graph.is_constant(t)]
    down, seen = [tensor], set()
    while down:  # down: from the points to the patch embedding
        t = down.pop()
        for node in graph.consumers(t):
            if node.name in seen or node.op in weight_ops:
                continue
            seen.add(node.name)
            keep.add(node.name)
            down += [o for o in node.outputs if o]
    return [n.name for n in graph.nodes if n.name in keep and not n.const]


def landmark_scope(graph: Graph, keep: Any = True,
                   weight_ops: Iterable[str] = WEIGHT_OPS) -> list[str]:
    """The landmark nodes a build keeps in float for build option ``keep_landmarks_float``:
    ``True`` (default: CNN, head, min-max and sampling), ``"head"`` (all but the CNN trunk)
    or ``False`` (none)."""
    if keep is False or keep == "false":
        return []
    if keep is True or keep == "true":
        return landmark_path(graph, weight_ops=weight_ops)
    if keep == "head":
        return landmark_path(graph, weight_ops=weight_ops, cnn=False)
    raise InputError(f"keep_landmarks_float must be true, false or head, not {keep!r}")
