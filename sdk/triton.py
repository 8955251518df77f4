"""``kpface export-triton``: a Triton Inference Server model repository from a models directory.

Every ONNX graph of every stage becomes one Triton model (platform ``onnxruntime_onnx``)::

    REPO/recognizer/config.pbtxt      REPO/recognizer/1/model.onnx      REPO/recognizer/kpface.json
    REPO/detector_pnet/...            REPO/detector_rnet/...            REPO/detector_onet/...
    REPO/keypoints/...                (when MODELS has a keypoint model)

``config.pbtxt`` is written with Triton's own model-config protobuf (``tritonclient``), with
inputs and outputs (names, types, dims) read from the ONNX graph itself, the batch dimension
taken out as Triton expects, and dynamic batching. ``kpface.json`` beside it carries what a
client needs that Triton does not serve: the pre-processing (colour order, mean, std, size),
the landmark order, MTCNN's cascade constants, the threshold and the weights' origin.

What Triton then serves is the networks. The glue between them stays in the client: MTCNN's
image pyramid, NMS and box regression between P-, R- and O-Net, the face alignment and the
L2 normalisation of embeddings (kpface does all of it in numpy; there is no Triton ensemble).
The repository is built in a temporary sibling folder and renamed into place.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import EngineUnavailable, InputError, ModelError
from .manifest import load_manifest, staging_dir, write_json

log = logging.getLogger(__name__)

CONFIG_NAME = "config.pbtxt"
SIDECAR_NAME = "kpface.json"
STAGES = ("detector", "keypoints", "recognizer")

# ONNX Runtime's type strings -> Triton data types.
ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16",
                 "tensor(double)": "TYPE_FP64", "tensor(bfloat16)": "TYPE_BF16",
                 "tensor(int8)": "TYPE_INT8", "tensor(int16)": "TYPE_INT16",
                 "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64",
                 "tensor(uint8)": "TYPE_UINT8", "tensor(uint16)": "TYPE_UINT16",
                 "tensor(uint32)": "TYPE_UINT32", "tensor(uint64)": "TYPE_UINT64",
                 "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING"}


@dataclass(frozen=True)
class Batching:
    """Triton batching for one graph: the largest batch one request (or a formed batch) may
    have, and the sizes the dynamic batcher should aim for."""

    max_batch_size: int
    preferred: tuple[int, ...]
    why: str


# Per (stage, graph). A request to R-Net carries every P-Net proposal of one image (often
# hundreds), to O-Net the survivors (tens); the recognizer and the keypoint model get the faces
# of one image. P-Net (and a detector with a free input size) sees a different H x W per pyramid
# level, and Triton batches only requests of equal shape, so it gets no preferred sizes.
BATCHING = {
    ("detector", "pnet"): Batching(8, (), "pyramid levels differ in size; equal shapes batch"),
    ("detector", "rnet"): Batching(2048, (128, 256, 512), "all proposals of an image at once"),
    ("detector", "onet"): Batching(256, (16, 32, 64), "R-Net survivors of an image"),
    ("detector", "model"): Batching(16, (4, 8), "one image per request"),
    ("keypoints", "model"): Batching(64, (8, 16, 32), "the faces of an image"),
    ("recognizer", "model"): Batching(64, (8, 16, 32), "the faces of an image"),
}
DEFAULT_BATCHING = Batching(16, (4, 8), "default")


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise EngineUnavailable(f"export-triton needs tritonclient ({e.name} is missing): "
                                "pip install 'kpface[triton]'") from None
    return model_config_pb2, text_format


def graph_signature(onnx_path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX graph as ONNX Runtime reads them: name, ORT type string,
    shape (ints, or None for a dynamic dimension)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"{onnx_path} could not be read by ONNX Runtime "
                         f"({str(e).splitlines()[0][:200]}); re-export the model") from None

    def describe(args):
        return [{"name": a.name, "type": a.type,
                 "shape": [d if isinstance(d, int) and d >= 0 else None for d in a.shape]}
                for a in args]
    return {"inputs": describe(sess.get_inputs()), "outputs": describe(sess.get_outputs())}


def model_config(name: str, signature: dict, batching: Batching, delay_us: int = 500,
                 instance_kind: str | None = None):
    """The Triton ``ModelConfig`` protobuf for one ONNX graph."""
    mc, _ = _pb()
    tensors = signature["inputs"] + signature["outputs"]
    batched = batching.max_batch_size > 0 and all(t["shape"] and t["shape"][0] is None
                                                  for t in tensors)
    if batching.max_batch_size > 0 and not batched:
        log.warning("%s: not every input/output has a dynamic first dimension; served "
                    "without batching", name)
    cfg = mc.ModelConfig(name=name, platform="onnxruntime_onnx",
                         max_batch_size=batching.max_batch_size if batched else 0)
    for kind, field in (("inputs", cfg.input), ("outputs", cfg.output)):
        for t in signature[kind]:
            if t["type"] not in ORT_TO_TRITON:
                raise ModelError(f"{name}: {t['name']} has type {t['type']}, which Triton "
                                 "cannot serve")
            dims = t["shape"][1:] if batched else t["shape"]
            entry = field.add(name=t["name"], data_type=mc.DataType.Value(ORT_TO_TRITON[t["type"]]))
            entry.dims.extend(-1 if d is None else int(d) for d in dims)
    if batched:
        dyn = any(d is None for t in tensors for d in t["shape"][1:])
        cfg.dynamic_batching.max_queue_delay_microseconds = int(delay_us)
        if not dyn:
            cfg.dynamic_batching.preferred_batch_size.extend(
                p for p in batching.preferred if p <= batching.max_batch_size)
    if instance_kind:
        kinds = {"cpu": mc.ModelInstanceGroup.KIND_CPU, "gpu": mc.ModelInstanceGroup.KIND_GPU}
        cfg.instance_group.add(kind=kinds[instance_kind], count=1)
    return cfg


def _sidecar(manifest: dict, stage: str, graph: str) -> dict[str, Any]:
    from . import __version__
    from .weights import for_client
    skip = {"files", "source", "weights", "graphs", "parity", "torch_weights"}
    out = {k: v for k, v in manifest.items() if k not in skip}
    g = manifest["graphs"][graph]
    out.update(kpface_version=__version__, stage=stage, graph=graph, graph_io=g,
               sha256=manifest["files"].get(g["file"]), weights=for_client(manifest))
    return out


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier kpface Triton repository."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose another --out")
    foreign = [p.name for p in out.iterdir()
               if not (p.is_dir() and (p / SIDECAR_NAME).is_file())]
    if foreign:
        raise InputError(f"{out} already holds {', '.join(sorted(foreign)[:5])}, which kpface "
                         "did not write; choose an empty or new --out folder")


def export_triton(models_dir: str | os.PathLike, out: str | os.PathLike,
                  max_batch: int | None = None, delay_us: int = 500,
                  instance_kind: str | None = None,
                  progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Write the repository; returns one summary per Triton model (name, files, batching).

    ``max_batch`` overrides the recognizer's maximum batch; ``instance_kind`` ("cpu" / "gpu")
    pins the instances, else Triton chooses (GPU when there is one).
    """
    _, text_format = _pb()
    root, out = Path(models_dir), Path(out)
    if not root.is_dir():
        raise ModelError(f"models directory {root} does not exist; run `kpface demo` or "
                         "`kpface export` first")
    if delay_us < 0 or (max_batch is not None and max_batch < 1):
        raise InputError("--max-batch must be >= 1 and --delay-us >= 0")
    if instance_kind not in (None, "cpu", "gpu"):
        raise InputError(f"instance kind must be cpu or gpu, got {instance_kind!r}")
    stages = [s for s in STAGES if (root / s).is_dir()]
    if "recognizer" not in stages and "detector" not in stages:
        raise ModelError(f"{root} has neither detector/ nor recognizer/; nothing to export")
    _check_out(out)
    summary = []
    with staging_dir(out) as tmp:
        for stage in stages:
            manifest = load_manifest(root / stage, task=stage)  # checks every file's hash
            for graph, g in manifest["graphs"].items():
                name = stage if graph == "model" else f"{stage}_{graph}"
                src = root / stage / g["file"]
                batching = BATCHING.get((stage, graph), DEFAULT_BATCHING)
                if stage == "recognizer" and max_batch:
                    batching = Batching(max_batch, batching.preferred, "--max-batch")
                sig = graph_signature(src)
                cfg = model_config(name, sig, batching, delay_us, instance_kind)
                model = tmp / name
                (model / "1").mkdir(parents=True)
                shutil.copyfile(src, model / "1" / "model.onnx")
                for extra in g.get("data_files", []):  # external weights keep their name
                    shutil.copyfile(src.parent / extra, model / "1" / extra)
                (model / CONFIG_NAME).write_text(text_format.MessageToString(cfg))
                write_json(model / SIDECAR_NAME, _sidecar(manifest, stage, graph))
                summary.append({"name": name, "source": str(src),
                                "max_batch_size": cfg.max_batch_size,
                                "preferred": list(cfg.dynamic_batching.preferred_batch_size),
                                "inputs": [t["name"] for t in sig["inputs"]],
                                "outputs": [t["name"] for t in sig["outputs"]]})
                if progress:
                    progress(f"  {name}: {', '.join(summary[-1]['inputs'])} -> "
                             f"{', '.join(summary[-1]['outputs'])}, max batch "
                             f"{cfg.max_batch_size}")
    return summary
