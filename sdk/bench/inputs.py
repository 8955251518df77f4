"""The arrays the bench feeds its configurations, made once per run and named, so that a plan
is data: a :class:`~kpface.bench.plan.BenchConfig` says which inputs feed it (``"scene"`` or a
face-crop key from :meth:`BenchInputs.add_faces`) and :meth:`BenchInputs.payload` hands them
over, cut to the configuration's batch."""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from kpface.samples import ASTRONAUT_BOX, ASTRONAUT_LANDMARKS, astronaut_bgr

from .settings import DETECTOR_SIZE

log = logging.getLogger(__name__)

SCENE = "scene"


def scene(width: int, height: int) -> dict[str, Any]:
    """A width x height BGR scene with one face (astronaut) and that face's box/landmarks."""
    import cv2
    try:
        face = astronaut_bgr()
        source = "skimage.data.astronaut() resized onto a grey canvas"
    except Exception:
        face = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        source = "random noise (scikit-image is not installed: no face in the scene)"
    side = min(width, height)
    s = side / face.shape[0]
    x0, y0 = (width - side) // 2, (height - side) // 2
    canvas = np.full((height, width, 3), 114, np.uint8)
    canvas[y0:y0 + side, x0:x0 + side] = cv2.resize(face, (side, side),
                                                     interpolation=cv2.INTER_AREA)
    box = ASTRONAUT_BOX * s + np.array([x0, y0, x0, y0], np.float32)
    pts = ASTRONAUT_LANDMARKS * s + np.array([x0, y0], np.float32)
    return {"image": canvas, "box": box.astype(np.float32), "landmarks": pts.astype(np.float32),
            "source": source}


def face_crops(manifest: dict, batch: int, seed: int = 0) -> dict[str, Any]:
    """[batch] aligned face crops (real faces when scikit-image is there, else noise)."""
    try:
        from kpface.runtimes.calibration import recognizer_data
        data = recognizer_data(manifest, n_calib=1, n_heldout=batch, seed=seed)
        held = data.heldout
        if len(held) >= batch:
            return {"image": np.ascontiguousarray(held.images[:batch], np.float32),
                    "keypoints": np.ascontiguousarray(held.keypoints[:batch], np.float32),
                    "source": "aligned face crops (kpface.runtimes.calibration, held-out)"}
    except Exception as e:  # no scikit-image, or calibration not available
        log.info("bench: using random recognizer inputs (%s)", e)
    pre = manifest.get("preprocess", {})
    w, h = (int(v) for v in pre.get("size", [112, 112]))
    rng = np.random.default_rng(seed)
    kp_count = int(manifest.get("keypoints", {}).get("count", 5))
    base = ASTRONAUT_LANDMARKS[:kp_count]
    base = (base - base.min(0)) / (base.max(0) - base.min(0)) * 0.35 + [0.32, 0.45]
    kps = base[None] + rng.uniform(-0.02, 0.02, (batch, kp_count, 2))
    return {"image": rng.uniform(-1, 1, (batch, 3, h, w)).astype(np.float32),
            "keypoints": kps.astype(np.float32), "source": "random images in [-1, 1]"}


class BenchInputs:
    """Named input sets: the one-face scene of :data:`DETECTOR_SIZE` for detectors, keypoint
    models and the pipeline, and aligned face crops per recognizer pre-processing."""

    def __init__(self, max_batch: int, seed: int = 0):
        self.max_batch, self.seed = int(max_batch), seed
        self._sets: dict[str, dict[str, Any]] = {}

    def add_scene(self) -> str:
        if SCENE not in self._sets:
            s = scene(*DETECTOR_SIZE)
            self._sets[SCENE] = {"arrays": {"scene": s["image"], "box": s["box"],
                                            "landmarks": s["landmarks"]},
                                 "source": s["source"], "batched": False}
        return SCENE

    def add_faces(self, manifest: dict) -> str:
        """The key of face crops made for ``manifest``'s pre-processing (made once per key)."""
        key = "faces " + json.dumps(manifest.get("preprocess", {}), sort_keys=True)
        if key not in self._sets:
            crops = face_crops(manifest, self.max_batch, self.seed)
            self._sets[key] = {"arrays": {k: crops[k] for k in ("image", "keypoints")},
                               "source": crops["source"], "batched": True}
        return key

    def source(self, key: str | None) -> str | None:
        """What the input set ``key`` holds, in words (None if it was never made)."""
        return self._sets[key]["source"] if key in self._sets else None

    def payload(self, key: str, batch: int) -> dict[str, np.ndarray]:
        """The arrays of input set ``key`` for one configuration at ``batch``."""
        entry = self._sets[key]
        if not entry["batched"]:
            return dict(entry["arrays"])
        return {k: v[:batch] for k, v in entry["arrays"].items()}
