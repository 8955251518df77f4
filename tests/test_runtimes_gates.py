"""The accuracy gates (kpface.runtimes.gates) with a stand-in detector and hand-computed
figures, and the import rules that keep kpface.runtimes below the SDK's models."""
import ast
from pathlib import Path

import numpy as np
import pytest

from kpface.errors import InputError
from kpface.runtimes import gates

ROOT = Path(__file__).resolve().parents[1]


# --- the gate decision ---------------------------------------------------------------------

class _Face:
    def __init__(self, box, landmarks):
        self.box, self.landmarks = np.array(box, np.float32), np.array(landmarks, np.float32)


def _factory(candidate_faces):
    """make_detector: the fp32 detector finds one face everywhere, the candidate
    ``candidate_faces`` (the same list for every photo)."""
    ref = [_Face([0, 0, 100, 100], np.full((5, 2), 50.0))]

    class Det:
        def __init__(self, faces):
            self.faces = faces

        def detect(self, image):
            assert image.ndim == 3 and image.dtype == np.uint8
            return list(self.faces)

    made = []

    def make(sessions):
        made.append(dict(sessions))
        return Det(candidate_faces if sessions else ref)
    return make, made


def test_detection_agreement_matches_hand_computed_figures():
    shifted = _Face([10, 0, 110, 100], np.full((5, 2), 50.0) + [3.0, 4.0])
    make, made = _factory([shifted])
    det = gates.detection_agreement(make, {"model": "candidate session"})
    assert made == [{}, {"model": "candidate session"}]
    scenes = len(gates.detection_scenes())
    assert det["faces"] == scenes and det["missed"] == 0 and det["extra"] == 0
    assert det["iou_min"] == pytest.approx(9000 / 11000)         # 90x100 overlap, 11000 union
    assert det["landmark_nme_max"] == pytest.approx(5 / 100)     # 3-4-5 error, sqrt(100*100)
    make, _ = _factory([_Face([300, 300, 400, 400], np.zeros((5, 2))),
                        _Face([0, 0, 100, 100], np.full((5, 2), 50.0))])
    det = gates.detection_agreement(make, {"model": None})
    assert det["missed"] == 0 and det["extra"] == scenes and det["iou_min"] == 1.0
    make, _ = _factory([])
    assert gates.detection_agreement(make, {"model": None})["missed"] == scenes


def test_decide_and_figures():
    ok = {"model": {"n": 64, "mean": 0.995, "min": 0.975}}
    s = gates.decide("recognizer", "int8", ok)
    assert s["passed"] and s["gate"] == gates.GATES["int8"] and s["metric"] == "embedding cosine"
    low = {"model": {"n": 64, "mean": 0.995, "min": 0.969}}
    s = gates.decide("recognizer", "int8", low)
    assert not s["passed"]
    assert gates.figures(s) == ("cosine vs fp32 mean 0.99500 (gate >= 0.99), min 0.96900 "
                                "(gate >= 0.97) on 64 held-out inputs")
    graphs = {g: {"n": 6, "mean": 0.9999, "min": 0.9995} for g in ("pnet", "rnet", "onet")}
    det = {"missed": 0, "extra": 1, "iou_min": 0.95, "landmark_nme_max": 0.01}
    s = gates.decide("detector", "fp16", graphs, det)
    assert not s["passed"] and set(s["graphs"]) == {"pnet", "rnet", "onet"}
    assert "1 extra" in gates.figures(s)
    assert gates.decide("detector", "fp16", graphs, {**det, "extra": 0})["passed"]


def test_build_takes_detectors_from_the_caller(models_dir, tiny_recognizer, monkeypatch):
    """build() resolves no detector itself: a recognizer's is a callable (or None), a detector
    build needs the factory; both refusals come before any work."""
    import kpface.runtimes.build as b

    def no_work(*args, **kwargs):
        raise AssertionError("the build started working")
    monkeypatch.setattr(b, "recognizer_data", no_work)
    monkeypatch.setattr(b, "staging_dir", no_work)
    with pytest.raises(InputError, match="detect\\(image\\) callable"):
        b.build(tiny_recognizer, "onnxruntime", "fp16", detector="auto")
    with pytest.raises(InputError, match="make_detector"):
        b.build(models_dir / "detector", "onnxruntime", "fp16")


# --- import rules ----------------------------------------------------------------------------

def test_runtimes_never_import_the_sdk_models_or_torch():
    banned = ("kpface.detect", "kpface.pipeline", "kpface.models", "kpface.export", "torch")
    for path in sorted((ROOT / "runtimes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                assert not name.startswith(banned), f"{path.name} imports {name}"
