"""The performance work of issue 12: external weight files, the exported head, the KP-RPE
bias layout, ONNX Runtime's fused attention, page release for mapped weights, the greedy NMS
fast path. Speed and memory are reported by ``kpface bench``, never asserted here; these tests
check that each change computes what it replaced."""
import logging
import mmap
import os
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch

from kpface.export.onnx_export import export_model
from kpface.export.vit import FaceViT, ViTConfig, fold_batchnorm
from kpface.manifest import load_manifest
from kpface.runtimes import onnxfile, ort_attention, pages
from kpface.runtimes.onnxruntime_rt import OrtSession
from runtimes_support import export_realistic_tiny, realistic_tiny



def _feeds(batch=3, seed=0):
    rng = np.random.default_rng(seed)
    base = np.array([[0.342, 0.462], [0.657, 0.460], [0.5, 0.64], [0.371, 0.825],
                     [0.632, 0.824]], np.float32)
    return {"image": rng.uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32),
            "keypoints": (base + rng.uniform(-0.04, 0.04, (batch, 5, 2))).astype(np.float32)}


def _run(path, feeds):
    sess = OrtSession(path, threads=2)
    return sess.run({n: feeds[n] for n in sess.input_names})["embedding"]


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """vit_kprpe_tiny with a non-zero keypoint linear (the KP-RPE path is on)."""
    return export_realistic_tiny(tmp_path_factory.mktemp("perf") / "recognizer")


@pytest.fixture(scope="module")
def plain_tiny(tmp_path_factory):
    """The same tiny ViT without KP-RPE."""
    from kpface.export import registry, vit
    registry.archs()
    vit._register("vit_tiny_plain_perf_test", "test", embed_dim=64, depth=2, num_heads=2,
                  mlp_ratio=2.0, kprpe=False)
    out = tmp_path_factory.mktemp("perf") / "plain"
    try:
        logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
        export_model("vit_tiny_plain_perf_test", out)
    finally:
        registry._ARCHS.pop("vit_tiny_plain_perf_test", None)
    return out


# --- the exported head --------------------------------------------------------------------

def test_export_head_is_the_feature_head_in_eval_mode(monkeypatch):
    import kpface.export.vit as vit
    monkeypatch.setattr(vit, "HEAD_SLICE_BYTES", 2 ** 20)  # several slices for a tiny head
    torch.manual_seed(3)
    model = FaceViT(ViTConfig(embed_dim=64, depth=1, num_heads=2, mlp_ratio=1.0)).eval()
    for bn in (model.feature[1], model.feature[3]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(4, 64 * 196, dtype=torch.float64)
    with torch.no_grad():
        model.double()
        # Independent: BatchNorm1d's eval formula written out.
        h = x @ model.feature[0].weight.T
        bn = model.feature[1]
        h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        h = h @ model.feature[2].weight.T
        bn = model.feature[3]
        want = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        got = model.export_head(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    w, b = fold_batchnorm(model.feature[0], model.feature[1])
    assert w.shape == model.feature[0].weight.shape and b.shape == (512,)


def test_exported_head_is_sliced_and_batchnorm_free(realistic):
    g = onnx.load(str(realistic / "model.onnx")).graph
    ops = [n.op_type for n in g.node]
    assert "BatchNormalization" not in ops
    # The tiny head (64*196 x 512 fp32 = 25.7 MB) is one slice; no Add chain that ONNX
    # Runtime would fuse into Gemms with a non-constant C.
    heads = [i for i in g.initializer if list(i.dims) == [64 * 196, 512]]
    assert len(heads) == 1


# --- the KP-RPE key-row layout ------------------------------------------------------------

def test_kprpe_export_matches_torch_with_a_live_keypoint_path(realistic):
    m = load_manifest(realistic)
    out = m["parity"]["model"]["outputs"]["embedding"]
    assert out["rel_max_diff"] <= 1e-4 and out["cosine"] >= 0.99999
    model = realistic_tiny()
    feeds = _feeds(4, seed=7)
    with torch.no_grad():
        ref = model(torch.from_numpy(feeds["image"]), torch.from_numpy(feeds["keypoints"]))
    got = _run(realistic / "model.onnx", feeds)
    np.testing.assert_allclose(got, ref.numpy(), atol=2e-4 * float(ref.abs().max()))
    # The landmarks matter (the bias path is on).
    moved = dict(feeds, keypoints=feeds["keypoints"] + 0.05)
    assert np.abs(_run(realistic / "model.onnx", moved) - got).max() > 1e-3


# --- external weights ---------------------------------------------------------------------

def test_large_graphs_keep_weights_beside_them(tmp_path, monkeypatch, realistic):
    monkeypatch.setattr(onnxfile, "EXTERNAL_MIN_BYTES", 0)
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    out = tmp_path / "ext"
    m = export_model("vit_kprpe_tiny", out, weights=realistic.with_name("recognizer.safetensors"))
    assert set(m["files"]) == {"model.onnx", "model.onnx.data"}
    assert m["graphs"]["model"]["data_files"] == ["model.onnx.data"]
    assert m["graphs"]["model"]["bytes"] == onnxfile.nbytes(out / "model.onnx")
    assert (out / "model.onnx").stat().st_size < 200_000  # the graph alone
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset"))
               for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert offsets and all(o % onnxfile.ALIGN == 0 for o in offsets)
    feeds = _feeds()
    np.testing.assert_array_equal(_run(out / "model.onnx", feeds),
                                  _run(realistic / "model.onnx", feeds))
    # Copies carry the data file, under the new name when the graph is renamed.
    assert onnxfile.copy(out / "model.onnx", tmp_path / "model.onnx") == \
        ["model.onnx", "model.onnx.data"]
    assert onnxfile.copy(out / "model.onnx", tmp_path / "other.onnx") == \
        ["other.onnx", "other.onnx.data"]
    np.testing.assert_array_equal(_run(tmp_path / "other.onnx", feeds),
                                  _run(realistic / "model.onnx", feeds))
    # A hash mismatch of the data file is refused like one of the graph.
    with open(out / "model.onnx.data", "r+b") as f:
        f.seek(5000)
        f.write(b"\x01\x02")
    from kpface.errors import ModelError
    with pytest.raises(ModelError, match="model.onnx.data does not match"):
        load_manifest(out)


def test_order_as_needed_runs_each_bias_just_before_its_block(realistic):
    from kpface.runtimes import floatscope
    from kpface.runtimes.onnxruntime_rt import describe
    model = onnx.load(str(realistic / "model.onnx"))
    # Breadth-first, as onnxruntime.quantization writes nodes: everything that depends on the
    # keypoints alone (every block's table and bias) first.
    early = set(floatscope.kprpe_path(describe(model)))
    nodes = list(model.graph.node)
    model.graph.ClearField("node")
    model.graph.node.extend([n for n in nodes if n.name in early or n.op_type == "Constant"]
                            + [n for n in nodes if n.name not in early and n.op_type != "Constant"])
    gathers = [i for i, n in enumerate(model.graph.node) if "rpe.gather_index" in n.input]
    softmax = [i for i, n in enumerate(model.graph.node) if n.op_type == "Softmax"]
    assert max(gathers) < min(softmax)  # all biases before the first block
    onnxfile.order_as_needed(model)
    onnx.checker.check_model(model)
    gathers = [i for i, n in enumerate(model.graph.node) if "rpe.gather_index" in n.input]
    softmax = [i for i, n in enumerate(model.graph.node) if n.op_type == "Softmax"]
    assert len(gathers) == len(softmax) == 2
    assert gathers[0] < softmax[0] < gathers[1] < softmax[1]  # one bias alive at a time
    feeds = _feeds()
    path = realistic.parent / "reordered.onnx"
    onnxfile.save(model, path)
    np.testing.assert_array_equal(_run(path, feeds), _run(realistic / "model.onnx", feeds))


# --- ONNX Runtime's fused attention -------------------------------------------------------

@pytest.mark.parametrize("form", ort_attention.FORMS)
def test_fused_attention_matches_the_portable_graph(realistic, plain_tiny, tmp_path, form):
    feeds = _feeds(3, seed=2)
    plain = plain_tiny / "model.onnx"
    for src in (realistic / "model.onnx", plain):
        model = onnx.load(str(src))
        done = ort_attention.fuse(model, form)
        assert done == {"form": form, "blocks": 2, "unmatched": 0}
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("Attention" if form == "attention" else "MultiHeadAttention") == 2
        assert "Softmax" not in ops
        onnxfile.save(model, tmp_path / f"{src.parent.name}-{form}.onnx")
        got = _run(tmp_path / f"{src.parent.name}-{form}.onnx", feeds)
        ref = _run(src, feeds)
        np.testing.assert_allclose(got, ref, atol=1e-5 * float(np.abs(ref).max()))


def test_fused_attention_builds_record_it_and_pass_their_gates(realistic, tmp_path):
    from kpface.runtimes.build import build
    from kpface.runtimes.session import open_session
    d = tmp_path / "recognizer"
    shutil.copytree(realistic, d, ignore=shutil.ignore_patterns("builds"))
    feeds = _feeds(4, seed=3)
    ref = _run(d / "model.onnx", feeds)
    for precision in ("fp32", "int8"):
        info = build(d, "onnxruntime", precision, detector=None, n_calib=32, n_heldout=16,
                     threads=2, options={"attention": "fused"})
        assert info["gate"] == "passed" and info["options"] == {"attention": "fused"}
        assert info["graphs"]["model"]["attention"]["blocks"] == 2
        sess = open_session(d, "onnxruntime", precision, threads=2)
        got = sess.run(feeds)["embedding"]
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > (0.99999 if precision == "fp32" else 0.97)
    # ONNX Runtime fp32 now opens the fused build; exported=True still opens model.onnx.
    assert open_session(d, threads=2)._sess._model_path.endswith(
        os.path.join("builds", "onnxruntime-fp32-cpu", "model.onnx"))
    assert open_session(d, threads=2, exported=True)._sess._model_path == str(d / "model.onnx")
    from kpface.errors import InputError
    with pytest.raises(InputError, match="fp32 and int8"):
        build(d, "onnxruntime", "fp16", detector=None, options={"attention": "fused"})


# --- page release -------------------------------------------------------------------------

def _file_rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc, madvise)")
def test_dropped_pages_leave_the_data_intact(tmp_path):
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 255, 64 * 2 ** 20, dtype=np.uint8)
    data.tofile(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    view = np.frombuffer(mm, dtype=np.uint8)
    before = _file_rss_kb()
    assert int(view[::4096].sum()) >= 0  # touch every page
    touched = _file_rss_kb()
    assert touched - before > 48 * 1024
    with pages.PageDropper([path]) as dropper:
        pass
    assert dropper.bytes_mapped >= 64 * 2 ** 20
    assert touched - _file_rss_kb() > 48 * 1024  # the pages left this process
    np.testing.assert_array_equal(view, data)   # and read back unchanged
    # A writable mapping is never advised.
    other = tmp_path / "scratch.bin"
    data[: 2 ** 20].tofile(other)
    with open(other, "r+b") as f:
        rw = mmap.mmap(f.fileno(), 0)
    assert pages.read_only_mappings([path]) and not pages.read_only_mappings([other])
    del view
    rw.close()
    mm.close()


# --- greedy NMS ---------------------------------------------------------------------------

def _nms_spec(boxes, scores, thr, mode, offset):
    """Greedy NMS one pair at a time, from the definition."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        ok = True
        for k in keep:
            w = max(min(boxes[i][2], boxes[k][2]) - max(boxes[i][0], boxes[k][0]) + offset, 0)
            h = max(min(boxes[i][3], boxes[k][3]) - max(boxes[i][1], boxes[k][1]) + offset, 0)
            inter = w * h
            area = [max(b[2] - b[0] + offset, 0) * max(b[3] - b[1] + offset, 0)
                    for b in (boxes[i], boxes[k])]
            denom = min(area) if mode == "min" else sum(area) - inter
            if denom > 0 and inter / denom > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_nms_fast_path_is_greedy_nms(monkeypatch):
    import kpface.postprocess as pp
    rng = np.random.default_rng(1)
    for trial in range(60):
        n = int(rng.integers(2, 120))
        xy = rng.uniform(0, 60, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 25, (n, 2))], 1)
        if trial % 4 == 0:
            boxes[: n // 3] = boxes[0]
        scores = np.round(rng.random(n), 1)  # ties
        for mode in ("union", "min"):
            for offset in (0.0, 1.0):
                thr = float(rng.choice([0.3, 0.5, 0.7]))
                want = _nms_spec(boxes.tolist(), scores.tolist(), thr, mode, offset)
                for limit in (pp.NMS_MATRIX_MAX, 0):  # the fast path and the loop
                    monkeypatch.setattr(pp, "NMS_MATRIX_MAX", limit)
                    got = pp.nms(boxes, scores, thr, mode=mode, offset=offset)
                    assert got.tolist() == want


# --- the README's measured block ----------------------------------------------------------

def test_readme_measured_block_is_generated_from_the_committed_report():
    import json
    from pathlib import Path

    from kpface.bench.readme import BEGIN, END, measured_block
    root = Path(__file__).resolve().parents[1]
    report_path = root / "docs" / "measurements" / "bench-report.json"
    report = json.loads(report_path.read_text())
    assert report["kind"] == "kpface-bench" and report["results"]
    readme = (root / "README.md").read_text()
    block = readme.split(BEGIN)[1].split(END)[0]
    assert block.strip() == measured_block(
        report, "docs/measurements/bench-report.json").strip()
    # Every latency in the block is one of the report's own.
    assert report["date"] in block


# --- MTCNN: the pyramid's levels at once --------------------------------------------------

def _photos():
    import cv2
    from skimage import data

    from kpface.bench.inputs import scene
    from kpface.samples import astronaut_bgr
    out = {"astronaut": astronaut_bgr(), "scene 640x480": scene(640, 480)["image"]}
    for name in ("camera", "coffee", "chelsea", "immunohistochemistry"):
        a = getattr(data, name)()
        out[name] = cv2.cvtColor(a, cv2.COLOR_GRAY2BGR if a.ndim == 2 else cv2.COLOR_RGB2BGR)
    out["two astronauts"] = np.concatenate([out["astronaut"], out["astronaut"][:, ::-1]], 1)
    return out


def _stage1_one_level_at_a_time(det, image):
    """Stage 1 as the cascade defines it: each pyramid level in turn, its own NMS, then NMS
    over all levels (the loop kpface ran before the levels were run at once)."""
    import cv2

    from kpface.postprocess import nms
    h, w = image.shape[:2]
    found = []
    for s in det.scales(h, w):
        x = det.norm(cv2.resize(image, (int(w * s + 1), int(h * s + 1)),
                                interpolation=cv2.INTER_AREA))
        out = det.pnet.run({"image": x})
        prob, reg = out["prob"][0, 1], out["reg"][0]
        ys, xs = np.nonzero(prob >= det.thresholds[0])
        if ys.size:
            cells = np.stack([xs, ys], 1).astype(np.float64) * det.stride
            cand = np.concatenate([np.floor((cells + 1) / s), np.floor((cells + det.cell) / s),
                                   prob[ys, xs, None], reg[:, ys, xs].T], 1)
            found.append(cand[nms(cand[:, :4], cand[:, 4], det.nms_cfg["per_scale"])])
    cand = np.concatenate(found)
    return cand[nms(cand[:, :4], cand[:, 4], det.nms_cfg["pnet"])]


def test_mtcnn_runs_pyramid_levels_at_once_with_the_same_faces(tmp_path_factory):
    from kpface.detect import load_detector
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    d = tmp_path_factory.mktemp("perf") / "mtcnn"
    export_model("mtcnn", d)
    one = load_detector(d, threads=1)
    many = load_detector(d, threads=3)
    assert (one.workers, many.workers) == (1, 3)
    faces = 0
    for name, image in _photos().items():
        ref = _stage1_one_level_at_a_time(one, image)
        got = np.concatenate([c for c in many._pyramid(image) if c is not None])
        got = got[__import__("kpface.postprocess", fromlist=["nms"]).nms(
            got[:, :4], got[:, 4], many.nms_cfg["pnet"])]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=name)
        a, b = one.detect(image), many.detect(image)
        assert len(a) == len(b), name
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.box, y.box, atol=1e-3)
            np.testing.assert_allclose(x.landmarks, y.landmarks, atol=1e-3)
            assert abs(x.score - y.score) < 1e-5
        faces += len(a)
    assert faces >= 4  # astronaut, the scene, camera, two astronauts


def test_paired_ratio_is_not_thrown_by_one_loaded_turn():
    from kpface.bench.ratios import paired_ratio
    rng = np.random.default_rng(0)
    rounds, per = 6, 4
    # Both rows were slowed 2.5x in rounds 3-5; in round 1 the load also hit the KP-RPE row's
    # turn but not the plain row's. The true ratio is 1.02.
    plain_load = np.array([1.0, 1.0, 1.0, 2.5, 2.5, 2.5])
    kprpe_load = np.array([1.0, 2.5, 1.0, 2.5, 2.5, 2.5])
    noise = lambda: rng.uniform(0.995, 1.005, rounds * per)  # noqa: E731
    plain = np.repeat(100.0 * plain_load, per) * noise()
    kprpe = np.repeat(102.0 * kprpe_load, per) * noise()
    assert np.median(kprpe) / np.median(plain) > 1.3         # whole-run medians mislead
    assert paired_ratio({"samples_ms": kprpe.tolist()}, {"samples_ms": plain.tolist()},
                        rounds) == pytest.approx(1.02, abs=0.01)
    assert paired_ratio({"samples_ms": [1.0]}, {"samples_ms": [1.0, 2.0]}, rounds) is None
