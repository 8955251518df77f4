"""MTCNN as a torch-free detector: an image pyramid through P-Net, NMS, then R-Net and O-Net
refinement, in numpy. The cascade's constants (scale factor, stage thresholds, NMS settings,
crop sizes) come from the manifest's ``mtcnn`` block.

What is reported is set by two arguments (``kpface run --min-face / --score``):

* ``min_face``: the smallest face searched for. A value below 1 is a fraction of the image's
  shorter side, 1 or more is pixels. Default 0.1 of the shorter side, as Google ML Kit's face
  detector (``minFaceSize = 0.1``), but never below the manifest's ``min_face_size`` (20 px,
  facenet-pytorch's default, the origin of the weights).
* ``score``: the final (O-Net) face probability a face needs. Default 0.9, as OpenCV's YuNet
  face detector (``conf_threshold = 0.9``); facenet-pytorch's cascade stops at 0.7, which let a
  38-pixel non-face (score 0.94) through on scikit-image's camera() photo at 1000 pixels.

An older manifest without ``min_face`` / ``score`` gets these same defaults."""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import cv2
import numpy as np

from ..align import _check_image
from ..errors import InputError
from ..postprocess import nms
from ..preprocess import Normalizer
from .base import Detection, Model, check_min_face, check_score, require

log = logging.getLogger(__name__)

DEFAULT_MIN_FACE = 0.1   # of the shorter image side (Google ML Kit's minFaceSize)
DEFAULT_SCORE = 0.9      # final face probability (OpenCV YuNet's conf_threshold)
MAX_PYRAMID_WORKERS = 4  # pyramid levels run at once (at most the thread count)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow boxes to squares of side max(w, h) around the same centre."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + (w - side) / 2
    out[:, 1] = boxes[:, 1] + (h - side) / 2
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray, plus_one: bool) -> np.ndarray:
    """Shift each edge by its regression times the box size."""
    extra = 1.0 if plus_one else 0.0
    w = boxes[:, 2] - boxes[:, 0] + extra
    h = boxes[:, 3] - boxes[:, 1] + extra
    return boxes + reg * np.stack([w, h, w, h], axis=1)


class MTCNNDetector(Model):
    """MTCNN cascade: image pyramid through P-Net, NMS, R-Net and O-Net refinement (numpy).

    ``min_face``: smallest face searched for (below 1: fraction of the image's shorter side;
    else pixels); ``score``: final face probability (see the module docstring for the
    defaults); ``thresholds``: all three stage thresholds (``score`` replaces the last).
    """

    arch_prefix = "mtcnn"
    task = "detector"

    def __init__(self, model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                 precision: str = "fp32", threads: int | None = None,
                 manifest: dict | None = None, min_face: float | None = None,
                 score: float | None = None, thresholds: Sequence[float] | None = None,
                 device: str | None = None):
        super().__init__(model_dir, runtime, precision, threads, manifest, device)
        self.norm = Normalizer(require(self.manifest, "preprocess"), self.name)
        cfg = require(self.manifest, "mtcnn")
        # The floor: P-Net's window at the pyramid's first level (facenet-pytorch: 20 px).
        self.min_face_size = int(cfg["min_face_size"])
        self.min_face = check_min_face(min_face if min_face is not None
                                       else cfg.get("min_face", DEFAULT_MIN_FACE))
        self.factor = float(cfg["scale_factor"])
        self.thresholds = [float(t) for t in (thresholds or cfg["thresholds"])]
        if score is not None or thresholds is None:
            self.thresholds[2] = check_score(score if score is not None
                                             else cfg.get("score", DEFAULT_SCORE))
        self.score = self.thresholds[2]
        self.stride, self.cell = int(cfg["pnet_stride"]), int(cfg["pnet_cell"])
        self.rnet_size, self.onet_size = int(cfg["rnet_size"]), int(cfg["onet_size"])
        self.nms_cfg = cfg["nms"]
        if self.min_face >= 1 and self.min_face < self.cell:
            raise InputError(f"min_face must be >= {self.cell} pixels (P-Net's window), "
                             f"got {self.min_face:g}")
        # The pyramid's levels are independent: on ONNX Runtime (whose runs are re-entrant and
        # concurrent) up to `threads` of them run at once, each on a one-thread P-Net session,
        # instead of one level at a time on `threads` threads, where the small levels leave
        # cores idle. An OpenVINO session runs one request at a time (one stream).
        from kpface.runtimes.engines import default_threads  # lazy, like every engine import
        self.workers = 1 if runtime != "onnxruntime" else \
            max(1, min(int(threads or default_threads()), MAX_PYRAMID_WORKERS))
        self.pnet = self._session("pnet", threads=1 if self.workers > 1 else None)
        self.rnet = self._session("rnet")
        self.onet = self._session("onet")
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def close(self) -> None:
        """Stop the pyramid's worker threads, then close the sessions (idempotent)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        super().close()

    def min_face_pixels(self, height: int, width: int) -> float:
        """The smallest face searched for in a ``height`` x ``width`` image, in pixels."""
        if self.min_face >= 1:
            return self.min_face
        return max(float(self.min_face_size), self.min_face * min(height, width))

    def scales(self, height: int, width: int) -> list[float]:
        m = self.cell / self.min_face_pixels(height, width)
        side = min(height, width) * m
        out = []
        while side >= self.cell:
            out.append(m * self.factor ** len(out))
            side *= self.factor
        return out

    def _level(self, image: np.ndarray, s: float) -> np.ndarray | None:
        """P-Net on one pyramid level: candidates [n, 9] (box, score, regression) after the
        level's own NMS, or None."""
        h, w = image.shape[:2]
        hs, ws = int(h * s + 1), int(w * s + 1)
        x = self.norm(cv2.resize(image, (ws, hs), interpolation=cv2.INTER_AREA))
        out = self.pnet.run({"image": x})
        prob, reg = out["prob"][0, 1], out["reg"][0]
        ys, xs = np.nonzero(prob >= self.thresholds[0])
        if ys.size == 0:
            return None
        cells = np.stack([xs, ys], axis=1).astype(np.float64) * self.stride
        boxes = np.concatenate([np.floor((cells + 1) / s),
                                np.floor((cells + self.cell) / s)], axis=1)
        cand = np.concatenate([boxes, prob[ys, xs, None], reg[:, ys, xs].T], axis=1)
        keep = nms(cand[:, :4], cand[:, 4], float(self.nms_cfg["per_scale"]))
        return cand[keep]

    def _pyramid(self, image: np.ndarray) -> list[np.ndarray | None]:
        """Every level's candidates, in level order. With several workers, levels are shared
        out by area (largest first, each to the least loaded worker) and run concurrently; the
        result is the same as one level after the other."""
        scales = self.scales(*image.shape[:2])
        if self.workers == 1 or len(scales) < 2:
            return [self._level(image, s) for s in scales]
        loads = [0.0] * self.workers
        shares: list[list[int]] = [[] for _ in range(self.workers)]
        for k in sorted(range(len(scales)), key=lambda k: -scales[k]):
            w = loads.index(min(loads))
            shares[w].append(k)
            loads[w] += scales[k] ** 2
        with self._pool_lock:  # detect() may be called from several threads at once
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kpface-pnet")
            pool = self._pool
        done: dict[int, np.ndarray | None] = {}

        def work(levels: list[int]) -> None:
            for k in levels:
                done[k] = self._level(image, scales[k])
        for f in [pool.submit(work, share) for share in shares if share]:
            f.result()
        return [done[k] for k in range(len(scales))]

    def _stage1(self, image: np.ndarray) -> np.ndarray:
        found = [c for c in self._pyramid(image) if c is not None]
        if not found:
            return np.zeros((0, 5))
        cand = np.concatenate(found)
        cand = cand[nms(cand[:, :4], cand[:, 4], float(self.nms_cfg["pnet"]))]
        boxes = _square(_regress(cand[:, :4], cand[:, 5:9], plus_one=False))
        return np.concatenate([boxes, cand[:, 4:5]], axis=1)

    def _crops(self, image: np.ndarray, boxes: np.ndarray, size: int):
        """Zero-padded integer crops of ``boxes`` resized to ``size``; returns (batch, origins,
        crop sizes) with origins/sizes as (x, y) in pixels."""
        h, w = image.shape[:2]
        xa = np.floor(boxes[:, 0]).astype(int)
        ya = np.floor(boxes[:, 1]).astype(int)
        xb = np.maximum(np.floor(boxes[:, 2]).astype(int), xa)
        yb = np.maximum(np.floor(boxes[:, 3]).astype(int), ya)
        batch = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
        for i in range(len(boxes)):
            patch = np.zeros((yb[i] - ya[i] + 1, xb[i] - xa[i] + 1, 3), dtype=np.uint8)
            x0, y0 = max(xa[i], 0), max(ya[i], 0)
            x1, y1 = min(xb[i] + 1, w), min(yb[i] + 1, h)
            if x1 > x0 and y1 > y0:
                patch[y0 - ya[i]:y1 - ya[i], x0 - xa[i]:x1 - xa[i]] = image[y0:y1, x0:x1]
            batch[i] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
        origins = np.stack([xa, ya], axis=1).astype(np.float64)
        sizes = np.stack([xb - xa + 1, yb - ya + 1], axis=1).astype(np.float64)
        return self.norm(batch), origins, sizes

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        image = _check_image(image_bgr)
        cand = self._stage1(image)
        if len(cand) == 0:
            return []
        # R-Net: re-score and refine the proposals.
        x, _, _ = self._crops(image, cand[:, :4], self.rnet_size)
        out = self.rnet.run({"image": x})
        score = out["prob"][:, 1]
        ok = score >= self.thresholds[1]
        if not ok.any():
            return []
        boxes, score, reg = cand[ok, :4], score[ok], out["reg"][ok]
        keep = nms(boxes, score, float(self.nms_cfg["rnet"]))
        boxes = _square(_regress(boxes[keep], reg[keep], plus_one=True))
        # O-Net: final score, box and landmarks.
        x, origins, sizes = self._crops(image, boxes, self.onet_size)
        out = self.onet.run({"image": x})
        score = out["prob"][:, 1]
        ok = score >= self.thresholds[2]
        if not ok.any():
            return []
        boxes, score, reg = boxes[ok], score[ok], out["reg"][ok]
        rel = out["landmarks"][ok].reshape(-1, 2, 5).transpose(0, 2, 1)  # -> [N, 5, (x, y)]
        lms = origins[ok, None, :] + rel * sizes[ok, None, :]
        boxes = _regress(boxes, reg, plus_one=True)
        keep = nms(boxes, score, float(self.nms_cfg["onet"]),
                   mode=str(self.nms_cfg.get("onet_mode", "union")))
        log.debug("mtcnn: %d proposals, %d after R-Net, %d faces", len(cand), len(x), len(keep))
        return [Detection(boxes[i].astype(np.float32), float(score[i]),
                          lms[i].astype(np.float32)) for i in keep]
