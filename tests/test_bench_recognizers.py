"""kpface bench with more than one recognizer (models_dir/recognizers/*, --recognizer DIR) and
the FLOP counts of Part fViT, checked against torch's own FLOP counter. Speed is reported by
the bench, never asserted here."""
import json
import logging
import shutil

import pytest
import torch

from kpface import bench
from kpface.bench.flops import onnx_flops, part_fvit_flops
from kpface.export import registry

BATCHES = (1, 2)


def torch_flops(arch, batch, sampling="gridsample"):
    """FLOPs of one forward as torch.utils.flop_counter counts them (conv, mm, bmm)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = registry.get(arch).factory(sampling=sampling).eval()
    x = torch.rand(batch, 3, 112, 112) * 2 - 1
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_part_fvit_flops_match_torch_and_the_sheet():
    """The official configuration: 13.29 G multiply-adds per face (sheet section 7.5), the
    same from the manifest's description and from torch's counter."""
    manifest = registry.get("part_fvit").manifest
    count = part_fvit_flops(manifest)["flops"]
    assert count == torch_flops("part_fvit", 1)
    assert count / 2e9 == pytest.approx(13.29, abs=0.005)
    assert part_fvit_flops(manifest, batch=4)["flops"] == 4 * count


@pytest.fixture(scope="module")
def tiny_pfv(tmp_path_factory):
    """part_fvit_tiny exported in both sampling forms (random weights)."""
    from kpface.export.onnx_export import export_model
    root = tmp_path_factory.mktemp("bench_pfv")
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    return {f: (export_model("part_fvit_tiny", root / f, options={"sampling": f}), root / f)
            for f in ("gridsample", "gather")}


@pytest.mark.parametrize("form", ["gridsample", "gather"])
def test_onnx_graph_counts_like_torch_in_both_forms(tiny_pfv, form):
    manifest, d = tiny_pfv[form]
    for b in (1, 3):
        r = onnx_flops(d / "model.onnx", {"batch": b})
        assert r["unknown"] == []
        assert r["flops"] == torch_flops("part_fvit_tiny", b, form) == \
            part_fvit_flops(manifest, b)["flops"]


# --- a run with three recognizers --------------------------------------------------------

@pytest.fixture(scope="module")
def run(tiny_recognizer, tiny_pfv, tmp_path_factory):
    """recognizer/ = vit_kprpe_tiny; recognizers/pfv = part_fvit_tiny (GridSample) with an ORT
    int8 build; --recognizer = part_fvit_tiny (gather form)."""
    from kpface.runtimes.build import build
    root = tmp_path_factory.mktemp("bench_multi") / "models"
    shutil.copytree(tiny_recognizer, root / "recognizer", ignore=shutil.ignore_patterns("builds"))
    shutil.copytree(tiny_pfv["gridsample"][1], root / "recognizers" / "pfv")
    build(root / "recognizers" / "pfv", "onnxruntime", "int8", detector=None, n_calib=8,
          n_heldout=4, force=True, threads=2)
    out = tmp_path_factory.mktemp("bench_multi_out")
    report = bench.run_bench(root, out, runtimes=["onnxruntime"], batches=BATCHES, repeats=2,
                             warmup=0, threads=2, stages=["embed"], export_baselines=False,
                             gemm_size=128, gemm_repeats=2,
                             recognizers=[tiny_pfv["gather"][1]])
    return report, out


def _ok(report, **match):
    return [r for r in report["results"] if r["status"] == "ok"
            and all(r.get(k) == v for k, v in match.items())]


def test_every_recognizer_gets_rows_flops_and_ratios(run, tiny_pfv):
    report, out = run
    manifest = tiny_pfv["gather"][0]
    for label, precisions in (("recognizer", {"fp32"}), ("recognizers/pfv", {"fp32", "int8"}),
                              ("part_fvit_tiny", {"fp32"})):
        for b in BATCHES:
            rows = _ok(report, stage="embed", model=label, runtime="onnxruntime", batch=b)
            assert {r["precision"] for r in rows} == precisions, (label, b)
            for r in rows:
                if label != "recognizer":
                    assert r["arch"] == "part_fvit_tiny"
                    assert r["flops"]["per_batch"] == part_fvit_flops(manifest, b)["flops"]
                assert r["fraction_of_peak"] > 0
    ratios = report["ratios"]
    for key in ("kprpe_overhead", "int8_speedup", "ort_vs_torch"):  # the existing keys stay
        assert key in ratios
    for label in ("recognizers/pfv", "part_fvit_tiny"):
        rel = ratios[f"latency_vs_recognizer:{label}"]
        assert rel["status"] == "ok" and set(rel["by_batch"]) == {"1", "2"}
        a = _ok(report, model=label, precision="fp32", batch=2)[0]["latency_ms"]["p50"]
        r = _ok(report, model="recognizer", runtime="onnxruntime", precision="fp32",
                batch=2)[0]["latency_ms"]["p50"]
        assert rel["by_batch"]["2"] == pytest.approx(a / r)
    sp = ratios["int8_speedup_onnxruntime:recognizers/pfv"]
    assert sp["status"] == "ok" and sp["batch"] == 2 and sp["value"] > 0
    assert "int8_speedup_onnxruntime:part_fvit_tiny" not in ratios  # no int8 build of it
    assert report["settings"]["recognizers"] == [str(tiny_pfv["gather"][1])]
    assert {"recognizers/pfv", "part_fvit_tiny"} <= set(report["models"])
    md = (out / "report.md").read_text()
    assert "latency_vs_recognizer:recognizers/pfv" in md and "part_fvit_tiny" in md
    data = json.loads((out / "report.json").read_text())
    assert set(data["ratios"]) == set(ratios)


def test_the_extra_recognizers_are_timed_beside_the_reference(run):
    """Same stage and batch = one interleaved group: every recognizer's rows at batch 1 come
    before any at batch 2."""
    report, _ = run
    order = [(r["batch"], r["model"]) for r in report["results"] if r["runtime"] != "torch"]
    batches = [b for b, _ in order]
    assert batches == sorted(batches)
    assert {m for b, m in order if b == 1} == {"recognizer", "recognizers/pfv", "part_fvit_tiny"}


def test_bad_recognizer_dirs_and_the_cli_flag(tmp_path, tiny_recognizer):
    from kpface.cli import build_parser
    from kpface.errors import ModelError
    with pytest.raises(ModelError, match="--recognizer .* is not a model directory"):
        bench.run_bench(tiny_recognizer.parent, tmp_path, recognizers=[tmp_path / "nothing"])
    args = build_parser().parse_args(["bench", "--recognizer", "a", "--recognizer", "b"])
    assert args.recognizer == ["a", "b"]
