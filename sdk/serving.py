"""The two stages of a served pipeline, without Ray: detection (+ alignment) and embedding.

:mod:`kpface.serve` wraps each in a Ray Serve deployment; keeping them plain classes lets them be
tested and timed directly. Together they compute exactly what :class:`~kpface.pipeline.FacePipeline`
computes (its own ``detect`` and ``embed_crops``, the same ``crop_face``), but each stage opens
only its own models, so a detector replica does not hold the recognizer in memory.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InputError, ModelError
from .manifest import load_manifest
from .weights import for_client, is_random

log = logging.getLogger(__name__)


def keypoints_dir(root: Path, use_keypoints: bool = True) -> Path | None:
    """The keypoint model the pipeline would use: ``root/keypoints`` unless absent, disabled,
    or exported with random weights (then the detector's landmarks are used, as in
    :meth:`FacePipeline.from_dir`)."""
    kp = root / "keypoints"
    if not use_keypoints or not kp.is_dir():
        return None
    if is_random(load_manifest(kp, verify=False)):
        log.warning("keypoint model in %s has random weights; using the detector's landmarks", kp)
        return None
    return kp


def stages_info(models_dir: str | os.PathLike, use_keypoints: bool = True) -> dict[str, Any]:
    """Arch and weights block of each stage that runs (``keypoints`` is None when the
    detector's own landmarks are used)."""
    root = Path(models_dir)
    info: dict[str, Any] = {}
    for stage in ("detector", "keypoints", "recognizer"):
        d = root / stage
        if stage == "keypoints":
            d = keypoints_dir(root, use_keypoints)
            if d is None:
                info[stage] = None
                continue
        m = load_manifest(d, verify=False)
        info[stage] = {"arch": m.get("arch"), "weights": for_client(m)}
    return info


def _models_root(models_dir) -> Path:
    root = Path(models_dir)
    for stage in ("detector", "recognizer"):
        if not (root / stage).is_dir():
            raise ModelError(f"{root} has no {stage}/ model; export one with "
                             f"`kpface export {stage} --out {root / stage}`")
    return root


class _NoRecognizer:
    """Stands in for the recognizer session in the detection stage, which never embeds."""

    provider = "none"
    input_names: list[str] = []
    output_names: list[str] = []

    def run(self, feeds):
        raise RuntimeError("the detection stage has no recognizer")


class DetectStage:
    """Encoded image bytes -> faces (box, score, landmarks) and their aligned recognizer crops."""

    def __init__(self, models_dir: str | os.PathLike, threads: int | None = 1,
                 runtime: str = "onnxruntime", precision: str = "fp32",
                 use_keypoints: bool = True, min_face: float | None = None,
                 score: float | None = None):
        from .detect import load_detector, load_keypoints
        from .pipeline import FacePipeline
        root = _models_root(models_dir)
        options = {k: v for k, v in (("min_face", min_face), ("score", score)) if v is not None}
        detector = load_detector(root / "detector", runtime=runtime, precision=precision,
                                 threads=threads, **options)
        kp_dir = keypoints_dir(root, use_keypoints)
        keypoints = None if kp_dir is None else load_keypoints(
            kp_dir, runtime=runtime, precision=precision, threads=threads)
        manifest = load_manifest(root / "recognizer", task="recognizer")  # crop size
        self.pipe = FacePipeline(detector, _NoRecognizer(), manifest, keypoints=keypoints)
        self.size = int(manifest["preprocess"]["size"][0])

    def __call__(self, image: np.ndarray | bytes) -> dict[str, Any]:
        """``{"faces": [Face without embedding], "crops": [N, S, S, 3] uint8,
        "points": [N, 5, 2]}``; undecodable bytes raise :class:`InputError`."""
        from .image import decode_image, to_bgr8
        image = decode_image(image) if isinstance(image, (bytes, bytearray)) else to_bgr8(image)
        faces = self.pipe.detect(image)
        crops = np.zeros((len(faces), self.size, self.size, 3), np.uint8)
        points = np.zeros((len(faces), 5, 2), np.float64)
        for i, face in enumerate(faces):
            # The recognizer's own crop (ArcFace-aligned, square, or dlib's face chip).
            crops[i], points[i], _ = self.pipe.crop(image, face)
        return {"faces": faces, "crops": crops, "points": points}


class EmbedStage:
    """Aligned crops + their landmarks -> L2-normalised embeddings, many requests per call."""

    def __init__(self, models_dir: str | os.PathLike, threads: int | None = 1,
                 runtime: str = "onnxruntime", precision: str = "fp32"):
        from kpface.runtimes import open_session

        from .pipeline import FacePipeline
        root = _models_root(models_dir)
        manifest = load_manifest(root / "recognizer", task="recognizer")
        session = open_session(root / "recognizer", runtime=runtime, precision=precision,
                               threads=threads, manifest=manifest)
        self.pipe = FacePipeline(None, session, manifest)
        self.size = int(manifest.get("embedding_size", 512))

    def __call__(self, crops: np.ndarray, points: np.ndarray) -> np.ndarray:
        return self.pipe.embed_crops(list(crops), list(points))

    def embed_many(self, requests: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """One recognizer call for the faces of several requests; one [n_i, D] array each."""
        counts = [len(c) for c, _ in requests]
        if not sum(counts):
            return [np.zeros((0, self.size), np.float32) for _ in requests]
        crops = [c for cs, _ in requests for c in cs]
        points = [p for _, ps in requests for p in ps]
        emb = self.pipe.embed_crops(crops, points)
        return np.split(emb, np.cumsum(counts)[:-1])


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100:
        raise InputError(f"k must be an integer from 1 to 100, got {k!r}")
    return k


def jsonable(x: Any) -> Any:
    """Plain JSON types from numpy values, dataclasses, tuples and objects with ``__dict__``."""
    import dataclasses
    if isinstance(x, (str, bool, int, type(None))):
        return x
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, np.ndarray):
        return [jsonable(v) for v in x.tolist()]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if hasattr(x, "__dict__"):
        return {k: jsonable(v) for k, v in vars(x).items() if not k.startswith("_")}
    return str(x)
