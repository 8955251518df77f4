"""The keypoint path end to end (issue 14): on a real photo, MTCNN's landmarks -> alignment ->
keypoints in crop units -> KP-RPE recognizer, checked against an independent computation.

One landmark is moved by a few pixels. The test computes, on its own, what the pipeline should
then produce: scikit-image's similarity fit onto the ArcFace template, cv2.warpAffine, a
hand-written normalisation, the landmarks mapped into the crop and divided by its size, and the
torch model of the export (random weights are seeded, so ``build_model(arch, seed=0)`` is the
exported network). An x/y swap, image instead of crop pixels, or stale keypoints anywhere in
detect -> align -> keypoints -> recognizer moves the pipeline away from that computation; the
last test shows those mistakes are large against the tolerance used here.
"""
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from skimage.transform import SimilarityTransform

from kpface.landmarks import ARCFACE_TEMPLATE_112
from kpface.pipeline import FacePipeline
from kpface.samples import astronaut_bgr

NOSE, SHIFT_PX = 2, (3.0, 0.0)  # move the nose tip 3 pixels right
# Distance between unit embeddings counted as agreement; measured: pipeline vs this test's
# computation 1.1e-6; the keypoints' share of the 3-pixel move 1.1e-2, an x/y swap 0.35.
TOL = 1e-4


class MovedLandmark:
    """The real detector, with one landmark of every face moved by ``shift`` pixels."""

    def __init__(self, detector, index, shift):
        self.detector, self.index, self.shift = detector, index, np.asarray(shift, np.float32)
        self.manifest = detector.manifest

    def detect(self, image):
        out = []
        for d in self.detector.detect(image):
            pts = np.array(d.landmarks, np.float32).reshape(5, 2).copy()
            pts[self.index] += self.shift
            out.append(replace(d, landmarks=pts))
        return out


def reference_inputs(image, landmarks):
    """Independent preparation: (image tensor [1, 3, 112, 112] in [-1, 1] RGB, keypoints
    [1, 5, 2] (x, y) in [0, 1] of the crop)."""
    t = SimilarityTransform.from_estimate(np.asarray(landmarks, np.float64),
                                          ARCFACE_TEMPLATE_112.astype(np.float64))
    assert t
    m = t.params[:2]
    crop = cv2.warpAffine(image, m, (112, 112), flags=cv2.INTER_LINEAR, borderValue=0)
    pts = np.asarray(landmarks, np.float64) @ m[:, :2].T + m[:, 2]  # crop pixels, x right
    x = (crop[:, :, ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5
    return (torch.from_numpy(x.transpose(2, 0, 1).copy())[None],
            torch.from_numpy((pts / 112.0).astype(np.float32))[None])


def unit(v):
    v = np.asarray(v, np.float64).ravel()
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def setup(models_dir):
    from kpface.export.onnx_export import build_model
    pipe = FacePipeline.from_dir(models_dir, threads=1)
    assert pipe.weights["recognizer"]["seed"] == 0  # the export this module rebuilds
    _, model, _ = build_model(pipe.recognizer.arch, seed=0)
    image = astronaut_bgr()
    moved = FacePipeline(MovedLandmark(pipe.detector, NOSE, SHIFT_PX), pipe.recognizer)
    face0, face1 = pipe(image)[0], moved(image)[0]
    np.testing.assert_allclose(face1.landmarks[NOSE] - face0.landmarks[NOSE], SHIFT_PX, atol=1e-4)

    def torch_embedding(img, kp):
        with torch.no_grad():
            return unit(model(img, kp)[0].numpy())
    in0 = reference_inputs(image, face0.landmarks)
    in1 = reference_inputs(image, face1.landmarks)
    return {"pipe": (unit(face0.embedding), unit(face1.embedding)), "torch": torch_embedding,
            "in0": in0, "in1": in1, "ref": (torch_embedding(*in0), torch_embedding(*in1))}


def test_pipeline_matches_the_independent_computation(setup):
    (e0, e1), (t0, t1) = setup["pipe"], setup["ref"]
    assert np.linalg.norm(e0 - t0) < TOL and np.linalg.norm(e1 - t1) < TOL


def test_moving_one_landmark_changes_the_embedding_as_computed(setup):
    (e0, e1), (t0, t1) = setup["pipe"], setup["ref"]
    d_pipe, d_ref = e1 - e0, t1 - t0
    assert np.linalg.norm(d_ref) > 100 * TOL  # 3 pixels move the embedding measurably
    assert np.linalg.norm(d_pipe - d_ref) < 0.01 * np.linalg.norm(d_ref)


def test_the_keypoints_carry_part_of_that_change(setup):
    """With the moved crop but the old keypoints the embedding is far (against TOL) from what
    the pipeline gives: a pipeline that fed stale keypoints would fail the tests above."""
    (_, e1), (t0, t1), emb = setup["pipe"], setup["ref"], setup["torch"]
    (img1, _), (_, kp0) = setup["in1"], setup["in0"]
    stale = emb(img1, kp0)
    assert np.linalg.norm(t1 - stale) > 0.05 * np.linalg.norm(t1 - t0)
    assert np.linalg.norm(e1 - stale) > 20 * TOL


def test_coordinate_mistakes_fail_the_tolerance(setup):
    """The mistakes the first test must catch, made on purpose in the reference inputs."""
    (e0, _), emb = setup["pipe"], setup["torch"]
    img, kp = setup["in0"]
    mistakes = {"x/y swapped": emb(img, kp.flip(-1)),
                "units of the photo, not the crop": emb(img, kp * 112.0 / 512.0),
                "crop pixels, not [0, 1]": emb(img, kp * 112.0)}
    for name, wrong in mistakes.items():
        assert np.linalg.norm(e0 - wrong) > 100 * TOL, name
