"""TensorRT adapter (TensorRT 10 Python API, device buffers through cuda-python).

Build: the ONNX parser fills a network; one optimisation profile covers the dynamic batch
(min 1, opt 8, max 32 by default; ``options["profile"] = (min, opt, max)``).

* fp16: ``BuilderFlag.FP16`` with ``PREFER_PRECISION_CONSTRAINTS``; LayerNorm (``NORMALIZATION``
  layers and the reduce / elementwise layers of an unfused LayerNorm), Softmax, the KP-RPE
  path (layers that depend on the keypoints but not on the image) and Part fViT's landmark path
  (:func:`.floatscope.landmark_path`: GridSample or the gather form) are pinned to fp32.
* int8: explicit quantization, not the implicit-int8 calibrator TensorRT 10 deprecates. The
  ONNX graph is calibrated on face crops and written with QuantizeLinear / DequantizeLinear
  pairs (``<graph>.qdq.onnx``, by :func:`kpface.runtimes.onnxruntime_rt.quantize_int8`: int8
  symmetric activations and per-channel weights, zero points 0, as TensorRT requires), on the
  inputs of Conv / MatMul / Gemm only, with the same float scope as the ONNX Runtime and
  OpenVINO builds: LayerNorm, Softmax, the residual Adds, the attention products (q.k,
  attn.v), the KP-RPE path and the landmark path carry no Q/DQ. The network is *strongly typed*: TensorRT runs
  in int8 exactly what the Q/DQ nodes say and everything else in the graph's own fp32, with no
  precision flags. The Q/DQ graph and ``<graph>.calib.json`` (its key and per-tensor scales)
  are the calibration cache: written into the staged build directory, hashed in build.json,
  and reused by the next build of the same model on the same crops.

An engine only runs on the GPU architecture and TensorRT version it was built with: ``build.json``
records both (and the build directory is keyed by the compute capability, ``sm89``), and
``load`` refuses a mismatch with a message that says to rebuild, instead of TensorRT's own
deserialisation error.

Everything here imports without tensorrt; ``available()`` says what is missing.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kpface.errors import EngineUnavailable, InputError, ModelError

from . import floatscope
from .engines import Closable
from .tensorrt_qdq import make_qdq

log = logging.getLogger(__name__)

INSTALL = "pip install 'kpface[tensorrt]'  (tensorrt cuda-python; needs an NVIDIA GPU)"
DEFAULT_PROFILE = (1, 8, 32)
WORKSPACE = 2 << 30


# --- imports and CUDA helpers --------------------------------------------------------------

def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineUnavailable(f"tensorrt is not installed: {INSTALL}") from None
    return trt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8 / 13
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise EngineUnavailable("TensorRT buffers need cuda-python: pip install cuda-python"
                                    ) from None
    return cudart


def _call(result):
    """cuda-python returns (error, *values): raise on error, return the values."""
    cudart = _cudart()
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise EngineUnavailable(f"CUDA call failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else values


def _device_index(device: str | None) -> int:
    dev = (device or "cuda").lower()
    if not dev.startswith("cuda"):
        raise InputError(f"tensorrt runs on cuda devices, not {device!r}")
    return int(dev.split(":", 1)[1]) if ":" in dev else 0


def gpu_info(device: str | None = None) -> dict[str, Any]:
    cudart = _cudart()
    idx = _device_index(device)
    props = _call(cudart.cudaGetDeviceProperties(idx))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"index": idx, "name": name.strip("\x00 "),
            "compute_capability": f"{props.major}.{props.minor}",
            "sm": f"sm{props.major}{props.minor}"}


def available(device: str | None = None, purpose: str = "run") -> tuple[bool, str]:
    try:
        trt = _trt()
        cudart = _cudart()
    except EngineUnavailable as e:
        return False, str(e)
    try:
        _device_index(device)
        err, count = cudart.cudaGetDeviceCount()
    except InputError as e:
        return False, str(e)
    except Exception as e:  # a broken driver install
        return False, f"CUDA is not usable here ({type(e).__name__}: {e}); TensorRT needs an NVIDIA GPU"
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return False, "no NVIDIA GPU is visible (check the driver / CUDA_VISIBLE_DEVICES); TensorRT needs one"
    if _device_index(device) >= count:
        return False, f"{device} does not exist: this machine has {count} CUDA device(s)"
    g = gpu_info(device)
    return True, f"TensorRT {trt.__version__} on {g['name']} ({g['sm']})"


def device_key(device: str | None = None) -> str:
    return gpu_info(device)["sm"]


def versions() -> dict[str, str]:
    return {"tensorrt": _trt().__version__}


def _trt_logger():
    trt = _trt()
    if not hasattr(_trt_logger, "logger"):
        _trt_logger.logger = trt.Logger(trt.Logger.WARNING)  # type: ignore[attr-defined]
    return _trt_logger.logger  # type: ignore[attr-defined]


# --- device buffers ------------------------------------------------------------------------

class _Buffer:
    """A device allocation that grows as needed."""

    def __init__(self):
        self.ptr, self.nbytes = 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(_call(_cudart().cudaMalloc(max(nbytes, 1))))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            _call(_cudart().cudaFree(self.ptr))
            self.ptr, self.nbytes = 0, 0

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


def _h2d(dst: int, arr: np.ndarray, stream) -> None:
    cudart = _cudart()
    _call(cudart.cudaMemcpyAsync(dst, arr.ctypes.data, arr.nbytes,
                                 cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))


def _d2h(arr: np.ndarray, src: int, stream) -> None:
    cudart = _cudart()
    _call(cudart.cudaMemcpyAsync(arr.ctypes.data, src, arr.nbytes,
                                 cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))


# --- build ---------------------------------------------------------------------------------

def describe(network, trt) -> floatscope.Graph:
    """The engine-neutral description of a TensorRT network for :mod:`.floatscope`; node
    ``i`` is layer ``i`` (layer names need not be unique)."""
    nodes = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        ins = tuple(t.name if t is not None else ""
                    for t in (layer.get_input(j) for j in range(layer.num_inputs)))
        outs = tuple(layer.get_output(j).name for j in range(layer.num_outputs))
        nodes.append(floatscope.Node(str(i), str(layer.type), ins, outs,
                                     const=layer.type == trt.LayerType.CONSTANT))
    return floatscope.Graph(tuple(network.get_input(i).name for i in range(network.num_inputs)),
                            nodes, outputs={network.get_output(i).name: network.get_output(i).name
                                            for i in range(network.num_outputs)})


def _float_layers(network, trt) -> list:
    """Layers pinned to fp32: LayerNorm, Softmax, the KP-RPE path and Part fViT's landmark
    path (head, min-max, sampling grid or gather, whichever sampling form was exported)."""
    graph = describe(network, trt)
    weights = {str(trt.LayerType.MATRIX_MULTIPLY), str(trt.LayerType.CONVOLUTION)}
    kprpe = {int(i) for i in floatscope.kprpe_path(graph)}
    kprpe |= {int(i) for i in floatscope.landmark_path(graph, weight_ops=weights)}
    fp32_types = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX}
    keep = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        # An unfused LayerNorm arrives as ReduceMean / Sub / Pow / Sqrt / Div: keep its reduces.
        norm = layer.type in fp32_types or (layer.type == trt.LayerType.REDUCE
                                            and "norm" in layer.name.lower())
        if i in kprpe or norm:
            keep.append(layer)
    return keep


def _pin_fp32(layers, trt) -> int:
    n = 0
    for layer in layers:
        if all(layer.get_output(j).dtype not in (trt.float32, trt.float16)
               for j in range(layer.num_outputs)):
            continue  # integer / shape tensors have no float precision to pin
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float32, trt.float16):
                layer.set_output_type(j, trt.float32)
        n += 1
    return n


def build(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, precision: str,
          calibration: Any = None, manifest: dict | None = None, device: str | None = None,
          progress: Callable[[str], None] | None = None, options: dict | None = None,
          name: str = "model") -> dict[str, Any]:
    """Serialize ``<name>.engine`` for this GPU into ``out_dir``."""
    trt = _trt()
    say = progress or (lambda m: log.info("%s", m))
    options = options or {}
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"tensorrt has no {precision} build; choose fp32, fp16 or int8")
    if precision == "int8" and calibration is None:
        raise InputError("an int8 build needs calibration data")
    lo, opt, hi = tuple(options.get("profile", DEFAULT_PROFILE))
    gpu = gpu_info(device)
    _call(_cudart().cudaSetDevice(gpu["index"]))
    t0 = time.perf_counter()

    extra: dict[str, Any] = {}
    source = onnx_path
    if precision == "int8":
        installed = out_dir.parent / f"tensorrt-int8-{gpu['sm']}"
        extra = make_qdq(onnx_path, out_dir, name, calibration, installed,
                         bool(options.get("calibration_cache", True)), say)
        source = out_dir / extra["qdq_onnx"]

    logger = _trt_logger()
    builder = trt.Builder(logger)
    # TensorRT 10: explicit batch is the only mode. A Q/DQ graph is built strongly typed.
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
             if precision == "int8" else 0)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.get("workspace", WORKSPACE)))
    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        if any(d < 0 for d in dims[1:]):
            raise InputError(f"TensorRT builds here take a dynamic batch only; input {t.name} "
                             f"is {dims}")
        mins, opts, maxs = ([b] + dims[1:] for b in (lo, opt, hi))
        profile.set_shape(t.name, mins, opts, maxs)
        shapes[t.name] = {"min": mins, "opt": opts, "max": maxs}
    config.add_optimization_profile(profile)

    pinned = 0
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        # PREFER (not OBEY): a pinned layer without an fp32 kernel falls back instead of failing.
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32(_float_layers(network, trt), trt)
    say(f"building the TensorRT engine for {gpu['name']} ({gpu['sm']}); this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build {onnx_path.name} at {precision}; run with "
                         "--debug to see TensorRT's log")
    engine = out_dir / f"{name}.engine"
    engine.write_bytes(bytes(serialized))
    info = {"file": engine.name, "files": [engine.name] + extra.pop("files", []),
            "versions": versions(), "method": "tensorrt.Builder.build_serialized_network",
            "tensorrt_version": trt.__version__, "gpu": gpu["name"],
            "compute_capability": gpu["compute_capability"], "profile": shapes,
            "strongly_typed": bool(flags), "fp32_layers": pinned,
            "seconds": round(time.perf_counter() - t0, 2), **extra}
    return info


# --- sessions ------------------------------------------------------------------------------

def check_compatible(info: dict, device: str | None = None) -> None:
    """Refuse an engine built for another GPU architecture or TensorRT version."""
    trt = _trt()
    gpu = gpu_info(device)
    built_v, built_cc = info.get("tensorrt_version"), info.get("compute_capability")
    if built_v != trt.__version__ or built_cc != gpu["compute_capability"]:
        raise ModelError(
            f"this TensorRT engine was built with TensorRT {built_v} for compute capability "
            f"{built_cc} ({info.get('gpu')}); this machine has TensorRT {trt.__version__} and "
            f"{gpu['name']} ({gpu['compute_capability']}): rebuild it here with `kpface build "
            "--runtime tensorrt`")


class TensorRTSession(Closable):
    """One engine, one execution context and one CUDA stream; ``run`` is serialised by a
    lock (thread-safe). ``close()`` / ``with`` frees the device buffers and destroys the
    stream."""

    def __init__(self, engine_path: Path, info: dict, device: str | None = None):
        trt = _trt()
        check_compatible(info, device)
        gpu = gpu_info(device)
        _call(_cudart().cudaSetDevice(gpu["index"]))
        self._trt = trt
        runtime = trt.Runtime(_trt_logger())
        self._engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self._engine is None:
            raise ModelError(f"TensorRT could not deserialize {engine_path}; rebuild it with "
                             "`kpface build --runtime tensorrt`")
        self._context = self._engine.create_execution_context()
        self._stream = _call(_cudart().cudaStreamCreate())
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.input_names = [n for n in names
                            if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self._max_batch = int(info.get("profile", {}).get(self.input_names[0], {})
                              .get("max", [DEFAULT_PROFILE[2]])[0])
        self._buffers = {n: _Buffer() for n in names}
        self._lock = threading.Lock()
        self.provider = f"TensorRT:{gpu['name']}"

    def _run_chunk(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt = self._trt
        for n in self.input_names:
            arr = np.ascontiguousarray(feeds[n], dtype=trt.nptype(self._engine.get_tensor_dtype(n)))
            self._context.set_input_shape(n, arr.shape)
            ptr = self._buffers[n].ensure(arr.nbytes)
            _h2d(ptr, arr, self._stream)
            self._context.set_tensor_address(n, ptr)
        outs = {}
        for n in self.output_names:
            shape = tuple(self._context.get_tensor_shape(n))
            arr = np.empty(shape, dtype=trt.nptype(self._engine.get_tensor_dtype(n)))
            outs[n] = arr
            self._context.set_tensor_address(n, self._buffers[n].ensure(arr.nbytes))
        if not self._context.execute_async_v3(int(self._stream)):
            raise ModelError("TensorRT execution failed; see the TensorRT log")
        for n, arr in outs.items():
            _d2h(arr, self._buffers[n].ptr, self._stream)
        _call(_cudart().cudaStreamSynchronize(self._stream))
        return {n: a.astype(np.float32, copy=False) for n, a in outs.items()}

    def _release(self) -> None:
        with self._lock:
            for buf in self._buffers.values():
                buf.free()
            self._buffers.clear()
            stream, self._stream = self._stream, None
            self._context = self._engine = None
            if stream is not None:
                _call(_cudart().cudaStreamDestroy(stream))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        n = len(next(iter(feeds.values())))
        with self._lock:
            self._check_open()
            if n <= self._max_batch:
                return self._run_chunk(feeds)
            parts = [self._run_chunk({k: v[i:i + self._max_batch] for k, v in feeds.items()})
                     for i in range(0, n, self._max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}


def load(build_dir: str | os.PathLike, threads: int | None = None, info: dict | None = None,
         device: str | None = None) -> TensorRTSession:
    ok, why = available(device)
    if not ok:
        raise EngineUnavailable(why)
    info = info or {}
    return TensorRTSession(Path(build_dir) / info.get("file", "model.engine"), info, device)

