"""Analytic FLOP counts: from an ONNX graph (shape inference) or from a model's config (the
face ViT, Part fViT).

One multiply-add counts as two FLOPs. Only the ops that carry the arithmetic are counted:
``MatMul``/``Gemm`` (and their quantized forms), ``Conv``/``ConvTranspose`` (and quantized
forms), ``Einsum`` of two operands. Element-wise ops, softmax and normalisations are left out;
for a ViT they are well under 1% of the total.

:func:`onnx_flops` needs the ``onnx`` package (part of the ``export`` extra); the SDK itself
does not, so :func:`vit_flops` and :func:`part_fvit_flops` count the same thing from what a
recognizer's manifest records. :func:`add_flops` gives the bench's recognizer rows their FLOPs and the
fraction of the GEMM peak they reach.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .builds import manifest_or_none

log = logging.getLogger(__name__)

MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"}
GEMM_OPS = {"Gemm"}
CONV_OPS = {"Conv", "ConvInteger", "QLinearConv"}
KPRPE_BUCKETS = 49  # 7 x 7 relative-position buckets per head and block


def _dims(value_info) -> list[int | None] | None:
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[int | None] = []
    for d in t.tensor_type.shape.dim:
        out.append(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None)
    return out


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _prod(xs) -> int:
    return int(math.prod(xs)) if xs else 1


def _bind_inputs(model, dims: Mapping[str, int], input_shapes: Mapping[str, list[int]] | None):
    """Replace named dynamic dims (``batch``, ``height``...) of the graph inputs by values."""
    init_names = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        shape = inp.type.tensor_type.shape
        fixed = (input_shapes or {}).get(inp.name)
        for i, d in enumerate(shape.dim):
            if fixed is not None:
                d.Clear()
                d.dim_value = int(fixed[i])
            elif d.HasField("dim_param") and d.dim_param in dims:
                value = int(dims[d.dim_param])
                d.Clear()
                d.dim_value = value


def onnx_flops(model_or_path: Any, dims: Mapping[str, int] | None = None,
               input_shapes: Mapping[str, list[int]] | None = None) -> dict[str, Any]:
    """FLOPs of one run of an ONNX graph with its dynamic dims bound to ``dims``.

    ``dims`` maps dim names (``{"batch": 8, "height": 480, "width": 640}``) to values;
    ``input_shapes`` gives full shapes per input instead. Returns ``{"flops": total,
    "by_op": {op_type: flops}, "nodes": counted, "unknown": [names of nodes whose shapes shape
    inference could not resolve]}``; with unknown nodes the total is a lower bound.
    """
    import onnx
    from onnx import shape_inference

    if isinstance(model_or_path, (str, os.PathLike)):
        model = onnx.load(str(model_or_path))
    else:
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
    _bind_inputs(model, dims or {}, input_shapes)
    try:
        model = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # an op the checker does not know; count what has shapes
        log.warning("ONNX shape inference failed (%s); FLOP count may be incomplete", e)
    g = model.graph
    shapes: dict[str, list[int | None] | None] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shapes[vi.name] = _dims(vi)
    for init in g.initializer:
        shapes[init.name] = [int(d) for d in init.dims]

    total, counted = 0, 0
    by_op: dict[str, int] = {}
    unknown: list[str] = []

    def add(node, flops: int) -> None:
        nonlocal total, counted
        total += int(flops)
        counted += 1
        by_op[node.op_type] = by_op.get(node.op_type, 0) + int(flops)

    for node in g.node:
        op = node.op_type
        if op not in MATMUL_OPS | GEMM_OPS | CONV_OPS | {"ConvTranspose", "Einsum"}:
            continue
        label = node.name or f"{op}:{node.output[0]}"
        out = shapes.get(node.output[0])
        if op in MATMUL_OPS:
            a = shapes.get(node.input[0])
            if not (_known(out) and a is not None and isinstance(a[-1], int)):
                unknown.append(label)
                continue
            add(node, 2 * _prod(out) * a[-1])
        elif op in GEMM_OPS:
            a = shapes.get(node.input[0])
            if not (_known(out) and _known(a)):
                unknown.append(label)
                continue
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[1]
            add(node, 2 * _prod(out) * k)
        elif op in CONV_OPS or op == "ConvTranspose":
            w_index = 3 if op == "QLinearConv" else 1
            w = shapes.get(node.input[w_index])
            x = shapes.get(node.input[0])
            if not (_known(out) and _known(w) and _known(x)):
                unknown.append(label)
                continue
            if op == "ConvTranspose":
                # Every input pixel scatters one kernel per output channel.
                # w [Cin, Cout/groups, *k]
                add(node, 2 * _prod(x) * w[1] * _prod(w[2:]))
            else:
                # out [N, Cout, *S]; w [Cout, Cin/groups, *k]
                add(node, 2 * _prod(out) * _prod(w[1:]))
        elif op == "Einsum" and len(node.input) == 2:
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            eq = next((at.s.decode() for at in node.attribute if at.name == "equation"), "")
            if not (_known(a) and _known(b) and "->" in eq):
                unknown.append(label)
                continue
            lhs, rhs = eq.replace(" ", "").split("->")
            ta, tb = lhs.split(",")
            if "." in eq:
                unknown.append(label)
                continue
            sizes = dict(zip(ta, a))
            sizes.update(zip(tb, b))
            add(node, 2 * _prod(sizes[c] for c in set(ta + tb)))
    if unknown:
        log.warning("FLOP count: %d of %d arithmetic nodes have unresolved shapes "
                    "(total is a lower bound)", len(unknown), len(unknown) + counted)
    return {"flops": int(total), "by_op": by_op, "nodes": counted, "unknown": unknown,
            "method": "onnx shape inference"}


def vit_flops(config: Mapping[str, Any], batch: int = 1) -> dict[str, Any]:
    """FLOPs of the face ViT (``kpface.export.vit``) from its manifest ``config``.

    Patch-embedding conv, per block qkv / QK^T / AV / proj / MLP, the feature head's two
    linears and, with KP-RPE, the keypoint linear; same ops as :func:`onnx_flops` counts.
    """
    img, p = int(config["img_size"]), int(config["patch_size"])
    d, depth = int(config["embed_dim"]), int(config["depth"])
    hidden = int(int(config["embed_dim"]) * float(config["mlp_ratio"]))
    out = int(config["output_dim"])
    n = (img // p) ** 2
    patch = 2 * n * d * 3 * p * p
    block = (2 * n * d * 3 * d      # qkv
             + 2 * n * n * d        # q @ k^T over all heads
             + 2 * n * n * d        # attn @ v
             + 2 * n * d * d        # proj
             + 2 * 2 * n * d * hidden)  # fc1 + fc2
    head = 2 * n * d * out + 2 * out * out
    total = patch + depth * block + head
    if config.get("kprpe"):
        # Each block's key-row table (kpface.export.kprpe): [N, 2K + 1] -> [N, heads * 7 * side]
        # (the 49 buckets as 7 row buckets x the side's key columns; the +1 carries the bias).
        k = int(config.get("num_keypoints", 5))
        side = img // p
        total += depth * 2 * n * (2 * k + 1) * int(config["num_heads"]) * 7 * side
    return {"flops": int(total * batch), "method": "ViT config"}


def constant_folded(path: Path):
    """``path``'s graph with its constant subgraphs folded by ONNX Runtime (basic level), or
    None. Shape inference cannot follow pads that the torch exporter computes from constants
    through Slice / Transpose / Cast (dlib_resnet_v1's shortcut padding): folded, it can."""
    import tempfile

    import onnx
    try:
        import onnxruntime as ort
        with tempfile.TemporaryDirectory(prefix="kpface-flops-") as tmp:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            opts.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
            opts.log_severity_level = 3
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            return onnx.load(opts.optimized_model_filepath)
    except Exception as e:
        log.warning("bench: constant folding of %s for FLOP counting failed (%s)", path, e)
        return None


def part_fvit_flops(manifest: Mapping[str, Any], batch: int = 1) -> dict[str, Any]:
    """FLOPs of Part fViT (``kpface.export.part_fvit``) from its manifest: the landmark CNN
    from ``landmark_cnn`` (stem, blocks, head), the 196 + CLS token ViT from ``config``. The
    same ops as :func:`onnx_flops`: convolutions (depthwise ones at k*k per output value), the
    squeeze-excite and head linears, patch embedding, qkv / q.k / attn.v / out / MLP. The
    sampling (12,544 bilinear samples x 3 channels, about 0.3 MFLOP: element-wise in either
    form) is not counted, like other element-wise work."""
    c, cnn = manifest["config"], manifest["landmark_cnn"]
    size = int(c["img_size"])
    side = -(-size // 2)  # stem: 3x3 stride 2, pad 1
    stem = int(cnn["stem"])
    total = 2 * side * side * stem * 3 * 9
    inp = stem
    for kernel, exp, out, se, _act, stride in cnn["blocks"][1:]:
        total += 2 * side * side * inp * exp           # 1x1 expansion
        side = -(-side // int(stride))
        total += 2 * side * side * exp * kernel ** 2    # depthwise
        if se:
            total += 2 * 2 * exp * (exp // 4)           # two squeeze-excite linears
        total += 2 * side * side * exp * out            # 1x1 projection
        inp = out
    head_in, head_out = cnn["head"]
    total += 2 * head_in * head_out
    k, d = int(c["num_landmarks"]), int(c["dim"])
    inner, mlp, n = int(c["heads"]) * int(c["dim_head"]), int(c["mlp_dim"]), k + 1
    total += 2 * k * 3 * int(c["patch_size"]) ** 2 * d  # patch embedding (landmark tokens)
    block = (2 * n * d * 3 * inner + 2 * 2 * n * n * inner + 2 * n * inner * d
             + 2 * 2 * n * d * mlp)
    total += int(c["depth"]) * block
    return {"flops": int(total * batch), "method": "Part fViT config"}


def _flops_for(model_dir: str, manifest: dict | None, batches: Iterable[int]
               ) -> dict[int, dict[str, Any]]:
    """FLOPs per batch: the ONNX graph when onnx is installed (constant-folded first when
    shape inference leaves arithmetic nodes unresolved), else the model's config."""
    out: dict[int, dict[str, Any]] = {}
    path = Path(model_dir) / (manifest or {}).get("graphs", {}).get("model", {}).get(
        "file", "model.onnx")
    model = None
    if importlib.util.find_spec("onnx") is not None and path.is_file():
        try:
            import onnx
            model = onnx.load(str(path))
            level = log.level
            log.setLevel(logging.ERROR)  # the probe's lower-bound warning is not the answer
            try:
                unresolved = onnx_flops(model, {"batch": 1})["unknown"]
            finally:
                log.setLevel(level)
            if unresolved:
                model = constant_folded(path) or model
        except Exception as e:
            log.warning("bench: cannot load %s for FLOP counting (%s)", path, e)
    for b in batches:
        try:
            if model is not None:
                r = onnx_flops(model, {"batch": b})
                out[b] = {"flops": r["flops"], "method": r["method"], "by_op": r["by_op"],
                          "unresolved_nodes": len(r["unknown"])}
                continue
        except Exception as e:
            log.warning("bench: ONNX FLOP count of %s failed (%s)", path, e)
        cfg = (manifest or {}).get("config")
        if cfg and "embed_dim" in cfg:
            out[b] = vit_flops(cfg, b)
        elif cfg and "landmark_cnn" in (manifest or {}):
            out[b] = part_fvit_flops(manifest, b)
    return out


def add_flops(rows: list[dict[str, Any]], peak_gflops: float | None, batches: Iterable[int],
              say: Callable[[str], None]) -> None:
    """``flops``, ``gflops_achieved`` and ``fraction_of_peak`` of each measured embed row."""
    cache: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["stage"] != "embed" or r["status"] != "ok":
            continue
        key = r["model_dir"]
        if key not in cache:
            say(f"bench: counting FLOPs of {r['model']} ({r['arch']})")
            cache[key] = _flops_for(key, manifest_or_none(Path(key)), batches)
        f = cache[key].get(r["batch"])
        if not f:
            continue
        r["flops"] = {"per_batch": f["flops"], "per_item": f["flops"] / r["batch"],
                      "method": f["method"]}
        achieved = f["flops"] / (r["latency_ms"]["p50"] / 1e3) / 1e9
        r["gflops_achieved"] = achieved
        r["fraction_of_peak"] = achieved / peak_gflops if peak_gflops else None
