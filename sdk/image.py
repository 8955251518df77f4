"""Image loading and checks: every image reaching a model is 8-bit, 3-channel BGR, non-empty.

Files: the header is read first (:mod:`kpface.imageheader`), so a file in an unknown format, or
one whose header declares more pixels than the limit (a decompression bomb), is refused before
anything is decoded. The limit is ``max_pixels=``, else ``$KPFACE_MAX_PIXELS``, else
:data:`DEFAULT_MAX_PIXELS` (Pillow's decompression-bomb limit, 89.5 megapixels). Decoding keeps
16-bit data and alpha, and turns EXIF-rotated photos upright (JPEG, PNG, WebP; OpenCV's TIFF
decoder does it for TIFF). Grayscale, palette, RGBA / BGRA, CMYK JPEG and 16-bit images are
converted (and logged); a missing, empty, corrupt or truncated file raises
:class:`InputError` with a one-line reason, and so does anything the decoder raises.

Arrays: :func:`to_bgr8`. A float image must say its range: ``value_range=1`` (the default,
[0, 1]) or ``value_range=255``; values outside the range are refused rather than clipped,
since a [0, 255] image read as [0, 1] would turn white.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

from .errors import InputError
from .imageheader import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, ORIENT_HERE, read_header

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm",
                  ".pbm", ".pnm", ".pam")
FLOAT_RANGES = (1.0, 255.0)


def pixel_limit(value: int | None = None) -> int:
    """The pixel limit: ``value``, else ``$KPFACE_MAX_PIXELS``, else the default."""
    source = "max_pixels"
    if value is None:
        env = os.environ.get(MAX_PIXELS_ENV)
        if not env:
            return DEFAULT_MAX_PIXELS
        value, source = env, f"${MAX_PIXELS_ENV}"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise InputError(f"{source}={value!r} is not a positive number of pixels")
    return n


def _jpeg_is_truncated(data: bytes) -> bool:
    # A complete JPEG ends with the EOI marker (trailing padding aside); OpenCV decodes a
    # truncated one silently, filling the rest with grey.
    return data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _float_to_8bit(image: np.ndarray, name: str, value_range: float | None) -> np.ndarray:
    top = 1.0 if value_range is None else float(value_range)
    if top not in FLOAT_RANGES:
        raise InputError(f"{name}: value_range must be 1 ([0, 1]) or 255 ([0, 255]), "
                         f"got {value_range!r}")
    if not np.isfinite(image).all():
        raise InputError(f"{name}: the image holds NaN or infinite values")
    lo, hi = float(image.min()), float(image.max())
    slack = 1e-3 * top
    if lo < -slack or hi > top + slack:
        hint = ("; it looks like [0, 255]: pass value_range=255" if top == 1.0 and hi <= 255.5
                and lo >= -slack else "")
        raise InputError(f"{name}: a float image must hold values in [0, {top:g}] "
                         f"(value_range={top:g}), this one spans [{lo:g}, {hi:g}]{hint}")
    return np.clip(image * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)


def to_bgr8(image: np.ndarray, name: str = "image",
            value_range: float | None = None) -> np.ndarray:
    """Return ``image`` as a contiguous HxWx3 uint8 BGR array, or raise InputError.

    Accepts HxW (gray), HxWx1, HxWx3 (BGR), HxWx4 (BGRA: alpha composited on black);
    uint8, uint16 (scaled by 255/65535) or float in [0, ``value_range``] (1, the default, or
    255; values outside are refused, not clipped).
    """
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise InputError(f"{name}: unsupported shape {image.shape}; expected HxW, HxWx3 or HxWx4")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{name}: the image is empty ({image.shape[1]}x{image.shape[0]} pixels)")
    if image.dtype == np.uint16:
        log.info("%s: 16-bit image converted to 8-bit", name)
        # round(x * 255 / 65535) without a 4-byte-per-value intermediate.
        image = cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
    elif image.dtype.kind == "f":
        image = _float_to_8bit(image, name, value_range)
    elif image.dtype != np.uint8:
        raise InputError(f"{name}: unsupported pixel type {image.dtype}; use uint8, uint16 or float")
    if image.ndim == 2 or image.shape[2] == 1:
        image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        image = (image[:, :, :3].astype(np.float32) * alpha + 0.5).astype(np.uint8)
    return np.ascontiguousarray(image)


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as HxWx3 uint8 BGR; raise InputError naming the problem."""
    path = Path(path)
    try:
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, not an image")
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    return decode_image(data, name=str(path), max_pixels=max_pixels)


# EXIF orientation -> the operation that turns the stored pixels upright.
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
    7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
    8: lambda a: np.swapaxes(a, 0, 1)[::-1],
}


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, ... file bytes) as HxWx3 uint8 BGR; raise
    InputError naming the problem (``name`` says which image in the message). Images whose
    header declares more than ``max_pixels`` (see :func:`pixel_limit`) are refused undecoded."""
    if not data:
        raise InputError(f"{name}: the file is empty")
    limit = pixel_limit(max_pixels)
    data = bytes(data)
    if _jpeg_is_truncated(data):
        raise InputError(f"{name}: the JPEG is truncated (no end marker); re-copy the file")
    header = read_header(data, name)
    if header.pixels > limit:
        raise InputError(
            f"{name}: the {header.format.upper()} header declares {header.width}x"
            f"{header.height} = {header.pixels:,} pixels, over the limit of {limit:,}; not "
            f"decoded (raise the limit with --max-pixels or ${MAX_PIXELS_ENV} if the image is "
            "genuine)")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except (cv2.error, MemoryError, ValueError, OverflowError) as e:
        reason = str(e).strip().splitlines()[-1][:120] if str(e).strip() else type(e).__name__
        raise InputError(f"{name}: not a readable image (the decoder failed: {reason})") from None
    if image is None:
        raise InputError(f"{name}: not a readable image (corrupt, truncated or unsupported format)")
    if image.shape[0] * image.shape[1] > limit:
        raise InputError(f"{name}: decoded to {image.shape[1]}x{image.shape[0]} pixels, over "
                         f"the limit of {limit:,}")
    if header.format in ORIENT_HERE and header.orientation != 1:
        log.info("%s: turned upright (EXIF orientation %d)", name, header.orientation)
        image = np.ascontiguousarray(_UPRIGHT[header.orientation](image))
    return to_bgr8(image, name=name)


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files
