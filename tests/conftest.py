import logging

import pytest


@pytest.fixture(scope="session")
def tiny_recognizer(tmp_path_factory):
    """vit_kprpe_tiny exported once per session (random weights)."""
    from kpface.export.onnx_export import export_model
    out = tmp_path_factory.mktemp("models") / "recognizer"
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    export_model("vit_kprpe_tiny", out)
    return out


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_recognizer):
    """A models directory: MTCNN (real packaged weights) + the tiny recognizer."""
    import shutil

    from kpface.export.onnx_export import export_model
    root = tmp_path_factory.mktemp("pipeline") / "models"
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    export_model("mtcnn", root / "detector")
    shutil.copytree(tiny_recognizer, root / "recognizer")
    return root


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory):
    import cv2
    from skimage import data
    path = tmp_path_factory.mktemp("images") / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    return path
