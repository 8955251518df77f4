"""dlib's face chip (``get_face_chip_details`` + ``extract_image_chip``) in numpy, from
kpface's five landmarks. Torch-free; needed by the ``dlib_resnet_v1`` recognizer.

dlib fits a similarity from a template of its own five points (shape_predictor_5: the outer and
inner corners of both eyes, the base of the nose) in a unit face frame, padded by ``padding`` on
each side and scaled to the chip, onto the detected points. kpface's five points (eye centres,
nose tip, mouth corners, :data:`kpface.landmarks.LANDMARK_ORDER`) are other points of the same
face, so the template for them is where they sit in that frame: taken from the mean face shape
that dlib's chip code uses for 68-point input (the iBUG 300-W points), whose eye corners and
nose base dlib's 5-point template reproduces to within 0.003 of the face width. Eye centre =
mean of the six eye-contour points, nose tip = point 30, mouth corners = points 48 and 54, all
moved by the small similarity that maps the mean shape's eye corners and nose base onto the
5-point template (:func:`kpface_template`).

The extraction then follows dlib step by step: the chip rectangle and angle from the fitted
similarity, dlib's 2x image pyramid (5-tap [1 4 6 4 1] filter, integer arithmetic) when the face
is more than twice the chip's size, bilinear sampling whose result is truncated to uint8, and 0
outside the image. Given dlib's own five points (``points="dlib5"``), :func:`face_chip`
reproduces ``dlib.get_face_chip`` (the test fixture checks it).

Pixel coordinates: pixel (i, j) has its centre at (x=j, y=i), as in dlib and OpenCV.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .align import estimate_similarity
from .errors import InputError

CHIP_SIZE = 150
CHIP_PADDING = 0.25

# dlib's five-point template (interpolation.h, get_face_chip_details), unit face frame, in
# shape_predictor_5 order: 0 = outer corner of the image-right eye, 1 = its inner corner,
# 2 = outer corner of the image-left eye, 3 = its inner corner, 4 = base of the nose.
DLIB5_UNIT = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                       [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                       [0.4901123135679, 0.6277975316475]])

# dlib's mean face shape (interpolation.h, 68-point branch), the entries used here, by iBUG index.
_MEAN68 = {
    30: (0.490127, 0.515625), 33: (0.490127, 0.628106),
    36: (0.121737, 0.216423), 37: (0.187122, 0.178758), 38: (0.265825, 0.179852),
    39: (0.334606, 0.231733), 40: (0.260918, 0.245099), 41: (0.182743, 0.244077),
    42: (0.645647, 0.231733), 43: (0.714428, 0.179852), 44: (0.793132, 0.178758),
    45: (0.858516, 0.216423), 46: (0.79751, 0.244077), 47: (0.719335, 0.245099),
    48: (0.254149, 0.780233), 54: (0.726104, 0.780233),
}
_DLIB5_IN_MEAN68 = (45, 42, 36, 39, 33)  # the mean-shape points dlib's five points stand for


def _mean68(*idx: int) -> np.ndarray:
    return np.array([_MEAN68[i] for i in idx], dtype=np.float64)


def kpface_template_unit() -> np.ndarray:
    """kpface's five points (LANDMARK_ORDER) in dlib's unit face frame, [5, 2]."""
    ours = np.stack([_mean68(*range(36, 42)).mean(0), _mean68(*range(42, 48)).mean(0),
                     _mean68(30)[0], _mean68(48)[0], _mean68(54)[0]])
    to_dlib5 = estimate_similarity(_mean68(*_DLIB5_IN_MEAN68), DLIB5_UNIT)
    return ours @ to_dlib5[:, :2].T + to_dlib5[:, 2]


POINT_SETS = ("kpface", "dlib5")


def chip_template(size: int = CHIP_SIZE, padding: float = CHIP_PADDING,
                  points: str = "kpface") -> np.ndarray:
    """Where the five points go in a ``size`` x ``size`` chip (pixels), as dlib places them:
    ``(padding + p) / (2 * padding + 1) * size``."""
    if points == "kpface":
        unit = kpface_template_unit()
    elif points == "dlib5":
        unit = DLIB5_UNIT
    else:
        raise InputError(f"unknown landmark set {points!r}; use one of {POINT_SETS}")
    return (padding + unit) / (2 * padding + 1) * size


@dataclass(frozen=True)
class ChipDetails:
    """dlib's ``chip_details``: a rectangle (l, t, r, b) in image pixels, its rotation about its
    centre and the chip size."""

    rect: tuple[float, float, float, float]
    angle: float
    rows: int
    cols: int


def chip_details(landmarks_px: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING,
                 points: str = "kpface") -> ChipDetails:
    """``get_face_chip_details`` for five landmarks (``points`` names their convention)."""
    if size <= 0 or not padding >= 0:
        raise InputError(f"chip size {size} and padding {padding} must be > 0 and >= 0")
    pts = np.asarray(landmarks_px, dtype=np.float64)
    if pts.shape != (5, 2):
        raise InputError(f"a face chip needs five (x, y) landmarks, got shape {pts.shape}")
    m = estimate_similarity(chip_template(size, padding, points), pts)  # chip -> image
    dx, dy = m[:, 0]
    angle, scale = math.atan2(dy, dx), math.hypot(dx, dy)
    cx, cy = m[:, :2] @ np.array([size / 2.0, size / 2.0]) + m[:, 2]
    half = (size * scale - 1) / 2  # dlib's centered_drect: width - 1 between the edges
    return ChipDetails((cx - half, cy - half, cx + half, cy + half), angle, size, size)


# --- dlib's extraction -----------------------------------------------------------------------

def _width(r) -> float:
    return r[2] - r[0] + 1 if r[2] >= r[0] else 0.0


def _area(r) -> float:
    return _width(r) * (r[3] - r[1] + 1 if r[3] >= r[1] else 0.0)


def _rect_down(r):
    # pyramid_down<2>::point_down(p) = p / 2 - (1.25, 0.75), applied to both corners.
    return (r[0] / 2 - 1.25, r[1] / 2 - 0.75, r[2] / 2 - 1.25, r[3] / 2 - 0.75)


def _rotate(centre, p, angle):
    c, s = math.cos(angle), math.sin(angle)
    x, y = p[0] - centre[0], p[1] - centre[1]
    return (c * x - s * y + centre[0], s * x + c * y + centre[1])


def _corners(r, angle):
    centre = ((r[0] + r[2]) / 2, (r[1] + r[3]) / 2)
    return [_rotate(centre, p, angle) for p in ((r[0], r[1]), (r[2], r[1]), (r[0], r[3]),
                                                 (r[2], r[3]))]


def pyramid_down(image: np.ndarray) -> np.ndarray:
    """dlib's ``pyramid_down<2>``: [1 4 6 4 1] x [1 4 6 4 1] / 256 (integer, floored), keeping
    every other row and column; output ((H - 3) // 2, (W - 3) // 2)."""
    h, w = image.shape[:2]
    if h <= 8 or w <= 8:
        return image[:0, :0]
    ho, wo = (h - 3) // 2, (w - 3) // 2
    x = image.astype(np.uint32)
    taps = (1, 4, 6, 4, 1)
    rows = sum(k * x[:, j:j + 2 * wo:2] for j, k in enumerate(taps))
    out = sum(k * rows[i:i + 2 * ho:2] for i, k in enumerate(taps))
    return (out // 256).astype(np.uint8)


def _bilinear_truncate(src: np.ndarray, a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Sample ``src`` at ``a @ (x, y, 1)`` for every chip pixel, dlib's ``interpolate_bilinear``
    (a 2x2 neighbourhood fully inside the image, else 0; the blend truncated to uint8)."""
    ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float64)
    px = a[0, 0] * xs + a[0, 1] * ys + a[0, 2]
    py = a[1, 0] * xs + a[1, 1] * ys + a[1, 2]
    left, top = np.floor(px), np.floor(py)
    h, w = src.shape[:2]
    inside = (left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)
    li = np.where(inside, left, 0).astype(np.intp)
    ti = np.where(inside, top, 0).astype(np.intp)
    fx = (px - left)[..., None]
    fy = (py - top)[..., None]
    s = src.astype(np.float64)
    tl, tr = s[ti, li], s[ti, np.minimum(li + 1, w - 1)]
    bl, br = s[np.minimum(ti + 1, h - 1), li], s[np.minimum(ti + 1, h - 1), np.minimum(li + 1, w - 1)]
    v = (1 - fy) * ((1 - fx) * tl + fx * tr) + fy * ((1 - fx) * bl + fx * br)
    out = v.astype(np.uint8)  # C++ static_cast<unsigned char>(double): truncation
    out[~inside] = 0
    return out


def extract_chip(image: np.ndarray, details: ChipDetails) -> tuple[np.ndarray, np.ndarray]:
    """dlib's ``extract_image_chip`` (bilinear). Returns (chip [rows, cols, C] uint8, M), M the
    2x3 affine map from image pixels to chip pixels (what dlib's sampling implies)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.dtype != np.uint8:
        got = getattr(image, "shape", type(image).__name__)
        raise InputError(f"expected an HxWxC uint8 image, got {got}")
    rows, cols, rect, angle = details.rows, details.cols, details.rect, details.angle
    h, w = image.shape[:2]
    # How deep a pyramid, and the (grown) bounding box of the rotated rectangle.
    depth, grow, r = 0, 2.0, _rect_down(rect)
    while _area(r) > rows * cols:
        r, depth, grow = _rect_down(r), depth + 1, grow * 2 + 2
    cs = np.array(_corners(rect, angle))
    lo, hi = cs.min(0) - grow, cs.max(0) + grow
    box = [max(lo[0], 0.0), max(lo[1], 0.0), min(hi[0], w - 1.0), min(hi[1], h - 1.0)]
    bl, bt, br, bb = (int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))
                      for v in box)  # std::lround
    if br < bl or bb < bt:  # the chip lies wholly outside the image
        return np.zeros((rows, cols, image.shape[2]), np.uint8), _image_to_chip(rect, angle, rows, cols)
    src = image[bt:bb + 1, bl:br + 1]
    local = (rect[0] - bl, rect[1] - bt, rect[2] - bl, rect[3] - bt)
    level = -1
    while _area(_rect_down(local)) > rows * cols:
        level, local = level + 1, _rect_down(local)
    for _ in range(level + 1):
        src = pyramid_down(src)
    # Chip corners (0,0), (cols-1,0), (0,rows-1) -> the rotated rectangle's tl, tr, bl.
    tl, tr, bl_, _ = _corners(local, angle)
    a = np.array([[(tr[0] - tl[0]) / max(cols - 1, 1), (bl_[0] - tl[0]) / max(rows - 1, 1), tl[0]],
                  [(tr[1] - tl[1]) / max(cols - 1, 1), (bl_[1] - tl[1]) / max(rows - 1, 1), tl[1]]])
    return _bilinear_truncate(src, a, rows, cols), _image_to_chip(rect, angle, rows, cols)


def _image_to_chip(rect, angle, rows: int, cols: int) -> np.ndarray:
    tl, tr, bl, _ = _corners(rect, angle)
    chip_to_img = np.array([[(tr[0] - tl[0]) / max(cols - 1, 1), (bl[0] - tl[0]) / max(rows - 1, 1), tl[0]],
                            [(tr[1] - tl[1]) / max(cols - 1, 1), (bl[1] - tl[1]) / max(rows - 1, 1), tl[1]]])
    full = np.vstack([chip_to_img, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def face_chip(image: np.ndarray, landmarks_px: np.ndarray, size: int = CHIP_SIZE,
              padding: float = CHIP_PADDING, points: str = "kpface"
              ) -> tuple[np.ndarray, np.ndarray]:
    """The dlib face chip of one face. ``landmarks_px``: five (x, y) image points, in
    LANDMARK_ORDER (``points="kpface"``) or shape_predictor_5's order (``"dlib5"``).
    Returns (chip uint8 [size, size, C] in the image's channel order, M image -> chip)."""
    return extract_chip(image, chip_details(landmarks_px, size, padding, points))
