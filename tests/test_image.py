"""Bad or unusual images: converted when meaningful, refused with one clear line otherwise."""
import cv2
import numpy as np
import pytest

from kpface.errors import InputError
from kpface.image import list_images, load_image, to_bgr8


@pytest.fixture
def photo():
    from kpface.samples import astronaut_bgr
    return astronaut_bgr()[:128, :160].copy()


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "nope.jpg")


def test_empty_file(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(tmp_path / "e.png")


def test_corrupt_file(tmp_path):
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(InputError, match="not a readable image"):
        load_image(tmp_path / "c.png")


def test_truncated_jpeg(tmp_path, photo):
    ok, buf = cv2.imencode(".jpg", photo)
    (tmp_path / "t.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(InputError, match="truncated"):
        load_image(tmp_path / "t.jpg")
    (tmp_path / "full.jpg").write_bytes(buf.tobytes())
    assert load_image(tmp_path / "full.jpg").shape == photo.shape


def test_truncated_png(tmp_path, photo):
    ok, buf = cv2.imencode(".png", photo)
    (tmp_path / "t.png").write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(InputError):
        load_image(tmp_path / "t.png")


def test_grayscale_rgba_and_16bit_are_converted(tmp_path, photo):
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    g = load_image(tmp_path / "g.png")
    assert g.shape == photo.shape and (g[..., 0] == gray).all()

    bgra = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), photo)

    deep = photo.astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    np.testing.assert_array_equal(load_image(tmp_path / "d.png"), photo)


def test_transparent_pixels_become_black(photo):
    bgra = np.dstack([photo, np.zeros(photo.shape[:2], np.uint8)])
    assert to_bgr8(bgra).max() == 0


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((10, 10, 2), np.uint8), "unsupported shape"),
    (np.zeros((10, 10, 3), np.int32), "unsupported pixel type"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
    ("not an array", "numpy array"),
])
def test_bad_arrays(bad, match):
    with pytest.raises(InputError, match=match):
        to_bgr8(bad)


def test_list_images(tmp_path, photo):
    with pytest.raises(InputError, match="holds no images"):
        list_images(tmp_path)
    cv2.imwrite(str(tmp_path / "x.png"), photo)
    assert [p.name for p in list_images(tmp_path)] == ["x.png"]
