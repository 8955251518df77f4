"""Issue 13, concurrency and resources: FacePipeline under 8 threads x 20 calls on real photos
gives the serial results; every session, model class and the pipeline close (and work as
context managers); default threads follow the CPU affinity; nothing redirects stdout/stderr
or changes logger levels at run time; and `kpface run` goes on after one image fails."""
import contextlib
import json
import logging
import os
import threading

import cv2
import numpy as np
import pytest

from kpface.cli import main as cli_main
from kpface.errors import ModelError
from kpface.models import MTCNNDetector, Recognizer, load_detector, load_recognizer
from kpface.pipeline import FacePipeline
from kpface.runtimes import engines, open_session
from kpface.samples import astronaut_bgr, camera_bgr, coffee_bgr

THREADS, CALLS = 8, 20


@pytest.fixture(scope="module")
def photos():
    import matplotlib.cbook as cbook

    from kpface.image import load_image
    hopper = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    half = lambda im: cv2.resize(im, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    return [half(astronaut_bgr()), half(camera_bgr()), half(coffee_bgr()), half(hopper)]


def _summary(faces):
    return [(f.box.copy(), f.score, f.landmarks.copy(), f.embedding.copy()) for f in faces]


def test_pipeline_threads_give_the_serial_results(models_dir, photos):
    with FacePipeline.from_dir(models_dir, threads=1) as pipe:
        serial = [_summary(pipe(im)) for im in photos]
        assert [len(s) for s in serial] == [1, 1, 0, 1]
        results, errors = [], []

        def work(k):
            try:
                for i in range(CALLS):
                    j = (k + i) % len(photos)
                    results.append((j, _summary(pipe(photos[j]))))
            except Exception as e:  # surfaced below
                errors.append(e)
        threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert not errors, errors
    assert len(results) == THREADS * CALLS
    for j, got in results:
        want = serial[j]
        assert len(got) == len(want)
        for (b, s, lm, e), (b0, s0, lm0, e0) in zip(got, want):
            np.testing.assert_array_equal(b, b0)
            assert s == s0
            np.testing.assert_array_equal(lm, lm0)
            np.testing.assert_allclose(e, e0, atol=1e-6)
    print(f"\n{THREADS} threads x {CALLS} calls on 4 real photos: identical to the serial run")


def test_sessions_models_and_the_pipeline_close(models_dir, tiny_recognizer, photos):
    feeds = {"image": np.zeros((1, 3, 112, 112), np.float32),
             "keypoints": np.full((1, 5, 2), 0.5, np.float32)}
    with open_session(tiny_recognizer, threads=1) as sess:
        assert sess.run(feeds)["embedding"].shape == (1, 512)
    assert sess.closed
    with pytest.raises(ModelError, match="closed"):
        sess.run(feeds)
    with load_recognizer(tiny_recognizer, threads=1) as rec:
        assert isinstance(rec, Recognizer)
    with pytest.raises(ModelError, match="closed"):
        rec.session.run(feeds)
    with load_detector(models_dir / "detector", threads=1) as det:
        assert isinstance(det, MTCNNDetector)
    assert det.pnet.closed and det.rnet.closed and det.onet.closed
    pipe = FacePipeline.from_dir(models_dir, threads=1)
    pipe.close()
    pipe.close()  # idempotent
    with pytest.raises(ModelError, match="closed"):
        pipe(photos[0])


def test_openvino_session_closes(tiny_recognizer, tmp_path):
    ov = pytest.importorskip("openvino", reason="openvino not installed")
    from kpface.runtimes.openvino_rt import OpenVinoSession
    xml = tmp_path / "model.xml"
    ov.save_model(ov.convert_model(str(tiny_recognizer / "model.onnx")), str(xml))
    with OpenVinoSession(xml, threads=1) as sess:
        out = sess.run({"image": np.zeros((1, 3, 112, 112), np.float32),
                        "keypoints": np.full((1, 5, 2), 0.5, np.float32)})
        assert out["embedding"].shape == (1, 512)
    with pytest.raises(ModelError, match="closed"):
        sess.run({})


def test_coreml_session_closes():
    from kpface.runtimes.coreml_rt import CoreMLSession
    sess = CoreMLSession.__new__(CoreMLSession)  # predicting needs macOS; closing does not
    sess._model = object()
    with sess:
        pass
    assert sess._model is None
    with pytest.raises(ModelError, match="closed"):
        sess.run({"image": np.zeros((1, 3, 112, 112), np.float32)})


def test_default_threads_follow_the_cpu_affinity(monkeypatch):
    monkeypatch.delenv("KPFACE_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert engines.default_threads() == 3
    monkeypatch.setenv("KPFACE_THREADS", "2")
    assert engines.default_threads() == 2
    monkeypatch.setenv("KPFACE_THREADS", "zero")
    with pytest.raises(Exception, match="KPFACE_THREADS"):
        engines.default_threads()


def test_nothing_redirects_output_or_logger_levels_at_run_time(models_dir, tiny_recognizer,
                                                                 tmp_path, photos, monkeypatch):
    """Opening and running models (ONNX Runtime, OpenVINO builds, Core ML's availability) never
    swaps sys.stdout / sys.stderr or changes a logger's level."""
    from kpface.runtimes.build import build
    import shutil
    d = tmp_path / "models"
    shutil.copytree(models_dir, d)
    builds = [("onnxruntime", "fp16")]
    if engines.get_engine("openvino").available()[0]:
        builds.append(("openvino", "fp32"))
    for runtime, precision in builds:
        build(d / "recognizer", runtime, precision, n_calib=0, n_heldout=4, threads=1)

    def forbidden(*a, **k):
        raise AssertionError("stdout/stderr redirected at run time")
    monkeypatch.setattr(engines, "quiet", forbidden)
    monkeypatch.setattr(contextlib, "redirect_stdout", forbidden)
    monkeypatch.setattr(contextlib, "redirect_stderr", forbidden)
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
              if isinstance(lg, logging.Logger)}
    out, err = os.sys.stdout, os.sys.stderr
    engines.get_engine("coreml").available()  # imports coremltools where installed
    with FacePipeline.from_dir(d, precision="fp16", threads=1) as pipe:
        face = pipe(photos[0], return_crops=True)[0]
    for runtime, precision in builds:
        with load_recognizer(d / "recognizer", runtime=runtime, precision=precision,
                             threads=1) as rec:
            crop, pts, _ = rec.crop(photos[0], face.landmarks)
            assert rec.embed([crop], [pts]).shape == (1, 512)
    assert os.sys.stdout is out and os.sys.stderr is err
    changed = {name: (level, logging.getLogger(name).level) for name, level in levels.items()
               if logging.getLogger(name).level != level}
    assert not changed, changed


def test_kpface_run_goes_on_after_an_unexpected_error(models_dir, photos, tmp_path,
                                                      monkeypatch, capsys):
    paths = []
    for i, im in enumerate(photos):
        paths.append(tmp_path / f"p{i}.png")
        cv2.imwrite(str(paths[-1]), im)
    real = FacePipeline.__call__

    def flaky(self, image, return_crops=False):
        if image.shape == photos[1].shape and np.array_equal(image, photos[1]):
            raise RuntimeError("a bug in one image's path")
        return real(self, image, return_crops)
    monkeypatch.setattr(FacePipeline, "__call__", flaky)
    out = tmp_path / "faces.json"
    code = cli_main(["run", *map(str, paths), "--models", str(models_dir), "--threads", "1",
                     "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"error: {paths[1]}: internal error: RuntimeError: a bug in one image's path" in err
    results = json.loads(out.read_text())["images"]
    assert sorted(results) == sorted(str(p) for p in (paths[0], paths[2], paths[3]))
    assert "kpface: error: 1 of 4 image(s) could not be read; results for the other 3" in err
