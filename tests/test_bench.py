"""kpface.bench / kpface.bench.flops: report structure, percentiles, GEMM peak, FLOP counts,
outputs, skipped runtimes. Speed is reported by the bench, never asserted here."""
import copy
import json
import logging
import shutil
import sys

import numpy as np
import pytest

from kpface import bench
from kpface.bench import machine
from kpface.bench.flops import onnx_flops, vit_flops
from kpface.bench.report import write_outputs
from kpface.bench.worker import Worker
from kpface.errors import InputError, ModelError

REPEATS = 3
BATCHES = (1, 2)
PLAIN_ARCH = "vit_tiny_plain_bench_test"


# --- FLOP counter --------------------------------------------------------------------------

def _graph(nodes, inputs, outputs, inits=()):
    from onnx import helper
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_flops_one_matmul_known_shape():
    from onnx import TensorProto, helper
    m, k, n = 7, 13, 5
    model = _graph([helper.make_node("MatMul", ["a", "b"], ["c"])],
                   [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]),
                    helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n])],
                   [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
    r = onnx_flops(model)
    assert r["flops"] == 2 * m * n * k
    assert r["by_op"] == {"MatMul": 2 * m * n * k} and r["unknown"] == []


def test_flops_dynamic_batch_gemm_and_conv():
    from onnx import TensorProto, helper, numpy_helper
    k, n = 16, 24
    w = numpy_helper.from_array(np.zeros((k, n), np.float32), "w")
    wt = numpy_helper.from_array(np.zeros((n, k), np.float32), "wt")       # Gemm transB
    cw = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "cw")  # Conv 3->8, 3x3
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Gemm", ["x2", "wt"], ["z"], transB=1),
             helper.make_node("Conv", ["img", "cw"], ["f"], pads=[1, 1, 1, 1])]
    model = _graph(nodes,
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10, k]),
                    helper.make_tensor_value_info("x2", TensorProto.FLOAT, [4, k]),
                    helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 3, 6, 5])],
                   [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                    for o in ("y", "z", "f")], [w, wt, cw])
    b = 3
    r = onnx_flops(model, {"batch": b})
    expected = {"MatMul": 2 * (b * 10) * n * k, "Gemm": 2 * 4 * n * k,
                "Conv": 2 * (b * 8 * 6 * 5) * (3 * 3 * 3)}
    assert r["by_op"] == expected
    assert r["flops"] == sum(expected.values())
    # Unbound dynamic batch: shapes unknown, reported rather than guessed.
    assert onnx_flops(model)["unknown"]


def test_vit_flops_agree_with_onnx_graph(tiny_recognizer):
    manifest = json.loads((tiny_recognizer / "manifest.json").read_text())
    for b in (1, 3):
        assert onnx_flops(tiny_recognizer / "model.onnx", {"batch": b})["flops"] == \
            vit_flops(manifest["config"], b)["flops"]


def test_latency_stats_ordered():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 31):
        s = bench.latency_stats(rng.lognormal(1.0, 0.5, n))
        assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
        assert s["repeats"] == n


# --- a real (tiny) run -----------------------------------------------------------------------

def _export_plain_tiny(out):
    """A plain (no KP-RPE) ViT with vit_kprpe_tiny's dimensions: the overhead baseline."""
    from kpface.export import registry, vit
    from kpface.export.onnx_export import export_model
    registry.archs()  # load the real registry first, so ours is an addition
    vit._register(PLAIN_ARCH, "test baseline", embed_dim=64, depth=2, num_heads=2,
                  mlp_ratio=2.0, kprpe=False)
    try:
        logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
        export_model(PLAIN_ARCH, out)
    finally:
        registry._ARCHS.pop(PLAIN_ARCH, None)
    return out


@pytest.fixture(scope="module")
def models(tiny_recognizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_models")
    shutil.copytree(tiny_recognizer, root / "recognizer",
                    ignore=shutil.ignore_patterns("builds"))
    plain = _export_plain_tiny(tmp_path_factory.mktemp("bench_baseline") / "plain")
    return root, plain


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    root, plain = models
    out = tmp_path_factory.mktemp("bench_out")
    messages = []
    report = bench.run_bench(root, out, runtimes=["onnxruntime", "tensorrt", "nosuchengine"],
                             batches=BATCHES, repeats=REPEATS, warmup=1, threads=2,
                             baseline_dir=plain, progress=messages.append,
                             gemm_size=256, gemm_repeats=3)
    return report, out, messages


def _ok(report, **match):
    return [r for r in report["results"] if r["status"] == "ok"
            and all(r.get(k) == v for k, v in match.items())]


def test_report_structure(run):
    report, _, messages = run
    for key in ("schema", "date", "machine", "settings", "method", "engines", "models", "gemm",
                "results", "ratios", "skipped", "files"):
        assert key in report, key
    m = report["machine"]
    assert m["cpu_model"] and m["logical_cores"] >= 1
    assert m["versions"]["numpy"] and "onnxruntime" in m["versions"] and "torch" in m["versions"]
    assert report["settings"]["threads"] == 2 and report["settings"]["repeats"] == REPEATS
    assert messages and any("[1/" in msg for msg in messages)
    # ORT fp32 at every batch for the recognizer and the baseline, torch eager too.
    for b in BATCHES:
        assert len(_ok(report, stage="embed", model="recognizer", runtime="onnxruntime",
                       precision="fp32", batch=b)) == 1
        assert len(_ok(report, stage="embed", model=f"baselines/{PLAIN_ARCH}",
                       runtime="onnxruntime", batch=b)) == 1
        assert len(_ok(report, stage="embed", model="recognizer", runtime="torch", batch=b)) == 1


def test_every_row_measured_and_ordered(run):
    report, _, _ = run
    rows = _ok(report)
    assert rows
    for r in rows:
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"], r["id"]
        assert lat["repeats"] == REPEATS == len(r["samples_ms"])
        assert r["throughput_items_s"] > 0
        mem = r["memory"]
        assert mem["peak_delta_mb"] is not None and mem["peak_delta_mb"] >= 0
        assert mem["rss_peak_mb"] >= mem["rss_baseline_mb"] > 0
        if r["runtime"] == "onnxruntime":
            assert r["size_bytes"] > 0 and r["provider"] == "CPUExecutionProvider"
            assert r["accuracy"]["source"] == "reference"


def test_gemm_peak_and_fraction(run, tiny_recognizer):
    report, _, _ = run
    g = report["gemm"]
    assert g["status"] == "ok" and g["gflops_median"] > 0 and g["gflops_max"] >= g["gflops_median"]
    assert g["threads"] == 2 and g["blas"]
    config = json.loads((tiny_recognizer / "manifest.json").read_text())["config"]
    for r in _ok(report, stage="embed", model="recognizer"):
        assert r["flops"]["per_batch"] == vit_flops(config, r["batch"])["flops"]
        assert r["gflops_achieved"] > 0
        assert r["fraction_of_peak"] == pytest.approx(r["gflops_achieved"] / g["gflops_median"])


def test_ratios(run):
    report, _, _ = run
    ratios = report["ratios"]
    ov = ratios["kprpe_overhead"]
    assert ov["status"] == "ok"
    assert set(ov["by_batch"]) == {str(b) for b in BATCHES}
    assert all(v > 0 for v in ov["by_batch"].values())
    for b in BATCHES:  # recomputed from the rows of the same run
        k = _ok(report, model="recognizer", runtime="onnxruntime", batch=b)[0]
        p = _ok(report, model=f"baselines/{PLAIN_ARCH}", batch=b)[0]
        assert ov["by_batch"][str(b)] == pytest.approx(k["latency_ms"]["p50"] /
                                                       p["latency_ms"]["p50"])
    assert ratios["ort_vs_torch"]["status"] == "ok"
    assert all(v > 0 for v in ratios["ort_vs_torch"]["by_batch"].values())
    assert ratios["int8_speedup"]["status"] == "skipped" and ratios["int8_speedup"]["reason"]


def test_memory_over_file_and_the_other_overhead_forms(run):
    report, _, _ = run
    rof = report["ratios"]["rss_over_file"]
    assert rof["status"] == "ok"
    for b in BATCHES:
        r = _ok(report, stage="embed", model="recognizer", runtime="onnxruntime", batch=b)[0]
        mem = r["memory"]
        assert mem["rss_over_file"] == pytest.approx(
            mem["peak_delta_mb"] * 2 ** 20 / r["size_bytes"], rel=0.01)
        assert rof["by_config"]["onnxruntime-fp32"][str(b)] == mem["rss_over_file"]
        assert mem["end_delta_mb"] is not None and mem["end_delta_mb"] <= mem["peak_delta_mb"] + 1
    # OpenVINO was not asked for, and the recognizer has no fused-attention build: both forms
    # of the overhead say why they were not measured.
    forms = report["ratios"]
    assert forms["kprpe_overhead_openvino"]["status"] == "skipped"
    assert "not asked for" in forms["kprpe_overhead_openvino"]["reason"]
    assert forms["kprpe_overhead_onnxruntime_fused"]["status"] == "skipped"
    assert "attention=fused" in forms["kprpe_overhead_onnxruntime_fused"]["reason"]


def test_missing_runtimes_and_stages_are_skipped_with_reasons(run):
    report, _, _ = run
    skipped = report["skipped"]
    assert all(s["reason"] for s in skipped)
    assert any(s["runtime"] == "tensorrt" for s in skipped)
    assert any(s["runtime"] == "nosuchengine" and "unknown runtime" in s["reason"]
               for s in skipped)
    assert any(s["stage"] == "detect" and "detector" in s["reason"] for s in skipped)
    assert not [r for r in report["results"] if r["runtime"] in ("tensorrt", "nosuchengine")]


def test_files_written(run):
    report, out, _ = run
    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    png = out / bench.CHART_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    assert len(data["results"]) == len(report["results"])
    assert data["gemm"]["gflops_median"] == pytest.approx(report["gemm"]["gflops_median"])
    md = (out / "report.md").read_text()
    for text in ("GEMM", "kprpe_overhead", "ort_vs_torch", report["machine"]["cpu_model"],
                 "p50", "tensorrt", bench.CHART_NAME):
        assert text in md, text
    table = bench.format_table(report)
    assert "p50 ms" in table and "kprpe_overhead" in table and "GEMM" in table
    assert len([ln for ln in table.splitlines() if ln.startswith("embed")]) == len(
        _ok(report, stage="embed"))


def test_chart_skipped_without_matplotlib(run, tmp_path, monkeypatch, caplog):
    report, _, _ = run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with caplog.at_level(logging.WARNING, logger="kpface.bench"):
        files = write_outputs(copy.deepcopy(report), tmp_path)
    assert files["chart"] is None and not (tmp_path / bench.CHART_NAME).exists()
    assert (tmp_path / "report.md").is_file() and "matplotlib" in caplog.text


def test_skips_without_baseline_or_torch(models, tmp_path, monkeypatch):
    root, _ = models
    monkeypatch.setattr(machine, "torch_available", lambda: (False, "torch is not installed"))
    report = bench.run_bench(root, tmp_path, stages=["embed"], batches=(1,), repeats=2,
                             warmup=0, export_baselines=False, gemm_size=128, gemm_repeats=2,
                             interleave=False)
    ratios = report["ratios"]
    assert ratios["kprpe_overhead"]["status"] == "skipped"
    assert "baselines" in ratios["kprpe_overhead"]["reason"]
    assert ratios["ort_vs_torch"] == {"status": "skipped", "reason": "torch is not installed"}
    assert [r["runtime"] for r in _ok(report)] == ["onnxruntime"]
    assert (tmp_path / "report.md").is_file()


def test_failing_configuration_is_reported_not_raised(models, tmp_path):
    root, _ = models
    broken = tmp_path / "broken"
    shutil.copytree(root / "recognizer", broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    cfg = {"id": "embed/broken/onnxruntime-fp32/b1", "stage": "embed", "model": "broken",
           "arch": "vit_kprpe_tiny", "model_dir": str(broken), "runtime": "onnxruntime",
           "precision": "fp32", "batch": 1, "kind": "session", "threads": 1, "repeats": 1,
           "warmup": 0}
    w = Worker(cfg, {}, timeout_s=120)
    try:
        status, reason = w.start()
    finally:
        w.close()
    assert status == "error" and "ModelError" in reason and "sha256" in reason


def test_bad_arguments(models, tmp_path):
    root, _ = models
    with pytest.raises(InputError):
        bench.run_bench(root, tmp_path, repeats=0)
    with pytest.raises(InputError):
        bench.run_bench(root, tmp_path, stages=["nope"])
    with pytest.raises(ModelError):
        bench.run_bench(tmp_path / "missing", tmp_path)


def test_no_stand_in_inputs_without_real_photos(models_dir, tmp_path, monkeypatch):
    """Without scikit-image's photos the bench has no real inputs: the rows they feed are
    reported as not measured with the reason, never timed on random images."""
    monkeypatch.setitem(sys.modules, "skimage", None)       # import skimage -> ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    report = bench.run_bench(models_dir, tmp_path, stages=["detect", "embed"], batches=(1, 2),
                             repeats=1, warmup=0, export_baselines=False, gemm_size=64,
                             gemm_repeats=1, interleave=False)
    rows = report["results"]
    assert {r["stage"] for r in rows} == {"detect", "embed"}
    for r in rows:
        assert r["status"] == "skipped", r["id"]
        assert "scikit-image" in r["reason"] and "latency_ms" not in r
    assert any(r["runtime"] == "torch" for r in rows)
    for key in ("scene", "recognizer_inputs"):
        text = report["settings"][key]
        assert text.startswith("not made") and "random" not in text and "noise" not in text
    assert "not measured" in (tmp_path / "report.md").read_text().lower()


def test_other_recognizer_folders_are_planned(models, tmp_path):
    """A recognizer beside recognizer/ (the demo's vit_kprpe_small/ next to dlib's) gets rows
    at every batch, and the KP-RPE overhead pair is taken from it when it is the KP-RPE ViT."""
    from kpface.bench.builds import engine_table
    from kpface.bench.inputs import BenchInputs
    from kpface.bench.plan import make_plan, other_recognizers
    from kpface.bench.settings import Settings
    root, plain = models
    two = tmp_path / "models"
    shutil.copytree(plain, two / "recognizer")               # a plain ViT answers
    shutil.copytree(root / "recognizer", two / "vit_kprpe_tiny")  # the KP-RPE ViT beside it
    (two / "baselines").mkdir()
    assert [s.folder for s in other_recognizers(two)] == ["vit_kprpe_tiny"]
    s = Settings.make(two, tmp_path / "out", ["onnxruntime"], None, BATCHES, 2, 0, 1, plain,
                      ["embed"], 64, 1, False, True, 1, 60.0)
    plan = make_plan(s, engine_table(["onnxruntime"]), BenchInputs(max(BATCHES)), lambda m: None)
    ids = [c.id for c in plan.configs]
    assert len(ids) == len(set(ids))
    for b in BATCHES:
        assert f"embed/vit_kprpe_tiny/onnxruntime-fp32/b{b}" in ids
        assert f"embed/recognizer/onnxruntime-fp32/b{b}" in ids
    assert plan.overhead is not None, plan.overhead_skip
    assert plan.overhead["kprpe"] == "vit_kprpe_tiny"
    assert plan.overhead["plain"] == f"baselines/{PLAIN_ARCH}"
