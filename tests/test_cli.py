"""The CLI as a user meets it: one clear line and a non-zero exit on bad input, no traceback."""
import json
import shutil
import subprocess
import sys

import pytest
import torch


def kpface(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "kpface", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(code, err, pattern):
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("kpface: ")]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]


def test_help_lists_commands_and_engines():
    code, out, _ = kpface("--help")
    assert code == 0
    for word in ("export", "build", "run", "compare", "bench", "demo", "engines", "onnxruntime"):
        assert word in out


def test_export_list():
    code, out, _ = kpface("export", "recognizer", "--list")
    assert code == 0 and "vit_kprpe_small" in out and "vit_small" in out


def test_export_prints_parity_and_warns_random(tmp_path):
    code, out, err = kpface("export", "recognizer", "--arch", "vit_kprpe_tiny", "--out", tmp_path / "m")
    assert code == 0, err
    assert "max abs diff" in out and "cosine" in out and "next: kpface build" in out
    assert "RANDOM" in err and "weights: RANDOM weights (seed 0)" in out
    manifest = json.loads((tmp_path / "m/manifest.json").read_text())
    assert manifest["parity"]["model"]["passed"]
    code, out, err = kpface("export", "recognizer", "--arch", "vit_kprpe_tiny", "--seed", "9",
                            "--out", tmp_path / "m9")
    assert code == 0 and "weights: RANDOM weights (seed 9)" in out, err
    other = json.loads((tmp_path / "m9/manifest.json").read_text())
    assert other["weights"]["seed"] == 9
    assert other["files"]["model.onnx"] != manifest["files"]["model.onnx"]  # other weights


def test_unknown_arch(tmp_path):
    code, _, err = kpface("export", "recognizer", "--arch", "vit_huge", "--out", tmp_path / "m")
    assert_one_line_error(code, err, "unknown recognizer architecture 'vit_huge'")


def test_checkpoint_with_wrong_keys(tmp_path):
    torch.save({"net.something_else": torch.zeros(3)}, tmp_path / "bad.pt")
    code, _, err = kpface("export", "recognizer", "--arch", "vit_kprpe_tiny",
                          "--weights", tmp_path / "bad.pt", "--out", tmp_path / "m")
    assert_one_line_error(code, err, "missing keys: ")
    assert "unexpected keys: something_else" in err
    assert not (tmp_path / "m").exists()


def test_tampered_and_truncated_models(tiny_recognizer, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_recognizer, copy)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 3])
    code, _, err = kpface("info", copy)
    assert_one_line_error(code, err, "does not match its manifest")

    # Even with a manifest rewritten to the truncated file's hash, loading fails cleanly.
    from kpface.errors import ModelError
    from kpface.manifest import load_manifest, write_manifest
    from kpface.runtimes import open_session
    m = load_manifest(copy, verify=False)
    write_manifest(copy, m, ["model.onnx"])
    with pytest.raises(ModelError, match="could not be loaded by ONNX Runtime"):
        open_session(copy)


def test_run_without_models(tmp_path):
    code, _, err = kpface("run", "x.jpg", "--models", tmp_path / "none")
    assert_one_line_error(code, err, "does not exist")


def test_run_with_incomplete_models_dir(tmp_path, tiny_recognizer):
    shutil.copytree(tiny_recognizer, tmp_path / "models/recognizer")
    code, _, err = kpface("run", "x.jpg", "--models", tmp_path / "models")
    assert_one_line_error(code, err, "has no detector/ model")


def test_debug_shows_traceback(tmp_path):
    code, _, err = kpface("--debug", "run", "x.jpg", "--models", tmp_path / "none")
    assert code != 0 and "Traceback" in err


def test_engines_table():
    code, out, err = kpface("engines")
    assert code == 0
    for name in ("onnxruntime", "openvino", "tensorrt", "coreml"):
        assert f"`{name}`" in out
    assert "WARNING coremltools" not in err


def test_build_on_a_missing_engine_is_one_line(tiny_recognizer):
    code, _, err = kpface("build", tiny_recognizer, "--runtime", "tensorrt", "--precision", "fp16")
    assert_one_line_error(code, err, "tensorrt")
    assert "pip install" in err


def test_build_int8_prints_accuracy(tiny_recognizer, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_recognizer, copy, ignore=shutil.ignore_patterns("builds"))
    code, out, err = kpface("build", copy, "--runtime", "onnxruntime", "--precision", "int8",
                            "--detector", "none")
    assert code == 0, err
    assert '"mean"' in out and "built " in out
    assert (copy / "builds" / "onnxruntime-int8-cpu" / "build.json").is_file()


def test_readme_engine_table_matches_the_code():
    from pathlib import Path

    from kpface.runtimes.engines import markdown_table
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- engines:begin -->")[1].split("<!-- engines:end -->")[0]
    assert block.strip() == markdown_table().strip()
