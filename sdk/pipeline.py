"""FacePipeline: detect -> keypoints -> embed, torch-free.

    pipe = FacePipeline.from_dir("~/.cache/kpface/models")
    faces = pipe(cv2.imread("photo.jpg"))          # list[Face] with embeddings
    pipe.compare(faces[0], other_face)             # Comparison(cosine, same, threshold)

A models directory holds one model directory per stage, each written by ``kpface export``:
``detector/``, ``keypoints/`` (optional: without it the detector's landmarks are used) and
``recognizer/``, the recognizer that answers. Other recognizers may sit beside them, each in a
folder of its own (``kpface demo`` puts the one that does not answer in ``<arch>/``, e.g.
``vit_kprpe_small/`` when ``recognizer/`` is ``dlib_resnet_v1``); ``from_dir(recognizer=NAME)``
picks one of them instead. Each stage is a class of :mod:`kpface.models` that owns its pre- and
post-processing; the pipeline only passes faces along: one detector call, one keypoint call
for all faces of the image, each face cropped the way the recognizer's manifest asks, one
recognizer call for all crops. It holds no per-call state, so one instance may serve many
threads (tested: 8 threads x 20 calls on real photos give the serial results). ``close()``
(or ``with FacePipeline.from_dir(...) as pipe:``) closes every session it opened.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .align import invert_affine, transform_points
from .errors import InputError, ModelError
from .image import to_bgr8
from .manifest import load_manifest
from .models.recognizer import Recognizer, l2_normalize
from .weights import is_random, stage_warning, weights_of

log = logging.getLogger(__name__)

__all__ = ["Face", "Comparison", "FacePipeline", "compare", "l2_normalize", "default_models_dir",
           "recognizer_dir"]


def default_models_dir() -> Path:
    home = os.environ.get("KPFACE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "kpface")
    return Path(home) / "models"


def recognizer_dir(models_dir: str | os.PathLike, recognizer: str | os.PathLike | None = None
                   ) -> Path:
    """The recognizer model directory a pipeline on ``models_dir`` uses: ``models_dir/recognizer``
    (None), ``models_dir/NAME`` for a folder name there, else ``recognizer`` as a path."""
    root = Path(models_dir)
    if recognizer is None:
        return root / "recognizer"
    name = Path(recognizer)
    if len(name.parts) == 1 and (root / name).is_dir():
        return root / name
    if name.is_dir():
        return name
    inside = sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file()) \
        if root.is_dir() else []
    raise ModelError(f"recognizer {str(recognizer)!r} is neither a folder of {root} "
                     f"({', '.join(inside) or 'none'}) nor a model directory")


@dataclass
class Face:
    """One face: box (x1, y1, x2, y2) and landmarks (5 x (x, y)) in image pixels.

    ``embedding`` is L2-normalised unless the recognizer's manifest says
    ``normalize_embedding: false`` (dlib_resnet_v1: its raw descriptor, for dlib's Euclidean
    rule; :func:`compare` normalises either way). ``dense_landmarks`` [K, 2], image pixels, are
    the recognizer's own points when it has them (Part fViT: 196, not semantic).
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    embedding: np.ndarray | None = None
    crop: np.ndarray | None = field(default=None, repr=False)  # recognizer input, BGR uint8
    dense_landmarks: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self, embedding: bool = True) -> dict[str, Any]:
        out = {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 5),
               "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks]}
        if self.dense_landmarks is not None:
            out["dense_landmarks"] = np.asarray(self.dense_landmarks, float).round(2).tolist()
        if embedding and self.embedding is not None:
            out["embedding"] = [round(float(v), 6) for v in self.embedding]
        return out


@dataclass(frozen=True)
class Comparison:
    cosine: float
    same: bool
    threshold: float


def _embedding_of(x: Face | np.ndarray) -> np.ndarray:
    emb = x.embedding if isinstance(x, Face) else x
    if emb is None:
        raise InputError("this face has no embedding; run the full pipeline, not detect()")
    emb = np.asarray(emb, dtype=np.float32).ravel()
    return l2_normalize(emb)


def compare(a: Face | np.ndarray, b: Face | np.ndarray, threshold: float) -> Comparison:
    """Cosine similarity of two faces (or embeddings) and a same/different decision at
    ``threshold`` (the recognizer's, from its manifest: :attr:`FacePipeline.threshold`)."""
    ea, eb = _embedding_of(a), _embedding_of(b)
    if ea.shape != eb.shape:
        raise InputError(f"embeddings of different sizes: {ea.size} and {eb.size}")
    cos = float(np.clip(ea @ eb, -1.0, 1.0))
    threshold = float(threshold)
    return Comparison(cosine=cos, same=cos >= threshold, threshold=threshold)


class FacePipeline:
    """detect -> (keypoints) -> embed on any runtime; see :meth:`from_dir`.

    ``recognizer``: a :class:`~kpface.models.Recognizer`, or an open session of a recognizer
    graph together with its ``recognizer_manifest``. ``convention``: the crop for recognizers
    without an ``alignment`` in their manifest, ``"aligned"`` (ArcFace template, the default)
    or ``"square"``; a recognizer whose manifest names its crop (dlib's face chip) gets that.

    ``weights``: {stage: weights block} of the stages that run (:mod:`kpface.weights`);
    ``warnings``: one line for every stage with random or partial weights (also logged), and
    for a keypoint model left out because its weights are random.
    """

    def __init__(self, detector, recognizer, recognizer_manifest: dict | None = None,
                 keypoints=None, convention: str | None = None):
        if not isinstance(recognizer, Recognizer):
            if recognizer_manifest is None:
                raise ModelError("FacePipeline needs the recognizer's manifest with a session; "
                                 "or pass a kpface.models.Recognizer")
            recognizer = Recognizer(manifest=recognizer_manifest, session=recognizer)
        self.detector = detector
        self.keypoints = keypoints
        self.recognizer = recognizer
        self.manifest = recognizer.manifest
        self.threshold = recognizer.threshold
        self.convention = recognizer.crop_method(convention)
        stages = {"detector": detector, "keypoints": keypoints, "recognizer": recognizer}
        manifests = {stage: m.manifest for stage, m in stages.items()
                     if isinstance(getattr(m, "manifest", None), dict)}
        self.weights = {stage: weights_of(m) for stage, m in manifests.items()}
        self.warnings: list[str] = [w for stage, m in manifests.items()
                                    if (w := stage_warning(m, stage))]
        for line in self.warnings:
            log.warning("%s", line)

    @property
    def verdict_problem(self) -> str | None:
        """Why this pipeline gives no identity verdicts (its recognizer's weights are random or
        partial), or None."""
        return self.recognizer.verdict_problem

    @classmethod
    def from_dir(cls, models_dir: str | os.PathLike | None = None, runtime: str = "onnxruntime",
                 precision: str = "fp32", threads: int | None = None,
                 use_keypoints: bool = True, detector_precision: str = "fp32",
                 convention: str | None = None, allow_random_keypoints: bool = False,
                 recognizer: str | os.PathLike | None = None,
                 min_face: float | None = None, score: float | None = None
                 ) -> "FacePipeline":
        """Open ``models_dir/{detector,keypoints,recognizer}``.

        ``recognizer``: another recognizer than ``models_dir/recognizer``: a folder name inside
        ``models_dir`` (``"vit_kprpe_small"``) or a model directory anywhere
        (:func:`recognizer_dir`).

        ``precision`` applies to the recognizer; the detection stages run at
        ``detector_precision`` on the same runtime. ``min_face`` (below 1: a fraction of the
        image's shorter side, else pixels) and ``score`` set what the detector reports; None
        keeps the detector's defaults (MTCNN: 0.1 of the shorter side, at least 20 px, and
        0.9; see :mod:`kpface.models.mtcnn`). A keypoint model exported with random
        weights would only scramble the alignment, so it is skipped (with a warning) unless
        ``allow_random_keypoints``; the detector's landmarks are used instead.
        """
        from .models import load_detector, load_keypoints, load_recognizer

        root = Path(models_dir) if models_dir is not None else default_models_dir()
        if not root.is_dir():
            hint = " (run `kpface demo` to create the default models)" if models_dir is None else ""
            raise ModelError(f"models directory {root} does not exist{hint}")
        rec_dir = recognizer_dir(root, recognizer)
        for stage, d in (("detector", root / "detector"), ("recognizer", rec_dir)):
            if not d.is_dir():
                raise ModelError(f"{root} has no {d.name}/ model; export one with "
                                 f"`kpface export {stage} --out {d}`")
        options = {k: v for k, v in (("min_face", min_face), ("score", score)) if v is not None}
        detector = load_detector(root / "detector", runtime=runtime,
                                 precision=detector_precision, threads=threads, **options)
        keypoints = None
        left_out = None
        if use_keypoints and (root / "keypoints").is_dir():
            kp_manifest = load_manifest(root / "keypoints", task="keypoints")
            if is_random(kp_manifest) and not allow_random_keypoints:
                left_out = (f"keypoints {kp_manifest.get('arch')}: RANDOM weights, left out: "
                            f"the detector's landmarks are used instead ({root / 'keypoints'})")
            else:
                keypoints = load_keypoints(root / "keypoints", runtime=runtime,
                                           precision=detector_precision, threads=threads,
                                           manifest=kp_manifest)
        recognizer = load_recognizer(rec_dir, runtime=runtime, precision=precision,
                                     threads=threads)
        log.info("pipeline: detector %s, keypoints %s, recognizer %s on %s/%s (%s)",
                 getattr(detector, "arch", "?"), getattr(keypoints, "arch", "detector's own"),
                 recognizer.arch, runtime, precision, recognizer.provider)
        pipe = cls(detector, recognizer, keypoints=keypoints, convention=convention)
        if left_out:
            log.warning("%s", left_out)
            pipe.warnings.append(left_out)
        return pipe

    # -- stages ------------------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> list[Face]:
        """Boxes, scores and landmarks (refined by the keypoint model, if there is one, in one
        call for all faces)."""
        image = to_bgr8(image)
        dets = list(self.detector.detect(image))
        if self.keypoints is not None and dets:
            landmarks = self.keypoints.predict_many(image, dets)
        else:
            landmarks = [d.landmarks for d in dets]
        return [Face(box=np.asarray(d.box, np.float32), score=float(d.score),
                     landmarks=np.asarray(pts, np.float32).reshape(5, 2))
                for d, pts in zip(dets, landmarks)]

    def crop(self, image: np.ndarray, face: Face) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The recognizer's crop of one face: (crop_bgr, landmarks in crop pixels, M image ->
        crop)."""
        return self.recognizer.crop(image, face.landmarks, box=face.box, convention=self.convention)

    def embed_crops(self, crops: Sequence[np.ndarray], landmarks_in_crop: Sequence[np.ndarray]
                    ) -> np.ndarray:
        """Embed face crops (BGR) with landmarks in crop pixels; returns [N, D]."""
        return self.recognizer.embed(crops, landmarks_in_crop)

    def __call__(self, image: np.ndarray, return_crops: bool = False) -> list[Face]:
        """All faces of one BGR image, embedded in one recognizer call."""
        image = to_bgr8(image)
        faces = self.detect(image)
        cut = [self.crop(image, face) for face in faces]
        out = self.recognizer.run([c for c, _, _ in cut], [p for _, p, _ in cut])
        dense = out.get("landmarks")
        for i, (face, (crop, _, m)) in enumerate(zip(faces, cut)):
            face.embedding = out["embedding"][i]
            if dense is not None:
                face.dense_landmarks = transform_points(dense[i], invert_affine(m)).astype(np.float32)
            if return_crops:
                face.crop = crop
        return faces

    def compare(self, a: Face | np.ndarray, b: Face | np.ndarray) -> Comparison:
        return compare(a, b, self.threshold)

    def close(self) -> None:
        """Close the stages' sessions (those they opened themselves); idempotent."""
        for stage in (self.detector, self.keypoints, self.recognizer):
            close = getattr(stage, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> "FacePipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
