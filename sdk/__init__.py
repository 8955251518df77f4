"""kpface: landmark-conditioned (KP-RPE) face recognition for edge devices.

Run-time imports are numpy, opencv and one engine; torch is only needed by
:mod:`kpface.export`.
"""
__version__ = "0.1.0"

from .errors import (AccuracyGateError, CheckpointError, EngineUnavailable, InputError,  # noqa: F401
                     KpfaceError, ModelError, RandomWeightsError)


def __getattr__(name):  # lazy: keep `import kpface` cheap and torch-free
    if name in ("FacePipeline", "Face", "compare"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "Gallery":
        from .gallery import Gallery
        return Gallery
    if name in ("Recognizer", "load_recognizer", "load_detector", "load_keypoints"):
        from . import models
        return getattr(models, name)
    raise AttributeError(name)
