"""RetinaFace (MobileNet0.25) as a torch-free detector: letterbox, one forward pass, prior
decoding, NMS. Input size, colour order, mean / std, priors and thresholds come from the model
directory's manifest. Coordinates are float pixels of the input image (pixel centres at integers,
as in OpenCV); landmarks follow :data:`kpface.landmarks.LANDMARK_ORDER`."""
from __future__ import annotations

import logging
import os

import cv2
import numpy as np

from ..align import _check_image
from ..errors import InputError
from ..postprocess import decode_boxes, decode_landmarks, nms, prior_boxes
from ..preprocess import Normalizer
from .base import Detection, Model, check_min_face, check_score, require

log = logging.getLogger(__name__)


class RetinaFaceDetector(Model):
    """RetinaFace: letterbox to the manifest's input size, one forward pass, decode, NMS."""

    arch_prefix = "retinaface"
    task = "detector"

    def __init__(self, model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                 precision: str = "fp32", threads: int | None = None,
                 manifest: dict | None = None, score_threshold: float | None = None,
                 input_size: tuple[int, int] | None = None, device: str | None = None,
                 min_face: float | None = None, score: float | None = None):
        """``score`` (or its older name ``score_threshold``): the face score a detection
        needs (default: the manifest's, 0.5 as InsightFace's ``det_thresh``); ``min_face``:
        drop faces whose larger side is smaller (below 1: a fraction of the image's shorter
        side, else pixels; default none)."""
        super().__init__(model_dir, runtime, precision, threads, manifest, device)
        if score is not None:
            score_threshold = check_score(score)
        self.min_face = None if min_face is None else check_min_face(min_face)
        m = self.manifest
        pre = require(m, "preprocess")
        self.norm = Normalizer(pre, self.name)
        self.width, self.height = input_size or (int(pre["width"]), int(pre["height"]))
        if input_size is not None and not pre.get("dynamic_size", False):
            raise InputError(f"{model_dir} was exported for {pre['width']}x{pre['height']} only")
        priors = require(m, "priors")
        self.variances = [float(v) for v in priors["variances"]]
        # Anchors depend only on the input size: computed once here.
        self.priors = prior_boxes(self.width, self.height, priors["min_sizes"], priors["steps"])
        self.score_threshold = float(score_threshold if score_threshold is not None
                                     else require(m, "score_threshold"))
        cfg = require(m, "nms")
        self.nms_iou = float(cfg["iou"])
        self.top_k = int(cfg.get("top_k", 5000))
        self.keep_top_k = int(cfg.get("keep_top_k", 750))
        self.session = self._session("model")

    def preprocess(self, image_bgr: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        """Letterbox (keep aspect, top-left, pad with the mean colour). Returns the network
        input [1, 3, H, W] and the per-axis scale from image to network pixels."""
        h, w = image_bgr.shape[:2]
        s = min(self.width / w, self.height / h)
        nw, nh = max(1, min(self.width, round(w * s))), max(1, min(self.height, round(h * s)))
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        resized = image_bgr if (nw, nh) == (w, h) else cv2.resize(image_bgr, (nw, nh),
                                                                  interpolation=interp)
        blob = np.zeros((1, 3, self.height, self.width), dtype=np.float32)  # 0 = mean colour
        self.norm(resized, out=blob)
        return blob, (nw / w, nh / h)

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        image_bgr = _check_image(image_bgr)
        blob, (sx, sy) = self.preprocess(image_bgr)
        out = self.session.run({"image": blob})
        scores = out["conf"][0, :, 1]
        idx = np.nonzero(scores > self.score_threshold)[0]
        if idx.size == 0:
            return []
        idx = idx[np.argsort(-scores[idx], kind="stable")][: self.top_k]
        pri = self.priors[idx]
        wh = np.array([self.width, self.height], dtype=np.float32)
        boxes = decode_boxes(out["loc"][0, idx], pri, self.variances) * np.tile(wh, 2)
        lms = decode_landmarks(out["landms"][0, idx], pri, self.variances) * wh
        keep = nms(boxes, scores[idx], self.nms_iou, max_keep=self.keep_top_k)
        log.debug("retinaface: %d anchors above %.2f, %d after NMS", idx.size,
                  self.score_threshold, keep.size)
        # Network pixels -> image pixels (half-pixel-centre resize convention).
        scale = np.array([sx, sy], dtype=np.float32)
        boxes = ((boxes.reshape(-1, 2, 2) + 0.5) / scale - 0.5).reshape(-1, 4)
        lms = (lms + 0.5) / scale - 0.5
        if self.min_face is not None:
            h, w = image_bgr.shape[:2]
            px = self.min_face if self.min_face >= 1 else self.min_face * min(h, w)
            side = np.maximum(boxes[keep, 2] - boxes[keep, 0], boxes[keep, 3] - boxes[keep, 1])
            keep = keep[side >= px]
        return [Detection(boxes[i].astype(np.float32), float(scores[idx[i]]),
                          lms[i].astype(np.float32)) for i in keep]
