"""One torch-free class per model, each owning its pre- and post-processing (read from its
manifest), and the loaders that pick the class for an exported model directory.

| file            | class                | task       | architectures   |
|-----------------|----------------------|------------|-----------------|
| retinaface.py   | RetinaFaceDetector   | detector   | retinaface*     |
| mtcnn.py        | MTCNNDetector        | detector   | mtcnn*          |
| dfa.py          | DFAKeypoints         | keypoints  | dfa*            |
| recognizer.py   | Recognizer           | recognizer | any             |

A new detector or keypoint model is one file here (a :class:`~kpface.models.base.Model`
subclass) plus one row in ``DETECTORS`` / ``KEYPOINTS`` below.
"""
from __future__ import annotations

import os

from ..errors import ModelError
from ..manifest import load_manifest
from .base import Detection, Model  # noqa: F401
from .dfa import DFAKeypoints
from .mtcnn import MTCNNDetector
from .recognizer import Recognizer
from .retinaface import RetinaFaceDetector

# Architecture-name prefix -> class, per task.
DETECTORS: dict[str, type] = {"retinaface": RetinaFaceDetector, "mtcnn": MTCNNDetector}
KEYPOINTS: dict[str, type] = {"dfa": DFAKeypoints}


def _pick(table: dict, manifest: dict, model_dir, what: str):
    arch = str(manifest.get("arch", ""))
    for prefix, cls in table.items():
        if arch.startswith(prefix):
            return cls
    raise ModelError(f"{model_dir}: no {what} class for architecture {arch!r} "
                     f"(supported: {', '.join(p + '*' for p in table)})")


def load_detector(model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                  precision: str = "fp32", threads: int | None = None, **kwargs):
    """Open an exported detector directory; returns a RetinaFaceDetector or MTCNNDetector."""
    manifest = load_manifest(model_dir, task="detector")
    cls = _pick(DETECTORS, manifest, model_dir, "detector")
    return cls(model_dir, runtime, precision, threads, manifest=manifest, **kwargs)


def load_keypoints(model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                   precision: str = "fp32", threads: int | None = None,
                   manifest: dict | None = None, **kwargs) -> DFAKeypoints:
    """Open an exported keypoint model directory (DFA); ``manifest``, if given, is its
    already verified manifest."""
    manifest = manifest or load_manifest(model_dir, task="keypoints")
    cls = _pick(KEYPOINTS, manifest, model_dir, "keypoint model")
    return cls(model_dir, runtime, precision, threads, manifest=manifest, **kwargs)


def load_recognizer(model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                    precision: str = "fp32", threads: int | None = None,
                    manifest: dict | None = None, **kwargs) -> Recognizer:
    """Open an exported recognizer directory."""
    manifest = manifest or load_manifest(model_dir, task="recognizer")
    return Recognizer(model_dir, runtime, precision, threads, manifest=manifest, **kwargs)
