"""ONNX export of the recognizer: graph contract, precomputed constants, parity, manifest."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from kpface.errors import ModelError
from kpface.export.onnx_export import export_model
from kpface.manifest import load_manifest

from test_kprpe_spec import buckets_spec

RUNTIME_OPS = {"Range", "ConstantOfShape", "RandomUniform", "RandomNormal", "EyeLike"}


def test_graph_contract(tiny_recognizer):
    model = onnx.load(str(tiny_recognizer / "model.onnx"))
    assert model.opset_import[0].version >= 17
    g = model.graph

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    assert [(i.name, shape(i)) for i in g.input] == [
        ("image", ["batch", 3, 112, 112]), ("keypoints", ["batch", 5, 2])]
    assert [(o.name, shape(o)) for o in g.output] == [("embedding", ["batch", 512])]
    assert not RUNTIME_OPS & {n.op_type for n in g.node}


def test_geometry_is_stored_as_initializers(tiny_recognizer):
    g = onnx.load(str(tiny_recognizer / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    grid = inits["rpe.grid"].reshape(196, 2)
    c = np.array([(2 * k + 1) / 28 for k in range(14)])
    np.testing.assert_allclose(grid[:, 0], np.tile(c, 14), atol=1e-7)   # x = column
    np.testing.assert_allclose(grid[:, 1], np.repeat(c, 14), atol=1e-7)  # y = row
    depth, heads, side = 2, 2, 14  # the tiny model
    spec = buckets_spec()
    # Block d's table row ((ci*14 + ri)*H + h)*7 + a holds the biases of one key row (14
    # keys): expand_index_d[ci, (h, a, cj)] names the keypoint-linear row it reads; block d's
    # bias[h, i, rj*14 + cj] is table row gather_index[h, i, rj], column cj.
    # (expand_index_d is folded into block d's MatMul weight at export: read the module's.)
    from kpface.export.kprpe import KPRPE
    rpe = KPRPE(side, depth, heads)
    index = inits["rpe.gather_index"].reshape(heads, 196, side)
    np.testing.assert_array_equal(index.ravel(), rpe.gather_index.numpy())
    ri, ci = np.divmod(np.arange(196), side)
    for h in range(heads):
        want = ((ci * side + ri) * heads + h)[:, None]
        np.testing.assert_array_equal(index[h] // 7, np.broadcast_to(want, index[h].shape))
    for d in range(depth):
        expand = getattr(rpe, f"expand_index_{d}").numpy().reshape(side, heads, 7, side)
        for h in range(heads):
            feature = expand[ci[:, None, None], h, (index[h] % 7)[:, :, None],
                             np.arange(side)[None, None, :]]            # [i, rj, cj]
            np.testing.assert_array_equal(feature.reshape(196, 196),
                                          (d * heads + h) * 49 + spec)
    gathers = [n for n in g.node if n.op_type == "Gather" and "rpe.gather_index" in n.input]
    assert len(gathers) == depth  # one per block


def test_manifest_records_parity_and_hashes(tiny_recognizer):
    m = load_manifest(tiny_recognizer, task="recognizer")
    p = m["parity"]["model"]
    assert p["passed"] and p["batch"] != 2  # checked at a batch size other than the traced one
    out = p["outputs"]["embedding"]
    assert out["rel_max_diff"] <= 1e-4 and out["cosine"] >= 0.99999
    assert m["source"]["random_weights"] is True
    w = m["weights"]  # the block every reader goes through (kpface.weights)
    assert (w["source"], w["seed"]) == ("random", 0)
    assert w["init"]["keypoint_linear"]["weight"].startswith("normal(0, ")
    assert m["preprocess"]["color"] == "RGB" and m["embedding_size"] == 512
    assert m["opset"] >= 17 and len(m["files"]["model.onnx"]) == 64


def test_dynamic_batch_runs(tiny_recognizer):
    sess = ort.InferenceSession(str(tiny_recognizer / "model.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 5):
        out = sess.run(None, {"image": np.zeros((b, 3, 112, 112), np.float32),
                              "keypoints": np.full((b, 5, 2), 0.5, np.float32)})[0]
        assert out.shape == (b, 512)


def test_keypoints_change_the_embedding(tmp_path):
    """KP-RPE is live in the graph: moving landmarks moves the output."""
    from kpface.export import registry
    from kpface.export.checkpoint import save_weights
    spec = registry.get("vit_kprpe_tiny")
    model = spec.factory()
    torch.nn.init.normal_(model.keypoint_linear.weight, std=0.5)
    w = tmp_path / "w.safetensors"
    save_weights(model, w, arch=spec.name)
    export_model("vit_kprpe_tiny", tmp_path / "m", weights=w)
    sess = ort.InferenceSession(str(tmp_path / "m/model.onnx"), providers=["CPUExecutionProvider"])
    img = np.random.default_rng(0).uniform(-1, 1, (1, 3, 112, 112)).astype(np.float32)
    a = sess.run(None, {"image": img, "keypoints": np.full((1, 5, 2), 0.4, np.float32)})[0]
    b = sess.run(None, {"image": img, "keypoints": np.full((1, 5, 2), 0.6, np.float32)})[0]
    assert np.abs(a - b).max() > 1e-3


def test_tampered_model_is_refused(tiny_recognizer, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_recognizer, copy)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ModelError, match="does not match its manifest"):
        load_manifest(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(ModelError, match="model.onnx is missing"):
        load_manifest(copy)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import kpface.export.onnx_export as ex
    monkeypatch.setattr(ex, "PARITY_MIN_COSINE", 1.5)  # impossible gate
    with pytest.raises(ex.ParityError, match="nothing was written"):
        export_model("vit_kprpe_tiny", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["vit_kprpe_small", "vit_small"])
def test_small_parity(arch, tmp_path):
    m = export_model(arch, tmp_path / arch)
    out = m["parity"]["model"]["outputs"]["embedding"]
    assert m["parity"]["model"]["passed"]
    assert out["rel_max_diff"] <= 1e-4 and out["cosine"] >= 0.99999
    assert json.loads((tmp_path / arch / "manifest.json").read_text())["arch"] == arch
