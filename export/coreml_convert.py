"""Core ML builder: torch model -> ML program (``<graph>.mlpackage``), fp32 / fp16 / int8 weights.

The engine table names this module as Core ML's builder (:mod:`kpface.runtimes.coreml_rt`
loads and runs the result). Core ML converts from torch, not from ONNX, so a build needs the
torch model: the architecture comes from the manifest (``arch``) and the weights, in this order,
from

1. ``weights.safetensors`` stored by ``export_model(..., save_weights=True)`` (listed in the
   manifest as ``torch_weights`` and hash-checked with the rest of the model directory);
2. the checkpoint the caller names with the build option ``weights`` (``kpface build
   --option weights=PATH``), which must have the sha256 the manifest's ``source`` recorded;
3. the weights an installed package ships for the architecture (``packaged_weights``).

A path recorded in the manifest is never opened on the manifest's word: a model directory only
makes kpface open files inside itself.

A model exported with random weights and without ``save_weights`` cannot be converted (its
random initialisation is not reproducible); the build says so. Before converting, the torch
model is checked against ``model.onnx`` so wrong weights are refused.

Conversion: ``torch.jit.trace`` + ``coremltools.convert`` to an ``mlprogram`` with named fp32
inputs (``image``, ``keypoints``) and output (``embedding``), enumerated batch sizes (1 and 8
by default, option ``batches``; several enumerated inputs need iOS 18 / macOS 15), fp32 or fp16
compute precision (LayerNorm and softmax stay fp32), and for int8 ``coremltools.optimize.coreml.
linear_quantize_weights`` (symmetric, per channel; activations stay fp16) with the KP-RPE
keypoint linear kept in float, as the other engines keep the KP-RPE path.

Prediction needs macOS: where Core ML cannot predict, the build's accuracy gate measures a
torch stand-in with the same weight rounding (fp16 / int8 per channel), computed in fp32
(:func:`gate_session`). That is a simulation, not a measurement: the build is recorded with
``"gate": "simulated"`` (never ``"passed"``) and its ``accuracy.method`` says what stood in.

The run side is reached through the engine table (``get_engine("coreml").load_adapter()``),
so this module imports nothing of :mod:`kpface.runtimes` but the table.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kpface.errors import InputError, ModelError
from kpface.runtimes.engines import get_engine, quiet

log = logging.getLogger(__name__)

FROM_TORCH = True  # kpface.runtimes.build: this builder picks its own export options
FP32_OPS = ("layer_norm", "softmax")     # MIL op types kept fp32 in fp16 programs
WEIGHT_THRESHOLD = 2048                  # smaller weights stay fp16 (coremltools' default)
# torch parameters kept in float in int8 builds: the KP-RPE keypoint linear (whose rows are
# every block's relative-position bias table), as the ORT / OpenVINO / TensorRT builds keep it.
FLOAT_PARAMETERS = ("keypoint_linear.",)
TARGET = "macOS15"                       # several EnumeratedShapes inputs need iOS 18 / macOS 15


def _runner():
    """:mod:`kpface.runtimes.coreml_rt`, the run side, named by the engine table."""
    return get_engine("coreml").load_adapter()


def available(device: str | None = None, purpose: str = "build") -> tuple[bool, str]:
    """Can Core ML models be converted here (any OS with coremltools and torch)?"""
    ok, why = _runner().available(device, purpose="build")
    if not ok:
        return ok, why
    try:
        import torch  # noqa: F401  (conversion traces the torch model)
    except ImportError:
        return False, ("Core ML conversion starts from the torch model: "
                       "pip install 'kpface[export]'")
    return ok, why


def device_key(device: str | None = None) -> str:
    return _runner().device_key(device)


def versions() -> dict[str, str]:
    ct = _runner().import_coremltools()
    import torch
    return {"coremltools": ct.__version__, "torch": torch.__version__}


# --- the torch model -----------------------------------------------------------------------

def torch_model(manifest: dict, model_dir: str | os.PathLike,
                weights: str | os.PathLike | None = None):
    """(eval-mode torch module, where its weights came from) for ``manifest``'s arch;
    ``weights``: a checkpoint the caller names (it must match the manifest's source)."""
    from kpface.export.onnx_export import build_model
    from kpface.manifest import sha256_file, verified_file

    model_dir = Path(model_dir)
    arch = manifest.get("arch")
    source = manifest.get("source", {}) or {}
    stored = manifest.get("torch_weights")
    # Export-time choices (Part fViT's sampling form) shape the module: rebuild it the same way,
    # except where the engine table says Core ML lacks an op that an option avoids.
    from kpface.export import registry
    from kpface.runtimes.engines import export_options_for
    needed = export_options_for("coreml", registry.get(arch).options)
    opts = {**(manifest.get("export_options") or {}), **needed} or None
    if needed:
        log.info("Core ML lacks ops of this export; converting with %s", needed)
    if stored:
        path = verified_file(model_dir, manifest, stored)
        _, model, _ = build_model(arch, weights=path, options=opts)
        return model.eval(), str(path)
    ckpt = source.get("path")
    if weights is not None:
        if not Path(weights).is_file():
            raise InputError(f"--option weights={weights}: no such checkpoint file")
        expected = (manifest.get("weights") or {}).get("sha256") or source.get("sha256")
        if sha256_file(weights) != expected:
            raise ModelError(f"{weights} is not the checkpoint {model_dir} was exported from "
                             f"(its manifest records sha256 {str(expected)[:12]}...)")
        _, model, _ = build_model(arch, weights=weights, options=opts)
        return model.eval(), str(weights)
    from kpface.weights import is_random
    if not is_random(manifest) and registry.get(arch).packaged_weights is not None:
        _, model, _ = build_model(arch, options=opts)
        return model.eval(), "packaged weights"
    if is_random(manifest):
        raise ModelError(f"Core ML converts from torch and {model_dir} was exported with random "
                         "weights and without them; re-export it with --save-weights "
                         "(export_model(..., save_weights=True))")
    raise ModelError(f"Core ML converts from torch and {model_dir} holds no torch weights; pass "
                     f"the checkpoint it was exported from ({ckpt or 'see its manifest'}) with "
                     "--option weights=PATH, or re-export it with --save-weights")


def _check_against_onnx(module, onnx_path: Path, graph: dict, batch: int = 2) -> float:
    """Cosine of torch vs ONNX outputs on seeded random inputs; refuse other weights."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(0)
    feeds = {}
    for spec in graph["inputs"]:
        shape = [batch if isinstance(d, str) else d for d in spec["shape"]]
        if spec["name"] == "keypoints":
            feeds["keypoints"] = (0.35 + 0.3 * rng.random(shape)).astype(np.float32)
        else:
            feeds[spec["name"]] = rng.uniform(-1, 1, shape).astype(np.float32)
    with torch.no_grad():
        ref = module(*[torch.from_numpy(feeds[s["name"]]) for s in graph["inputs"]])
    # Compared by name: the graph's first output is the one the torch module returns first.
    name = graph["outputs"][0]["name"]
    ref = (ref if isinstance(ref, (tuple, list)) else (ref,))[0].numpy().ravel()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    got = sess.run([name], feeds)[0].ravel()
    cos = float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got) + 1e-30))
    if cos < 0.9999:
        raise ModelError(f"the torch weights found for Core ML do not reproduce {onnx_path} "
                         f"(cosine {cos:.5f}); re-export the model with save_weights=True")
    return cos


# --- conversion ----------------------------------------------------------------------------

_PATCHED = False


def _patch_int_cast() -> None:
    """coremltools 9 folds ``int(tensor)`` with ``int(np_array)``, which numpy >= 2.3 refuses
    for arrays of one element (the traced ``x.shape[0]`` of a reshape). Override the ``int`` /
    ``bool`` converters with a version that takes ``.item()``; other cases go to the original."""
    global _PATCHED
    if _PATCHED:
        return
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops as ctops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    def cast(context, node, dtype, dtype_name):
        x = ctops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and np.size(x.val) == 1:
            value = dtype(np.asarray(x.val).reshape(()).item())
            context.add(mb.const(val=value, name=node.name), node.name)
        else:
            ctops._cast(context, node, dtype, dtype_name)

    @register_torch_op(torch_alias=["int"], override=True)
    def _int(context, node):
        cast(context, node, int, "int32")

    @register_torch_op(torch_alias=["bool"], override=True)
    def _bool(context, node):
        cast(context, node, bool, "bool")

    _PATCHED = True


def convert(module, graph: dict, precision: str, batches=None):
    """The ``ct.models.MLModel`` of ``module`` at ``precision`` (weights not yet quantized)."""
    import torch
    ct = _runner().import_coremltools()
    batches = tuple(batches or _runner().DEFAULT_BATCHES)
    _patch_int_cast()
    example = []
    inputs = []
    for spec in graph["inputs"]:
        shape = list(spec["shape"])
        if any(isinstance(d, str) for d in shape[1:]):
            raise InputError(f"Core ML builds need fixed sizes except the batch; input "
                             f"{spec['name']} is {shape}")
        shapes = [[b] + shape[1:] for b in batches]
        inputs.append(ct.TensorType(name=spec["name"], dtype=np.float32,
                                    shape=ct.EnumeratedShapes(shapes=shapes, default=shapes[0])))
        fill = 0.5 if spec["name"] == "keypoints" else 0.0
        example.append(torch.full(shapes[0], fill))
    outputs = [ct.TensorType(name=o["name"], dtype=np.float32) for o in graph["outputs"]]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jit.trace: still what ct reads
        traced = torch.jit.trace(module, tuple(example), check_trace=False)
    if precision == "fp32":
        compute = ct.precision.FLOAT32
    else:
        compute = ct.transform.FP16ComputePrecision(op_selector=lambda op: op.op_type not in FP32_OPS)
    with quiet("coremltools"):  # tqdm bars on stderr
        return ct.convert(traced, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                          compute_precision=compute,
                          minimum_deployment_target=getattr(ct.target, TARGET))


def float_weights(module) -> list[str]:
    """Names of the ML program's weight constants kept in float at int8: the parameters in
    :data:`FLOAT_PARAMETERS` (coremltools names a weight after its parameter, dots as ``_``)."""
    return sorted(name.replace(".", "_") for name, _ in module.named_parameters()
                  if name.startswith(FLOAT_PARAMETERS))


def int8_config(keep_float=()):
    """The coremltools weight-quantization config: int8 symmetric per channel, the weight
    constants named in ``keep_float`` left alone."""
    import coremltools.optimize as cto
    return cto.coreml.OptimizationConfig(
        global_config=cto.coreml.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel",
            weight_threshold=WEIGHT_THRESHOLD),
        op_name_configs={name: None for name in keep_float})


def quantize_weights(mlmodel, keep_float=()):
    import coremltools.optimize as cto
    config = int8_config(keep_float)
    with quiet("coremltools"):
        return cto.coreml.linear_quantize_weights(mlmodel, config=config)


def build(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, precision: str,
          calibration: Any = None, manifest: dict | None = None, device: str | None = None,
          progress: Callable[[str], None] | None = None, options: dict | None = None,
          name: str = "model") -> dict[str, Any]:
    """Write ``<name>.mlpackage`` into ``out_dir`` (``calibration`` is not used: Core ML int8
    here is weight-only)."""
    say = progress or (lambda m: log.info("%s", m))
    options = options or {}
    if precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"coreml has no {precision} build; choose fp32, fp16 or int8")
    if manifest is None:
        raise InputError("a Core ML build needs the model's manifest (arch and weights)")
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    graph = manifest["graphs"][name]
    batches = tuple(options.get("batches", _runner().DEFAULT_BATCHES))
    t0 = time.perf_counter()
    module, weights_from = torch_model(manifest, onnx_path.parent, options.get("weights"))
    cos = _check_against_onnx(module, onnx_path, graph)
    say(f"converting {manifest.get('arch')} from torch to a Core ML ML program ({precision}, "
        f"batch sizes {', '.join(map(str, batches))})")
    mlmodel = convert(module, graph, precision, batches)
    keep = float_weights(module) if precision == "int8" else []
    if precision == "int8":
        say("quantizing Core ML weights to int8 (linear symmetric, per channel; "
            f"{', '.join(keep) or 'nothing'} kept in float)")
        mlmodel = quantize_weights(mlmodel, keep)
    pkg = out_dir / f"{name}.mlpackage"
    mlmodel.save(str(pkg))
    files = sorted(str(p.relative_to(out_dir)) for p in pkg.rglob("*") if p.is_file())
    info = {"file": pkg.name, "files": files, "versions": versions(),
            "method": "torch.jit.trace + coremltools.convert(mlprogram)",
            "weights_from": weights_from, "weights_option": options.get("weights"),
            "torch_vs_onnx_cosine": cos,
            "batch_sizes": list(batches), "minimum_deployment_target": TARGET,
            **({"sampling": module.sampling} if hasattr(module, "sampling") else {}),
            "compute_precision": "fp32" if precision == "fp32" else
            f"fp16 ({', '.join(FP32_OPS)} in fp32)",
            "weights": {"fp32": "fp32", "fp16": "fp16",
                        "int8": f"int8 linear symmetric per channel (tensors >= "
                                f"{WEIGHT_THRESHOLD} elements)"}[precision],
            "float_weights": keep,
            "spec": _runner().check_spec(pkg, graph, batches)}
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


# --- the accuracy gate where Core ML cannot predict ------------------------------------------

class TorchStandIn:
    """The torch model with the build's weight rounding, computed in fp32: what the accuracy
    gate measures where Core ML cannot predict. ``simulated``: a build measured on it is
    recorded as ``"gate": "simulated"``."""

    simulated = True

    def __init__(self, module, graph: dict, precision: str, keep_float=()):
        import torch
        self._torch = torch
        self._module = module
        self.input_names = [s["name"] for s in graph["inputs"]]
        self.output_names = [o["name"] for o in graph["outputs"]]
        self.provider = f"torch-cpu (stand-in for Core ML {precision})"
        self.gate_method = (f"Core ML cannot predict on {sys.platform}: torch fp32 with the "
                            f"build's {precision} weight rounding stands in (compute precision "
                            "not simulated); re-measure on macOS")
        keep = set(keep_float)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if precision in ("fp16", "int8"):
                    w = p.data
                    if (precision == "int8" and w.dim() >= 2 and w.numel() >= WEIGHT_THRESHOLD
                            and name.replace(".", "_") not in keep):
                        # coremltools' per-channel axis is the output channel (dim 0 in torch).
                        scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / 127.0
                        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                        w = torch.clamp(torch.round(w / scale), -127, 127) * scale
                    p.data.copy_(w.half().float())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.no_grad():
            out = self._module(*[torch.from_numpy(np.ascontiguousarray(feeds[n]))
                                 for n in self.input_names])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {k: v.numpy() for k, v in zip(self.output_names, out)}

    def close(self) -> None:
        self._module = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gate_session(build_dir: str | os.PathLike, info: dict, threads: int | None = None,
                 manifest: dict | None = None, model_dir: str | os.PathLike | None = None,
                 graph: str = "model"):
    runner = _runner()
    if runner.available()[0]:
        return runner.load(build_dir, threads, info)
    module, _ = torch_model(manifest, model_dir, info.get("weights_option"))
    precision = "int8" if "int8" in info["weights"] else info["weights"]
    return TorchStandIn(module, manifest["graphs"][graph], precision,
                        keep_float=info.get("float_weights", ()))
