"""Five-point face alignment and recognizer input preparation (numpy + OpenCV, torch-free).

Pixel coordinates follow OpenCV's ``warpAffine``: pixel (i, j) has its centre at (x=j, y=i).
Keypoints given to a recognizer are those pixel coordinates divided by the crop size, as in
CVLface (``ldmk * size`` gives the pixel position back).

Two conventions feed a KP-RPE recognizer (specification section 4):
- ``"aligned"`` (default, CVLface verification app): the face warped onto the ArcFace
  template, with its landmarks mapped into that aligned crop;
- ``"square"`` (CVLface benchmark pipeline / HF model card): an un-re-aligned square crop around
  the face, resized to the recognizer size, with the landmarks of that crop.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from .errors import InputError, ModelError
from .landmarks import ARCFACE_TEMPLATE_112
from .preprocess import Normalizer

CONVENTIONS = ("aligned", "square")


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (uniform scale, rotation, translation; no reflection) mapping
    ``src`` [N, 2] onto ``dst`` [N, 2] (Umeyama 1991). Returns the 2x3 matrix, float64."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise InputError(f"similarity needs two equal sets of >= 2 points, got {src.shape} "
                         f"and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise InputError("similarity got non-finite landmarks; check the detector output")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s ** 2).sum() / len(src)
    if var_s <= 1e-12:
        raise InputError("the source landmarks all coincide; no similarity can be fitted")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    fix = np.ones(2)
    if np.linalg.det(cov) < 0:  # forbid reflections
        fix[-1] = -1.0
    rot = u @ np.diag(fix) @ vt
    scale = (sig * fix).sum() / var_s
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def transform_points(pts: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine ``m`` to points [..., 2]."""
    pts = np.asarray(pts, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine transform."""
    return cv2.invertAffineTransform(np.asarray(m, dtype=np.float64))


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        got = getattr(image, "shape", type(image).__name__)
        raise InputError(f"expected a BGR image of shape HxWx3, got {got}")
    if image.dtype != np.uint8:
        raise InputError(f"expected a uint8 BGR image, got dtype {image.dtype}; "
                         "convert with np.clip(x, 0, 255).astype(np.uint8)")
    return image


def template(size: int = 112) -> np.ndarray:
    """The ArcFace five-point template scaled to a ``size`` x ``size`` crop (LANDMARK_ORDER)."""
    return ARCFACE_TEMPLATE_112.astype(np.float64) * (size / 112.0)


def norm_crop(image_bgr: np.ndarray, landmarks_px: np.ndarray,
              size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """Warp the face onto the ArcFace template. Returns (crop_bgr uint8 [size, size, 3], M),
    where M (2x3) maps image pixels to crop pixels."""
    image_bgr = _check_image(image_bgr)
    m = estimate_similarity(np.asarray(landmarks_px).reshape(5, 2), template(size))
    crop = cv2.warpAffine(image_bgr, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop, m


def square_box(box: Sequence[float], scale: float = 1.0) -> tuple[float, float, float]:
    """(cx, cy, side) of the square of side ``scale * max(w, h)`` centred on ``box``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = scale * max(x2 - x1, y2 - y1)
    if not side > 0:
        raise InputError(f"box {list(box)} is empty; it needs x2 > x1 or y2 > y1")
    return (x1 + x2) / 2, (y1 + y2) / 2, side


def square_crop(image_bgr: np.ndarray, box: Sequence[float], size: int, scale: float = 1.0,
                align_corners: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Crop the square around ``box`` (see :func:`square_box`), zero padded, resized to ``size``
    with bilinear interpolation. Returns (crop_bgr uint8, M), M (2x3) mapping image pixels to
    crop pixels.

    By default the square's outer pixel edges map onto the crop's (OpenCV ``resize``
    convention). ``align_corners=True`` maps the square's first and last pixel centres onto the
    crop's, as ``F.interpolate(..., align_corners=True)`` does (the DFA's resize).
    """
    image_bgr = _check_image(image_bgr)
    cx, cy, side = square_box(box, scale)
    x0, y0 = cx - side / 2, cy - side / 2  # outer edge of the square, in pixel coordinates
    if align_corners:
        k = (size - 1) / max(side - 1, 1e-6)
        tx, ty = -(x0 + 0.5) * k, -(y0 + 0.5) * k
    else:
        k = size / side
        tx, ty = -x0 * k - 0.5, -y0 * k - 0.5
    m = np.array([[k, 0, tx], [0, k, ty]], dtype=np.float64)
    crop = cv2.warpAffine(image_bgr, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop, m


def crop_face(image_bgr: np.ndarray, landmarks_px: np.ndarray, size: int = 112,
              convention: str = "aligned", box: Sequence[float] | None = None,
              square_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop one face for a recognizer. Returns (crop_bgr, landmarks in crop pixels, M).

    ``convention="aligned"`` warps onto the ArcFace template (:func:`norm_crop`); ``"square"``
    takes the square of side ``square_scale * max(w, h)`` around ``box`` (or, with no box,
    around the landmarks' bounding box) without rotating it.
    """
    landmarks_px = np.asarray(landmarks_px, dtype=np.float64).reshape(5, 2)
    if convention == "aligned":
        crop, m = norm_crop(image_bgr, landmarks_px, size)
    elif convention == "square":
        if box is None:
            lo, hi = landmarks_px.min(0), landmarks_px.max(0)
            box = (lo[0], lo[1], hi[0], hi[1])
        crop, m = square_crop(image_bgr, box, size, square_scale)
    else:
        raise InputError(f"unknown keypoint convention {convention!r}; use one of {CONVENTIONS}")
    return crop, transform_points(landmarks_px, m), m


def fit_crops(crops_bgr: Sequence[np.ndarray], points_px: Sequence[np.ndarray],
              size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack face crops at ``size`` (width, height) for a network. Crops of another size are
    resized (bilinear) and their points moved with them (half-pixel-centre convention:
    x' = (x + 0.5) * W'/W - 0.5). Returns (crops uint8 [B, H, W, 3], points float64 [B, K, 2]
    in network pixels, scale [B, 2] = network size / crop size)."""
    width, height = size
    if len(crops_bgr) != len(points_px):
        raise InputError(f"{len(crops_bgr)} crops but {len(points_px)} landmark sets")
    batch = np.empty((len(crops_bgr), height, width, 3), dtype=np.uint8)
    points, scales = [], np.ones((len(crops_bgr), 2), dtype=np.float64)
    for i, (crop, pts) in enumerate(zip(crops_bgr, points_px)):
        crop = _check_image(crop)
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        h, w = crop.shape[:2]
        if (h, w) != (height, width):
            crop = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)
            scales[i] = (width / w, height / h)
            pts = (pts + 0.5) * scales[i] - 0.5
        batch[i] = crop
        points.append(pts)
    points_arr = np.stack(points) if points else np.zeros((0, 5, 2), dtype=np.float64)
    return batch, points_arr, scales


def recognizer_inputs(crops_bgr: Sequence[np.ndarray], landmarks_in_crop_px: Sequence[np.ndarray],
                      manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """Batch face crops for a recognizer, reading size, colour order, mean and std from its
    manifest's ``preprocess`` (through :class:`kpface.preprocess.Normalizer`). Returns
    (image [B, 3, H, W] float32, keypoints [B, 5, 2] float32 with (x, y) in [0, 1] of the
    image fed to the network).

    Crops of another size are resized (bilinear) and their landmarks scaled with them
    (:func:`fit_crops`).
    """
    pre = manifest.get("preprocess")
    if not isinstance(pre, dict):
        raise InputError("the recognizer manifest has no 'preprocess' entry; re-export the model")
    try:
        width, height = (int(v) for v in pre["size"])
        norm = Normalizer(pre, str(manifest.get("name", "recognizer")))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"the recognizer manifest's 'preprocess' is incomplete ({e}); "
                         "re-export the model") from None
    except ModelError as e:
        raise InputError(str(e)) from None
    batch, points, _ = fit_crops(crops_bgr, landmarks_in_crop_px, (width, height))
    keypoints = (points / np.array([width, height])).astype(np.float32)
    return norm(batch), keypoints
