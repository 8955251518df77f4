"""The recognizer as a torch-free class: face crop -> network inputs -> one batched call ->
embeddings. Everything it needs comes from the model directory's manifest:

- ``preprocess``: input size, colour order, mean / std (through :class:`~kpface.preprocess.Normalizer`);
- ``alignment`` (optional): how faces are cropped. Without it the crop is the ArcFace five-point
  template (``"aligned"``, the default) or a square around the box (``"square"``) at the input
  size; ``{"method": "dlib_face_chip", "size": S, "padding": P}`` is dlib's face chip
  (:func:`kpface.facechip.face_chip`);
- ``keypoints.used``: the graph also takes the five points of the crop as ``keypoints``
  ([B, 5, 2], (x, y) in [0, 1] of the network input; KP-RPE);
- ``embedding_size``; ``normalize_embedding`` (L2-normalise, default true); ``mirror_sum``
  (embedding = model(x) + model(mirror(x)), before normalisation, in the same call);
- ``landmarks.output`` (optional): a graph output of dense points in pixels of the network
  input (Part fViT's 196), returned in crop pixels;
- ``threshold``: the cosine similarity at and above which two faces are the same person
  (required: kpface has no threshold of its own).

The embedding is the graph output named ``embedding``, never "the first output".

    rec = load_recognizer("models/recognizer")
    crop, pts, m = rec.crop(image, landmarks, box)      # pts: the landmarks in crop pixels
    emb = rec.embed([crop], [pts])                      # [1, D]
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from ..align import CONVENTIONS, crop_face, fit_crops, transform_points
from ..errors import InputError, ModelError
from ..facechip import face_chip
from ..preprocess import Normalizer
from ..weights import is_random, verdict_problem, weights_of
from .base import Model, check_landmark_order, graph_tensors, require

EMBEDDING_OUTPUT = "embedding"
DLIB_FACE_CHIP = "dlib_face_chip"
ALIGNMENTS = (DLIB_FACE_CHIP,)  # manifest ``alignment.method`` values this SDK can crop
# Where each LANDMARK_ORDER point goes in a horizontal mirror (eyes and mouth corners swap).
MIRRORED_ORDER = (1, 0, 2, 4, 3)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def read_threshold(manifest: dict) -> float:
    """The manifest's cosine threshold, or a ModelError saying why there is none."""
    name = manifest.get("name") or manifest.get("arch") or "recognizer"
    value = manifest.get("threshold")
    if value is None:
        raise ModelError(f"{name}: the recognizer manifest has no 'threshold' (the cosine "
                         "similarity at which two faces count as the same person); re-export "
                         "the model with this kpface version, or add the threshold measured "
                         "for it to its manifest.json")
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if not -1.0 <= t <= 1.0:
        raise ModelError(f"{name}: the manifest's threshold {value!r} is not a cosine in "
                         "[-1, 1]; fix manifest.json or re-export the model")
    return t


def _alignment(manifest: dict, name: str) -> dict[str, Any] | None:
    block = manifest.get("alignment")
    if block is None:
        return None
    method = block.get("method") if isinstance(block, dict) else None
    if method not in ALIGNMENTS:
        raise ModelError(f"{name}: the manifest's alignment {method or block!r} is not one "
                         f"this kpface can crop ({', '.join(ALIGNMENTS)}); upgrade kpface")
    try:
        return {"method": method, "size": int(block["size"]), "padding": float(block["padding"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{name}: the manifest's alignment block is incomplete ({e!r}); "
                         "re-export the model") from None


class Recognizer(Model):
    """A face recognizer model directory (any architecture), opened on one runtime.

    ``session``: an already open session of its graph (then ``model_dir`` may be None and
    ``manifest`` is required). Thread-safe: nothing is stored per call.
    """

    task = "recognizer"
    landmarks_key = ()  # the five points are checked under ``keypoints`` below

    def __init__(self, model_dir: str | os.PathLike | None = None, runtime: str = "onnxruntime",
                 precision: str = "fp32", threads: int | None = None,
                 manifest: dict | None = None, device: str | None = None, session=None):
        super().__init__(model_dir, runtime, precision, threads, manifest, device)
        m = self.manifest
        kp = m.get("keypoints") if isinstance(m.get("keypoints"), dict) else {}
        if "order" in kp:
            check_landmark_order(m, "keypoints")
        self.norm = Normalizer.from_manifest(m)
        if self.norm.size is None:
            raise ModelError(f"{self.name}: the manifest's preprocess has no 'size'; "
                             "re-export the model")
        self.size = self.norm.size  # (width, height) of the network input
        self.threshold = read_threshold(m)
        self.embedding_size = int(require(m, "embedding_size"))
        self.normalize = bool(m.get("normalize_embedding", True))
        self.mirror_sum = bool(m.get("mirror_sum", False))
        self.uses_keypoints = bool(kp.get("used", False))
        dense = m.get("landmarks")
        self.dense_output = str(dense["output"]) if isinstance(dense, dict) and dense.get("output") else None
        self.alignment = _alignment(m, self.name)
        if self.mirror_sum and self.uses_keypoints and int(kp.get("count", 5)) != 5:
            raise ModelError(f"{self.name}: mirror_sum with {kp.get('count')} keypoints: only "
                             "the five LANDMARK_ORDER points can be mirrored")
        self._check_graph(graph_tensors(m, "inputs"), graph_tensors(m, "outputs"), "the manifest")
        self.session = session if session is not None else self._session("model")
        names = list(getattr(self.session, "input_names", None) or [])
        if names:  # a stand-in session may list none
            self._check_graph(names, None, "the opened graph")

    # -- what it is ----------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, Any]:
        """Where its weights came from: the manifest's weights block (:mod:`kpface.weights`:
        source checkpoint / hub / package / random, file or repo, sha256, load counts)."""
        return weights_of(self.manifest)

    @property
    def random_weights(self) -> bool:
        return is_random(self.manifest)

    @property
    def verdict_problem(self) -> str | None:
        """Why its similarities are no identity verdict (random or partial weights), or None."""
        return verdict_problem(self.manifest, "recognizer")

    @property
    def provider(self) -> str | None:
        return getattr(self.session, "provider", None)

    @property
    def crop_methods(self) -> tuple[str, ...]:
        """The crops it accepts, its own first: the manifest's alignment method, or the ArcFace
        template conventions."""
        return (self.alignment["method"],) if self.alignment else CONVENTIONS

    def crop_method(self, convention: str | None = None) -> str:
        """The crop to use: ``convention`` if this model accepts it, its own when None."""
        if convention is None:
            return self.crop_methods[0]
        if convention not in self.crop_methods:
            if self.alignment:
                raise InputError(f"{self.arch} is fed {self.alignment['method']} crops (its "
                                 f"manifest's alignment); the {convention!r} crop does not apply")
            raise InputError(f"unknown crop convention {convention!r}; use one of {CONVENTIONS}")
        return convention

    def _check_graph(self, inputs: list[str] | None, outputs: list[str] | None, where: str):
        want = ["image"] + (["keypoints"] if self.uses_keypoints else [])
        if inputs is not None and sorted(inputs) != sorted(want):
            raise ModelError(f"{self.name}: the manifest says the graph takes {want} "
                             f"(keypoints.used = {self.uses_keypoints}) but {where} lists "
                             f"inputs {inputs}; re-export the model")
        for out in (EMBEDDING_OUTPUT, self.dense_output):
            if outputs is not None and out is not None and out not in outputs:
                raise ModelError(f"{self.name}: {where} lists no graph output {out!r} (it has "
                                 f"{outputs}); re-export the model")

    # -- per face ------------------------------------------------------------------------
    def crop(self, image_bgr: np.ndarray, landmarks_px: np.ndarray,
             box: Sequence[float] | None = None, convention: str | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The crop this model takes for one face. Returns (crop_bgr uint8, the five landmarks
        in crop pixels, M (2x3) mapping image pixels to crop pixels)."""
        method = self.crop_method(convention)
        landmarks_px = np.asarray(landmarks_px, dtype=np.float64).reshape(5, 2)
        if method == DLIB_FACE_CHIP:
            chip, m = face_chip(image_bgr, landmarks_px, size=self.alignment["size"],
                                padding=self.alignment["padding"])
            return chip, transform_points(landmarks_px, m), m
        return crop_face(image_bgr, landmarks_px, size=self.size[0], convention=method, box=box)

    # -- batched -------------------------------------------------------------------------
    def inputs(self, crops_bgr: Sequence[np.ndarray], landmarks_in_crop: Sequence[np.ndarray]
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Network feeds for a batch of crops (BGR uint8) with their five landmarks in crop
        pixels, and the per-crop scale network / crop (crops of another size are resized)."""
        batch, points, scales = fit_crops(crops_bgr, landmarks_in_crop, self.size)
        feeds = {"image": self.norm(batch)}
        if self.uses_keypoints:
            feeds["keypoints"] = (points / np.array(self.size)).astype(np.float32)
        return feeds, scales

    def _mirrored(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch followed by its horizontal mirror (points mirrored and re-ordered)."""
        out = {"image": np.concatenate([feeds["image"], feeds["image"][..., ::-1]])}
        if "keypoints" in feeds:
            kp = feeds["keypoints"]
            flipped = kp[:, MIRRORED_ORDER].copy()
            # Pixel x -> W - 1 - x, in units of the width: (W - 1) / W - x.
            flipped[..., 0] = (self.size[0] - 1) / self.size[0] - flipped[..., 0]
            out["keypoints"] = np.concatenate([kp, flipped]).astype(np.float32)
        return out

    def run(self, crops_bgr: Sequence[np.ndarray], landmarks_in_crop: Sequence[np.ndarray]
            ) -> dict[str, np.ndarray]:
        """One recognizer call for all crops. Returns ``embedding`` [N, D] (L2-normalised
        unless the manifest says ``normalize_embedding: false``) and, for a model with a dense
        landmark output, ``landmarks`` [N, K, 2] in pixels of each given crop."""
        n = len(crops_bgr)
        if n == 0:
            out = {"embedding": np.zeros((0, self.embedding_size), np.float32)}
            if self.dense_output:
                out["landmarks"] = np.zeros((0, 0, 2), np.float32)
            return out
        feeds, scales = self.inputs(crops_bgr, landmarks_in_crop)
        raw = self.session.run(self._mirrored(feeds) if self.mirror_sum else feeds)
        if EMBEDDING_OUTPUT not in raw:
            raise ModelError(f"{self.name}: the recognizer returned {sorted(raw)}, no "
                             f"{EMBEDDING_OUTPUT!r}; re-export the model")
        emb = np.asarray(raw[EMBEDDING_OUTPUT], np.float32)
        if self.mirror_sum:
            emb = emb[:n] + emb[n:]
        out = {"embedding": l2_normalize(emb) if self.normalize else emb}
        if self.dense_output:
            pts = np.asarray(raw[self.dense_output], np.float64)[:n]
            # Network pixels -> crop pixels (the inverse of fit_crops' resize).
            out["landmarks"] = ((pts + 0.5) / scales[:, None, :] - 0.5).astype(np.float32)
        return out

    def embed(self, crops_bgr: Sequence[np.ndarray], landmarks_in_crop: Sequence[np.ndarray]
              ) -> np.ndarray:
        """Embeddings [N, D] of face crops with their landmarks in crop pixels."""
        return self.run(crops_bgr, landmarks_in_crop)["embedding"]
