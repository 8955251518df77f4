"""Annotate an image with faces: boxes, scores and the five landmarks."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

# One BGR colour per landmark, in LANDMARK_ORDER: eyes blue/cyan, nose green, mouth red/magenta.
LANDMARK_COLOURS = ((255, 0, 0), (255, 255, 0), (0, 255, 0), (0, 0, 255), (255, 0, 255))


def draw_faces(image_bgr: np.ndarray, faces: Sequence) -> np.ndarray:
    out = image_bgr.copy()
    scale = max(1, round(max(out.shape[:2]) / 400))
    for face in faces:
        x1, y1, x2, y2 = (int(round(float(v))) for v in face.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 200, 0), scale)
        cv2.putText(out, f"{face.score:.2f}", (x1, max(0, y1 - 4 * scale)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4 * scale, (0, 200, 0), scale)
        dense = getattr(face, "dense_landmarks", None)  # a recognizer's own points, if any
        for x, y in ([] if dense is None else np.asarray(dense)):
            cv2.circle(out, (int(round(x)), int(round(y))), max(1, scale // 2), (200, 200, 200), -1)
        for (x, y), colour in zip(np.asarray(face.landmarks), LANDMARK_COLOURS):
            cv2.circle(out, (int(round(x)), int(round(y))), 2 * scale, colour, -1)
    return out
