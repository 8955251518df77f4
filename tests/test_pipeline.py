"""FacePipeline on the tiny recognizer with a stand-in detector, checked against an
independent preparation (scikit-image's similarity estimate + a hand-written normalisation)."""
import threading
from dataclasses import dataclass

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from skimage.transform import SimilarityTransform

from kpface.errors import InputError, ModelError
from kpface.landmarks import ARCFACE_TEMPLATE_112
from kpface.manifest import load_manifest
from kpface.models import Recognizer
from kpface.pipeline import FacePipeline, compare
from kpface.runtimes import open_session
from kpface.samples import ASTRONAUT_BOX, ASTRONAUT_LANDMARKS, astronaut_bgr


@dataclass
class Det:
    box: np.ndarray
    score: float
    landmarks: np.ndarray


class FixedDetector:
    """Returns the astronaut face for every image, plus shifted copies when n > 1."""

    def __init__(self, n=1):
        self.n = n

    def detect(self, image):
        return [Det(ASTRONAUT_BOX + 3 * i, 0.99 - 0.1 * i,
                    ASTRONAUT_LANDMARKS + 3 * i) for i in range(self.n)]


@pytest.fixture(scope="module")
def astronaut():
    return astronaut_bgr()


@pytest.fixture(scope="module")
def pipe(tiny_recognizer):
    m = load_manifest(tiny_recognizer)
    return FacePipeline(FixedDetector(n=2), open_session(tiny_recognizer, threads=1), m)


def reference_embedding(model_dir, image, landmarks):
    """Independent: skimage's Umeyama + cv2.warpAffine + hand normalisation + raw ORT."""
    t = SimilarityTransform.from_estimate(landmarks.astype(np.float64),
                                          ARCFACE_TEMPLATE_112.astype(np.float64))
    assert t
    m = t.params[:2]
    crop = cv2.warpAffine(image, m, (112, 112), flags=cv2.INTER_LINEAR, borderValue=0)
    pts = landmarks @ m[:, :2].T + m[:, 2]
    x = (crop[:, :, ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    emb = sess.run(None, {"image": x.transpose(2, 0, 1)[None].astype(np.float32),
                          "keypoints": (pts / 112.0)[None].astype(np.float32)})[0][0]
    return emb / np.linalg.norm(emb)


def test_faces_match_independent_preparation(pipe, astronaut, tiny_recognizer):
    faces = pipe(astronaut, return_crops=True)
    assert len(faces) == 2
    f = faces[0]
    assert f.crop.shape == (112, 112, 3)
    assert np.linalg.norm(f.embedding) == pytest.approx(1.0, abs=1e-5)
    want = reference_embedding(tiny_recognizer, astronaut, ASTRONAUT_LANDMARKS)
    assert float(f.embedding @ want) > 0.9999
    d = f.to_dict()
    assert set(d) == {"box", "score", "landmarks", "embedding"} and len(d["embedding"]) == 512


def test_all_faces_go_through_one_recognizer_call(tiny_recognizer, astronaut):
    calls = []
    sess = open_session(tiny_recognizer, threads=1)

    class Spy:
        input_names, output_names, provider = sess.input_names, sess.output_names, sess.provider

        def run(self, feeds):
            calls.append(feeds["image"].shape[0])
            return sess.run(feeds)
    p = FacePipeline(FixedDetector(n=3), Spy(), load_manifest(tiny_recognizer))
    assert len(p(astronaut)) == 3 and calls == [3]


def test_threads_give_identical_results(pipe, astronaut):
    expected = [f.embedding for f in pipe(astronaut)]
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append([f.embedding for f in pipe(astronaut)])
        except Exception as e:  # surfaced below
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(results) == 12
    for r in results:
        for a, b in zip(r, expected):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_no_faces_is_an_empty_list(tiny_recognizer):
    class Nobody:
        def detect(self, image):
            return []
    p = FacePipeline(Nobody(), open_session(tiny_recognizer, threads=1), load_manifest(tiny_recognizer))
    assert p(np.zeros((50, 60, 3), np.uint8)) == []


def test_bad_image_is_an_input_error(pipe):
    with pytest.raises(InputError):
        pipe(np.zeros((0, 0, 3), np.uint8))


def test_compare_threshold_and_symmetry():
    rng = np.random.default_rng(0)
    a = rng.normal(size=512).astype(np.float32)
    c = compare(a, a * 3, 0.3)
    assert c.cosine == pytest.approx(1.0) and c.same
    d = compare(a, -a, 0.3)
    assert d.cosine == pytest.approx(-1.0) and not d.same
    b = rng.normal(size=512)
    assert compare(a, b, 0.3).cosine == pytest.approx(compare(b, a, 0.3).cosine)
    with pytest.raises(InputError, match="different sizes"):
        compare(a, a[:10], 0.3)
    assert compare(a, a * 3, 0.99).same and not compare(a, b, 0.9).same
    with pytest.raises(TypeError):
        compare(a, b)  # no threshold of its own: it comes from the recognizer's manifest


def test_threshold_comes_from_the_manifest_only(tiny_recognizer):
    m = load_manifest(tiny_recognizer)
    sess = open_session(tiny_recognizer, threads=1)
    p = FacePipeline(FixedDetector(), sess, dict(m, threshold=0.42))
    assert p.threshold == 0.42 and p.recognizer.threshold == 0.42
    assert p.compare(np.ones(4), np.ones(4)).threshold == 0.42
    no_threshold = {k: v for k, v in m.items() if k != "threshold"}
    with pytest.raises(ModelError, match="no 'threshold'"):
        FacePipeline(FixedDetector(), sess, no_threshold)
    with pytest.raises(ModelError, match="not a cosine"):
        Recognizer(tiny_recognizer, manifest=dict(m, threshold="high"), session=sess)


def test_keypoint_model_runs_once_per_image_on_all_faces(tiny_recognizer, astronaut):
    calls = []

    class Keypoints:
        def predict_many(self, image, detections):
            calls.append(len(detections))
            return np.stack([d.landmarks + 1.0 for d in detections])
    p = FacePipeline(FixedDetector(n=3), open_session(tiny_recognizer, threads=1),
                     load_manifest(tiny_recognizer), keypoints=Keypoints())
    faces = p(astronaut)
    assert calls == [3] and len(faces) == 3
    np.testing.assert_allclose(faces[2].landmarks, ASTRONAUT_LANDMARKS + 3 * 2 + 1.0, atol=1e-5)


def test_recognizer_reads_its_manifest(tiny_recognizer, astronaut):
    rec = Recognizer(tiny_recognizer, threads=1)
    assert (rec.size, rec.embedding_size, rec.arch) == ((112, 112), 512, "vit_kprpe_tiny")
    assert rec.uses_keypoints and rec.normalize and not rec.mirror_sum
    assert rec.threshold == load_manifest(tiny_recognizer)["threshold"]
    assert rec.random_weights and rec.weights["source"] == "random" and rec.weights["seed"] == 0
    assert "RANDOM" in rec.verdict_problem
    assert rec.crop_methods == ("aligned", "square") and rec.dense_output is None
    crop, pts, _ = rec.crop(astronaut, ASTRONAUT_LANDMARKS)
    feeds, _ = rec.inputs([crop], [pts])
    assert sorted(feeds) == ["image", "keypoints"]
    np.testing.assert_allclose(feeds["keypoints"][0], pts / 112, atol=1e-6)
    want = reference_embedding(tiny_recognizer, astronaut, ASTRONAUT_LANDMARKS)
    assert float(rec.embed([crop], [pts])[0] @ want) > 0.9999
    assert rec.embed([], []).shape == (0, 512)
    # A manifest that contradicts the graph is refused.
    m = load_manifest(tiny_recognizer)
    with pytest.raises(ModelError, match="keypoints.used = False"):
        Recognizer(tiny_recognizer, manifest=dict(m, keypoints=dict(m["keypoints"], used=False)))
    with pytest.raises(InputError, match="convention"):
        rec.crop(astronaut, ASTRONAUT_LANDMARKS, convention="tilted")
