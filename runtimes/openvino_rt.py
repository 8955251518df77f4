"""OpenVINO adapter: ONNX -> IR (``model.xml`` + ``model.bin``) at fp32, fp16 or int8.

* fp32: ``openvino.convert_model`` + ``save_model(compress_to_fp16=False)``; run with
  ``INFERENCE_PRECISION_HINT=f32`` (the CPU plugin would otherwise pick bf16 on CPUs that
  have it, which is not what an fp32 build promises).
* fp16: the same IR with fp16-compressed weights. Compute runs in f16 where the device has it
  (GPU, some ARM / AMX-FP16 CPUs), else in f32 with the weights decompressed at load time;
  ``build.json`` records which (``inference_precision``).
* int8: ``nncf.quantize`` with ``ModelType.TRANSFORMER`` (LayerNorm, Softmax and residual Adds
  stay float), calibrated on face crops; the KP-RPE path (nodes that depend on the keypoints but
  not on the image), the attention products (q.k, attn.v) and Part fViT's landmark path (CNN,
  min-max, sampling) are in the ignored scope.

Sessions take a thread count (``INFERENCE_NUM_THREADS``) and report the devices that really
execute the model (``EXECUTION_DEVICES``); asking for a GPU and landing elsewhere is refused.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kpface.errors import EngineUnavailable, InputError, ModelError

from . import floatscope, pages
from .engines import Closable, default_threads, int8_saturates, quiet

log = logging.getLogger(__name__)

INSTALL = "pip install 'kpface[openvino]'  (openvino nncf)"
# convert_model fuses attention into this op; its inputs (q, k, v, KP-RPE bias) stay float.
ATTENTION_TYPES = ["ScaledDotProductAttention"]


def _device(device: str | None) -> str:
    return (device or "cpu").upper()


def available(device: str | None = None, purpose: str = "run") -> tuple[bool, str]:
    try:
        import openvino as ov
    except ImportError:
        return False, f"openvino is not installed: {INSTALL}"
    dev = _device(device)
    have = ov.Core().available_devices
    if not any(d == dev or d.startswith(dev + ".") for d in have):
        return False, (f"OpenVINO {ov.__version__} sees no {dev} device here (it has "
                       f"{', '.join(have) or 'none'}); install the device driver or use --device cpu")
    return True, f"OpenVINO {ov.__version__} ({dev})"


def device_key(device: str | None = None) -> str:
    return _device(device).lower().replace(".", "")


def versions() -> dict[str, str]:
    import openvino as ov
    out = {"openvino": ov.__version__}
    try:
        import nncf
        out["nncf"] = nncf.__version__
    except ImportError:
        pass
    return out


def _capabilities(core, dev: str) -> list[str]:
    try:
        return list(core.get_property(dev, "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # a plugin without the property
        return []


# --- sessions ------------------------------------------------------------------------------

class OpenVinoSession(Closable):
    """A compiled OpenVINO model; ``run`` uses one infer request per call (thread-safe).
    ``close()`` / ``with`` releases it.

    ``release_pages`` (default): the pages of the mapped ``.bin`` are given back while and
    after it compiles (:mod:`.pages`), so the weights are resident once (repacked), not twice.
    """

    def __init__(self, xml: str | os.PathLike, threads: int | None = None,
                 device: str | None = None, precision_hint: str = "f32",
                 names: list[str] | None = None, release_pages: bool = True):
        try:
            import openvino as ov
        except ImportError:
            raise EngineUnavailable(f"openvino is not installed: {INSTALL}") from None
        dev = _device(device)
        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY",
                                  "INFERENCE_PRECISION_HINT": precision_hint}
        if dev == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads or default_threads())
            config["NUM_STREAMS"] = 1
        try:
            # The IR's weights are mapped; what OpenVINO repacks need not stay resident twice.
            with pages.PageDropper([Path(xml).with_suffix(".bin")] if release_pages else []):
                self._compiled = core.compile_model(str(xml), dev, config)
                if release_pages:
                    _warm_up(self._compiled)  # kernels for a dynamic batch are made at the first run
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line message
            raise ModelError(f"{xml} could not be compiled by OpenVINO on {dev} "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                             "rebuild it with `kpface build`") from None
        executing = list(self._compiled.get_property("EXECUTION_DEVICES"))
        if not any(d.split(".")[0] == dev.split(".")[0] for d in executing):
            raise EngineUnavailable(f"OpenVINO runs this model on {', '.join(executing)} although "
                                    f"{dev} was asked for; check the {dev} driver")
        self.provider = "OpenVINO:" + ",".join(executing)
        self.inference_precision = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        # Fused ops collect extra tensor names: keep the graph's own (``names``).
        self.input_names = [_pick_name(i, names) for i in self._compiled.inputs]
        self.output_names = [_pick_name(o, names) for o in self._compiled.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        request = self._compiled.create_infer_request()
        result = request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return {name: np.array(result[o], copy=True)
                for name, o in zip(self.output_names, self._compiled.outputs)}

    def _release(self) -> None:
        self._compiled = None


def _warm_up(compiled) -> None:
    """One batch-1 inference of zeros when every input dim but the first is static."""
    feeds = {}
    for port in compiled.inputs:
        shape = port.get_partial_shape()
        dims = [1 if i == 0 and d.is_dynamic else d for i, d in enumerate(shape)]
        if any(not isinstance(d, int) and d.is_dynamic for d in dims):
            return
        feeds[port] = np.zeros([int(d if isinstance(d, int) else d.get_length()) for d in dims],
                               dtype=port.get_element_type().to_dtype())
    compiled.create_infer_request().infer(feeds)


def _pick_name(port, preferred: list[str] | None) -> str:
    names = port.get_names()
    for n in preferred or ():
        if n in names:
            return n
    plain = sorted(n for n in names if "/" not in n)
    return plain[0] if plain else port.get_any_name()


def load(build_dir: str | os.PathLike, threads: int | None = None, info: dict | None = None,
         device: str | None = None) -> OpenVinoSession:
    info = info or {}
    sess = OpenVinoSession(Path(build_dir) / info.get("file", "model.xml"), threads=threads,
                           device=device, precision_hint=info.get("inference_precision", "f32"),
                           names=info.get("inputs", []) + info.get("outputs", []))
    log.debug("OpenVINO session on %s runs on %s at %s", build_dir, sess.provider,
             sess.inference_precision)
    return sess


# --- build ---------------------------------------------------------------------------------

# A weight reaches a MatMul as a Constant, possibly through a short decompression chain.
WEIGHT_CHAIN = frozenset({"Convert", "Transpose", "Reshape", "FakeQuantize"})
# The ops that carry weights (the ends of floatscope.landmark_path).
WEIGHT_OPS = frozenset({"MatMul", "Convolution", "GroupConvolution"})


def describe(model) -> floatscope.Graph:
    """The engine-neutral description of an OpenVINO model for :mod:`.floatscope`: one node
    per op, named by friendly name as NNCF's ignored scope expects. A Parameter is a graph
    input named by its friendly name; other tensors are ``<unique op name>:<port>``."""
    def tensor(value) -> str:
        node = value.get_node()
        if node.get_type_name() == "Parameter":
            return node.get_friendly_name()
        return f"{node.get_name()}:{value.get_index()}"

    inputs, nodes = [], []
    outputs = {name: tensor(r.input_value(0)) for r in model.get_results()
               for name in r.input_value(0).get_names()}
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Parameter":
            inputs.append(op.get_friendly_name())
            continue
        nodes.append(floatscope.Node(
            op.get_friendly_name(), op.get_type_name(),
            tuple(tensor(v) for v in op.input_values()),
            tuple(tensor(o) for o in op.outputs()),
            const=op.get_type_name() == "Constant"))
    return floatscope.Graph(tuple(inputs), nodes, const_through=WEIGHT_CHAIN, outputs=outputs)


def build(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, precision: str,
          calibration: Any = None, manifest: dict | None = None, device: str | None = None,
          progress: Callable[[str], None] | None = None, options: dict | None = None,
          name: str = "model") -> dict[str, Any]:
    """Write ``<name>.xml`` + ``<name>.bin`` at ``precision`` into ``out_dir``."""
    import openvino as ov

    say = progress or (lambda m: log.info("%s", m))
    options = options or {}
    out_dir = Path(out_dir)
    xml = out_dir / f"{name}.xml"
    t0 = time.perf_counter()
    say(f"converting {Path(onnx_path).name} to OpenVINO IR")
    model = ov.convert_model(str(onnx_path))
    info: dict[str, Any] = {"file": xml.name, "files": [xml.name, f"{name}.bin"],
                            "versions": versions(), "device": _device(device),
                            "inputs": [i.get_any_name() for i in model.inputs],
                            "outputs": [o.get_any_name() for o in model.outputs]}
    hint = "f32"
    if precision == "fp32":
        ov.save_model(model, str(xml), compress_to_fp16=False)
        info["method"] = "openvino.convert_model"
    elif precision == "fp16":
        ov.save_model(model, str(xml), compress_to_fp16=True)
        caps = _capabilities(ov.Core(), _device(device))
        hint = "f16" if "FP16" in caps else "f32"
        info["method"] = "openvino.convert_model + save_model(compress_to_fp16=True)"
        info["weights"] = "fp16"
        if hint == "f32":
            info["note"] = (f"{_device(device)} has no fp16 compute ({', '.join(caps)}): "
                            "weights are stored fp16 and computed in f32")
    elif precision == "int8":
        if calibration is None:
            raise InputError("an int8 build needs calibration data")
        say(f"quantizing to int8 with NNCF ({len(calibration)} calibration crops)")
        info.update(_quantize(model, xml, calibration, options))
    else:
        raise InputError(f"openvino has no {precision} build; choose fp32, fp16 or int8")
    info["inference_precision"] = hint
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


def _quantize(model, xml: Path, calibration, options: dict) -> dict[str, Any]:
    try:
        import nncf
    except ImportError:
        raise EngineUnavailable(f"int8 builds for OpenVINO need nncf: {INSTALL}") from None
    import openvino as ov

    input_names = [i.get_any_name() for i in model.inputs]
    ignored: list[str] = list(options.get("exclude", []))
    kprpe = []
    graph = describe(model)
    if options.get("keep_kprpe_float", True) and {"image", "keypoints"} <= set(input_names):
        kprpe = floatscope.kprpe_path(graph)
        ignored += kprpe
    attention = ([] if options.get("quantize_attention", False)
                 else floatscope.activation_matmuls(graph))
    ignored += attention
    landmarks = floatscope.landmark_scope(graph, options.get("keep_landmarks_float", True),
                                          WEIGHT_OPS)
    ignored += landmarks
    ignored_types = [] if options.get("quantize_attention", False) else ATTENTION_TYPES
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters,
                                                       OverflowFix)
    # SmoothQuant (on by default for transformers) moved the worst held-out crop of a
    # vit_kprpe_small from cosine 0.995 to 0.943: off unless asked for.
    alpha = float(options.get("smooth_quant", -1))
    # x86 CPUs without VNNI multiply u8 x s8 through 16-bit sums that saturate; 7-bit weights
    # in every layer avoid that (measured on an AVX2-only EPYC: cosine 0.92 -> see README).
    overflow = options.get("overflow_fix") or ("enable" if int8_saturates()
                                                else "first_layer_only")
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha),
        overflow_fix=OverflowFix(overflow))
    items = list(calibration.feeds(input_names, batch=1))
    preset = (nncf.QuantizationPreset.MIXED if options.get("activation", "uint8") == "uint8"
              else nncf.QuantizationPreset.PERFORMANCE)
    # NNCF logs every ignored node at INFO and draws progress bars on stdout.
    with quiet("nncf"):
        quantized = nncf.quantize(
            model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
            preset=preset, subset_size=len(items),
            ignored_scope=nncf.IgnoredScope(names=ignored, types=ignored_types, validate=False),
            fast_bias_correction=True, advanced_parameters=advanced)
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    n_fq = sum(1 for op in quantized.get_ordered_ops() if op.get_type_name() == "FakeQuantize")
    return {"method": "nncf.quantize(model_type=TRANSFORMER)", "preset": str(preset.value),
            "weights": "int8 symmetric per-channel", "fake_quantize_nodes": n_fq,
            "smooth_quant": alpha if alpha >= 0 else "off", "overflow_fix": overflow,
            "attention_products": "int8" if options.get("quantize_attention") else "float",
            "float_nodes_kprpe": len(kprpe), "float_nodes_landmarks": len(landmarks),
            "ignored_nodes": len(ignored)}
