"""Torch-free face detectors and the DFA keypoint model, on top of :mod:`kpface.runtimes`.

Each class reads its constants (input size, colour order, mean / std, priors, thresholds) from
the model directory's manifest; none are repeated here. Images are BGR uint8 H x W x 3. All
coordinates are float pixels of the input image (pixel centres at integers, as in OpenCV), and
landmarks follow :data:`kpface.landmarks.LANDMARK_ORDER` (image-left eye first).

    det = load_detector("models/retinaface")      # or an exported ``mtcnn`` directory
    faces = det.detect(image)                     # [Detection(box, score, landmarks), ...]
    kp = load_keypoints("models/dfa")
    points = kp.predict(image, faces[0])          # [5, 2] refined landmarks
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np

from .align import _check_image, invert_affine, square_crop, transform_points
from .errors import InputError, ModelError
from .landmarks import LANDMARK_ORDER
from .manifest import load_manifest
from .postprocess import decode_boxes, decode_landmarks, nms, prior_boxes

log = logging.getLogger(__name__)


@dataclass
class Detection:
    """One face: ``box`` (x1, y1, x2, y2) float pixels, ``score`` in [0, 1], ``landmarks``
    [5, 2] (x, y) pixels in LANDMARK_ORDER."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray = field(default_factory=lambda: np.full((5, 2), np.nan, np.float32))

    def __post_init__(self):
        self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
        self.score = float(self.score)
        self.landmarks = np.asarray(self.landmarks, dtype=np.float32).reshape(5, 2)

    def to_dict(self) -> dict[str, Any]:
        return {"box": [float(v) for v in self.box], "score": float(self.score),
                "landmarks": np.asarray(self.landmarks, dtype=float).round(2).tolist()}


# --- shared helpers ------------------------------------------------------------------------

def _require(manifest: dict, *keys: str) -> Any:
    node: Any = manifest
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise ModelError(f"{manifest.get('name', 'model')}: manifest has no "
                             f"{'.'.join(keys)!r}; re-export it with this kpface version")
        node = node[k]
    return node


def _check_landmark_order(manifest: dict) -> None:
    order = tuple(_require(manifest, "landmarks", "order"))
    if order != LANDMARK_ORDER:
        raise ModelError(f"{manifest.get('name', 'model')}: landmark order {order} is not "
                         f"kpface's {LANDMARK_ORDER}; re-export the model")


class _Normalizer:
    """BGR uint8 -> float32 NCHW in the manifest's colour order, (x - mean) / std, where mean
    and std are given in that colour order."""

    def __init__(self, pre: dict):
        color = str(pre.get("color", "")).upper()
        if color not in ("RGB", "BGR"):
            raise ModelError(f"manifest colour order {color!r} is not RGB or BGR; re-export")
        # Model channel c reads image (BGR) channel source[c].
        self.source = (2, 1, 0) if color == "RGB" else (0, 1, 2)
        std = np.asarray(pre["std"], dtype=np.float32).reshape(3)
        self.scale = 1.0 / std
        self.offset = -np.asarray(pre["mean"], dtype=np.float32).reshape(3) / std

    def __call__(self, images_bgr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[H, W, 3] or [B, H, W, 3] uint8 -> [B, 3, H, W] float32 (written into ``out``
        [B, 3, >=H, >=W] at the top-left if given)."""
        x = images_bgr[None] if images_bgr.ndim == 3 else images_bgr
        n, h, w = x.shape[:3]
        if out is None:
            out = np.empty((n, 3, h, w), dtype=np.float32)
        for c, src in enumerate(self.source):
            dst = out[:, c, :h, :w]
            np.multiply(x[..., src], self.scale[c], out=dst, casting="unsafe")
            dst += self.offset[c]
        return out


def _open(model_dir, manifest, graph, runtime, precision, threads):
    from kpface.runtimes import open_session  # lazy: keeps `import kpface` light
    return open_session(model_dir, runtime=runtime, precision=precision, graph=graph,
                        threads=threads, manifest=manifest)


class _Model:
    arch_prefix = ""
    task = ""

    def __init__(self, model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                 precision: str = "fp32", threads: int | None = None,
                 manifest: dict | None = None):
        self.model_dir = model_dir
        self.manifest = manifest if manifest is not None else load_manifest(model_dir,
                                                                             task=self.task)
        self.arch = arch = str(self.manifest.get("arch", ""))
        if not arch.startswith(self.arch_prefix):
            raise ModelError(f"{model_dir} holds a {arch!r} model; {type(self).__name__} needs "
                             f"a {self.arch_prefix}* model")
        _check_landmark_order(self.manifest)
        self._open_args = (runtime, precision, threads)

    def _session(self, graph: str = "model"):
        return _open(self.model_dir, self.manifest, graph, *self._open_args)


# --- RetinaFace ----------------------------------------------------------------------------

class RetinaFaceDetector(_Model):
    """RetinaFace: letterbox to the manifest's input size, one forward pass, decode, NMS."""

    arch_prefix = "retinaface"
    task = "detector"

    def __init__(self, model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                 precision: str = "fp32", threads: int | None = None,
                 manifest: dict | None = None, score_threshold: float | None = None,
                 input_size: tuple[int, int] | None = None):
        super().__init__(model_dir, runtime, precision, threads, manifest)
        m = self.manifest
        pre = _require(m, "preprocess")
        self.norm = _Normalizer(pre)
        self.width, self.height = input_size or (int(pre["width"]), int(pre["height"]))
        if input_size is not None and not pre.get("dynamic_size", False):
            raise InputError(f"{model_dir} was exported for {pre['width']}x{pre['height']} only")
        priors = _require(m, "priors")
        self.variances = [float(v) for v in priors["variances"]]
        # Anchors depend only on the input size: computed once here.
        self.priors = prior_boxes(self.width, self.height, priors["min_sizes"], priors["steps"])
        self.score_threshold = float(score_threshold if score_threshold is not None
                                     else _require(m, "score_threshold"))
        cfg = _require(m, "nms")
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
        return [Detection(boxes[i].astype(np.float32), float(scores[idx[i]]),
                          lms[i].astype(np.float32)) for i in keep]


# --- MTCNN ---------------------------------------------------------------------------------

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


class MTCNNDetector(_Model):
    """MTCNN cascade: image pyramid through P-Net, NMS, R-Net and O-Net refinement (numpy)."""

    arch_prefix = "mtcnn"
    task = "detector"

    def __init__(self, model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                 precision: str = "fp32", threads: int | None = None,
                 manifest: dict | None = None, min_face_size: int | None = None,
                 thresholds: Sequence[float] | None = None):
        super().__init__(model_dir, runtime, precision, threads, manifest)
        self.norm = _Normalizer(_require(self.manifest, "preprocess"))
        cfg = _require(self.manifest, "mtcnn")
        self.min_face_size = int(min_face_size or cfg["min_face_size"])
        self.factor = float(cfg["scale_factor"])
        self.thresholds = [float(t) for t in (thresholds or cfg["thresholds"])]
        self.stride, self.cell = int(cfg["pnet_stride"]), int(cfg["pnet_cell"])
        self.rnet_size, self.onet_size = int(cfg["rnet_size"]), int(cfg["onet_size"])
        self.nms_cfg = cfg["nms"]
        if self.min_face_size < self.cell:
            raise InputError(f"min_face_size must be >= {self.cell} pixels, "
                             f"got {self.min_face_size}")
        self.pnet = self._session("pnet")
        self.rnet = self._session("rnet")
        self.onet = self._session("onet")

    def scales(self, height: int, width: int) -> list[float]:
        m = self.cell / self.min_face_size
        side = min(height, width) * m
        out = []
        while side >= self.cell:
            out.append(m * self.factor ** len(out))
            side *= self.factor
        return out

    def _stage1(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        found = []
        for s in self.scales(h, w):
            hs, ws = int(h * s + 1), int(w * s + 1)
            x = self.norm(cv2.resize(image, (ws, hs), interpolation=cv2.INTER_AREA))
            out = self.pnet.run({"image": x})
            prob, reg = out["prob"][0, 1], out["reg"][0]
            ys, xs = np.nonzero(prob >= self.thresholds[0])
            if ys.size == 0:
                continue
            cells = np.stack([xs, ys], axis=1).astype(np.float64) * self.stride
            boxes = np.concatenate([np.floor((cells + 1) / s),
                                    np.floor((cells + self.cell) / s)], axis=1)
            cand = np.concatenate([boxes, prob[ys, xs, None], reg[:, ys, xs].T], axis=1)
            keep = nms(cand[:, :4], cand[:, 4], float(self.nms_cfg["per_scale"]))
            found.append(cand[keep])
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


# --- DFA keypoints -------------------------------------------------------------------------

class DFAKeypoints(_Model):
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
                 manifest: dict | None = None, crop_scale: float | None = None):
        super().__init__(model_dir, runtime, precision, threads, manifest)
        pre = _require(self.manifest, "preprocess")
        self.norm = _Normalizer(pre)
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


# --- factories -----------------------------------------------------------------------------

_DETECTORS = {"retinaface": RetinaFaceDetector, "mtcnn": MTCNNDetector}
_KEYPOINTS = {"dfa": DFAKeypoints}


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
    cls = _pick(_DETECTORS, manifest, model_dir, "detector")
    return cls(model_dir, runtime, precision, threads, manifest=manifest, **kwargs)


def load_keypoints(model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                   precision: str = "fp32", threads: int | None = None,
                   manifest: dict | None = None, **kwargs) -> DFAKeypoints:
    """Open an exported keypoint model directory (DFA); ``manifest``, if given, is its
    already verified manifest."""
    manifest = manifest or load_manifest(model_dir, task="keypoints")
    cls = _pick(_KEYPOINTS, manifest, model_dir, "keypoint model")
    return cls(model_dir, runtime, precision, threads, manifest=manifest, **kwargs)
