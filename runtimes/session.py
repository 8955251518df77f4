"""The session seam between the SDK and the engines."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from kpface.errors import EngineUnavailable, ModelError
from kpface.manifest import load_manifest


class Session(Protocol):
    provider: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def default_threads() -> int:
    env = os.environ.get("KPFACE_THREADS")
    return int(env) if env else (os.cpu_count() or 1)


class OrtSession:
    """ONNX Runtime session on one ONNX file; thread-safe (ORT's run is re-entrant)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EngineUnavailable("onnxruntime is not installed: pip install onnxruntime") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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
        outs = self._sess.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))


def open_session(model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                 precision: str = "fp32", graph: str = "model", threads: int | None = None,
                 manifest: dict | None = None, device: str | None = None) -> Session:
    """Open ``graph`` of ``model_dir`` on ``runtime`` at ``precision``.

    ONNX Runtime at fp32 runs the exported ONNX file itself; every other runtime / precision
    opens the build made by ``kpface build`` for this device
    (``model_dir/builds/<runtime>-<precision>-<device key>/``), checked against its build.json.
    """
    model_dir = Path(model_dir)
    manifest = manifest or load_manifest(model_dir)
    graphs = manifest.get("graphs", {})
    if graph not in graphs:
        raise ModelError(f"{model_dir} has no graph {graph!r} (it has: {', '.join(graphs)})")
    if runtime == "onnxruntime" and precision == "fp32":
        if device in (None, "cpu"):
            return OrtSession(model_dir / graphs[graph]["file"], threads=threads)
        from .onnxruntime_rt import open_onnx
        return open_onnx(model_dir / graphs[graph]["file"], threads=threads, device=device)
    from .build import open_build
    return open_build(model_dir, runtime, precision, graph=graph, threads=threads,
                      manifest=manifest, device=device)
