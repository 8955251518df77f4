"""TensorRT int8 by explicit quantization: the Q/DQ ONNX graph a TensorRT int8 build parses.

TensorRT 10 deprecates the implicit-int8 calibrator; explicit quantization puts the scales
in the graph as QuantizeLinear / DequantizeLinear pairs. The graph is made by
:func:`kpface.runtimes.onnxruntime_rt.quantize_int8` (onnxruntime.quantization, static QDQ)
with TensorRT's recipe (:data:`QDQ_OPTIONS`: signed int8, symmetric, zero points 0,
per-channel weights, Q/DQ on the inputs of Conv / MatMul / Gemm only) and the float scope
every kpface engine keeps: LayerNorm, Softmax, the residual Adds, the attention products and
the KP-RPE path (:mod:`kpface.runtimes.floatscope`) get no Q/DQ.

The Q/DQ graph and ``<graph>.calib.json`` (the calibration key and each activation's scale)
are the build's calibration cache: they are written into the staged build directory, so
build.json hashes them, and a later build of the same model on the same crops copies them
from the installed build (after checking them against its build.json) instead of
calibrating again. Needs no GPU and no tensorrt.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kpface.errors import ModelError

log = logging.getLogger(__name__)

# The Q/DQ recipe TensorRT takes: signed int8, symmetric (zero point 0) activations and
# per-channel weights, Q/DQ on the inputs of the weighted ops only, biases in float (TensorRT
# quantizes int8 and fp8 tensors, not int32 biases).
QDQ_OPTIONS = {"activation": "int8", "weights": "int8", "per_channel": True,
               "method": "minmax", "quantize_outputs": False, "quantize_attention": False,
               "keep_kprpe_float": True, "preprocess": True, "quantize_bias": False}


def calibration_key(onnx_path: Path, calibration) -> str:
    """sha256 of the ONNX file, the exact calibration crops and the Q/DQ recipe: a Q/DQ graph
    is reused only for the same model, data and recipe."""
    from kpface.manifest import sha256_file
    h = hashlib.sha256(sha256_file(onnx_path).encode())
    h.update(np.ascontiguousarray(calibration.images).tobytes())
    h.update(np.ascontiguousarray(calibration.keypoints).tobytes())
    h.update(json.dumps(QDQ_OPTIONS, sort_keys=True).encode())
    return h.hexdigest()


def _reusable_qdq(installed: Path, name: str, key: str) -> Path | None:
    """The Q/DQ graph of the installed build at ``installed`` if it was calibrated with
    ``key``, after checking it against that build's build.json."""
    from kpface.manifest import BUILD_MANIFEST_NAME, read_json, verified_file
    if not (installed / BUILD_MANIFEST_NAME).is_file():
        return None
    try:
        info = read_json(installed / BUILD_MANIFEST_NAME, "the installed TensorRT build")
        graph = (info.get("graphs") or {}).get(name) or {}
        if graph.get("calibration_key") != key:
            return None
        return verified_file(installed, info, graph.get("qdq_onnx"))
    except ModelError as e:
        log.info("not reusing the installed calibration (%s)", e)
        return None


def make_qdq(onnx_path: Path, out_dir: Path, name: str, calibration, installed: Path | None,
             reuse: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Write ``<name>.qdq.onnx`` and ``<name>.calib.json`` into the staged ``out_dir``:
    copied from the installed build when calibrated on the same model and crops, else
    calibrated here. Returns the build.json fields (files, key, Q/DQ counts)."""
    import shutil

    import onnx

    from .onnxruntime_rt import quantize_int8
    qdq, calib = out_dir / f"{name}.qdq.onnx", out_dir / f"{name}.calib.json"
    key = calibration_key(onnx_path, calibration)
    found = _reusable_qdq(installed, name, key) if reuse and installed is not None else None
    if found is not None:
        say(f"reusing the Q/DQ calibration of {installed.name} (same model and crops)")
        shutil.copyfile(found, qdq)
        qinfo = {"reused_from": installed.name}
    else:
        say(f"calibrating int8 on {len(calibration)} face crops (Q/DQ graph, "
            "onnxruntime.quantization)")
        qinfo = quantize_int8(onnx_path, qdq, calibration, dict(QDQ_OPTIONS))
    model = onnx.load(str(qdq))
    inits = {i.name: i for i in model.graph.initializer}
    scales = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[1] in inits:
            scales[n.input[0]] = float(onnx.numpy_helper.to_array(inits[n.input[1]]).ravel()[0])
    calib.write_text(json.dumps({"calibration_key": key, "recipe": QDQ_OPTIONS,
                                 "crops": len(calibration), "activation_scales": scales},
                                indent=1) + "\n")
    return {"qdq_onnx": qdq.name, "calibration_cache": calib.name, "calibration_key": key,
            "quantization": {"scheme": "explicit (Q/DQ), strongly typed network", **qinfo},
            "files": [qdq.name, calib.name]}
