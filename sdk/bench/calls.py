"""What a bench process times, by kind of configuration: each kind opens its model once and
returns the call to time, and says which part of that call's output the accuracy comparison
needs. A new kind (a gallery search, say) is one more :class:`Kind` in :data:`KINDS`.

Runs inside the bench process (see :mod:`kpface.bench.worker`); engine and model libraries are
imported here, lazily, so that the process's memory baseline is taken before them.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import numpy as np

from .settings import MAX_E2E_FACES, Skip

Call = Callable[[], Any]


def engine_module(runtime: str) -> str:
    """The python module an engine needs (imported before the memory baseline is taken)."""
    if runtime == "torch":
        return "torch"
    from kpface.runtimes.engines import get_engine
    return get_engine(runtime).module


def _provider_of(obj) -> str | None:
    for attr in ("session", "pnet", "_session"):
        s = getattr(obj, attr, None)
        if s is not None and hasattr(s, "provider"):
            return s.provider
    return None


def _open_session(cfg: dict, payload: dict) -> tuple[Call, dict[str, Any]]:
    from kpface.runtimes import open_session
    from kpface.runtimes.session import open_build
    model_dir = cfg.get("model_dir")
    if cfg.get("build_dir"):  # this very build (an ONNX Runtime fp32 one is not model.onnx)
        sess = open_build(model_dir, cfg["runtime"], cfg["precision"],
                          graph=cfg.get("graph", "model"), threads=cfg["threads"],
                          at=cfg["build_dir"])
    else:  # model.onnx itself for the ONNX Runtime fp32 reference
        sess = open_session(model_dir, runtime=cfg["runtime"], precision=cfg["precision"],
                            graph=cfg.get("graph", "model"), threads=cfg["threads"],
                            exported=True)
    missing = [n for n in sess.input_names if n not in payload]
    if missing:
        raise Skip(f"the bench has no input for {missing} of {model_dir}")
    feeds = {n: payload[n] for n in sess.input_names}
    return (lambda: sess.run(feeds)), {"provider": sess.provider}


def _open_detector(cfg: dict, payload: dict) -> tuple[Call, dict[str, Any]]:
    from kpface.detect import load_detector
    det = load_detector(cfg.get("model_dir"), runtime=cfg["runtime"],
                        precision=cfg["precision"], threads=cfg["threads"])
    image = payload["scene"]
    return (lambda: det.detect(image)), {"provider": _provider_of(det)}


def _open_keypoints(cfg: dict, payload: dict) -> tuple[Call, dict[str, Any]]:
    from kpface.detect import Detection, load_keypoints
    kp = load_keypoints(cfg.get("model_dir"), runtime=cfg["runtime"],
                        precision=cfg["precision"], threads=cfg["threads"])
    image = payload["scene"]
    det = Detection(payload["box"], 1.0, payload["landmarks"])
    return (lambda: kp.predict(image, det)), {"provider": _provider_of(kp)}


def _open_pipeline(cfg: dict, payload: dict) -> tuple[Call, dict[str, Any]]:
    from kpface.pipeline import FacePipeline
    pipe = FacePipeline.from_dir(cfg["models_dir"], runtime=cfg["runtime"],
                                 precision=cfg["precision"], threads=cfg["threads"],
                                 detector_precision=cfg.get("detector_precision", "fp32"))
    image = payload["scene"]
    faces = len(pipe.detect(image))
    if faces > MAX_E2E_FACES:
        raise Skip(f"the detector finds {faces} faces in the one-face bench scene (random "
                   f"weights?): end-to-end time would be that of {faces} recognizer runs; "
                   "export the detector with real weights")
    return (lambda: pipe(image)), {"provider": getattr(pipe.recognizer, "provider", None),
                                   "faces": faces}


def _open_torch(cfg: dict, payload: dict) -> tuple[Call, dict[str, Any]]:
    import torch

    from kpface.export.onnx_export import build_model
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    spec, model, _ = build_model(cfg["arch"])
    graph = spec.graphs[0]
    missing = [s.name for s in graph.inputs if s.name not in payload]
    if missing:
        raise Skip(f"the bench has no input for {missing} of {cfg['arch']}")
    tensors = [torch.from_numpy(np.ascontiguousarray(payload[s.name])) for s in graph.inputs]
    module = graph.module(model).eval()

    def call():
        with torch.inference_mode():
            return module(*tensors)
    return call, {"provider": f"torch eager {torch.__version__} "
                              f"({torch.get_num_threads()} threads)"}


def _session_out(out: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in out.items()}


def _torch_out(out: Any) -> dict[str, np.ndarray]:
    t = out[0] if isinstance(out, (tuple, list)) else out
    return {"output": t.detach().float().numpy()}


def _detector_out(out: Any) -> dict[str, np.ndarray]:
    boxes = np.array([d.box for d in out], np.float32).reshape(-1, 4)
    return {"boxes": boxes, "scores": np.array([d.score for d in out], np.float32)}


def _keypoints_out(out: Any) -> dict[str, np.ndarray]:
    return {"landmarks": np.asarray(out, np.float32).reshape(-1, 2)}


def _pipeline_out(out: Any) -> dict[str, np.ndarray]:
    return {"faces": np.array([len(out)])}


class Kind(NamedTuple):
    open: Callable[[dict, dict], tuple[Call, dict[str, Any]]]   # (cfg, payload) -> call, info
    summary: Callable[[Any], dict[str, np.ndarray]]             # last output -> small arrays


KINDS: dict[str, Kind] = {
    "session": Kind(_open_session, _session_out),        # one graph of a model directory
    "detector": Kind(_open_detector, _detector_out),     # kpface.detect's detector on the scene
    "keypoints": Kind(_open_keypoints, _keypoints_out),  # keypoint model on the scene's face
    "pipeline": Kind(_open_pipeline, _pipeline_out),     # FacePipeline, scene -> faces
    "torch": Kind(_open_torch, _torch_out),              # the torch model, eager
}


def open_call(cfg: dict, payload: dict) -> tuple[Call, dict[str, Any]]:
    """Open ``cfg``'s model and return (the call to time, info such as the provider)."""
    kind = KINDS.get(cfg["kind"])
    if kind is None:
        raise ValueError(f"unknown bench kind {cfg['kind']!r}")
    return kind.open(cfg, payload)


def summarize(kind: str, out: Any) -> dict[str, np.ndarray]:
    """The part of a call's output that the accuracy comparison needs (small arrays)."""
    k = KINDS.get(kind)
    return k.summary(out) if k is not None else {}
