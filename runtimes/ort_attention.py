"""ONNX Runtime's fused attention for the face ViTs: a build-time rewrite of the exported graph.

The exported (portable) attention of a block is about fifteen ONNX ops: the qkv MatMul, a
Reshape and a five-axis Transpose, three Gathers, the scaled q.k MatMul, the KP-RPE bias Add,
Softmax, the attn.v MatMul, a Transpose and a Reshape. ONNX Runtime's contrib op
``com.microsoft.Attention`` does all of it in one kernel: the qkv projection with pre-packed
weights, q.k with the bias (``attention_bias``, [B, H, N, N]) accumulated into the scores as
they are computed, softmax and attn.v per (batch, head), written straight in the [B, N, D]
layout the output projection reads. The KP-RPE bias then costs no pass of its own over the
scores, and the Transposes of q, k, v and of the output go away.

``com.microsoft`` ops run on ONNX Runtime only, so this is an ONNX Runtime build option
(``attention=fused``, recorded in build.json); ``model.onnx`` stays portable and the other
engines build from it. Two forms:

* ``attention``: one ``Attention`` node (qkv projection inside; for fp32 / fp16);
* ``mha``: q, k and v as three MatMuls and a ``MultiHeadAttention`` node: the projections stay
  ordinary MatMuls, so an int8 build quantizes them.

Only ``onnx`` is needed; the pattern is the one :mod:`kpface.export.vit` exports, matched
node by node, and a block that does not match is left as it is (reported).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

DOMAIN = "com.microsoft"
FORMS = ("attention", "mha")


@dataclass
class Match:
    qkv: object            # the qkv MatMul node
    out_reshape: object    # the Reshape whose output the projection reads
    bias: str | None       # the KP-RPE bias tensor added to the scores, or None
    heads: int
    head_dim: int
    scale: float
    nodes: list            # every node the fused op replaces


class _Index:
    def __init__(self, graph):
        import onnx
        from onnx import numpy_helper
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in graph.initializer}
        self.consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                       for n in graph.node if n.op_type == "Constant" and n.attribute
                       and n.attribute[0].type == onnx.AttributeProto.TENSOR}

    def value(self, name: str):
        from onnx import numpy_helper
        if name in self.consts:
            return self.consts[name]
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        return None

    def only(self, tensor: str, op: str):
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None


def _attr(node, name, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _match(ix: _Index, reshape) -> Match | None:
    """The attention of one block, from the Reshape of the qkv MatMul's output."""
    qkv = ix.producer.get(reshape.input[0])
    if qkv is None or qkv.op_type != "MatMul" or qkv.input[1] not in ix.inits:
        return None
    tr = ix.only(reshape.output[0], "Transpose")
    if tr is None or list(_attr(tr, "perm", [])) != [2, 0, 3, 1, 4]:
        return None
    gathers = {}
    for g in ix.consumers.get(tr.output[0], []):
        idx = ix.value(g.input[1]) if g.op_type == "Gather" else None
        if idx is None or idx.ndim != 0:
            return None
        gathers[int(idx)] = g
    if sorted(gathers) != [0, 1, 2]:
        return None
    gq, gk, gv = gathers[0], gathers[1], gathers[2]
    nodes = [reshape, tr, gq, gk, gv]
    tk = ix.only(gk.output[0], "Transpose")
    if tk is None or list(_attr(tk, "perm", [])) != [0, 1, 3, 2]:
        return None
    nodes.append(tk)
    # KP-RPE form: MatMul(Mul(q, s), kT) [+ bias]; plain form: Mul(MatMul(q, kT), s).
    q_user = ix.consumers[gq.output[0]][0]
    scale = None
    if q_user.op_type == "Mul":
        scale = ix.value(q_user.input[1])
        qk = ix.only(q_user.output[0], "MatMul")
        nodes += [q_user]
        after = qk
    elif q_user.op_type == "MatMul":
        qk = q_user
        after = ix.only(qk.output[0], "Mul")
        if after is None:
            return None
        scale = ix.value(after.input[1])
        nodes.append(after)
    else:
        return None
    if qk is None or scale is None or np.size(scale) != 1 or qk.input[1] != tk.output[0]:
        return None
    nodes.append(qk)
    scores = after.output[0]
    bias = None
    nxt = ix.consumers.get(scores, [])
    if len(nxt) == 1 and nxt[0].op_type == "Add":
        add = nxt[0]
        bias = add.input[1] if add.input[0] == scores else add.input[0]
        nodes.append(add)
        scores = add.output[0]
    sm = ix.only(scores, "Softmax")
    if sm is None or _attr(sm, "axis", -1) not in (-1, 3):
        return None
    av = ix.only(sm.output[0], "MatMul")
    if av is None or av.input[1] != gv.output[0]:
        return None
    to = ix.only(av.output[0], "Transpose")
    if to is None or list(_attr(to, "perm", [])) != [0, 2, 1, 3]:
        return None
    out = ix.only(to.output[0], "Reshape")
    if out is None:
        return None
    nodes += [sm, av, to, out]
    shape = ix.value(reshape.input[1])
    if shape is None:  # [B, N, 3, H, hd] built from Shape ops: read H and hd from the Concat
        cat = ix.producer.get(reshape.input[1])
        dims = [ix.value(i) for i in cat.input] if cat is not None and cat.op_type == "Concat" \
            else []
        if len(dims) != 5 or any(d is None for d in dims[2:]):
            return None
        heads, head_dim = int(np.ravel(dims[3])[0]), int(np.ravel(dims[4])[0])
    else:
        heads, head_dim = int(shape[3]), int(shape[4])
    return Match(qkv, out, bias, heads, head_dim, float(np.ravel(scale)[0]), nodes)


def _prune(graph) -> int:
    """Drop nodes whose outputs nothing reads (the shape arithmetic the fused op left)."""
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack, live = set(), [o.name for o in graph.output], set()
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        n = producer.get(t)
        if n is not None and id(n) not in live:
            live.add(id(n))
            stack.extend(i for i in n.input if i)
    keep = [n for n in graph.node if id(n) in live]
    dropped = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return dropped


def fuse(model, form: str = "attention") -> dict:
    """Rewrite every matching attention of ``model`` (an ONNX ModelProto, weights loaded) in
    place; return ``{"form", "blocks", "unmatched"}``."""
    from onnx import helper, numpy_helper
    if form not in FORMS:
        raise ValueError(f"unknown attention form {form!r}; choose {', '.join(FORMS)}")
    g = model.graph
    ix = _Index(g)
    matches = [m for m in (_match(ix, n) for n in g.node if n.op_type == "Reshape") if m]
    candidates = sum(1 for n in g.node if n.op_type == "Softmax")
    for k, m in enumerate(matches):
        dim = m.heads * m.head_dim
        if not np.isclose(m.scale, m.head_dim ** -0.5, rtol=1e-6):
            raise ValueError(f"attention scale {m.scale} is not 1/sqrt({m.head_dim})")
        x, w_name = m.qkv.input[0], m.qkv.input[1]
        out = m.out_reshape.output[0]
        bias = m.bias or ""
        # Where the replaced ops ended: every input (the KP-RPE bias too) is made by then.
        first = list(g.node).index(m.out_reshape)
        if form == "attention":
            new = [helper.make_node("Attention", [x, w_name, "", "", "", bias], [out],
                                    name=f"/fused_attention_{k}", domain=DOMAIN,
                                    num_heads=m.heads)]
        else:
            w = numpy_helper.to_array(ix.inits[w_name])
            names = []
            for j, part in enumerate("qkv"):
                name = f"{w_name}_{part}"
                g.initializer.append(numpy_helper.from_array(
                    np.ascontiguousarray(w[:, j * dim:(j + 1) * dim]), name))
                names.append(name)
            new = [helper.make_node("MatMul", [x, names[j]], [f"/fused_attention_{k}/{p}"],
                                    name=f"/fused_attention_{k}/{p}_proj")
                   for j, p in enumerate("qkv")]
            new.append(helper.make_node(
                "MultiHeadAttention", [f"/fused_attention_{k}/{p}" for p in "qkv"]
                + ["", "", bias], [out], name=f"/fused_attention_{k}", domain=DOMAIN,
                num_heads=m.heads))
        for j, n in enumerate(new):
            g.node.insert(first + 1 + j, n)
        for n in m.nodes + [m.qkv]:
            g.node.remove(n)
    dropped = _prune(g) if matches else 0
    if matches and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    log.debug("fused %d attention blocks (%s), %d nodes dropped", len(matches), form, dropped)
    return {"form": form, "blocks": len(matches), "unmatched": candidates - len(matches)}
