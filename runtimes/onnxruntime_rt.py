"""ONNX Runtime adapter: fp32, fp16 (fp32 inputs/outputs) and static int8 (QDQ).

* fp32: the exported ONNX file itself (copied into the build so the build is self-contained).
* fp16: ``onnxruntime.transformers.float16.convert_float_to_float16`` with ``keep_io_types``;
  LayerNormalization, Softmax and BatchNormalization (and ORT's default block list) stay fp32,
  and so does Part fViT's landmark path (:func:`.floatscope.landmark_path`).
* int8: ``onnxruntime.quantization.quantize_static`` in QDQ format, uint8 activations and
  per-channel symmetric int8 weights, calibrated on face crops. Only Conv / MatMul / Gemm with a
  constant weight are quantized (Conv with its output, so ORT fuses QLinearConv; MatMul / Gemm
  without, so it fuses MatMulIntegerToFloat), so LayerNorm, Softmax, the residual Adds and the attention
  products (q.k, attn.v) stay float; the KP-RPE path (every node that depends on the keypoints
  but not on the image: relative keypoints, keypoint linear, table gather) stays float too.

Sessions report the execution provider that really runs the graph; asking for CUDA and
getting CPU raises :class:`EngineUnavailable` instead of running slowly in silence.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kpface.errors import EngineUnavailable, InputError, ModelError

from . import floatscope, onnxfile
from .engines import Closable, default_threads, int8_saturates, quiet

log = logging.getLogger(__name__)

INSTALL = "pip install onnxruntime"
INSTALL_GPU = "pip install onnxruntime-gpu"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
FP16_KEEP_FP32 = ["LayerNormalization", "Softmax", "BatchNormalization"]
INT8_OP_TYPES = ["Conv", "MatMul", "Gemm"]
# ``attention`` build option: the exported graph's attention, or ONNX Runtime's fused op.
ATTENTION_FORMS = ("portable", "fused")
DEFAULT_QUANTIZED_OUTPUTS = ["Conv"]


def output_types(value: Any) -> list[str]:
    """The ``quantize_outputs`` option as a list of op types (true: all, false: none)."""
    if value is True:
        return list(INT8_OP_TYPES)
    if value is False or value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or any(t not in INT8_OP_TYPES for t in items):
        raise InputError(f"quantize_outputs {value!r}: give true, false or a list of "
                         f"{', '.join(INT8_OP_TYPES)}")
    return [t for t in INT8_OP_TYPES if t in items]


def _device(device: str | None) -> str:
    dev = (device or "cpu").lower().split(":")[0]
    if dev not in PROVIDERS:
        raise InputError(f"onnxruntime runs on {', '.join(PROVIDERS)}, not {device!r}")
    return dev


def available(device: str | None = None, purpose: str = "run") -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return False, f"onnxruntime is not installed: {INSTALL}"
    dev = _device(device)
    have = ort.get_available_providers()
    if PROVIDERS[dev] not in have:
        return False, (f"onnxruntime {ort.__version__} has no {PROVIDERS[dev]} here (it has "
                       f"{', '.join(have)}): {INSTALL_GPU} and install CUDA/cuDNN")
    return True, f"onnxruntime {ort.__version__} ({PROVIDERS[dev]})"


def device_key(device: str | None = None) -> str:
    return _device(device)


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime as ort
    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__}


# --- sessions ------------------------------------------------------------------------------

class OrtSession(Closable):
    """ONNX Runtime session on one ONNX file; thread-safe (ORT's run is re-entrant).
    ``close()`` / ``with`` releases it.

    ``spinning`` (off by default): ONNX Runtime's worker threads busy-wait for work between
    ops unless told not to. A pipeline runs several sessions one after the other (P-Net, R-Net,
    O-Net, the recognizer), and each one's spinning threads took the cores from the next: on
    this 2-core machine the int8 pipeline took 414 ms with spinning and 169 ms without, the
    detector 144 ms against 68 ms (same process, same load). Weights of a graph saved with
    external data (:mod:`.onnxfile`) are memory-mapped by ONNX Runtime, not copied.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 providers: list | None = None, spinning: bool = False):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EngineUnavailable(f"onnxruntime is not installed: {INSTALL}") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self._sess = ort.InferenceSession(str(path), opts,
                                              providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf types
            raise ModelError(f"{path} could not be loaded by ONNX Runtime "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             "re-export the model") from None
        self.provider = self._sess.get_providers()[0]
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        outs = self._sess.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))

    def _release(self) -> None:
        self._sess = None


def open_onnx(path: str | os.PathLike, threads: int | None = None,
              device: str | None = None) -> OrtSession:
    """An :class:`OrtSession` on ``device``; a CUDA request that lands on CPU is refused."""
    dev = _device(device)
    if dev == "cpu":
        return OrtSession(path, threads=threads)
    ok, why = available(dev)
    if not ok:
        raise EngineUnavailable(why)
    provider = device.split(":")[1] if ":" in (device or "") else "0"
    sess = OrtSession(path, threads=threads, providers=[
        (PROVIDERS[dev], {"device_id": int(provider)}), "CPUExecutionProvider"])
    if sess.provider != PROVIDERS[dev]:
        raise EngineUnavailable(
            f"onnxruntime fell back to {sess.provider} although {PROVIDERS[dev]} was asked "
            f"for (CUDA/cuDNN libraries missing or mismatched?); fix the CUDA install or "
            f"use --device cpu")
    return sess


def load(build_dir: str | os.PathLike, threads: int | None = None, info: dict | None = None,
         device: str | None = None) -> OrtSession:
    build_dir = Path(build_dir)
    fname = (info or {}).get("file", "model.onnx")
    sess = open_onnx(build_dir / fname, threads=threads, device=device)
    log.debug("onnxruntime session on %s runs on %s", build_dir / fname, sess.provider)
    return sess


# --- build ---------------------------------------------------------------------------------

def build(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, precision: str,
          calibration: Any = None, manifest: dict | None = None, device: str | None = None,
          progress: Callable[[str], None] | None = None, options: dict | None = None,
          name: str = "model") -> dict[str, Any]:
    """Write ``<name>.onnx`` at ``precision`` into ``out_dir``; return its description."""
    say = progress or (lambda m: log.info("%s", m))
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    out = out_dir / f"{name}.onnx"
    t0 = time.perf_counter()
    info: dict[str, Any] = {"file": out.name, "files": [out.name], "versions": versions()}
    options = dict(options or {})
    attention = str(options.pop("attention", "portable"))
    if attention not in ATTENTION_FORMS:
        raise InputError(f"attention={attention} is not an onnxruntime build option value; "
                         f"choose attention={'|'.join(ATTENTION_FORMS)}")
    if attention == "fused" and precision not in ("fp32", "int8"):
        raise InputError("attention=fused is made for fp32 and int8 onnxruntime builds")
    if precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"onnxruntime has no {precision} build; choose fp32, fp16 or int8")
    with tempfile.TemporaryDirectory(prefix="kpface-ort-b-") as work:
        src = onnx_path
        if attention == "fused":
            say("fusing attention into ONNX Runtime's contrib "
                + ("Attention" if precision == "fp32" else "MultiHeadAttention") + " ops")
            src = Path(work) / "fused.onnx"
            info["attention"] = fuse_attention(onnx_path, src, precision)
        if precision == "fp32":
            onnxfile.copy(src, out)
            info["method"] = "the exported fp32 ONNX graph" + (
                " with fused attention" if attention == "fused" else "")
        elif precision == "fp16":
            say("converting to fp16 (fp32 inputs/outputs; LayerNorm/Softmax/BatchNorm kept fp32)")
            info.update(convert_fp16(src, out, options))
        else:
            if calibration is None:
                raise InputError("an int8 build needs calibration data")
            say(f"quantizing to int8 (static QDQ, {len(calibration)} calibration crops)")
            info.update(quantize_int8(src, out, calibration, options))
    info["files"] = onnxfile.files(out)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


def fuse_attention(src: Path, dst: Path, precision: str) -> dict[str, Any]:
    """``src`` with every ViT attention as one ONNX Runtime contrib op, written to ``dst``:
    ``Attention`` for fp32, ``MultiHeadAttention`` after three MatMuls (which int8 quantizes)
    for int8 (:mod:`.ort_attention`)."""
    import onnx

    from .ort_attention import fuse
    model = onnx.load(str(src))
    done = fuse(model, "attention" if precision == "fp32" else "mha")
    if not done["blocks"]:
        raise InputError(f"{src.name} has no attention block ONNX Runtime's fused op can take "
                         "(attention=fused is made for the face ViTs); build without it")
    onnxfile.save(model, dst)
    return {"fused": "com.microsoft." + ("Attention" if done["form"] == "attention"
                                         else "MultiHeadAttention"), **done}


def convert_fp16(src: Path, dst: Path, options: dict | None = None) -> dict[str, Any]:
    import onnx
    try:
        from onnxruntime.transformers.float16 import (DEFAULT_OP_BLOCK_LIST,
                                                      convert_float_to_float16)
    except ImportError:
        raise EngineUnavailable("this onnxruntime wheel lacks onnxruntime.transformers.float16; "
                                "pip install -U onnxruntime") from None
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32))
    model = onnx.load(str(src))
    # Part fViT: the landmark CNN, min-max and sampling stay fp32 (fp16 spacing near 111 px is
    # 0.06 px, and every point moves a patch; build option keep_landmarks_float).
    landmarks = floatscope.landmark_scope(describe(model),
                                          (options or {}).get("keep_landmarks_float", True))
    # It logs every initializer shared by fp32 and fp16 nodes (it keeps both copies) at INFO.
    with quiet("onnxruntime.transformers.float16"):
        model16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                           node_block_list=landmarks)
    del model
    dropped = drop_fp16_round_trips(model16)
    onnxfile.save(model16, dst)
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16",
            "keep_io_types": True, "fp32_op_types": FP16_KEEP_FP32,
            "fp32_nodes_landmarks": len(landmarks), "fp16_round_trips_removed": dropped}


def drop_fp16_round_trips(model) -> int:
    """Between two nodes it keeps in fp32, ``convert_float_to_float16`` inserts Cast(to fp16)
    then Cast(to fp32): a lossy round trip (it moved Part fViT's fp32 landmark CNN by 0.15 px
    on average). Feed each such fp32 Cast's consumers the fp32 tensor itself and drop the
    Casts nothing reads any more. Returns how many round trips were removed."""
    from onnx import TensorProto, shape_inference
    g = model.graph
    # Only a round trip that starts from an fp32 tensor is lossy (a model's own Cast of an
    # integer tensor to float, made fp16, may feed an fp32 node too): element types from
    # shape inference, graph inputs and initializers.
    typed = shape_inference.infer_shapes(model).graph
    elem = {v.name: v.type.tensor_type.elem_type
            for v in list(typed.value_info) + list(typed.input) + list(typed.output)}
    elem.update({i.name: i.data_type for i in g.initializer})

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) \
            if node.op_type == "Cast" else None
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    rename, n_out = {}, 0
    for n in g.node:
        first = producer.get(n.input[0]) if n.op_type == "Cast" else None
        if not (cast_to(n) == TensorProto.FLOAT and first is not None
                and cast_to(first) == TensorProto.FLOAT16
                and elem.get(first.input[0]) == TensorProto.FLOAT):
            continue
        if n.output[0] in outputs:  # a graph output keeps its name: an Identity of the fp32
            n.op_type, n.input[0] = "Identity", first.input[0]
            del n.attribute[:]
            n_out += 1
        else:
            rename[n.output[0]] = first.input[0]
    for n in g.node:
        n.input[:] = [rename.get(t, t) for t in n.input]
    while True:  # drop Casts whose outputs nothing reads (the fp32 ones, then idle fp16 ones)
        used = {t for n in g.node for t in n.input} | outputs
        idle = [n for n in g.node if n.op_type == "Cast" and n.output[0] not in used]
        if not idle:
            break
        for n in idle:
            g.node.remove(n)
    return len(rename) + n_out


def describe(model) -> floatscope.Graph:
    """The engine-neutral description of an ONNX model for :mod:`.floatscope`."""
    return floatscope.Graph(
        inputs=tuple(i.name for i in model.graph.input),
        nodes=[floatscope.Node(n.name, n.op_type, tuple(n.input), tuple(n.output),
                               const=n.op_type == "Constant") for n in model.graph.node],
        constants=frozenset(i.name for i in model.graph.initializer),
        outputs={o.name: o.name for o in model.graph.output})


def quantize_int8(src: Path, dst: Path, calibration, options: dict) -> dict[str, Any]:
    """Static QDQ int8 of ``src`` into ``dst``. ``options`` overrides the defaults:

    ``method`` (minmax | entropy | percentile), ``per_channel`` (True), ``activation``
    (uint8 | int8), ``exclude`` (extra node names), ``keep_kprpe_float`` (True),
    ``quantize_attention`` (False: q.k and attn.v MatMuls stay float), ``keep_landmarks_float``
    (True: Part fViT's landmark CNN, min-max and sampling stay float; "head": all but the CNN
    trunk), ``quantize_outputs``
    (``["Conv"]``: the op types whose outputs are quantized too; true = all, false = none),
    ``preprocess`` (True: symbolic shape inference first), ``op_types`` (Conv, MatMul, Gemm:
    the op types quantized; a ResNet may add Add, AveragePool, MaxPool, Relu, Pad),
    ``quantize_bias`` (True: int32 biases; the TensorRT recipe keeps them float).

    Outputs: a Conv whose output stays float cannot become ORT's QLinearConv: it runs as
    DequantizeLinear + float Conv, slower than fp32 (dlib_resnet_v1, batch 8: 0.8x fp32 with
    float Conv outputs, 2.5x with quantized ones). A MatMul with a float output fuses into
    MatMulIntegerToFloat, which is why MatMul / Gemm outputs stay float by default.

    Measured on vit_kprpe_small (64 calibration / 32 held-out crops; batch 8, 2 threads): ORT's
    defaults (attention products and MatMul outputs quantized too) gave cosine mean 0.99902 /
    min 0.99847 and 1.85x fp32 speed; these defaults give 0.99967 / 0.99942 and 1.95x.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    method = options.get("method", "minmax")
    if method not in methods:
        raise InputError(f"unknown calibration method {method!r}; choose {', '.join(methods)}")
    quantized_outputs = output_types(options.get("quantize_outputs", DEFAULT_QUANTIZED_OUTPUTS))
    op_types = list(options.get("op_types") or INT8_OP_TYPES)
    if not all(isinstance(t, str) for t in op_types) or not set(INT8_OP_TYPES) <= set(op_types):
        raise InputError(f"op_types {op_types!r}: a list of ONNX op types that includes "
                         f"{', '.join(INT8_OP_TYPES)} (e.g. adding Add, AveragePool, MaxPool, "
                         "Relu, Pad for a ResNet)")
    model = onnx.load(str(src))
    input_names = [i.name for i in model.graph.input]
    op_type = {n.name: n.op_type for n in model.graph.node}
    graph = describe(model)
    exclude = list(options.get("exclude", []))
    kprpe_nodes: list[str] = []
    if options.get("keep_kprpe_float", True) and {"image", "keypoints"} <= set(input_names):
        kprpe_nodes = floatscope.kprpe_path(graph)
        exclude += kprpe_nodes
    attention = ([] if options.get("quantize_attention", False)
                 else floatscope.activation_matmuls(graph))
    exclude += attention
    landmark_nodes = floatscope.landmark_scope(graph, options.get("keep_landmarks_float", True))
    exclude += landmark_nodes
    del model, graph

    class FaceReader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(calibration.feeds(input_names, batch=8))

    act = QuantType.QUInt8 if options.get("activation", "uint8") == "uint8" else QuantType.QInt8
    # On x86 without VNNI, uint8 x int8 products saturate in 16 bits: use uint8 weights there
    # (kpface.runtimes.engines.int8_saturates). options["weights"] overrides.
    weights = options.get("weights") or ("uint8" if int8_saturates() and act == QuantType.QUInt8
                                         else "int8")
    wtype = QuantType.QUInt8 if weights == "uint8" else QuantType.QInt8
    with tempfile.TemporaryDirectory(prefix="kpface-ort-q-") as work:
        source = src
        if options.get("preprocess", True):
            from onnxruntime.quantization.shape_inference import quant_pre_process
            pre = Path(work) / "pre.onnx"
            try:
                with quiet("onnxruntime.quantization"):
                    quant_pre_process(str(src), str(pre))
                source = pre
            except Exception as e:  # symbolic shape inference is best effort
                log.warning("quantization pre-processing skipped (%s: %s)", type(e).__name__,
                            str(e).splitlines()[0][:160] if str(e) else "")
        quantize_static(
            str(source), str(dst), FaceReader(),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
            per_channel=bool(options.get("per_channel", True)), reduce_range=False,
            activation_type=act, weight_type=wtype, nodes_to_exclude=exclude,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": act == QuantType.QInt8,
                           "WeightSymmetric": wtype == QuantType.QInt8,
                           "QuantizeBias": bool(options.get("quantize_bias", True)),
                           "OpTypesToExcludeOutputQuantization":
                               [t for t in INT8_OP_TYPES if t not in quantized_outputs]})
    q = onnx.load(str(dst))
    onnxfile.order_as_needed(q)
    onnxfile.save(q, dst)  # a large int8 graph gets page-aligned external data too
    n_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
    n_dq = sum(1 for n in q.graph.node if n.op_type == "DequantizeLinear")
    return {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "activations": "uint8 asymmetric" if act == QuantType.QUInt8 else "int8 symmetric",
            "weights": (f"{weights} " + ("symmetric " if weights == "int8" else "asymmetric ")
                        + ("per-channel" if options.get("per_channel", True) else "per-tensor")),
            "saturation_free": weights == "uint8" or not int8_saturates(),
            "calibration_method": method, "op_types": op_types,
            "attention_products": "int8" if options.get("quantize_attention") else "float",
            "quantized_outputs": quantized_outputs,
            "float_nodes_kprpe": len(kprpe_nodes),
            "float_nodes_landmarks": len(landmark_nodes),
            "float_matmuls": sorted(n for n in set(exclude) if op_type.get(n) in INT8_OP_TYPES),
            "quantize_linear_nodes": n_q, "dequantize_linear_nodes": n_dq}
