"""Image loading and checks: every image reaching a model is 8-bit, 3-channel BGR, non-empty.

Grayscale, RGBA/BGRA and 16-bit images are converted (and logged); missing, empty, corrupt or
truncated files raise :class:`InputError` with a one-line reason.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


def _jpeg_is_truncated(data: bytes) -> bool:
    # A complete JPEG ends with the EOI marker (trailing padding aside); OpenCV decodes a
    # truncated one silently, filling the rest with grey.
    return data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def to_bgr8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return ``image`` as a contiguous HxWx3 uint8 BGR array, or raise InputError.

    Accepts HxW (gray), HxWx1, HxWx3 (BGR), HxWx4 (BGRA: alpha composited on black);
    uint8, uint16 (scaled by 1/257) or float in [0, 1].
    """
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise InputError(f"{name}: unsupported shape {image.shape}; expected HxW, HxWx3 or HxWx4")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{name}: the image is empty ({image.shape[1]}x{image.shape[0]} pixels)")
    if image.dtype == np.uint16:
        log.info("%s: 16-bit image converted to 8-bit", name)
        image = (image.astype(np.uint32) * 255 + 32767) // 65535
        image = image.astype(np.uint8)
    elif image.dtype.kind == "f":
        if not np.isfinite(image).all():
            raise InputError(f"{name}: the image holds NaN or infinite values")
        image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(f"{name}: unsupported pixel type {image.dtype}; use uint8, uint16 or float")
    if image.ndim == 2 or image.shape[2] == 1:
        image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        image = (image[:, :, :3].astype(np.float32) * alpha + 0.5).astype(np.uint8)
    return np.ascontiguousarray(image)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as HxWx3 uint8 BGR; raise InputError naming the problem."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an image")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    return decode_image(data, name=str(path))


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, ... file bytes) as HxWx3 uint8 BGR; raise
    InputError naming the problem (``name`` says which image in the message)."""
    if not data:
        raise InputError(f"{name}: the file is empty")
    if _jpeg_is_truncated(data):
        raise InputError(f"{name}: the JPEG is truncated (no end marker); re-copy the file")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"{name}: not a readable image (corrupt, truncated or unsupported format)")
    return to_bgr8(image, name=name)


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files
