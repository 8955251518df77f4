"""Torch-free face detectors and the DFA keypoint model (this module keeps their public names;
the classes live in :mod:`kpface.models`, one file per model).

Each class reads its constants (input size, colour order, mean / std, priors, thresholds) from
the model directory's manifest; none are repeated here. Images are BGR uint8 H x W x 3. All
coordinates are float pixels of the input image (pixel centres at integers, as in OpenCV), and
landmarks follow :data:`kpface.landmarks.LANDMARK_ORDER` (image-left eye first).

    det = load_detector("models/retinaface")      # or an exported ``mtcnn`` directory
    faces = det.detect(image)                     # [Detection(box, score, landmarks), ...]
    kp = load_keypoints("models/dfa")
    points = kp.predict_many(image, faces)        # [N, 5, 2] refined landmarks, one call
"""
from .models import (DETECTORS, KEYPOINTS, DFAKeypoints, Detection, MTCNNDetector,  # noqa: F401
                     RetinaFaceDetector, load_detector, load_keypoints)

__all__ = ["Detection", "RetinaFaceDetector", "MTCNNDetector", "DFAKeypoints", "load_detector",
           "load_keypoints", "DETECTORS", "KEYPOINTS"]
