"""What an image file's header says, read before anything is decoded: format, width, height
and EXIF orientation.

:func:`kpface.image.decode_image` refuses a file whose header declares more pixels than its
limit before OpenCV allocates anything (a decompression bomb is a few hundred bytes that
declare 60000 x 60000 pixels), and a file in a format this module cannot measure. The formats
are those kpface lists (:data:`kpface.image.IMAGE_SUFFIXES`): PNG, JPEG, BMP, WebP, TIFF (and
BigTIFF) and the Netpbm family (PBM, PGM, PPM, PAM). Other formats OpenCV may decode (GIF,
OpenEXR, HDR, JPEG 2000, ...) are refused: their size is not checked here.

The EXIF orientation is read from JPEG (APP1), PNG (eXIf) and WebP (EXIF) files: OpenCV
ignores it when it decodes with ``IMREAD_UNCHANGED`` (which kpface needs to keep 16-bit data
and alpha). TIFF files are turned upright by OpenCV's TIFF decoder itself.

Every reader works on the bytes only, with explicit bounds checks: a damaged header is an
:class:`~kpface.errors.InputError` naming the problem, never another exception.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from .errors import InputError

# Pillow's Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3): 89.5 megapixels, about
# 270 MB as 8-bit BGR. Raise it with max_pixels=, $KPFACE_MAX_PIXELS or --max-pixels.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
MAX_PIXELS_ENV = "KPFACE_MAX_PIXELS"
ORIENTATION_TAG = 0x0112
# Formats whose EXIF orientation the caller must apply (OpenCV's TIFF decoder applies its own).
ORIENT_HERE = ("png", "jpeg", "webp")


@dataclass(frozen=True)
class Header:
    format: str          # "png", "jpeg", "bmp", "webp", "tiff", "pnm"
    width: int
    height: int
    orientation: int = 1  # EXIF orientation, 1..8 (1 = upright)

    @property
    def pixels(self) -> int:
        return self.width * self.height


class _Bad(Exception):
    """A header that cannot be read (turned into InputError by :func:`read_header`)."""


def _u(fmt: str, data: bytes, offset: int) -> int:
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(data):
        raise _Bad("the header is cut short")
    return struct.unpack_from(fmt, data, offset)[0]


# --- TIFF structures (TIFF files, and the EXIF block of JPEG / PNG / WebP) -----------------

def _tiff_tags(data: bytes, wanted: tuple[int, ...]) -> dict[int, int]:
    """Integer values of ``wanted`` tags of the first IFD of a TIFF structure."""
    if data[:2] == b"II":
        e = "<"
    elif data[:2] == b"MM":
        e = ">"
    else:
        raise _Bad("not a TIFF structure")
    magic = _u(e + "H", data, 2)
    if magic == 42:
        ifd, count_fmt, entry, value_at = _u(e + "I", data, 4), "H", 12, 8
    elif magic == 43:  # BigTIFF
        ifd, count_fmt, entry, value_at = _u(e + "Q", data, 8), "Q", 20, 12
    else:
        raise _Bad("not a TIFF structure")
    count = _u(e + count_fmt, data, ifd)
    if count > 4096:
        raise _Bad("the TIFF directory is implausibly long")
    first = ifd + struct.calcsize(count_fmt)
    found: dict[int, int] = {}
    types = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8
    for i in range(count):
        at = first + i * entry
        tag, kind = _u(e + "H", data, at), _u(e + "H", data, at + 2)
        if tag in wanted and kind in types:
            found[tag] = _u(e + types[kind], data, at + value_at)
    return found


def _orientation(exif: bytes) -> int:
    if exif.startswith(b"Exif\x00\x00"):
        exif = exif[6:]
    try:
        value = _tiff_tags(exif, (ORIENTATION_TAG,)).get(ORIENTATION_TAG, 1)
    except _Bad:
        return 1  # a damaged EXIF block says nothing about the pixels
    return value if 1 <= value <= 8 else 1


# --- one reader per format -------------------------------------------------------------------

def _png(data: bytes) -> Header:
    if _u(">I", data, 8) < 13 or data[12:16] != b"IHDR":
        raise _Bad("the PNG does not start with its IHDR chunk")
    w, h = _u(">I", data, 16), _u(">I", data, 20)
    orientation, at = 1, 8
    while at + 8 <= len(data):  # look for eXIf before the image data
        length, kind = _u(">I", data, at), data[at + 4:at + 8]
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"eXIf":
            orientation = _orientation(data[at + 8:at + 8 + length])
            break
        at += 12 + length
    return Header("png", w, h, orientation)


_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(data: bytes) -> Header:
    at, orientation = 2, 1
    while at < len(data):
        if data[at] != 0xFF:
            raise _Bad("the JPEG's markers are damaged")
        while at < len(data) and data[at] == 0xFF:  # fill bytes
            at += 1
        if at >= len(data):
            break
        marker = data[at]
        at += 1
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        length = _u(">H", data, at)
        if length < 2:
            raise _Bad("the JPEG has a segment of length < 2")
        if marker == 0xE1 and data[at + 2:at + 8] == b"Exif\x00\x00":
            orientation = _orientation(data[at + 2:at + length])
        if marker in _SOF:
            h, w = _u(">H", data, at + 3), _u(">H", data, at + 5)
            return Header("jpeg", w, h, orientation)
        at += length
    raise _Bad("the JPEG has no frame header (SOF)")


def _bmp(data: bytes) -> Header:
    size = _u("<I", data, 14)
    if size == 12:
        w, h = _u("<H", data, 18), _u("<H", data, 20)
    elif size >= 40:
        w, h = _u("<i", data, 18), abs(_u("<i", data, 22))
    else:
        raise _Bad("the BMP header is of an unknown kind")
    return Header("bmp", w, h)


def _webp(data: bytes) -> Header:
    at, end, w = 12, min(len(data), 8 + _u("<I", data, 4)), None
    orientation = 1
    while at + 8 <= end:
        kind, length = data[at:at + 4], _u("<I", data, at + 4)
        body = at + 8
        if kind == b"VP8X":
            if body + 10 > len(data):
                raise _Bad("the header is cut short")
            w = 1 + int.from_bytes(data[body + 4:body + 7], "little")
            h = 1 + int.from_bytes(data[body + 7:body + 10], "little")
        elif kind == b"VP8L" and w is None:
            if data[body:body + 1] != b"\x2f":
                raise _Bad("the WebP lossless header is damaged")
            bits = _u("<I", data, body + 1)
            w, h = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        elif kind == b"VP8 " and w is None:
            if data[body + 3:body + 6] != b"\x9d\x01\x2a":
                raise _Bad("the WebP lossy header is damaged")
            w, h = _u("<H", data, body + 6) & 0x3FFF, _u("<H", data, body + 8) & 0x3FFF
        elif kind == b"EXIF":
            orientation = _orientation(data[body:body + length])
        at = body + length + (length & 1)
    if w is None:
        raise _Bad("the WebP has no image header")
    return Header("webp", w, h, orientation)


def _tiff(data: bytes) -> Header:
    tags = _tiff_tags(data, (256, 257))
    if 256 not in tags or 257 not in tags:
        raise _Bad("the TIFF does not state its width and height")
    return Header("tiff", tags[256], tags[257])


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n\r]*)+")


def _pnm(data: bytes) -> Header:
    kind = data[:2]
    if kind == b"P7":  # PAM: "WIDTH w" / "HEIGHT h" lines up to ENDHDR
        head = data[:4096].split(b"ENDHDR", 1)[0]
        w = re.search(rb"\bWIDTH\s+(\d{1,9})", head)
        h = re.search(rb"\bHEIGHT\s+(\d{1,9})", head)
        if not (w and h):
            raise _Bad("the PAM header does not state its width and height")
        return Header("pnm", int(w.group(1)), int(h.group(1)))
    tokens = _PNM_TOKEN.split(data[2:1024], maxsplit=3)
    tokens = [t for t in tokens[:3] if t]
    if len(tokens) < 2 or not (tokens[0].isdigit() and tokens[1].isdigit()):
        raise _Bad("the Netpbm header does not state its width and height")
    if len(tokens[0]) > 9 or len(tokens[1]) > 9:
        raise _Bad("the Netpbm header states an implausible size")
    return Header("pnm", int(tokens[0]), int(tokens[1]))


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", _png),
    (b"\xff\xd8\xff", _jpeg),
    (b"BM", _bmp),
    (b"II*\x00", _tiff), (b"MM\x00*", _tiff), (b"II+\x00", _tiff), (b"MM\x00+", _tiff),
)
FORMATS = "PNG, JPEG, BMP, WebP, TIFF, PBM/PGM/PPM/PAM"


def read_header(data: bytes, name: str = "image") -> Header:
    """The :class:`Header` of an encoded image, or InputError (unknown format, damaged or
    implausible header)."""
    reader = next((r for magic, r in _MAGIC if data.startswith(magic)), None)
    if reader is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        reader = _webp
    if reader is None and len(data) > 2 and data[:1] == b"P" and data[1:2] in b"1234567" \
            and data[2:3].isspace():
        reader = _pnm
    if reader is None:
        raise InputError(f"{name}: not a readable image (not in a format kpface reads: "
                         f"{FORMATS})")
    try:
        header = reader(data)
    except _Bad as e:
        raise InputError(f"{name}: not a readable image ({e})") from None
    if header.width <= 0 or header.height <= 0:
        raise InputError(f"{name}: the {header.format.upper()} header declares an empty image "
                         f"({header.width}x{header.height} pixels)")
    return header
