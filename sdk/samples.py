"""Real face photos available offline (scikit-image's sample data) and their known geometry.

One place for the hand-measured facts that calibration, the accuracy gates, the benchmark and
the tests share. scikit-image is needed only here (extra ``build``, included by ``dev``).
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .landmarks import ARCFACE_TEMPLATE_112

# skimage.data.astronaut() (512x512, Eileen Collins), measured by eye on an 8x-24x zoom (pixel
# centres at integers), in LANDMARK_ORDER: iris centres, nose tip highlight, outer lip corners.
ASTRONAUT_LANDMARKS = np.array([[202.7, 100.4], [246.0, 102.8], [222.7, 126.5],
                                [203.5, 139.7], [243.0, 140.8]], dtype=np.float32)
# Her face box as MTCNN draws it (x1, y1, x2, y2), checked by eye on the annotated image.
ASTRONAUT_BOX = np.array([180.0, 60.0, 267.0, 173.0], dtype=np.float32)

# The first 100 images of skimage.data.lfw_subset() are 25x25 grayscale LFW face crops, roughly
# aligned: their five points are the ArcFace template scaled to the crop, then moved by one
# similarity (x1.043, 0.46 px left, 3.2 px up) fitted once to the eyes, nose and mouth of the
# mean of the 100 crops. The last 100 images are non-faces.
LFW_SUBSET_FACES = 100
LFW_SUBSET_FIT = (1.043, (-0.018, -0.129))


def _skimage_data():
    try:
        import skimage.data as skd
    except ImportError:
        raise InputError("the sample photos come from scikit-image: "
                         "pip install 'kpface[build]' (or pass your own images)") from None
    return skd


def _bgr(rgb_or_gray: np.ndarray) -> np.ndarray:
    from .image import to_bgr8
    img = to_bgr8(rgb_or_gray, name="sample image")  # gray -> 3 channels; RGB stays RGB order
    return np.ascontiguousarray(img[:, :, ::-1]) if rgb_or_gray.ndim == 3 else img


def astronaut_bgr() -> np.ndarray:
    """skimage.data.astronaut() as 512x512 BGR uint8 (one frontal face)."""
    return _bgr(_skimage_data().astronaut())


def camera_bgr() -> np.ndarray:
    """skimage.data.camera() (grayscale cameraman, near profile) as 3-channel BGR uint8."""
    return _bgr(_skimage_data().camera())


def coffee_bgr() -> np.ndarray:
    """skimage.data.coffee(): a photo with no face, as BGR uint8."""
    return _bgr(_skimage_data().coffee())


def lfw_subset_bgr() -> list[np.ndarray]:
    """The 100 LFW face crops of skimage.data.lfw_subset() as 25x25 BGR uint8 images."""
    return [_bgr(crop) for crop in _skimage_data().lfw_subset()[:LFW_SUBSET_FACES]]


def template_landmarks(width: int, height: int) -> np.ndarray:
    """The ArcFace template scaled to an aligned ``width`` x ``height`` face crop."""
    return ARCFACE_TEMPLATE_112 * np.array([width / 112.0, height / 112.0], np.float32)


def lfw_subset_landmarks(width: int, height: int) -> np.ndarray:
    """Where the five points of an lfw_subset crop (resized to ``width`` x ``height``) are."""
    scale, (dx, dy) = LFW_SUBSET_FIT
    return (template_landmarks(width, height) * scale
            + np.array([dx * width, dy * height], np.float32)).astype(np.float32)
