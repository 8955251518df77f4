"""Part fViT: ONNX export in both sampling forms, the graph contract, parity, the manifest, and
checkpoint loading (official supervised files, kpface safetensors, self-supervised files)."""
import argparse
import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from kpface.errors import CheckpointError, InputError
from kpface.export import registry
from kpface.export.checkpoint import load_weights, save_weights
from kpface.export.onnx_export import compare_outputs, export_model
from kpface.manifest import load_manifest

from test_part_fvit import build, face_like

RUNTIME_OPS = {"Range", "ConstantOfShape", "RandomUniform", "RandomNormal", "EyeLike"}
ARCH = "part_fvit_tiny"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """part_fvit_tiny (seeded random weights) exported in both forms: {form: model dir}."""
    root = tmp_path_factory.mktemp("part_fvit")
    weights = root / "w.safetensors"
    save_weights(build(ARCH, seed=2), weights, arch=ARCH)
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    dirs = {}
    for form in ("gridsample", "gather"):
        export_model(ARCH, root / form, weights=weights, options={"sampling": form})
        dirs[form] = root / form
    return dirs


def session(model_dir):
    return ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("form", ["gridsample", "gather"])
def test_graph_contract(exported, form):
    model = onnx.load(str(exported[form] / "model.onnx"))
    g = model.graph

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    assert [(i.name, shape(i)) for i in g.input] == [("image", ["batch", 3, 112, 112])]
    assert [(o.name, shape(o)) for o in g.output] == [
        ("embedding", ["batch", 64]), ("landmarks", ["batch", 196, 2])]
    ops = [n.op_type for n in g.node]
    assert not RUNTIME_OPS & set(ops)
    assert ops.count("Shape") <= 2  # the batch size, for the CLS token and the landmarks
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    if form == "gridsample":
        assert model.opset_import[0].version >= 16 and ops.count("GridSample") == 1
        # Offset tile [a, 0, b] = (a - 4, b - 4): patch row a steps along image x.
        o = np.arange(8) - 4.0
        expected = np.stack(np.meshgrid(o, o, indexing="ij"), -1)[:, None]
        np.testing.assert_array_equal(inits["patch_offsets"], expected)
        node = next(n for n in g.node if n.op_type == "GridSample")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["align_corners"] == 0 and attrs["padding_mode"] == b"zeros"
    else:
        assert "GridSample" not in ops and ops.count("GatherElements") == 1
        np.testing.assert_array_equal(inits["window_steps"], np.tile(np.arange(9) - 4.0, (2, 1)))


@pytest.mark.parametrize("form", ["gridsample", "gather"])
def test_manifest_records_form_parity_and_preprocessing(exported, form):
    m = load_manifest(exported[form], task="recognizer")
    assert m["export_options"] == {"sampling": form}
    p = m["parity"]["model"]
    assert p["passed"] and p["batch"] != 2
    for name in ("embedding", "landmarks"):
        assert p["outputs"][name]["rel_max_diff"] <= 1e-4
        assert p["outputs"][name]["cosine"] >= 0.99999
    pre = m["preprocess"]
    assert pre["color"] == "RGB" and pre["range"] == [-1.0, 1.0]
    assert pre["mean"] == [127.5] * 3 and pre["std"] == [127.5] * 3
    assert m["mirror_sum"] is False and m["embedding_size"] == 64
    assert m["landmarks"]["count"] == 196 and m["keypoints"]["used"] is False
    assert m["source"]["random_weights"] is False


@pytest.mark.parametrize("form", ["gridsample", "gather"])
def test_onnx_matches_torch_in_both_forms_and_batches(exported, form):
    """Both graphs against the torch model in the official (GridSample) form."""
    model = build(ARCH, seed=2)
    sess = session(exported[form])
    for batch in (1, 5):
        image = face_like(batch, seed=batch)
        with torch.no_grad():
            emb, points = model(image)
        got_emb, got_points = sess.run(["embedding", "landmarks"], {"image": image.numpy()})
        for ref, got in ((emb, got_emb), (points, got_points)):
            c = compare_outputs(ref.numpy(), got)
            assert c["rel_max_diff"] <= 1e-4 and c["cosine"] >= 0.99999, c


def test_unknown_export_options_are_refused(tmp_path):
    with pytest.raises(InputError, match="sampling=gridsample|gather"):
        export_model(ARCH, tmp_path / "x", options={"sampling": "nearest"})
    with pytest.raises(InputError, match="no export option"):
        export_model("vit_kprpe_tiny", tmp_path / "y", options={"sampling": "gather"})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- checkpoints ------------------------------------------------------------------------------

def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def official_state(model, num_class=10):
    """Section 4.2: DataParallel keys ``module.*`` with the CosFace head ``loss.weight``."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.loss.weight"] = torch.randn(num_class, model.cfg.dim)
    return state


def test_official_supervised_file_loads_strictly_without_its_head(tmp_path, caplog):
    spec, src = registry.get(ARCH), build(ARCH, seed=3)
    path = tmp_path / "Backbone_VIT_land_8_Epoch_34_checkpoint.pth"
    torch.save(official_state(src), path)
    dst = spec.factory()
    with caplog.at_level(logging.INFO, logger="kpface.export.part_fvit"):
        info = load_weights(dst, path, remap=spec.remap_keys, arch=ARCH)
    assert same_weights(src, dst) and info["missing"] == [] and info["unexpected"] == []
    assert any("loss.weight [10, 64]" in r.getMessage() for r in caplog.records)


def test_kpface_safetensors_round_trip(tmp_path):
    spec, src = registry.get(ARCH), build(ARCH, seed=4)
    path = tmp_path / "w.safetensors"
    save_weights(src, path, arch=ARCH)
    dst = spec.factory(sampling="gather")  # the same weights serve both forms
    load_weights(dst, path, remap=spec.remap_keys, arch=ARCH)
    assert same_weights(src, dst)
    with pytest.raises(CheckpointError, match="part_fvit_tiny.*not 'part_fvit'"):
        load_weights(registry.get("part_fvit").factory(), path, arch="part_fvit")


def test_wrong_keys_and_shapes_are_named(tmp_path):
    spec = registry.get(ARCH)
    state = official_state(spec.factory())
    del state["module.stn.features.3.conv.0.weight"]
    state["module.mask_token"] = torch.zeros(1, 1, 64)  # SimMIM classes only (section 3.1)
    torch.save(state, tmp_path / "keys.pth")
    with pytest.raises(CheckpointError) as e:
        load_weights(spec.factory(), tmp_path / "keys.pth", remap=spec.remap_keys, arch=ARCH)
    assert "missing keys: stn.features.3.conv.0.weight" in str(e.value)
    assert "unexpected keys: mask_token" in str(e.value)
    state = official_state(spec.factory())
    state["module.transformer.layers.0.0.fn.fn.to_qkv.weight"] = torch.zeros(192, 64)
    torch.save(state, tmp_path / "shapes.pth")
    with pytest.raises(CheckpointError, match="wrong shape.*to_qkv.weight"):
        load_weights(spec.factory(), tmp_path / "shapes.pth", remap=spec.remap_keys, arch=ARCH)


def ssl_file(path, model):
    """Section 4.3: what lafs_train.py saves; the backbone has no landmark CNN."""
    vit = {f"backbone.{k}": v for k, v in model.state_dict().items()
           if not k.startswith(("stn.", "output_layer."))}
    vit["head.last_layer.weight_g"] = torch.ones(100, 1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    torch.save({"student": {f"module.{k}": v for k, v in vit.items()}, "teacher": vit,
                "optimizer": opt.state_dict(), "epoch": 41,
                "args": argparse.Namespace(out_dim=100000, lr=5e-4),
                "dino_loss": {"center": torch.zeros(1, 100)}}, path)


def test_self_supervised_file_is_refused_in_one_line(tmp_path):
    spec = registry.get(ARCH)
    path = tmp_path / "checkpoint0040.pth"
    ssl_file(path, spec.factory())
    with pytest.raises(CheckpointError, match="self-supervised.*no landmark CNN") as e:
        load_weights(spec.factory(), path, remap=spec.remap_keys, arch=ARCH)
    assert "\n" not in str(e.value)


def test_cli_export_with_option_and_ssl_refusal(tmp_path, capsys):
    from kpface.cli import main
    ssl_file(tmp_path / "ssl.pth", registry.get(ARCH).factory())
    rc = main(["-q", "export", "recognizer", "--arch", ARCH, "--weights",
               str(tmp_path / "ssl.pth"), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "self-supervised" in err[0]
    rc = main(["-q", "export", "recognizer", "--arch", ARCH, "--option", "sampling",
               "--out", str(tmp_path / "m")])
    assert rc == 2 and "NAME=VALUE" in capsys.readouterr().err
    rc = main(["-q", "export", "recognizer", "--arch", ARCH, "--option", "sampling=gather",
               "--out", str(tmp_path / "m")])
    assert rc == 0
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["export_options"] == {"sampling": "gather"}


# --- in the pipeline: dense landmarks on Face, mirror_sum ------------------------------------

def _reference(model_dir, image, landmarks):
    """Independent: skimage's Umeyama onto the ArcFace template, cv2.warpAffine, a hand
    normalisation to [-1, 1] RGB, raw ONNX Runtime. Returns (the network input [1, 3, 112,
    112], the similarity image -> crop)."""
    import cv2
    from skimage.transform import SimilarityTransform

    from kpface.landmarks import ARCFACE_TEMPLATE_112
    t = SimilarityTransform.from_estimate(landmarks.astype(np.float64),
                                          ARCFACE_TEMPLATE_112.astype(np.float64))
    crop = cv2.warpAffine(image, t.params[:2], (112, 112), flags=cv2.INTER_LINEAR, borderValue=0)
    x = (crop[:, :, ::-1].astype(np.float32) - 127.5) / 127.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), t


def _pipeline(model_dir, manifest=None):
    from kpface.models import Recognizer
    from kpface.pipeline import Face, FacePipeline
    from kpface.samples import ASTRONAUT_BOX, ASTRONAUT_LANDMARKS

    class Astronaut:
        def detect(self, image):
            return [Face(ASTRONAUT_BOX, 0.99, ASTRONAUT_LANDMARKS)]
    return FacePipeline(Astronaut(), Recognizer(model_dir, threads=1, manifest=manifest))


def test_pipeline_maps_the_196_landmarks_back_to_the_image(exported):
    from kpface.samples import ASTRONAUT_LANDMARKS, astronaut_bgr
    model_dir = exported["gridsample"]
    image = astronaut_bgr()
    face = _pipeline(model_dir)(image)[0]
    x, t = _reference(model_dir, image, ASTRONAUT_LANDMARKS)
    emb, pts = session(model_dir).run(["embedding", "landmarks"], {"image": x})
    want = emb[0] / np.linalg.norm(emb[0])
    assert float(face.embedding @ want) > 0.9999
    assert face.dense_landmarks.shape == (196, 2)
    np.testing.assert_allclose(face.dense_landmarks, t.inverse(pts[0].astype(np.float64)),
                               atol=0.02)
    # Back in the crop they span it (the model min-max rescales its 392 numbers to [0, 111]).
    in_crop = t(face.dense_landmarks.astype(np.float64))
    np.testing.assert_allclose([in_crop.min(), in_crop.max()], [0, 111], atol=0.05)
    assert len(face.to_dict()["dense_landmarks"]) == 196


def test_mirror_sum_adds_the_mirror_view_before_normalising(exported):
    from kpface.samples import ASTRONAUT_LANDMARKS, astronaut_bgr
    model_dir = exported["gridsample"]
    image = astronaut_bgr()
    manifest = load_manifest(model_dir, task="recognizer")
    single = _pipeline(model_dir)(image)[0]
    calls = []
    pipe = _pipeline(model_dir, dict(manifest, mirror_sum=True))
    real = pipe.recognizer.session

    class Spy:
        def run(self, feeds):
            calls.append(feeds["image"].shape[0])
            return real.run(feeds)
    pipe.recognizer.session = Spy()
    both = pipe(image)[0]
    assert calls == [2]  # the face and its mirror in one call
    x, _ = _reference(model_dir, image, ASTRONAUT_LANDMARKS)
    sess = session(model_dir)
    raw = sess.run(["embedding"], {"image": x})[0][0] + \
        sess.run(["embedding"], {"image": np.ascontiguousarray(x[..., ::-1])})[0][0]
    want = raw / np.linalg.norm(raw)
    np.testing.assert_allclose(both.embedding, want, atol=2e-5)
    # The mirror view counts (little, with random weights: the CLS token dominates).
    assert np.abs(single.embedding - want).max() > 1e-4
    np.testing.assert_allclose(both.dense_landmarks, single.dense_landmarks, atol=1e-3)


def test_run_draw_shows_the_196_points(models_dir, exported, astronaut_png, tmp_path):
    """`kpface run --draw` with Part fViT as the recognizer: MTCNN finds the face, the JSON
    carries its 196 points in image pixels and the drawing has a dot at each of them."""
    import shutil

    import cv2

    from test_cli import kpface
    models = tmp_path / "models"
    shutil.copytree(models_dir / "detector", models / "detector")
    shutil.copytree(exported["gather"], models / "recognizer")
    code, out, err = kpface("run", astronaut_png, "--models", models, "--json",
                            tmp_path / "f.json", "--draw", tmp_path / "d.png")
    assert code == 0, err
    face = json.loads((tmp_path / "f.json").read_text())["images"][str(astronaut_png)][0]
    points = np.array(face["dense_landmarks"])
    assert points.shape == (196, 2)
    x1, y1, x2, y2 = face["box"]
    inside = ((points[:, 0] > x1 - 20) & (points[:, 0] < x2 + 20) & (points[:, 1] > y1 - 20)
              & (points[:, 1] < y2 + 20))
    assert inside.mean() > 0.9  # the points lie on the face the detector found
    drawn, original = cv2.imread(str(tmp_path / "d.png")), cv2.imread(str(astronaut_png))
    xy = np.round(points).astype(int)
    dots = (drawn[xy[:, 1], xy[:, 0]] == (200, 200, 200)).all(axis=1)
    assert dots.mean() > 0.8  # a few may sit under the box or the five landmarks
    changed = (drawn != original).any(axis=2)
    assert changed[xy[:, 1], xy[:, 0]].all()
