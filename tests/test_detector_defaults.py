"""Issue 13, detector defaults on real photos: MTCNN's default minimum face (0.1 of the shorter
side, at least 20 px: Google ML Kit's minFaceSize) and final score (0.9: OpenCV YuNet's
conf_threshold) drop the 0.94-score non-face that facenet-pytorch's settings (20 px, 0.7)
report on scikit-image's camera() photo at 998 x 998 pixels, and keep every real face;
--min-face / --score and the Python arguments set them."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from kpface.cli import main as cli_main
from kpface.errors import InputError
from kpface.image import load_image
from kpface.models import MTCNNDetector, load_detector
from kpface.pipeline import FacePipeline
from kpface.samples import astronaut_bgr, camera_bgr, coffee_bgr

FACENET_PYTORCH = {"min_face": 20, "score": 0.7}  # its MTCNN(min_face_size=20, thresholds[2]=0.7)


@pytest.fixture(scope="module")
def photos():
    import matplotlib.cbook as cbook
    hopper = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return {"astronaut": astronaut_bgr(), "camera": camera_bgr(), "coffee": coffee_bgr(),
            "grace_hopper": hopper}


def scaled(image, s):
    return cv2.resize(image, None, fx=s, fy=s,
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def test_the_non_face_box_is_gone_and_real_faces_stay(models_dir, photos):
    det = load_detector(models_dir / "detector", threads=2)
    assert isinstance(det, MTCNNDetector) and det.min_face == 0.1 and det.score == 0.9
    old = load_detector(models_dir / "detector", threads=2, **FACENET_PYTORCH)
    camera = scaled(photos["camera"], 1.95)  # 998 x 998
    before = old.detect(camera)
    assert len(before) == 2
    small = min(before, key=lambda d: d.box[2] - d.box[0])
    assert 0.9 < small.score < 0.95 and small.box[2] - small.box[0] < 45  # the 0.94 box
    after = det.detect(camera)
    assert len(after) == 1 and after[0].score > 0.99
    # Real faces stay: each portrait at several sizes gives its one face; coffee none.
    found = {}
    for name, image in photos.items():
        for s in (0.5, 1.0, 1.95):
            found[(name, s)] = len(det.detect(scaled(image, s)))
    assert found == {(n, s): 0 if n == "coffee" else 1 for n, s in found}, found


def test_python_arguments_set_them(models_dir, photos):
    det = load_detector(models_dir / "detector", threads=1, min_face=0.6)
    assert det.min_face_pixels(512, 512) == pytest.approx(307.2)
    assert det.detect(photos["astronaut"]) == []  # the 88 px face is below 0.6 x 512
    assert load_detector(models_dir / "detector", threads=1, min_face=40).min_face_pixels(
        2000, 2000) == 40
    strict = load_detector(models_dir / "detector", threads=1, score=0.99995)
    assert len(strict.detect(photos["camera"])) == 0  # its face scores 0.9995
    pipe = FacePipeline.from_dir(models_dir, threads=1, min_face=0.6)
    assert pipe.detector.min_face == 0.6 and pipe(photos["astronaut"]) == []
    from kpface.serving import DetectStage  # `kpface serve --min-face / --score`
    stage = DetectStage(models_dir, threads=1, min_face=0.6, score=0.95)
    assert (stage.pipe.detector.min_face, stage.pipe.detector.score) == (0.6, 0.95)
    for bad in ({"min_face": 0}, {"min_face": -1}, {"min_face": 5}, {"score": 1.5},
                {"score": "high"}):
        with pytest.raises(InputError):
            load_detector(models_dir / "detector", threads=1, **bad)


def test_cli_min_face_and_score(models_dir, photos, tmp_path, capsys):
    path = tmp_path / "camera.png"
    cv2.imwrite(str(path), photos["camera"])
    out = tmp_path / "faces.json"
    base = ["run", str(path), "--models", str(models_dir), "--threads", "1", "--json", str(out)]
    assert cli_main(base) == 0
    assert len(json.loads(out.read_text())["images"][str(path)]) == 1
    assert cli_main(base + ["--score", "0.99995"]) == 0
    assert json.loads(out.read_text())["images"][str(path)] == []
    assert cli_main(base + ["--min-face", "300"]) == 0
    assert json.loads(out.read_text())["images"][str(path)] == []
    capsys.readouterr()
    code = cli_main(base + ["--min-face", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "kpface: error: min_face must be" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli_main(["compare", "--help"])
    assert "--min-face" in capsys.readouterr().out
