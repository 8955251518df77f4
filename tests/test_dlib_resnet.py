"""dlib_resnet_v1: the torch model and its ONNX export against dlib's own descriptors
(tests/fixtures/dlib_resnet_v1.npz, made by scripts/make_dlib_fixture.py with dlib), its
manifest, and its export from the packaged weights alone."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import numpy as np
import pytest
from dlib_support import FIXTURE, descriptors_torch, dlib_input, fixture, require_package

from kpface.errors import CheckpointError

PARITY = 1e-4  # max abs difference to dlib's descriptors (issue 9)


def test_fixture_is_small_and_says_where_it_came_from():
    data = fixture()
    assert FIXTURE.stat().st_size < 1_000_000
    assert str(data["dlib_version"]).count(".") >= 1 and str(data["models_version"]) == "0.3.0"
    n = len(data["names"])
    assert data["chips_rgb"].shape == (n, 150, 150, 3) and data["descriptors"].shape == (n, 128)
    assert {"astronaut", "astronaut_mirror", "hopper", "noise"} <= {str(s) for s in data["names"]}


def test_torch_model_reproduces_dlib():
    require_package()
    data = fixture()
    got = descriptors_torch(data["chips_rgb"])
    diff = np.abs(got - data["descriptors"]).max()
    assert diff <= PARITY, diff


def test_kpface_normaliser_is_dlibs_input_layer(exported):
    """The manifest's preprocess block, through the SDK's Normalizer (BGR in), gives exactly
    the tensor dlib's input_rgb_image makes (RGB in)."""
    from kpface.preprocess import Normalizer
    manifest = json.loads((exported / "manifest.json").read_text())
    chips = fixture()["chips_rgb"]
    got = Normalizer.from_manifest(manifest)(np.ascontiguousarray(chips[..., ::-1]))
    np.testing.assert_array_equal(got, dlib_input(chips))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`kpface export recognizer --arch dlib_resnet_v1` with no --weights: packaged weights."""
    require_package()
    out = tmp_path_factory.mktemp("dlib") / "recognizer"
    p = subprocess.run([sys.executable, "-m", "kpface", "export", "recognizer", "--arch",
                        "dlib_resnet_v1", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert "RANDOM" not in p.stdout + p.stderr and "parity embedding" in p.stdout
    return out


def test_onnx_reproduces_dlib_at_any_batch(exported):
    import onnxruntime as ort

    from kpface.preprocess import Normalizer
    manifest = json.loads((exported / "manifest.json").read_text())
    norm = Normalizer.from_manifest(manifest)
    sess = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    data = fixture()
    x = norm(np.ascontiguousarray(data["chips_rgb"][..., ::-1]))
    batch = sess.run(["embedding"], {"image": x})[0]
    assert np.abs(batch - data["descriptors"]).max() <= PARITY
    one = sess.run(["embedding"], {"image": x[1:2]})[0]
    assert np.abs(one[0] - data["descriptors"][1]).max() <= PARITY


def test_manifest(exported):
    from kpface.manifest import load_manifest, sha256_file
    m = load_manifest(exported, task="recognizer")
    assert m["arch"] == "dlib_resnet_v1" and m["opset"] == 17
    graph = m["graphs"]["model"]
    assert [i["name"] for i in graph["inputs"]] == ["image"]
    assert graph["inputs"][0]["shape"] == ["batch", 3, 150, 150]
    assert graph["outputs"][0]["shape"] == ["batch", 128]
    assert m["keypoints"]["used"] is False
    pre = m["preprocess"]
    assert pre["size"] == [150, 150] and pre["color"] == "RGB" and pre["std"] == [256.0] * 3
    assert pre["mean"] == [float(np.float32(v)) for v in (122.782, 117.001, 104.298)]
    assert m["embedding_size"] == 128
    assert m["verification"]["metric"] == "euclidean" and m["verification"]["threshold"] == 0.6
    assert 0.85 < m["threshold"] < 0.95
    align = m["alignment"]
    assert align["method"] == "dlib_face_chip" and (align["size"], align["padding"]) == (150, 0.25)
    src = m["source"]
    assert src["random_weights"] is False and src["sha256"] == sha256_file(require_package())
    w = m["weights"]
    assert (w["source"], w["package"], w["sha256"]) == (
        "package", "face-recognition-models 0.3.0", src["sha256"])
    assert (w["missing_keys"], w["unexpected_keys"]) == (0, 0)
    assert str(fixture()["model_sha256"]) == src["sha256"]
    assert m["parity"]["model"]["passed"]


def test_cosine_threshold_agrees_with_dlibs_distance_rule():
    """On dlib's own descriptors of real pairs, the manifest's cosine threshold (the SDK
    compares L2-normalised embeddings) decides as dlib's Euclidean 0.6 does."""
    from kpface.export.dlib_resnet import COSINE_THRESHOLD, DLIB_DISTANCE_THRESHOLD
    data = fixture()
    names = [str(s) for s in data["names"]]
    faces = [i for i, n in enumerate(names) if n != "noise"]
    person = {n: n.split("_")[0] for n in names}
    decided = 0
    for a in faces:
        for b in faces:
            if a >= b:
                continue
            da, db = data["descriptors"][a], data["descriptors"][b]
            dist = np.linalg.norm(da - db)
            cos = da @ db / np.linalg.norm(da) / np.linalg.norm(db)
            same = person[names[a]] == person[names[b]]
            assert (dist < DLIB_DISTANCE_THRESHOLD) == same, (names[a], names[b], dist)
            assert (cos >= COSINE_THRESHOLD) == same, (names[a], names[b], cos)
            decided += 1
    assert decided >= 10


def test_missing_package_is_one_clear_error(monkeypatch):
    from kpface.export import dlib_resnet

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(dlib_resnet.importlib.metadata, "distribution", missing)
    with pytest.raises(CheckpointError, match="pip install face-recognition-models==0.3.0"):
        dlib_resnet.packaged_weights()


def test_wrong_file_is_refused(tmp_path):
    """A .dat that is not this network (here: the 5-point shape predictor the same package
    ships) is refused with a CheckpointError, not loaded half-way."""
    path = require_package()
    from kpface.export.checkpoint import load_weights
    from kpface.export.dlib_resnet import DlibResNet
    other = tmp_path / "shape_predictor.dat"
    other.write_bytes(open(path.replace("dlib_face_recognition_resnet_model_v1",
                                        "shape_predictor_5_face_landmarks"), "rb").read(4096))
    with pytest.raises(CheckpointError, match="shape_predictor.dat"):
        load_weights(DlibResNet(), other, arch="dlib_resnet_v1")


def test_every_layer_setting_is_checked_against_the_model():
    """A file whose layers parse but whose settings differ from the torch model (a stride,
    a pooling size, the input means) is refused, naming the layer."""
    from kpface.export.dlib_dat import read_dnn
    from kpface.export.dlib_resnet import dlib_stack, net_to_state_dict
    path = require_package()
    assert len(net_to_state_dict(read_dnn(path, dlib_stack()))) == 117
    for layer_index, key, value, message in [(0, "stride_y", 1, "conv: stride_y = 1"),
                                             (3, "nr", 2, "pooling layers"),
                                             (-1, "num_outputs", 64, "fc: num_outputs = 64")]:
        net = read_dnn(path, dlib_stack())
        net.layers[layer_index].config[key] = value
        with pytest.raises(CheckpointError, match=message):
            net_to_state_dict(net)
    net = read_dnn(path, dlib_stack())
    net.input["avg_red"] = 128.0
    with pytest.raises(CheckpointError, match="input means"):
        net_to_state_dict(net)


def test_pipeline_feeds_dlib_its_face_chip(exported):
    """The pipeline crops for dlib_resnet_v1 as its manifest's alignment says: its embedding of
    the astronaut is the ONNX model run on kpface.facechip.face_chip's chip, normalised by hand
    as dlib's input layer does (raw descriptor: the manifest says normalize_embedding false)."""
    import onnxruntime as ort

    from kpface.errors import InputError
    from kpface.facechip import face_chip
    from kpface.models import load_recognizer
    from kpface.pipeline import Face, FacePipeline
    from kpface.samples import ASTRONAUT_BOX, ASTRONAUT_LANDMARKS, astronaut_bgr

    class Astronaut:
        def detect(self, image):
            return [Face(ASTRONAUT_BOX, 0.99, ASTRONAUT_LANDMARKS)]
    image = astronaut_bgr()
    rec = load_recognizer(exported, threads=1)
    pipe = FacePipeline(Astronaut(), rec)
    assert pipe.convention == "dlib_face_chip" and pipe.threshold == rec.threshold
    face = pipe(image, return_crops=True)[0]
    chip, _ = face_chip(image, ASTRONAUT_LANDMARKS)
    np.testing.assert_array_equal(face.crop, chip)
    sess = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(["embedding"], {"image": dlib_input(chip[None, :, :, ::-1])})[0][0]
    np.testing.assert_allclose(face.embedding, want, atol=1e-5)
    assert face.embedding.shape == (128,) and face.dense_landmarks is None
    with pytest.raises(InputError, match="dlib_face_chip"):
        FacePipeline(Astronaut(), rec, convention="square")
