"""kpface.facechip: dlib's face chip in numpy, checked against slow per-pixel versions of dlib's
code, a known transform, dlib's own chips (fixture) and the recognizer's answers on them."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from kpface import facechip as fc
from kpface import samples
from kpface.align import transform_points
from kpface.errors import InputError

from dlib_support import descriptors_torch, fixture, sources


# --- the template --------------------------------------------------------------------------

def test_kpface_points_sit_where_they_belong_in_dlibs_frame():
    ours, d5 = fc.kpface_template_unit(), fc.DLIB5_UNIT
    left_eye, right_eye, nose, left_mouth, right_mouth = ours
    # Eye centres between the eye corners of dlib's template, at their height (+-0.02).
    assert d5[2, 0] < left_eye[0] < d5[3, 0] and d5[1, 0] < right_eye[0] < d5[0, 0]
    assert abs(left_eye[1] - d5[2:4, 1].mean()) < 0.02
    assert abs(right_eye[1] - d5[0:2, 1].mean()) < 0.02
    # Nose tip above the nose base, on the face's axis; mouth corners below, symmetric.
    assert nose[1] < d5[4, 1] and abs(nose[0] - d5[4, 0]) < 0.005
    assert left_mouth[1] > d5[4, 1] + 0.1 and abs(left_mouth[1] - right_mouth[1]) < 1e-3
    axis = d5[4, 0]
    assert abs((axis - left_eye[0]) - (right_eye[0] - axis)) < 0.005
    # In chip pixels: (padding + p) / (2 padding + 1) * size.
    np.testing.assert_allclose(fc.chip_template(150, 0.25), (0.25 + ours) / 1.5 * 150)
    np.testing.assert_allclose(fc.chip_template(200, 0.0, "dlib5"), d5 * 200)


def _similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty]])


@pytest.mark.parametrize("scale,angle", [(0.8, 0.0), (1.7, 0.3), (3.1, -0.5)])
def test_known_similarity_is_recovered(scale, angle):
    """Landmarks = the chip template moved by a known similarity: the chip details give that
    similarity back, and the image -> chip map sends the landmarks onto the template."""
    chip_to_img = _similarity(scale, angle, 310.0, 240.0)
    tpl = fc.chip_template()
    pts = transform_points(tpl, chip_to_img)
    d = fc.chip_details(pts)
    assert d.angle == pytest.approx(angle, abs=1e-9)
    centre = transform_points(np.array([[75.0, 75.0]]), chip_to_img)[0]
    np.testing.assert_allclose([(d.rect[0] + d.rect[2]) / 2, (d.rect[1] + d.rect[3]) / 2], centre)
    assert d.rect[2] - d.rect[0] == pytest.approx(150 * scale - 1)
    _, m = fc.extract_chip(np.zeros((600, 700, 3), np.uint8), d)
    # dlib maps chip pixel centres 0..149 onto the rectangle's edges (centred on the template's
    # (75, 75)): a template point q lands at 74.5 + 149 s / (150 s - 1) * (q - 75).
    expect = 74.5 + 149 * scale / (150 * scale - 1) * (tpl - 75.0)
    np.testing.assert_allclose(transform_points(pts, m), expect, atol=1e-6)


def test_chip_of_a_warped_image_is_the_original():
    """Warp a picture away with a known similarity (OpenCV), cut the chip back out: same
    picture, up to the two interpolations."""
    rng = np.random.default_rng(0)
    face = cv2.GaussianBlur(rng.integers(0, 256, (150, 150, 3), dtype=np.uint8), (0, 0), 3)
    chip_to_img = _similarity(1.3, 0.2, 260.0, 200.0)
    # Place the chip so that dlib's chip->image map (pixel centres onto the rectangle's edges)
    # is exactly chip_to_img: build the landmarks from it, then warp with dlib's actual map.
    pts = transform_points(fc.chip_template(), chip_to_img)
    d = fc.chip_details(pts)
    _, img_to_chip = fc.extract_chip(np.zeros((500, 560, 3), np.uint8), d)
    image = cv2.warpAffine(face, cv2.invertAffineTransform(img_to_chip), (560, 500),
                           flags=cv2.INTER_LINEAR)
    back, _ = fc.face_chip(image, pts)
    inner = (slice(5, -5), slice(5, -5))
    diff = np.abs(back[inner].astype(int) - face[inner].astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 12


def test_bad_landmarks_are_refused():
    with pytest.raises(InputError, match="five"):
        fc.chip_details(np.zeros((4, 2)))
    with pytest.raises(InputError, match="landmark set"):
        fc.chip_template(points="dlib68")
    with pytest.raises(InputError, match="uint8"):
        fc.face_chip(np.zeros((100, 100, 3), np.float32), samples.ASTRONAUT_LANDMARKS)


# --- the pieces of dlib's extraction, against slow versions written from dlib's loops ------

def _pyramid_down_slow(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    k = [1, 4, 6, 4, 1]
    out = np.zeros(((h - 3) // 2, (w - 3) // 2, img.shape[2]), np.uint8)
    for dr in range(out.shape[0]):
        for c in range(out.shape[1]):
            acc = np.zeros(img.shape[2], np.int64)
            for i in range(5):
                for j in range(5):
                    acc += k[i] * k[j] * img[2 * dr + i, 2 * c + j].astype(np.int64)
            out[dr, c] = acc // 256
    return out


def test_pyramid_down_matches_dlibs_loops():
    img = np.random.default_rng(1).integers(0, 256, (23, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fc.pyramid_down(img), _pyramid_down_slow(img))
    assert fc.pyramid_down(img[:8]).size == 0  # dlib returns an empty image at <= 8 rows


def test_bilinear_matches_dlibs_interpolation():
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    a = np.array([[0.9, -0.3, 8.2], [0.35, 0.85, -3.7]])
    got = fc._bilinear_truncate(src, a, 30, 30)
    for r in range(30):
        for c in range(30):
            # point_transform_affine: m * p + b, in that order
            x = (a[0, 0] * c + a[0, 1] * r) + a[0, 2]
            y = (a[1, 0] * c + a[1, 1] * r) + a[1, 2]
            left, top = math.floor(x), math.floor(y)
            if not (left >= 0 and top >= 0 and left + 1 < 50 and top + 1 < 40):
                assert (got[r, c] == 0).all()
                continue
            fx, fy = x - left, y - top
            p = src.astype(np.float64)
            v = ((1 - fy) * ((1 - fx) * p[top, left] + fx * p[top, left + 1])
                 + fy * ((1 - fx) * p[top + 1, left] + fx * p[top + 1, left + 1]))
            np.testing.assert_array_equal(got[r, c], v.astype(np.uint8))


# --- against dlib's own chips ----------------------------------------------------------------

def test_dlib_landmarks_give_dlibs_chip():
    """From dlib's five landmarks, kpface cuts dlib's chip: the same pixels (a level of
    rounding at most; measured: every pixel equal), through the direct path and the
    image-pyramid path (4x photo)."""
    data = fixture()
    photos = sources()
    checked = []
    for name, chip, pts in zip(data["names"], data["chips_rgb"], data["landmarks"]):
        if str(name) not in photos:
            continue
        ours, _ = fc.face_chip(photos[str(name)], pts.astype(np.float64), points="dlib5")
        diff = np.abs(ours.astype(int) - chip.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999, (name, diff.max(), (diff == 0).mean())
        checked.append(str(name))
    assert {"astronaut", "astronaut_x4", "hopper"} <= set(checked), checked


PHOTOS = ("astronaut", "astronaut_mirror", "hopper", "hopper_mirror")


@pytest.fixture(scope="module")
def detector_points(models_dir):
    """MTCNN's five points (real packaged weights) on the fixture's photos."""
    from kpface.detect import MTCNNDetector
    det = MTCNNDetector(models_dir / "detector")
    photos = sources()
    return {n: det.detect(np.ascontiguousarray(photos[n][:, :, ::-1]))[0].landmarks
            for n in PHOTOS}


def _chip_to_chip(ours_m: np.ndarray, dlib_m: np.ndarray) -> tuple[float, float, np.ndarray]:
    """dlib's chip -> kpface's chip: (scale, angle in degrees, shift of the chip centre)."""
    a = np.vstack([ours_m, [0, 0, 1]]) @ np.linalg.inv(np.vstack([dlib_m, [0, 0, 1]]))
    centre = transform_points(np.array([[74.5, 74.5]]), a[:2])[0] - 74.5
    return math.hypot(a[0, 0], a[1, 0]), math.degrees(math.atan2(a[1, 0], a[0, 0])), centre


@pytest.mark.parametrize("name", PHOTOS + ("astronaut_by_hand",))
def test_kpface_chip_is_dlibs_chip_from_other_points(name, detector_points):
    """kpface's chip from kpface's five points (MTCNN's, or the hand-measured astronaut ones)
    is dlib's chip from dlib's five up to small differences of placement (measured: scale
    0.98-1.08, angle <= 4.1 degrees, centre <= 4.7 px of 150), and the network's descriptor of
    it is close to dlib's descriptor of dlib's chip (measured 0.14-0.19; same person < 0.6)."""
    data = fixture()
    photo = name.replace("_by_hand", "")
    i = [str(n) for n in data["names"]].index(photo)
    pts = samples.ASTRONAUT_LANDMARKS if name.endswith("_by_hand") else detector_points[photo]
    ours, m = fc.face_chip(sources()[photo], pts)
    _, dlib_m = fc.face_chip(sources()[photo], data["landmarks"][i].astype(float), points="dlib5")
    scale, angle, shift = _chip_to_chip(m, dlib_m)
    assert 0.93 < scale < 1.12 and abs(angle) < 6 and np.hypot(*shift) < 7, (scale, angle, shift)
    dist = np.linalg.norm(descriptors_torch(ours[None])[0] - data["descriptors"][i])
    assert dist < 0.25, dist


def test_same_and_different_people_on_kpface_chips(detector_points):
    """Real pairs through kpface alone (MTCNN points -> kpface chip -> torch model): the same
    person (a photo and its mirror image) below dlib's 0.6, different people above it, by
    cosine at the manifest's threshold too, and within 0.1 of dlib's own distances."""
    from kpface.export.dlib_resnet import COSINE_THRESHOLD
    data = fixture()
    names = [str(n) for n in data["names"]]
    photos = sources()
    chips = np.stack([fc.face_chip(photos[n], detector_points[n])[0] for n in PHOTOS])
    emb = descriptors_torch(chips)
    for a in range(len(PHOTOS)):
        for b in range(a + 1, len(PHOTOS)):
            same = PHOTOS[a].split("_")[0] == PHOTOS[b].split("_")[0]
            dist = np.linalg.norm(emb[a] - emb[b])
            cos = emb[a] @ emb[b] / np.linalg.norm(emb[a]) / np.linalg.norm(emb[b])
            dlib_dist = np.linalg.norm(data["descriptors"][names.index(PHOTOS[a])]
                                       - data["descriptors"][names.index(PHOTOS[b])])
            assert (dist < 0.6) == same and (cos >= COSINE_THRESHOLD) == same, (a, b, dist, cos)
            assert abs(dist - dlib_dist) < 0.1, (PHOTOS[a], PHOTOS[b], dist, dlib_dist)
