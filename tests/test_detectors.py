"""Issue 3: RetinaFace, MTCNN and DFA export (parity), checkpoints, and the torch-free SDK."""
import importlib.metadata
import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from kpface.align import estimate_similarity, transform_points
from kpface.detect import (DFAKeypoints, Detection, MTCNNDetector, RetinaFaceDetector,
                           load_detector, load_keypoints)
from kpface.errors import CheckpointError, InputError, ModelError
from kpface.export import registry
from kpface.export.checkpoint import load_weights
from kpface.export.onnx_export import export_model
from kpface.landmarks import ARCFACE_TEMPLATE_112, LANDMARK_ORDER
from kpface.samples import ASTRONAUT_LANDMARKS, astronaut_bgr

try:
    importlib.metadata.distribution("facenet-pytorch")
    HAVE_FACENET = True
except importlib.metadata.PackageNotFoundError:
    HAVE_FACENET = False
needs_facenet = pytest.mark.skipif(not HAVE_FACENET, reason="facenet-pytorch wheel not installed")


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def mtcnn_dir(tmp_path_factory):
    if not HAVE_FACENET:
        pytest.skip("facenet-pytorch wheel not installed")
    out = tmp_path_factory.mktemp("det") / "mtcnn"
    export_model("mtcnn", out)
    return out


@pytest.fixture(scope="module")
def retina_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "retinaface"
    export_model("retinaface_mnet025", out)
    return out


@pytest.fixture(scope="module")
def dfa_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("kp") / "dfa"
    export_model("dfa_mnet025", out)
    return out


# --- export: parity and graph contract -------------------------------------------------------

def _assert_parity(manifest, graphs):
    assert set(manifest["parity"]) == set(graphs)
    for name in graphs:
        p = manifest["parity"][name]
        assert p["passed"] and p["batch"] != 2
        for out in p["outputs"].values():
            assert out["rel_max_diff"] <= 1e-4 and out["cosine"] >= 0.99999


def _shape(v):
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


def test_retinaface_export(retina_dir):
    from kpface.manifest import load_manifest
    m = load_manifest(retina_dir, task="detector")
    _assert_parity(m, ["model"])
    g = onnx.load(str(retina_dir / "model.onnx")).graph
    assert [(i.name, _shape(i)) for i in g.input] == [("image", ["batch", 3, "height", "width"])]
    assert [o.name for o in g.output] == ["loc", "conf", "landms"]
    assert m["preprocess"]["color"] == "BGR" and m["preprocess"]["mean"] == [104, 117, 123]
    assert m["priors"]["min_sizes"] == [[16, 32], [64, 128], [256, 512]]
    assert m["priors"]["steps"] == [8, 16, 32] and m["priors"]["variances"] == [0.1, 0.2]
    assert m["nms"]["iou"] == 0.4 and m["landmarks"]["order"] == list(LANDMARK_ORDER)


def test_retinaface_any_input_size(retina_dir):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(retina_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for h, w in ((480, 640), (100, 70)):
        loc, conf, landms = sess.run(None, {"image": np.zeros((1, 3, h, w), np.float32)})
        n = sum(2 * -(-h // s) * -(-w // s) for s in (8, 16, 32))
        assert loc.shape == (1, n, 4) and conf.shape == (1, n, 2) and landms.shape == (1, n, 10)
        np.testing.assert_allclose(conf.sum(-1), 1, atol=1e-5)


@needs_facenet
def test_mtcnn_export_with_packaged_weights(mtcnn_dir):
    from kpface.manifest import load_manifest
    m = load_manifest(mtcnn_dir, task="detector")
    _assert_parity(m, ["pnet", "rnet", "onet"])
    assert m["source"]["random_weights"] is False
    assert set(m["source"]["parts"]) == {"pnet", "rnet", "onet"}
    assert all(len(p["sha256"]) == 64 and not p["missing"] for p in m["source"]["parts"].values())
    import importlib.metadata
    w = m["weights"]  # the weights block: the package by name and version, each part's file
    assert (w["source"], w["package"], w["strict"]) == (
        "package", f"facenet-pytorch {importlib.metadata.version('facenet-pytorch')}", True)
    assert all(p["missing_keys"] == 0 and len(p["sha256"]) == 64 for p in w["parts"].values())
    assert set(m["files"]) == {"pnet.onnx", "rnet.onnx", "onet.onnx"}
    g = onnx.load(str(mtcnn_dir / "pnet.onnx")).graph
    assert _shape(g.input[0]) == ["batch", 3, "height", "width"]
    assert _shape(onnx.load(str(mtcnn_dir / "rnet.onnx")).graph.input[0]) == ["batch", 3, 24, 24]
    assert _shape(onnx.load(str(mtcnn_dir / "onet.onnx")).graph.input[0]) == ["batch", 3, 48, 48]


def test_dfa_export(dfa_dir):
    from kpface.manifest import load_manifest
    m = load_manifest(dfa_dir, task="keypoints")
    _assert_parity(m, ["model"])
    g = onnx.load(str(dfa_dir / "model.onnx")).graph
    assert [(i.name, _shape(i)) for i in g.input] == [("image", ["batch", 3, 160, 160])]
    assert [o.name for o in g.output] == ["landmarks", "aligned", "aligned_landmarks", "score",
                                          "theta"]
    names = {i.name for i in g.initializer}
    assert {"prior_centres", "prior_sizes", "base_grid"} <= names
    ops = {n.op_type for n in g.node}
    assert "GridSample" in ops and not ops & {"AffineGrid", "Range", "ConstantOfShape"}


def test_dfa_state_dict_matches_the_checkpoint_layout():
    model = registry.get("dfa_mnet025").factory()
    sd = model.state_dict()
    assert len(sd) == 338 and sum(k.endswith("num_batches_tracked") for k in sd) == 47
    assert sum(p.numel() for p in model.parameters()) == 486_775
    assert tuple(sd["aggregator.0.mlp_tokens.fc1.weight"].shape) == (8, 1050)
    assert tuple(sd["aggregator.3.weight"].shape) == (1, 16)
    assert "ssh1.conv7x7_3.0.weight" in sd and "LandmarkHead.2.conv1x1.bias" in sd


# --- DFA geometry against the specification ---------------------------------------------------

def _theta_from_spec(landmarks01):
    """Section 3.2: M by Umeyama in 160 px -> 112 px; theta = [k A^-1 | (2/160) A^-1 (56 - t) - 1]."""
    m = estimate_similarity(landmarks01 * 160, ARCFACE_TEMPLATE_112)
    a_inv = np.linalg.inv(m[:, :2])
    return np.concatenate([(112 / 160) * a_inv,
                           ((2 / 160) * a_inv @ (56 - m[:, 2]) - 1)[:, None]], axis=1), m


def test_dfa_theta_and_aligned_landmarks_follow_the_spec():
    model = registry.get("dfa_mnet025").factory().eval()
    rng = np.random.default_rng(3)
    lms = (ARCFACE_TEMPLATE_112 / 112 * 0.7 + 0.12)[None] + rng.normal(0, 0.02, (4, 5, 2))
    t = torch.tensor(lms, dtype=torch.float32)
    theta = model.similarity_theta(t).numpy()
    aligned = model.aligned_points(t, torch.tensor(theta)).numpy()
    for i in range(len(lms)):
        ref, m = _theta_from_spec(lms[i])
        np.testing.assert_allclose(theta[i], ref, atol=2e-5)
        np.testing.assert_allclose(aligned[i] * 112, transform_points(lms[i] * 160, m), atol=2e-3)


def test_dfa_warp_equals_affine_grid_sample():
    model = registry.get("dfa_mnet025").factory().eval()
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 160, 160, generator=gen) * 2 - 1
    theta = torch.tensor([[[0.6, 0.1, 0.05], [-0.1, 0.6, -0.02]],
                          [[0.8, -0.3, -0.4], [0.3, 0.8, 0.9]]])
    grid = F.affine_grid(theta, (2, 3, 112, 112), align_corners=True)
    ref = F.grid_sample(image + 1, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=True) - 1
    # Pixel noise turns float32 grid rounding (~1e-6 px) into ~1e-5 differences.
    torch.testing.assert_close(model.warp(image, theta), ref, atol=1e-4, rtol=0)


def test_dfa_decode_matches_numpy_postprocess():
    from kpface.postprocess import decode_boxes, decode_landmarks, prior_boxes
    model = registry.get("dfa_mnet025").factory().eval()
    gen = torch.Generator().manual_seed(1)
    loc, lm = torch.randn(1, 1050, 4, generator=gen), torch.randn(1, 1050, 10, generator=gen)
    boxes, points = model.decode(loc, lm)
    pri = prior_boxes(160, 160, [[64, 80], [96, 112], [128, 144]], [8, 16, 32])
    np.testing.assert_allclose(boxes[0].numpy(), decode_boxes(loc[0].numpy(), pri, [0.1, 0.2]),
                               atol=1e-6)
    np.testing.assert_allclose(points[0].numpy().reshape(-1, 5, 2),
                               decode_landmarks(lm[0].numpy(), pri, [0.1, 0.2]), atol=1e-6)


def test_dfa_onnx_aligned_crop_matches_numpy_warp(dfa_dir):
    """``aligned`` = the spec's sampling (u = 2p/size - 1 with align_corners grids), rebuilt
    with cv2.remap from the graph's own landmarks."""
    import cv2
    import onnxruntime as ort
    sess = ort.InferenceSession(str(dfa_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    low = np.random.default_rng(4).uniform(-1, 1, (20, 20, 3)).astype(np.float32)
    img = cv2.resize(low, (160, 160), interpolation=cv2.INTER_LINEAR)
    out = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {"image": img.transpose(2, 0, 1)[None]})))
    theta, m = _theta_from_spec(out["landmarks"][0].astype(np.float64))
    np.testing.assert_allclose(out["theta"][0], theta, atol=1e-5)
    np.testing.assert_allclose(out["aligned_landmarks"][0] * 112,
                               transform_points(out["landmarks"][0] * 160, m), atol=2e-3)
    q = np.arange(112, dtype=np.float64)
    v = np.stack(np.meshgrid(2 * q / 111 - 1, 2 * q / 111 - 1), -1)      # output grid
    u = v @ theta[:, :2].T + theta[:, 2]                                 # normalised input
    p = ((u + 1) * 159 / 2).astype(np.float32)                           # align_corners pixels
    ref = cv2.remap(img + 1, p[..., 0], p[..., 1], cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=0) - 1
    np.testing.assert_allclose(out["aligned"][0].transpose(1, 2, 0), ref, atol=1e-4)


# --- checkpoints: key remapping ---------------------------------------------------------------

def _randomised(model):
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return model


def test_retinaface_loads_module_prefixed_checkpoint(tmp_path):
    spec = registry.get("retinaface_mnet025")
    src = _randomised(spec.factory())
    # mobilenet0.25_Final.pth layout: DataParallel ``module.`` keys, no BN counters.
    state = {f"module.{k}": v for k, v in src.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "mobilenet0.25_Final.pth")
    dst = spec.factory()
    info = load_weights(dst, tmp_path / "mobilenet0.25_Final.pth", remap=spec.remap_keys,
                        arch=spec.name)
    assert info["missing"] == [] and info["unexpected"] == []
    for k, v in src.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(dst.state_dict()[k], v), k
    # CVLface retinaface-aligner layout: ``net.*``.
    torch.save({f"net.{k}": v for k, v in src.state_dict().items()}, tmp_path / "aligner.pt")
    load_weights(spec.factory(), tmp_path / "aligner.pt", remap=spec.remap_keys)


@pytest.mark.parametrize("prefix,suffix", [("net.", ".pt"), ("model.net.", ".safetensors")])
def test_dfa_loads_cvlface_checkpoints(tmp_path, prefix, suffix):
    spec = registry.get("dfa_mnet025")
    src = _randomised(spec.factory())
    state = {prefix + k: v.contiguous() for k, v in src.state_dict().items()}
    assert len(state) == 338
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
    dst = spec.factory()
    load_weights(dst, path, remap=spec.remap_keys, arch=spec.name)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_dfa_export_with_cvlface_weights(tmp_path):
    spec = registry.get("dfa_mnet025")
    src = spec.factory()
    torch.save({f"net.{k}": v for k, v in src.state_dict().items()}, tmp_path / "aligner.pt")
    m = export_model("dfa_mnet025", tmp_path / "dfa", weights=tmp_path / "aligner.pt")
    assert m["source"]["random_weights"] is False and m["source"]["tensors"] == 338
    assert m["parity"]["model"]["passed"]


def test_wrong_keys_fail_naming_them(tmp_path):
    spec = registry.get("retinaface_mnet025")
    state = {f"module.{k}": v for k, v in spec.factory().state_dict().items()}
    state["module.body.stage1.0.0.wieght"] = state.pop("module.body.stage1.0.0.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        export_model("retinaface_mnet025", tmp_path / "out", weights=tmp_path / "bad.pth")
    msg = str(err.value)
    assert "missing keys: body.stage1.0.0.weight" in msg
    assert "unexpected keys: body.stage1.0.0.wieght" in msg
    assert "\n" not in msg and not (tmp_path / "out").exists()
    # A RetinaFace checkpoint is not a DFA checkpoint: the aggregator keys are missing.
    torch.save(spec.factory().state_dict(), tmp_path / "retina.pth")
    with pytest.raises(CheckpointError, match="missing keys: aggregator"):
        export_model("dfa_mnet025", tmp_path / "out", weights=tmp_path / "retina.pth")


# --- SDK: MTCNN on a real face ------------------------------------------------------------------

@needs_facenet
def test_mtcnn_finds_the_astronaut(mtcnn_dir):
    det = load_detector(mtcnn_dir, threads=2)
    assert isinstance(det, MTCNNDetector)
    faces = det.detect(astronaut_bgr())
    assert len(faces) == 1
    f = faces[0]
    assert isinstance(f, Detection) and f.score > 0.99
    lm = f.landmarks
    assert lm.shape == (5, 2)
    err = np.linalg.norm(lm - ASTRONAUT_LANDMARKS, axis=1)
    assert err.max() < 6, err
    # Image-left eye first; eyes above the nose above the mouth.
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
    assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])
    x1, y1, x2, y2 = f.box
    assert x1 < lm[:, 0].min() and lm[:, 0].max() < x2 and y1 < lm[:, 1].min() and lm[:, 1].max() < y2


@needs_facenet
def test_mtcnn_no_face_gives_empty_list(mtcnn_dir):
    from skimage import data
    det = load_detector(mtcnn_dir, threads=2)
    assert det.detect(np.full((480, 640, 3), 128, np.uint8)) == []
    assert det.detect(np.ascontiguousarray(data.coffee()[..., ::-1])) == []
    assert det.detect(np.zeros((8, 8, 3), np.uint8)) == []  # smaller than the smallest face


@needs_facenet
def test_detector_rejects_bad_images(mtcnn_dir):
    det = load_detector(mtcnn_dir, threads=2)
    with pytest.raises(InputError, match="uint8"):
        det.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(InputError, match="HxWx3"):
        det.detect(np.zeros((64, 64), np.uint8))


# --- SDK: RetinaFace decoding on crafted network outputs ----------------------------------------

class _FakeSession:
    def __init__(self, outputs):
        self.outputs = outputs
        self.fed = None

    def run(self, feeds):
        self.fed = feeds
        return self.outputs


def test_retinaface_detector_decodes_and_maps_back(retina_dir):
    det = load_detector(retina_dir, threads=2)
    assert isinstance(det, RetinaFaceDetector) and (det.width, det.height) == (640, 480)
    n = len(det.priors)
    loc, landms = np.zeros((1, n, 4), np.float32), np.zeros((1, n, 10), np.float32)
    conf = np.tile(np.array([0.99, 0.01], np.float32), (1, n, 1))
    a = (10 * 80 + 20) * 2          # level 0, row 10, col 20, 16 px: centre (164, 84)
    b = (10 * 80 + 21) * 2          # its right neighbour, shifted 4 px left: IoU 0.6 with a
    c = (40 * 80 + 40) * 2 + 1      # below the score threshold
    conf[0, a], conf[0, b], conf[0, c] = [0.1, 0.9], [0.2, 0.8], [0.6, 0.4]
    loc[0, b, 0] = -2.5             # 4 px = 2.5 * 0.1 * 16
    landms[0, a] = [0.5, 0] * 5     # every point 0.8 px right of the centre
    det.session = _FakeSession({"loc": loc, "conf": conf, "landms": landms})
    image = np.zeros((960, 1280, 3), np.uint8)   # letterboxed at scale 0.5
    faces = det.detect(image)
    assert det.session.fed["image"].shape == (1, 3, 480, 640)
    assert len(faces) == 1 and faces[0].score == pytest.approx(0.9)
    # network px p -> image px (p + 0.5) / 0.5 - 0.5
    np.testing.assert_allclose(faces[0].box, [312.5, 152.5, 344.5, 184.5], atol=1e-3)
    np.testing.assert_allclose(faces[0].landmarks, [[330.1, 168.5]] * 5, atol=1e-3)
    # Letterbox keeps the aspect ratio, pads right/bottom with the mean colour (= 0 input).
    det.detect(np.full((480, 320, 3), 255, np.uint8))
    blob = det.session.fed["image"][0]
    assert blob[:, :, 320:].max() == 0 and blob[0, 0, 0] == pytest.approx(255 - 104)
    conf[0, :, 1] = 0.01
    assert det.detect(image) == []


# --- SDK: DFA keypoints ----------------------------------------------------------------------------

def test_dfa_keypoints_map_back_to_the_image(dfa_dir):
    kp = load_keypoints(dfa_dir, threads=2)
    assert isinstance(kp, DFAKeypoints) and kp.size == 160
    image = np.zeros((300, 360, 3), np.uint8)
    image[60:200, 80:220] = np.random.default_rng(5).integers(0, 255, (140, 140, 3))
    box = np.array([90.0, 70.0, 210.0, 190.0])
    pts = kp.predict(image, Detection(box, 0.9))
    assert pts.shape == (5, 2)
    # Shifting image and box together shifts the landmarks by the same amount.
    shifted = np.zeros_like(image)
    shifted[20:, 30:] = image[:-20, :-30]
    pts2 = kp.predict(shifted, box + [30, 20, 30, 20])
    np.testing.assert_allclose(pts2, pts + [30, 20], atol=1e-3)
    # The landmarks follow the crop: the network's [0, 1] output times 160, through M^-1.
    out = kp.run(image, [box])
    m = out["M"][0]
    np.testing.assert_allclose(transform_points(pts, m), out["landmarks"][0] * 160, atol=1e-3)
    many = kp.predict_many(image, [box, box + 5])
    assert many.shape == (2, 5, 2) and kp.predict_many(image, []).shape == (0, 5, 2)


def test_dfa_runs_all_faces_in_one_batched_call(dfa_dir):
    """The DFA graph's batch axis is dynamic: N boxes are one call, and each face gets what it
    gets alone."""
    kp = load_keypoints(dfa_dir, threads=2)
    image = astronaut_bgr()
    boxes = [np.array([180.0, 60.0, 267.0, 173.0]), np.array([150.0, 40.0, 300.0, 200.0]),
             np.array([10.0, 300.0, 120.0, 420.0])]
    alone = np.stack([kp.predict(image, b) for b in boxes])
    real, calls = kp.session, []

    class Spy:
        def run(self, feeds):
            calls.append(feeds["image"].shape[0])
            return real.run(feeds)
    kp.session = Spy()
    together = kp.predict_many(image, [Detection(b, 0.9) for b in boxes])
    assert calls == [3]
    np.testing.assert_allclose(together, alone, atol=1e-3)


def test_factories_check_the_task(retina_dir, dfa_dir):
    with pytest.raises(ModelError, match="expected a 'detector' model"):
        load_detector(dfa_dir)
    with pytest.raises(ModelError, match="expected a 'keypoints' model"):
        load_keypoints(retina_dir)


@needs_facenet
def test_sdk_runs_without_torch(mtcnn_dir, dfa_dir):
    code = (
        "import sys, numpy as np\n"
        "from kpface.samples import astronaut_bgr\n"
        "from kpface.detect import load_detector, load_keypoints\n"
        "import kpface.models.recognizer\n"
        "img = astronaut_bgr()\n"
        f"faces = load_detector({str(mtcnn_dir)!r}, threads=1).detect(img)\n"
        f"pts = load_keypoints({str(dfa_dir)!r}, threads=1).predict(img, faces[0])\n"
        "import kpface.align, kpface.postprocess\n"
        "assert len(faces) == 1 and pts.shape == (5, 2)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
