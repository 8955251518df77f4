"""Issue 13, hostile and odd images: odd formats load upright and in the right colour
(checked against Pillow, an independent decoder), float images say their range, headers that
declare too many pixels are refused before decoding, and a fuzz of damaged files through the
Python loader and one `kpface run` call: no crash, no traceback, bounded memory, only kpface's
own errors, and every good image in the same call gets its result."""
import io
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from kpface import image as kimage
from kpface.errors import InputError
from kpface.image import DEFAULT_MAX_PIXELS, decode_image, load_image, to_bgr8
from kpface.imageheader import read_header
from kpface.samples import astronaut_bgr, camera_bgr, coffee_bgr


@pytest.fixture(scope="module")
def photo():
    return astronaut_bgr()[40:200, 150:310].copy()  # 160x160, the face


def pil_bytes(rgb_or_image, fmt, **kw):
    im = rgb_or_image if isinstance(rgb_or_image, Image.Image) else Image.fromarray(rgb_or_image)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def pillow_bgr(data):
    """Pillow's reading: upright (exif_transpose) and converted to RGB, as BGR."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return np.asarray(im.convert("RGB"))[..., ::-1]


# --- formats, colours, orientation ---------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_rotated_photos_load_upright(photo, fmt):
    rgb = np.ascontiguousarray(photo[:120, :, ::-1])  # 160 wide, 120 high: rotations show
    extra = {"quality": 100} if fmt in ("JPEG", "WEBP") else {}
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = pil_bytes(rgb, fmt, exif=exif.tobytes(), **extra)
        want = pillow_bgr(data)
        got = decode_image(data, name=f"{fmt}-{orientation}")
        assert got.shape == want.shape, (fmt, orientation)
        assert np.abs(got.astype(int) - want).max() <= 1, (fmt, orientation)
        if orientation in (6, 8):
            assert got.shape[:2] == (160, 120)  # turned


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"),
                                        ("P", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG"),
                                        ("RGB", "BMP"), ("CMYK", "TIFF"), ("RGB", "PPM")])
def test_modes_load_in_the_right_colour(photo, mode, fmt):
    im = Image.fromarray(np.ascontiguousarray(photo[..., ::-1])).convert(mode)
    data = pil_bytes(im, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    got = decode_image(data)
    want = pillow_bgr(data)
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 2, (mode, fmt)


def test_16bit_color_and_gray(photo, tmp_path):
    deep = photo.astype(np.uint16) * 257
    assert cv2.imwrite(str(tmp_path / "c16.png"), deep)
    np.testing.assert_array_equal(load_image(tmp_path / "c16.png"), photo)
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    deep_gray = gray.astype(np.uint16) * 200 + 7    # not a multiple of 257: rounding shows
    assert cv2.imwrite(str(tmp_path / "g16.tif"), deep_gray)
    got = load_image(tmp_path / "g16.tif")
    want = np.round(deep_gray.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(got[..., 1], want)


def test_float_images_say_their_range(photo):
    unit = photo.astype(np.float32) / 255.0
    np.testing.assert_array_equal(to_bgr8(unit), photo)
    byte = photo.astype(np.float32)
    with pytest.raises(InputError, match="pass value_range=255"):
        to_bgr8(byte)  # not saturated to white
    np.testing.assert_array_equal(to_bgr8(byte, value_range=255), photo)
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        to_bgr8(unit * 2 - 1)  # [-1, 1]: neither range
    with pytest.raises(InputError, match="value_range must be 1"):
        to_bgr8(unit, value_range=100)


def test_a_float_image_reaching_the_pipeline_is_refused(photo):
    from kpface.pipeline import FacePipeline
    pipe = FacePipeline.__new__(FacePipeline)
    with pytest.raises(InputError, match="value_range=255"):
        pipe(photo.astype(np.float32))


# --- decompression bombs ------------------------------------------------------------------------

def _chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(w, h):
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + _chunk(b"IEND", b""))


def jpeg_declaring(w, h, photo):
    data = bytearray(cv2.imencode(".jpg", photo)[1].tobytes())
    at = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, h, w)
    return bytes(data)


def bmp_declaring(w, h):
    return (b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 64, 0, 0, 0, 0) + b"\x00" * 64)


def tiff_declaring(w, h):
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 10 * 12 + 4), (277, 3, 1, 1), (278, 4, 1, h),
               (279, 4, 1, 64), (284, 3, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", *e) if e[1] == 4 else struct.pack("<HHIHH", *e, 0)
        for e in entries) + b"\x00\x00\x00\x00"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 64


def webp_declaring(w, h):
    vp8x = b"\x00\x00\x00\x00" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def pnm_declaring(w, h):
    return f"P6\n# a comment\n{w} {h}\n255\n".encode() + b"\x00" * 64


def bombs(photo):
    return {"png": png_declaring(60000, 60000), "jpeg": jpeg_declaring(60000, 60000, photo),
            "bmp": bmp_declaring(60000, 60000), "tiff": tiff_declaring(60000, 60000),
            "webp": webp_declaring(16384, 16384), "pnm": pnm_declaring(60000, 60000),
            # Under OpenCV's own limit (2^30 pixels), which would have decoded it: 2.7 GB.
            "png-900MP": png_declaring(30000, 30000)}


def test_bombs_are_refused_before_anything_is_decoded(photo, monkeypatch):
    def never(*a, **k):
        raise AssertionError("cv2.imdecode was called on a decompression bomb")
    monkeypatch.setattr(kimage.cv2, "imdecode", never)
    for name, data in bombs(photo).items():
        header = read_header(data, name)
        assert header.pixels > DEFAULT_MAX_PIXELS, name
        with pytest.raises(InputError, match="over the limit of 89,478,485; not decoded"):
            decode_image(data, name=name)
    print("\nrefusal (bomb): "
          + str(pytest.raises(InputError, decode_image, bombs(photo)["png"], "b.png").value))


def test_the_pixel_limit_is_an_argument_and_an_environment_variable(photo, monkeypatch):
    data = cv2.imencode(".png", photo)[1].tobytes()  # 160 x 160 = 25,600 pixels
    assert decode_image(data).shape == photo.shape
    with pytest.raises(InputError, match="over the limit"):
        decode_image(data, max_pixels=25_599)
    monkeypatch.setenv("KPFACE_MAX_PIXELS", "25599")
    with pytest.raises(InputError, match="over the limit"):
        decode_image(data)
    assert decode_image(data, max_pixels=25_600).shape == photo.shape  # the argument wins
    monkeypatch.setenv("KPFACE_MAX_PIXELS", "lots")
    with pytest.raises(InputError, match="KPFACE_MAX_PIXELS"):
        decode_image(data)


def test_decoder_exceptions_become_input_errors(photo, monkeypatch):
    def boom(*a, **k):
        raise cv2.error("OpenCV(5.0.0) loadsave.cpp: error: (-215) pixels <= CV_IO_MAX_IMAGE_PIXELS")
    monkeypatch.setattr(kimage.cv2, "imdecode", boom)
    with pytest.raises(InputError, match="the decoder failed"):
        decode_image(cv2.imencode(".png", photo)[1].tobytes(), name="x.png")


def test_unknown_formats_are_refused():
    with pytest.raises(InputError, match="not in a format kpface reads"):
        decode_image(b"GIF89a" + b"\x00" * 100)
    with pytest.raises(InputError, match="not in a format kpface reads"):
        decode_image(b"hello world, not an image")


# --- the fuzz -------------------------------------------------------------------------------------

def good_files(photo):
    """(suffix, bytes) of one small valid file per format."""
    rgb = np.ascontiguousarray(photo[::2, ::2, ::-1])
    return [(".png", cv2.imencode(".png", photo[::2, ::2])[1].tobytes()),
            (".jpg", cv2.imencode(".jpg", photo[::2, ::2])[1].tobytes()),
            (".bmp", cv2.imencode(".bmp", photo[::4, ::4])[1].tobytes()),
            (".tif", pil_bytes(rgb, "TIFF")),
            (".webp", pil_bytes(rgb, "WEBP", quality=80)),
            (".ppm", cv2.imencode(".ppm", photo[::4, ::4])[1].tobytes()),
            (".pgm", cv2.imencode(".pgm", cv2.cvtColor(photo[::4, ::4], cv2.COLOR_BGR2GRAY))[1]
             .tobytes())]


def damaged_files(photo, seed=13):
    """At least 300 damaged files: byte flips (anywhere and in the header), truncations,
    garbage headers, random bytes, empty files and headers declaring huge images."""
    rng = random.Random(seed)
    out = []
    for suffix, data in good_files(photo):
        for i in range(12):  # flips anywhere
            b = bytearray(data)
            for _ in range(rng.randint(1, 24)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            out.append((f"flip{i}{suffix}", bytes(b)))
        for i in range(10):  # flips in the first 64 bytes (the header)
            b = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(min(64, len(b)))] = rng.randrange(256)
            out.append((f"hflip{i}{suffix}", bytes(b)))
        for i in range(8):  # truncation
            out.append((f"cut{i}{suffix}", data[:rng.randrange(1, len(data))]))
        for i in range(5):  # garbage header, body kept
            k = rng.randint(2, 40)
            out.append((f"garbage{i}{suffix}", bytes(rng.randrange(256) for _ in range(k))
                        + data[k:]))
    for i in range(30):
        out.append((f"random{i}.jpg", bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000)))))
    for i in range(6):
        out.append((f"empty{i}" + [".png", ".jpg", ".bmp", ".tif", ".webp", ".ppm"][i], b""))
    for name, data in bombs(photo).items():
        out.append((f"bomb-{name}.img", data))
        for i in range(3):  # bombs with damage after the header
            b = bytearray(data)
            b[rng.randrange(min(24, len(b) - 1), len(b))] ^= 0xFF
            out.append((f"bomb-{name}-{i}.img", bytes(b)))
    out.append(("tiny-header-only.png", png_declaring(1, 1)[:33]))
    return out


def test_the_python_loader_raises_only_kpface_errors(photo):
    files = damaged_files(photo)
    assert len(files) >= 300
    refused = decoded = 0
    for name, data in files:
        try:
            img = decode_image(data, name=name)
        except InputError as e:
            assert "\n" not in str(e), (name, str(e))
            refused += 1
        else:  # a damaged file may still decode (a flipped pixel byte): then it is an image
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            decoded += 1
    print(f"\nPython loader: {len(files)} damaged files, {refused} refused with InputError, "
          f"{decoded} decoded to images, 0 other exceptions")


MEASURED_CLI = """
import sys
from kpface.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
print("VmHWM_kB", hwm, file=sys.stderr, flush=True)
sys.exit(code)
"""


def test_kpface_run_survives_the_fuzz_and_still_answers_the_good_images(
        models_dir, photo, tmp_path):
    import matplotlib.cbook as cbook
    folder = tmp_path / "fuzz"
    folder.mkdir()
    paths = []
    for i, (name, data) in enumerate(damaged_files(photo)):
        p = folder / f"{i:03d}-{name}"
        p.write_bytes(data)
        paths.append(p)
    good = []
    for name, img in (("astronaut.png", astronaut_bgr()[::2, ::2]),
                      ("camera.jpg", camera_bgr()[::2, ::2]), ("coffee.png", coffee_bgr()[::2, ::2])):
        p = tmp_path / name
        cv2.imwrite(str(p), img)
        good.append(p)
    hopper = tmp_path / "grace_hopper.jpg"
    hopper.write_bytes(Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes())
    good.append(hopper)
    args = paths[:100] + good[:2] + paths[100:250] + good[2:] + paths[250:]
    out_json = tmp_path / "faces.json"
    # `python -m kpface run ...` (the same main()), reporting its own peak RSS at the end:
    # VmHWM of the new process image (getrusage's maxrss would count the forking parent).
    child = subprocess.run([sys.executable, "-c", MEASURED_CLI, "run", *map(str, args),
                            "--models", str(models_dir), "--threads", "1",
                            "--json", str(out_json)], capture_output=True, text=True,
                           env=dict(os.environ, KPFACE_MAX_PIXELS=""), timeout=600)
    err = child.stderr
    peak_mb = int(err.rsplit("VmHWM_kB ", 1)[1].split()[0]) / 1024
    err = err.rsplit("VmHWM_kB ", 1)[0]
    assert child.returncode == 2, err[-2000:]        # "N of M image(s) could not be read"
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    results = json.loads(out_json.read_text())["images"]
    for p in good:                                   # every good image has its result
        assert str(p) in results, p
    faces = {Path(k).name: len(v) for k, v in results.items() if Path(k) in set(good)}
    assert faces["astronaut.png"] == 1 and faces["grace_hopper.jpg"] == 1
    assert faces["coffee.png"] == 0
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) + len(results) == len(args)   # each file answered, once
    summary = [ln for ln in err.splitlines() if ln.startswith("kpface: error: ")]
    assert summary == [f"kpface: error: {len(errors)} of {len(args)} image(s) could not be "
                       f"read; results for the other {len(results)}"]
    # A decoded 60000 x 60000 bomb would be 10.8 GB, a 30000 x 30000 one 2.7 GB.
    assert peak_mb < 1000, peak_mb
    print(f"\nkpface run: {len(paths)} damaged + {len(good)} good files in one call, "
          f"{len(errors)} refused with one line each, {len(results)} answered "
          f"(faces: {faces}), peak RSS {peak_mb:.0f} MB")
