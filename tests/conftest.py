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
