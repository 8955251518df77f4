"""Five-point similarity alignment and recognizer inputs (numpy + OpenCV only)."""
import numpy as np
import pytest

from kpface.align import (crop_face, estimate_similarity, invert_affine, norm_crop,
                          recognizer_inputs, square_crop, template, transform_points)
from kpface.errors import InputError
from kpface.landmarks import ARCFACE_TEMPLATE_112

RECOGNIZER_MANIFEST = {"preprocess": {"size": [112, 112], "color": "RGB",
                                      "mean": [127.5] * 3, "std": [127.5] * 3}}


def similarity(scale, degrees, tx, ty):
    a = np.deg2rad(degrees)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([r, [[tx], [ty]]], axis=1)


def test_template_maps_to_itself():
    m = estimate_similarity(ARCFACE_TEMPLATE_112, ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-9)


@pytest.mark.parametrize("params", [(1.7, 20, 5, -3), (0.3, -135, 200, 17), (1.0, 180, 0, 0)])
def test_recovers_known_similarity(params):
    m_true = similarity(*params)
    src = np.random.default_rng(0).uniform(0, 300, (5, 2))
    dst = transform_points(src, m_true)
    np.testing.assert_allclose(estimate_similarity(src, dst), m_true, atol=1e-9)
    back = invert_affine(m_true)
    np.testing.assert_allclose(transform_points(dst, back), src, atol=1e-9)


def test_least_squares_matches_skimage():
    skt = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(1)
    for _ in range(5):
        src = rng.uniform(0, 160, (5, 2))
        dst = ARCFACE_TEMPLATE_112 + rng.normal(0, 3, (5, 2))
        if hasattr(skt.SimilarityTransform, "from_estimate"):
            ref = skt.SimilarityTransform.from_estimate(src, dst)
        else:
            ref = skt.SimilarityTransform()
            ref.estimate(src, dst)
        np.testing.assert_allclose(estimate_similarity(src, dst), ref.params[:2], atol=1e-9)


def test_no_reflection():
    src = ARCFACE_TEMPLATE_112.astype(float)
    mirrored = src * [-1, 1]  # a mirror image cannot be reached by a similarity
    m = estimate_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_bad_landmarks_raise_input_error():
    with pytest.raises(InputError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE_112)
    with pytest.raises(InputError, match="non-finite"):
        estimate_similarity(np.full((5, 2), np.nan), ARCFACE_TEMPLATE_112)


def test_norm_crop_puts_landmarks_on_the_template():
    m_true = similarity(2.5, 15, 80, 40)  # template (crop px) -> image px
    landmarks = transform_points(ARCFACE_TEMPLATE_112, m_true)
    image = np.zeros((400, 420, 3), np.uint8)
    for x, y in np.round(landmarks).astype(int):
        image[y - 2:y + 3, x - 2:x + 3] = 255
    crop, m = norm_crop(image, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(transform_points(landmarks, m), ARCFACE_TEMPLATE_112, atol=1e-4)
    for x, y in np.round(ARCFACE_TEMPLATE_112).astype(int):
        assert crop[y, x].min() > 100  # the dot landed at the template point
    assert crop[5, 5].max() == 0
    # Other crop sizes scale the template.
    crop2, m2 = norm_crop(image, landmarks, size=224)
    np.testing.assert_allclose(transform_points(landmarks, m2), template(224), atol=1e-4)


def test_square_crop_mappings():
    image = np.zeros((100, 200, 3), np.uint8)
    crop, m = square_crop(image, (50, 20, 90, 40), size=80)       # side 40 around (70, 30)
    assert crop.shape == (80, 80, 3)
    # The square [50, 90] x [10, 50] maps onto the crop's outer pixel edges [-0.5, 79.5].
    np.testing.assert_allclose(transform_points([[50, 10], [90, 50]], m),
                               [[-0.5, -0.5], [79.5, 79.5]], atol=1e-9)
    # align_corners: the centres of the square's first and last pixels -> 0 and size - 1.
    # Square [-0.5, 99.5] = pixels 0..99 of the image.
    _, m = square_crop(image, (-0.5, -0.5, 99.5, 99.5), size=160, align_corners=True)
    np.testing.assert_allclose(transform_points([[0, 0], [99, 99]], m),
                               [[0, 0], [159, 159]], atol=1e-9)


def test_crop_face_conventions():
    m_true = similarity(1.5, -10, 60, 50)
    landmarks = transform_points(ARCFACE_TEMPLATE_112, m_true)
    image = np.random.default_rng(2).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    crop, pts, m = crop_face(image, landmarks)
    np.testing.assert_allclose(pts, ARCFACE_TEMPLATE_112, atol=1e-4)
    crop, pts, m = crop_face(image, landmarks, convention="square", box=(50, 40, 230, 250))
    np.testing.assert_allclose(pts, transform_points(landmarks, m))
    assert np.linalg.det(m[:, :2]) > 0 and abs(m[0, 1]) < 1e-12  # no rotation
    with pytest.raises(InputError, match="convention"):
        crop_face(image, landmarks, convention="tilted")


def test_recognizer_inputs_reads_the_manifest():
    crop = np.zeros((112, 112, 3), np.uint8)
    crop[0, 0] = (255, 0, 51)  # B, G, R
    pts = ARCFACE_TEMPLATE_112.copy()
    image, kp = recognizer_inputs([crop, crop], [pts, pts], RECOGNIZER_MANIFEST)
    assert image.shape == (2, 3, 112, 112) and image.dtype == np.float32
    np.testing.assert_allclose(image[0, :, 0, 0], [-0.6, -1.0, 1.0], atol=1e-6)  # R, G, B
    np.testing.assert_allclose(kp[1], ARCFACE_TEMPLATE_112 / 112, atol=1e-6)
    bgr = dict(RECOGNIZER_MANIFEST["preprocess"], color="BGR", mean=[0, 0, 0], std=[255] * 3)
    image, _ = recognizer_inputs([crop], [pts], {"preprocess": bgr})
    np.testing.assert_allclose(image[0, :, 0, 0], [1.0, 0.0, 0.2], atol=1e-6)


def test_recognizer_inputs_resizes_other_crop_sizes():
    crop = np.full((224, 224, 3), 127, np.uint8)
    pts = template(224)
    image, kp = recognizer_inputs([crop], [pts], RECOGNIZER_MANIFEST)
    assert image.shape == (1, 3, 112, 112)
    np.testing.assert_allclose(kp[0] * 112, (pts + 0.5) / 2 - 0.5, atol=1e-5)


def test_recognizer_inputs_errors():
    crop = np.zeros((112, 112, 3), np.uint8)
    with pytest.raises(InputError, match="preprocess"):
        recognizer_inputs([crop], [ARCFACE_TEMPLATE_112], {})
    with pytest.raises(InputError, match="uint8"):
        recognizer_inputs([crop.astype(np.float32)], [ARCFACE_TEMPLATE_112], RECOGNIZER_MANIFEST)
    with pytest.raises(InputError, match="landmark sets"):
        recognizer_inputs([crop], [], RECOGNIZER_MANIFEST)
