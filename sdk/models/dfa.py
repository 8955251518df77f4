"""The DFA keypoint model (CVLface's aligner) on square crops around detections, torch-free.
All faces of an image go through one batched call (the graph's batch axis is dynamic)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..align import _check_image, invert_affine, square_crop, transform_points
from ..preprocess import Normalizer
from .base import Model, require


class DFAKeypoints(Model):
    """DFA landmark model on a square crop around a detection.

    The crop is the square of side ``crop_scale * max(w, h)`` centred on the box (manifest),
    zero padded and resized to the network size with the reference's align-corners bilinear
    resize; the predicted (x, y) in [0, 1] times the size are pixels of that crop (CVLface
    convention), mapped back to the image.
    """

    arch_prefix = "dfa"
    task = "keypoints"

    def __init__(self, model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                 precision: str = "fp32", threads: int | None = None,
                 manifest: dict | None = None, crop_scale: float | None = None,
                 device: str | None = None):
        super().__init__(model_dir, runtime, precision, threads, manifest, device)
        pre = require(self.manifest, "preprocess")
        self.norm = Normalizer(pre, self.name)
        self.size = int(pre["size"][0])
        self.crop_scale = float(crop_scale or pre["crop_scale"])
        self.align_corners = bool(pre.get("align_corners", True))
        self.session = self._session("model")

    def crop(self, image_bgr: np.ndarray, box: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """(crop_bgr [size, size, 3], M image -> crop pixels)."""
        return square_crop(image_bgr, box, self.size, self.crop_scale, self.align_corners)

    def run(self, image_bgr: np.ndarray, boxes: Sequence[Sequence[float]]) -> dict[str, np.ndarray]:
        """Raw graph outputs for a batch of boxes, plus ``M`` [B, 2, 3] (image -> crop)."""
        image_bgr = _check_image(image_bgr)
        crops, ms = zip(*(self.crop(image_bgr, b) for b in boxes))
        out = self.session.run({"image": self.norm(np.stack(crops))})
        out["M"] = np.stack(ms)
        return out

    def predict_many(self, image_bgr: np.ndarray, detections: Sequence) -> np.ndarray:
        """Landmarks [N, 5, 2] in image pixels for N detections (or boxes)."""
        if len(detections) == 0:
            return np.zeros((0, 5, 2), dtype=np.float32)
        boxes = [np.asarray(getattr(d, "box", d), dtype=np.float64).reshape(4) for d in detections]
        out = self.run(image_bgr, boxes)
        px = out["landmarks"].astype(np.float64) * self.size
        pts = [transform_points(p, invert_affine(m)) for p, m in zip(px, out["M"])]
        return np.stack(pts).astype(np.float32)

    def predict(self, image_bgr: np.ndarray, detection) -> np.ndarray:
        """Landmarks [5, 2] in image pixels (LANDMARK_ORDER) for one Detection or box."""
        return self.predict_many(image_bgr, [detection])[0]
