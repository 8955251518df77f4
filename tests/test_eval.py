"""kpface eval / build --eval / compare --recognizer with the real dlib_resnet_v1 weights, MTCNN
and pair sets made here from the real sample photos (kpface.sample_pairs)."""
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from dlib_support import require_package

from kpface.errors import AccuracyGateError, InputError

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")


def _kpface(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "kpface", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dlib_models(tmp_path_factory, models_dir):
    """recognizer/ = dlib_resnet_v1 (packaged weights), detector/ = MTCNN, and the tiny KP-RPE
    ViT beside them as vit_kprpe_tiny/ (the demo's layout)."""
    require_package()
    from kpface.export.onnx_export import export_model
    root = tmp_path_factory.mktemp("dlib_models")
    shutil.copytree(models_dir / "detector", root / "detector")
    shutil.copytree(models_dir / "recognizer", root / "vit_kprpe_tiny",
                    ignore=shutil.ignore_patterns("builds"))
    export_model("dlib_resnet_v1", root / "recognizer")
    return root


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    from kpface.sample_pairs import write_bin_set, write_lfw_layout
    out = tmp_path_factory.mktemp("pairs")
    pairs, images = write_lfw_layout(out, n_lfw=3, sets=4)
    return pairs, images, write_bin_set(out / "set.bin", n_lfw=3, sets=4)


def test_sample_pairs_layout(sample_set):
    from kpface.pairs import read_pairs
    pairs, images, bin_path = sample_set
    a, b = read_pairs(pairs, images), read_pairs(bin_path)
    # 6 people x 4 changed copies = 24 same pairs, as many different ones, in 4 sets.
    assert len(a) == len(b) == 48 and a.same.sum() == 24 and a.same.tolist() == b.same.tolist()
    assert len(a.image_names) == 6 * 5 and a.folds.tolist() == np.repeat(np.arange(4), 12).tolist()


def test_eval_lfw_layout(dlib_models, sample_set, tmp_path):
    pairs, images, _ = sample_set
    p = _kpface("eval", dlib_models / "recognizer", "--pairs", pairs, "--images", images,
                "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    assert "embedding: 30/30 images" in p.stderr and "4 folds (the file's own sets)" in p.stdout
    report = json.loads((tmp_path / "eval.json").read_text())
    ref = report["results"][0]
    assert ref["label"] == "onnxruntime fp32 (model.onnx)" and ref["pairs"] == 48
    # Photo vs its changed copy against different people: every scored pair is right.
    scored = 48 - ref["missing"]
    assert ref["accuracy"] == pytest.approx(scored / 48) and scored >= 40
    assert (tmp_path / "roc.png").stat().st_size > 10_000
    assert "TAR@FAR=1e-3: needs >= 1000" in p.stdout


def test_builds_side_by_side_and_the_eval_gate(dlib_models, sample_set, tmp_path):
    """An int8 build (quick calibration) appears beside fp32 with its accuracy; the build gate
    records the verification figures, and refuses a build whose drop is too large."""
    from kpface.evaluation import evaluate, make_verifier
    from kpface.runtimes.build import build
    pairs, images, bin_path = sample_set
    rec = dlib_models / "recognizer"
    verify = make_verifier(rec, bin_path)
    info = build(rec, "onnxruntime", "int8", n_calib=16, n_heldout=8, verify=verify)
    # The manifest's build_options: the residual Adds and pools are quantized too.
    assert "Add" in info["graphs"]["model"]["op_types"]
    ver = info["accuracy"]["verification"]
    assert ver["passed"] and abs(ver["drop_points"]) <= 0.5 and ver["max_drop_points"] == 0.5
    assert ver["fp32"]["pairs"] == 48 and "set.bin" in ver["pairs"]
    stored = json.loads((rec / "builds" / "onnxruntime-int8-cpu" / "build.json").read_text())
    assert stored["accuracy"]["verification"]["build"]["accuracy"] == ver["build"]["accuracy"]

    report = evaluate(rec, pairs, images=images)
    labels = [r["label"] for r in report["results"]]
    assert labels == ["onnxruntime fp32 (model.onnx)", "onnxruntime int8 (cpu)"]
    int8 = report["results"][1]
    assert int8["answers_changed_vs_reference"] == 0
    assert int8["accuracy"] == pytest.approx(report["results"][0]["accuracy"])

    def worse(sessions):  # a verifier that says the build lost 2 points
        return {"pairs": "fake", "fp32": {"accuracy": 0.99}, "build": {"accuracy": 0.97}}
    with pytest.raises(AccuracyGateError, match="drop 2.00 points"):
        build(rec, "onnxruntime", "fp16", n_heldout=8, verify=worse)
    assert not (rec / "builds" / "onnxruntime-fp16-cpu").exists()


def test_eval_aligned_bin_without_a_detector(dlib_models, tmp_path):
    """ArcFace-aligned crops (InsightFace's .bin convention) of real faces, no detector."""
    from kpface import samples
    from kpface.align import norm_crop
    from kpface.pairs import write_bin
    a = samples.astronaut_bgr()
    crop = norm_crop(a, samples.ASTRONAUT_LANDMARKS, 112)[0]
    lfw = [cv2.resize(f, (112, 112), interpolation=cv2.INTER_CUBIC)
           for f in samples.lfw_subset_bgr()[:4]]
    # Same: a crop and its mirror image; different: the astronaut and an LFW face.
    imgs, flags = [], []
    for face in [crop] + lfw:
        imgs += [face, face[:, ::-1]]
        flags.append(True)
    for face in lfw:
        imgs += [crop, face]
        flags.append(False)
    blobs = [cv2.imencode(".png", i)[1].tobytes() for i in imgs]
    write_bin(tmp_path / "aligned.bin", blobs, flags)
    p = _kpface("eval", dlib_models / "recognizer", "--pairs", tmp_path / "aligned.bin",
                "--aligned", "--out", tmp_path / "o")
    assert p.returncode == 0, p.stderr
    assert "aligned crops" in p.stderr and "a face was found in every image" in p.stdout
    res = json.loads((tmp_path / "o" / "eval.json").read_text())["results"][0]
    assert res["missing"] == 0 and res["pairs"] == 9 and res["accuracy"] == 1.0


def test_eval_bad_input_is_one_line(dlib_models, tmp_path):
    (tmp_path / "pairs.txt").write_text("1 1\nNobody 1 2\nNobody 1 Else 1\n")
    (tmp_path / "img").mkdir()
    for args in (["--pairs", tmp_path / "pairs.txt", "--images", tmp_path / "img"],
                 ["--pairs", tmp_path / "pairs.txt"],
                 ["--pairs", tmp_path / "none.bin"]):
        p = _kpface("eval", dlib_models / "recognizer", *args, "--out", tmp_path / "o")
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("kpface: error")
    p = _kpface("build", dlib_models / "recognizer", "--precision", "fp16", "--eval",
                tmp_path / "none.bin")
    assert p.returncode == 2 and "does not exist" in p.stderr
    assert not (dlib_models / "recognizer" / "builds" / "onnxruntime-fp16-cpu").exists()


def test_compare_real_pairs_and_which_model_answered(dlib_models, tmp_path):
    from kpface import samples
    from kpface.sample_pairs import _hopper_bgr, variant
    a, h = samples.astronaut_bgr(), _hopper_bgr()
    files = {}
    for name, img in (("a", a), ("a_rot", variant(a, "rotated")), ("h", h),
                      ("h_small", variant(h, "rescaled"))):
        files[name] = tmp_path / f"{name}.png"
        cv2.imwrite(str(files[name]), img)
    for x, y, want in (("a", "a_rot", "same person"), ("h", "h_small", "same person"),
                       ("a", "h", "different people")):
        p = _kpface("compare", files[x], files[y], "--models", dlib_models)
        assert p.returncode == 0, p.stderr
        assert want in p.stdout and "recognizer: dlib_resnet_v1" in p.stdout
        assert "package face-recognition-models 0.3.0" in p.stdout
    p = _kpface("compare", files["a"], files["a_rot"], "--models", dlib_models,
                "--recognizer", "vit_kprpe_tiny")
    assert "recognizer: vit_kprpe_tiny" in p.stdout or "RANDOM" in p.stdout + p.stderr
    p = _kpface("compare", files["a"], files["h"], "--models", dlib_models,
                "--recognizer", "nosuch")
    assert p.returncode == 2 and "neither a folder" in p.stderr


def test_recognizer_dir_resolution(dlib_models):
    from kpface.errors import ModelError
    from kpface.pipeline import recognizer_dir
    assert recognizer_dir(dlib_models) == dlib_models / "recognizer"
    assert recognizer_dir(dlib_models, "vit_kprpe_tiny") == dlib_models / "vit_kprpe_tiny"
    assert recognizer_dir(dlib_models, dlib_models / "recognizer") == dlib_models / "recognizer"
    with pytest.raises(ModelError, match="vit_kprpe_tiny"):
        recognizer_dir(dlib_models, "nosuch")


def test_build_eval_needs_a_recognizer(dlib_models, sample_set):
    from kpface.runtimes.build import build
    with pytest.raises(InputError, match="recognizers"):
        build(dlib_models / "detector", "onnxruntime", "fp16", verify=lambda s: {},
              make_detector=lambda s: None)


def test_bench_counts_every_conv_of_dlib_resnet(dlib_models):
    """The bench's FLOP count of dlib_resnet_v1 (its shortcut pads are computed from constants
    that shape inference cannot follow, so the graph is constant-folded first) equals the
    multiply-adds of every Conv2d and Linear of the torch model, counted with forward hooks."""
    import torch
    from dlib_support import torch_model

    from kpface.bench.flops import _flops_for
    model, macs = torch_model(), []

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels
            macs.append(out.numel() * k)
        else:
            macs.append(out.numel() * mod.in_features)
    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, 150, 150))
    for h in hooks:
        h.remove()
    manifest = json.loads((dlib_models / "recognizer" / "manifest.json").read_text())
    counted = _flops_for(str(dlib_models / "recognizer"), manifest, (1, 8))
    assert counted[1]["unresolved_nodes"] == 0
    assert counted[1]["flops"] == 2 * sum(macs) and counted[8]["flops"] == 8 * 2 * sum(macs)
