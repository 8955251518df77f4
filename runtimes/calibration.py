"""Calibration and held-out data for recognizers, made from real faces.

Quantization statistics and the accuracy gate both need inputs that look like what the
pipeline feeds the recognizer: aligned 112x112 face crops plus the five keypoints of that crop.
:func:`recognizer_data` makes them from

* ``skimage.data.lfw_subset()``: its first 100 images are 25x25 grayscale LFW face crops (the
  last 100 are non-faces and are not used for a recognizer);
* ``skimage.data.astronaut()`` (RGB) and ``skimage.data.camera()`` (grayscale, made 3-channel);
* the user's own images (``kpface build --calib FOLDER``).

Where the faces are: when a detector is given (``detect(image_bgr)`` returning, per face, a
[5, 2] array of landmark pixels, or objects with a ``.landmarks`` attribute, as
``kpface.detect``'s detectors return), every image goes through it, exactly as in the
pipeline. Without one, the known geometry of :mod:`kpface.samples` is used instead (the LFW
crops' fitted template, the astronaut's measured landmarks); the cameraman is in near profile
with one eye hidden by the camera, so without a detector he is left out; a user image without
a detector must be an aligned square face crop (template scaled to its size).

User images are read with :func:`kpface.image.load_image` (the suffixes of
:data:`kpface.image.IMAGE_SUFFIXES`): a corrupt file is refused with the same one-line error as
everywhere else.

Every base face is cut the way the recognizer's manifest says the pipeline cuts it: the
ArcFace template (the pipeline's least-squares similarity,
:func:`kpface.align.estimate_similarity`) when the manifest has no ``alignment`` block, dlib's
face chip (:func:`kpface.facechip.face_chip`, ``{"method": "dlib_face_chip", "size",
"padding"}``: dlib_resnet_v1) when it has one. Crops are then augmented (random similarity
jitter of the alignment, horizontal flip with the landmark index swap 0<->1 and 3<->4,
brightness/contrast), deterministically from ``seed``. The split into
calibration and held-out sets is made by base face, so no held-out crop shares a source face
with the calibration crops.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np

from kpface import samples
from kpface.align import (estimate_similarity, invert_affine, recognizer_inputs, template,
                          transform_points)
from kpface.errors import InputError
from kpface.facechip import chip_template, face_chip
from kpface.image import IMAGE_SUFFIXES, load_image
from kpface.preprocess import Normalizer

log = logging.getLogger(__name__)

Detect = Callable[[np.ndarray], Sequence[Any]]

# Horizontal flip swaps image-left and image-right points: eyes (0, 1) and mouth corners (3, 4).
FLIP_ORDER = [1, 0, 2, 4, 3]

# Used when no manifest is given: the KP-RPE ViT's pre-processing.
DEFAULT_RECOGNIZER = {"preprocess": {"size": [112, 112], "color": "RGB",
                                     "mean": [127.5] * 3, "std": [127.5] * 3}}


@dataclass
class Augment:
    """Ranges of the random augmentation; ``Augment.none()`` turns it off."""

    rotate_deg: float = 6.0
    scale: float = 0.05          # relative, +-
    shift: float = 0.03          # fraction of the crop size, +-
    flip: float = 0.5            # probability
    brightness: float = 20.0     # added to uint8 pixels, +-
    contrast: float = 0.15       # relative, +-

    @classmethod
    def none(cls) -> "Augment":
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass
class FaceSet:
    """Aligned crops ready for the recognizer, and where they came from."""

    images: np.ndarray        # [N, 3, H, W] float32, normalised as the manifest says
    keypoints: np.ndarray     # [N, 5, 2] float32, (x, y) in [0, 1] of the crop
    sources: list[str] = field(default_factory=list)  # base face of each crop

    def __len__(self) -> int:
        return len(self.images)

    def feeds(self, input_names: Sequence[str], batch: int | None = None) -> Iterable[dict]:
        """Yield feed dicts of at most ``batch`` crops for a graph with these inputs."""
        arrays = {"image": self.images, "keypoints": self.keypoints}
        missing = [n for n in input_names if n not in arrays]
        if missing:
            raise InputError(f"face crops cannot feed graph inputs {missing}; "
                             "calibration data is made for recognizers (image, keypoints)")
        step = max(1, batch or len(self))
        for i in range(0, len(self), step):
            yield {n: arrays[n][i:i + step] for n in input_names}


@dataclass
class RecognizerData:
    calibration: FaceSet
    heldout: FaceSet
    description: dict[str, Any]


# --- alignment ---------------------------------------------------------------------------
# The similarity fit is kpface.align's (the pipeline's own); the warp here adds the jitter.

def _jitter(rng: np.random.Generator, aug: Augment, size: int) -> np.ndarray:
    """A small random similarity about the crop centre, 2x3."""
    ang = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    sc = 1.0 + rng.uniform(-aug.scale, aug.scale)
    tx, ty = rng.uniform(-aug.shift, aug.shift, size=2) * size
    c = (size - 1) / 2.0
    cos, sin = sc * np.cos(ang), sc * np.sin(ang)
    return np.array([[cos, -sin, c - cos * c + sin * c + tx],
                     [sin, cos, c - sin * c - cos * c + ty]])


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2x3 affine ``a`` after ``b``."""
    a3 = np.vstack([a, [0, 0, 1]])
    b3 = np.vstack([b, [0, 0, 1]])
    return (a3 @ b3)[:2]


def _flip_and_tone(crop: np.ndarray, pts: np.ndarray, flip: bool,
                   rng: np.random.Generator | None, aug: Augment | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    size = crop.shape[1]
    if flip:
        crop = crop[:, ::-1].copy()
        pts = pts.copy()
        pts[:, 0] = size - 1 - pts[:, 0]
        pts = pts[FLIP_ORDER]
    if rng is not None and aug is not None and (aug.brightness or aug.contrast):
        alpha = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
        beta = rng.uniform(-aug.brightness, aug.brightness)
        mean = crop.mean()
        crop = np.clip((crop.astype(np.float32) - mean) * alpha + mean + beta, 0, 255
                       ).astype(np.uint8)
    return crop, pts.astype(np.float32)


def align_crop(image_bgr: np.ndarray, landmarks: np.ndarray, size: int = 112,
               rng: np.random.Generator | None = None, aug: Augment | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Warp a face to the ArcFace template (plus optional augmentation).

    Returns (crop BGR uint8 [size, size, 3], landmarks of the face in crop pixels [5, 2]).
    """
    m = estimate_similarity(landmarks, template(size))
    flip = False
    if rng is not None and aug is not None:
        m = _compose(_jitter(rng, aug, size), m)
        flip = rng.random() < aug.flip
    # Reflect, not the pipeline's black border: a 25x25 LFW crop fills the whole aligned
    # frame, and black margins from the jitter would be statistics no real photo produces.
    crop = cv2.warpAffine(image_bgr, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)
    return _flip_and_tone(crop, transform_points(landmarks, m), flip, rng, aug)


def chip_crop(image_bgr: np.ndarray, landmarks: np.ndarray, size: int = 150,
              padding: float = 0.25, rng: np.random.Generator | None = None,
              aug: Augment | None = None) -> tuple[np.ndarray, np.ndarray]:
    """dlib's face chip of a face (:func:`kpface.facechip.face_chip`, the pipeline's own),
    plus optional augmentation. Returns (chip BGR uint8 [size, size, 3], landmarks in chip
    pixels [5, 2]).

    The jitter J (in chip pixels) moves the five points to ``S J^-1 S^-1 (points)``, S the
    chip -> image similarity fitted to them: the chip of the moved points is the chip warped
    by J, cut by the same extraction as in the pipeline. Where the chip reaches past the
    image, the image is first extended by reflection (see :func:`align_crop`)."""
    pts = np.asarray(landmarks, np.float64).reshape(5, 2)
    flip = False
    if rng is not None and aug is not None:
        s = estimate_similarity(chip_template(size, padding), pts)  # chip -> image
        j = _jitter(rng, aug, size)
        moved = _compose(s, _compose(invert_affine(j), invert_affine(s)))
        pts_fit = transform_points(pts, moved)
        flip = rng.random() < aug.flip
    else:
        pts_fit = pts
    # How far the chip may reach outside the image: its half-diagonal around the points.
    s = estimate_similarity(chip_template(size, padding), pts_fit)
    corners = transform_points(np.array([[0, 0], [size, 0], [0, size], [size, size]], float), s)
    h, w = image_bgr.shape[:2]
    margin = int(np.ceil(max(0.0, -corners.min(), (corners[:, 0] - w).max(),
                             (corners[:, 1] - h).max()))) + 2
    if margin > 2:
        image_bgr = cv2.copyMakeBorder(image_bgr, margin, margin, margin, margin,
                                       cv2.BORDER_REFLECT)
        pts, pts_fit = pts + margin, pts_fit + margin
    chip, m = face_chip(image_bgr, pts_fit, size=size, padding=padding)
    return _flip_and_tone(chip, transform_points(pts, m), flip, rng, aug)


def crop_fn(manifest: dict | None) -> tuple[Callable[..., tuple[np.ndarray, np.ndarray]], int]:
    """``(crop(image, landmarks, rng, aug), size)`` for a recognizer manifest: the crop its
    ``alignment`` block names (dlib's face chip) or the ArcFace template without one."""
    manifest = manifest if manifest and "preprocess" in manifest else DEFAULT_RECOGNIZER
    block = manifest.get("alignment")
    if block is None:
        size = int(manifest["preprocess"]["size"][0])
        return (lambda img, lm, rng, aug: align_crop(img, lm, size, rng, aug)), size
    method = block.get("method") if isinstance(block, dict) else block
    if method != "dlib_face_chip":
        raise InputError(f"calibration cannot cut {method!r} crops (the manifest's alignment); "
                         "it knows the ArcFace template and dlib_face_chip")
    try:
        size, padding = int(block["size"]), float(block["padding"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"the manifest's alignment block is incomplete ({e!r}); re-export "
                         "the model") from None
    return (lambda img, lm, rng, aug: chip_crop(img, lm, size, padding, rng, aug)), size


# --- sources -------------------------------------------------------------------------------

def _landmarks_of(found: Any) -> np.ndarray:
    pts = getattr(found, "landmarks", found)
    pts = np.asarray(pts, np.float32)
    if pts.shape != (5, 2):
        raise InputError(f"the detector returned landmarks of shape {pts.shape}; expected [5, 2]")
    return pts


def _read_folder(folder: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"calibration folder {folder} does not exist; pass a folder of images")
    out = [(str(p), load_image(p)) for p in sorted(folder.rglob("*"))
           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not out:
        raise InputError(f"calibration folder {folder} holds no images "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    return out


def base_faces(detect: Detect | None = None, user_images: str | os.PathLike | None = None,
               use_builtin: bool = True, max_lfw: int = 100
               ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every source face as (name, image BGR uint8, landmarks [5, 2] pixels)."""
    faces: list[tuple[str, np.ndarray, np.ndarray]] = []

    def add_scene(name: str, img: np.ndarray, fallback: np.ndarray | None) -> None:
        if detect is not None:
            found = list(detect(img))
            if not found:
                log.info("calibration: no face detected in %s", name)
            for i, f in enumerate(found):
                faces.append((f"{name}#{i}", img, _landmarks_of(f)))
        elif fallback is not None:
            faces.append((name, img, fallback))

    if use_builtin:
        for i, img in enumerate(samples.lfw_subset_bgr()[:max_lfw]):
            h, w = img.shape[:2]
            if detect is not None:
                # A 25x25 crop is too small for a scene detector: pad it into context first.
                pad = cv2.copyMakeBorder(cv2.resize(img, (4 * w, 4 * h)), 2 * h, 2 * h, 2 * w,
                                         2 * w, cv2.BORDER_REPLICATE)
                found = list(detect(pad))
                if found:
                    faces.append((f"lfw_subset[{i}]#0", pad, _landmarks_of(found[0])))
                    continue
            faces.append((f"lfw_subset[{i}]", img, samples.lfw_subset_landmarks(w, h)))
        add_scene("astronaut", samples.astronaut_bgr(), samples.ASTRONAUT_LANDMARKS)
        add_scene("camera", samples.camera_bgr(), None)
    if user_images is not None:
        for path, img in _read_folder(user_images):
            name = f"user:{Path(path).name}"
            h, w = img.shape[:2]
            if detect is not None:
                add_scene(name, img, None)
            elif abs(h - w) <= 2:
                faces.append((name, img, samples.template_landmarks(w, h)))
            else:
                raise InputError(f"{path} is not a square face crop; without a detector "
                                 "calibration images must be aligned face crops (pass a "
                                 "detector model to use whole photos)")
    if not faces:
        raise InputError("no calibration faces were found; pass --calib FOLDER with face images")
    return faces


def make_faceset(faces: Sequence[tuple[str, np.ndarray, np.ndarray]], count: int,
                 rng: np.random.Generator, aug: Augment, manifest: dict | None = None
                 ) -> FaceSet:
    """``count`` augmented crops, cycling through ``faces`` in a seeded random order, turned
    into recognizer inputs by the pipeline's own :func:`kpface.align.recognizer_inputs`."""
    manifest = manifest if manifest and "preprocess" in manifest else DEFAULT_RECOGNIZER
    cut, _ = crop_fn(manifest)
    if count <= 0:
        w, h = (int(v) for v in manifest["preprocess"]["size"])
        return FaceSet(np.zeros((0, 3, h, w), np.float32), np.zeros((0, 5, 2), np.float32))
    crops, pts, names = [], [], []
    order = rng.permutation(len(faces))
    for j in range(count):
        name, img, lm = faces[order[j % len(faces)]]
        crop, p = cut(img, lm, rng, aug)
        crops.append(crop)
        pts.append(p)
        names.append(name)
    images, keypoints = recognizer_inputs(crops, pts, manifest)
    return FaceSet(images, keypoints, names)


def _split(faces: list, fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """(calibration faces, held-out faces), disjoint unless there is only one face."""
    if len(faces) < 2:
        log.warning("only %d calibration face(s): held-out crops share them", len(faces))
        return faces, faces
    order = rng.permutation(len(faces))
    n_held = min(len(faces) - 1, max(1, int(round(len(faces) * fraction))))
    return [faces[i] for i in order[n_held:]], [faces[i] for i in order[:n_held]]


def _source_names(faces: Sequence[tuple[str, Any, Any]]) -> list[str]:
    """``lfw_subset[3]``, ``camera#0``, ``user:a.jpg`` -> lfw_subset, camera, user."""
    return sorted({n.split("[")[0].split("#")[0].split(":")[0] for n, _, _ in faces})


def recognizer_data(manifest: dict | None = None, n_calib: int = 128, n_heldout: int = 64,
                    seed: int = 0, detect: Detect | None = None,
                    user_images: str | os.PathLike | None = None,
                    heldout_fraction: float = 0.3, augment: Augment | None = None
                    ) -> RecognizerData:
    """Calibration and held-out crops from disjoint base faces, deterministic by ``seed``.

    Calibration uses the user's images when given, else the built-in faces. The held-out set
    is a share of those faces that calibration never sees, plus, when the user gave images,
    every built-in face: the gate always measures real faces, even if the user's images are
    poor.
    """
    aug = augment or Augment()
    user = base_faces(detect, user_images, use_builtin=False) if user_images is not None else []
    try:
        builtin = base_faces(detect, None, use_builtin=True)
    except InputError:
        if not user:
            raise
        builtin = []
    rng = np.random.default_rng(seed)
    calib_faces, held_faces = _split(user or builtin, heldout_fraction, rng)
    if user:
        held_faces = held_faces + builtin
    calib = make_faceset(calib_faces, n_calib, rng, aug, manifest)
    held = make_faceset(held_faces, n_heldout, rng, aug, manifest)
    block = (manifest or {}).get("alignment")
    desc = {
        "kind": (f"{block['method']} crops" if isinstance(block, dict) and block.get("method")
                 else "aligned face crops"),
        "sources": _source_names(user + builtin),
        "calibration_sources": _source_names(calib_faces),
        "heldout_sources": _source_names(held_faces),
        "user_images": str(user_images) if user_images is not None else None,
        "landmarks": (f"detector ({sum('#' in n for n, _, _ in user + builtin)} faces), "
                      if detect is not None else "") + "known (template / hand-measured)",
        "calibration_faces": len(calib_faces), "heldout_faces": len(held_faces),
        "calibration_crops": len(calib), "heldout_crops": len(held), "seed": seed,
        "augment": dict(vars(aug)),
    }
    return RecognizerData(calib, held, desc)


# --- other image graphs (detectors, keypoint models) ----------------------------------------

def _spatial(dim: Any, fallback: int) -> int:
    return dim if isinstance(dim, int) else fallback


def image_feeds(manifest: dict, graph: dict, n: int = 6, seed: int = 0,
                batch: int = 2) -> list[dict[str, np.ndarray]]:
    """Held-out inputs for a graph with one ``image`` input [B, 3, H, W]: the astronaut, the
    cameraman and LFW faces, resized to H x W (dynamic sizes: the manifest's preprocess size,
    else 160) and normalised as the manifest's ``preprocess`` says (a manifest without mean,
    std or colour order is refused, as when the model opens)."""
    inputs = graph.get("inputs", [])
    if [i["name"] for i in inputs] != ["image"]:
        raise InputError(f"no held-out data for a graph with inputs "
                         f"{[i['name'] for i in inputs]}")
    shape = inputs[0]["shape"]
    pre = manifest.get("preprocess", {})
    size = pre.get("size") or [pre.get("width", 160), pre.get("height", 160)]
    w, h = _spatial(shape[3], int(size[0])), _spatial(shape[2], int(size[1]))
    rng = np.random.default_rng(seed)
    lfw = samples.lfw_subset_bgr()
    sources = [samples.astronaut_bgr(), samples.camera_bgr()]
    sources += [lfw[i] for i in rng.choice(len(lfw), max(0, n - 2), replace=False)]
    imgs = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in sources[:n]])
    x = Normalizer.from_manifest(manifest)(imgs)  # no guessed mean/std: the manifest's own
    return [{"image": x[i:i + batch]} for i in range(0, len(x), batch)]
