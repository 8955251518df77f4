"""The arrays the bench feeds its configurations, made once per run and named, so that a plan
is data: a :class:`~kpface.bench.plan.BenchConfig` says which inputs feed it (``"scene"`` or a
face-crop key from :meth:`BenchInputs.add_faces`) and :meth:`BenchInputs.payload` hands them
over, cut to the configuration's batch. Inputs are real photos only: when they cannot be made
the configurations they feed are reported as not measured, with the reason."""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

import numpy as np

from kpface.errors import InputError, KpfaceError
from kpface.samples import ASTRONAUT_BOX, ASTRONAUT_LANDMARKS, astronaut_bgr

from .settings import DETECTOR_SIZE, Skip

log = logging.getLogger(__name__)

SCENE = "scene"


def scene(width: int, height: int) -> dict[str, Any]:
    """A width x height BGR scene with one face (astronaut) and that face's box/landmarks.

    Needs scikit-image's sample photo: without it :func:`kpface.samples.astronaut_bgr` raises
    InputError and the rows this scene feeds are reported as not measured (never a stand-in).
    """
    import cv2
    face = astronaut_bgr()
    side = min(width, height)
    s = side / face.shape[0]
    x0, y0 = (width - side) // 2, (height - side) // 2
    canvas = np.full((height, width, 3), 114, np.uint8)
    canvas[y0:y0 + side, x0:x0 + side] = cv2.resize(face, (side, side),
                                                     interpolation=cv2.INTER_AREA)
    box = ASTRONAUT_BOX * s + np.array([x0, y0, x0, y0], np.float32)
    pts = ASTRONAUT_LANDMARKS * s + np.array([x0, y0], np.float32)
    return {"image": canvas, "box": box.astype(np.float32), "landmarks": pts.astype(np.float32),
            "source": "skimage.data.astronaut() resized onto a grey canvas"}


def face_crops(manifest: dict, batch: int, seed: int = 0) -> dict[str, Any]:
    """[batch] aligned real face crops and their keypoints, made the way calibration makes its
    held-out set (:func:`kpface.runtimes.calibration.recognizer_data`). Raises
    :class:`KpfaceError` when they cannot be made (no scikit-image): never a stand-in."""
    from kpface.runtimes.calibration import recognizer_data
    held = recognizer_data(manifest, n_calib=1, n_heldout=batch, seed=seed).heldout
    if len(held) < batch:
        raise InputError(f"only {len(held)} face crops could be made for batch {batch}")
    return {"image": np.ascontiguousarray(held.images[:batch], np.float32),
            "keypoints": np.ascontiguousarray(held.keypoints[:batch], np.float32),
            "source": "aligned face crops (kpface.runtimes.calibration, held-out)"}


class BenchInputs:
    """Named input sets: the one-face scene of :data:`DETECTOR_SIZE` for detectors, keypoint
    models and the pipeline, and aligned face crops per recognizer pre-processing.

    A set that cannot be made is remembered with the reason; :meth:`payload` then raises
    :class:`~kpface.bench.settings.Skip` and the configurations it feeds are reported as not
    measured. There is no fallback to synthetic inputs.
    """

    def __init__(self, max_batch: int, seed: int = 0):
        self.max_batch, self.seed = int(max_batch), seed
        self._sets: dict[str, dict[str, Any]] = {}

    def _make(self, key: str, what: str, make: Callable[[], dict[str, Any]],
              names: dict[str, str], batched: bool) -> str:
        """Make input set ``key`` once: ``names`` maps payload names to ``make()``'s keys."""
        if key not in self._sets:
            try:
                made = make()
            except KpfaceError as e:
                log.warning("bench: no %s: %s", what, e)
                self._sets[key] = {"error": f"no {what}: {e}"}
            else:
                self._sets[key] = {"arrays": {n: made[k] for n, k in names.items()},
                                   "source": made["source"], "batched": batched}
        return key

    def add_scene(self) -> str:
        return self._make(SCENE, "bench scene", lambda: scene(*DETECTOR_SIZE),
                          {"scene": "image", "box": "box", "landmarks": "landmarks"},
                          batched=False)

    def add_faces(self, manifest: dict) -> str:
        """The key of face crops made for ``manifest``'s pre-processing (made once per key)."""
        key = "faces " + json.dumps(manifest.get("preprocess", {}), sort_keys=True)
        return self._make(key, "real face crops for the recognizer",
                          lambda: face_crops(manifest, self.max_batch, self.seed),
                          {"image": "image", "keypoints": "keypoints"}, batched=True)

    def source(self, key: str | None) -> str | None:
        """What the input set ``key`` holds, in words (None if it was never asked for)."""
        entry = self._sets.get(key) if key is not None else None
        if entry is None:
            return None
        return entry["source"] if "error" not in entry else f"not made ({entry['error']})"

    def payload(self, key: str, batch: int) -> dict[str, np.ndarray]:
        """The arrays of input set ``key`` for one configuration at ``batch``."""
        entry = self._sets[key]
        if "error" in entry:
            raise Skip(entry["error"])
        if not entry["batched"]:
            return dict(entry["arrays"])
        return {k: v[:batch] for k, v in entry["arrays"].items()}
