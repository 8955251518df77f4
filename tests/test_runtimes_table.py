"""The engine table's options and status columns, and build options from the CLI."""
import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kpface.errors import InputError
from kpface.runtimes.engines import ENGINES, get_engine, help_text, markdown_table, options_text

def kpface(*args):
    p = subprocess.run([sys.executable, "-m", "kpface", *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("kpface: ")]
    assert len(lines) == 1, err
    return lines[0]


# --- the table -------------------------------------------------------------------------------

def test_every_option_key_the_builders_read_is_in_the_table():
    """Scan each builder's source for options.get("KEY") / options.pop("KEY") / options["KEY"]:
    the column must list exactly those keys, so an accepted option is never ignored and a read
    one never refused."""
    for e in ENGINES:
        source = Path(e.load_builder().__file__).read_text()
        tree = ast.parse(source)
        read = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("get", "pop") and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == "options" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                read.add(node.args[0].value)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                    and node.value.id == "options" and isinstance(node.slice, ast.Constant):
                read.add(node.slice.value)
        assert read == set(e.option_keys), e.name
        assert all(meaning and "\n" not in meaning for _, meaning in e.options)


def test_status_column_is_honest():
    status = {e.name: e.status for e in ENGINES}
    assert status["onnxruntime"].startswith("tested here")
    assert status["openvino"].startswith("tested here")
    assert status["tensorrt"].startswith("untested")
    assert "converts here" in status["coreml"] and "macOS" in status["coreml"]
    table = markdown_table()
    assert "| build options | status |" in table
    assert all(e.status in table and f"`{e.option_keys[0]}`" in table for e in ENGINES)
    assert all(e.status in help_text() for e in ENGINES)
    assert "method" in options_text() and "calibration_cache" in options_text()


def test_unknown_option_is_refused_in_one_line():
    with pytest.raises(InputError) as e:
        get_engine("openvino").check_options({"smooth_quant": 0.5, "methd": "entropy"})
    msg = str(e.value)
    assert "\n" not in msg and "'methd'" in msg and "smooth_quant, activation" in msg
    assert get_engine("coreml").check_options({"batches": [1, 4]}) == {"batches": [1, 4]}
    assert get_engine("tensorrt").check_options(None) == {}


def test_build_refuses_an_unknown_option_before_any_work(tiny_recognizer, monkeypatch):
    import kpface.runtimes.build as b

    def no_work(*args, **kwargs):
        raise AssertionError("the build started working")
    monkeypatch.setattr(b, "recognizer_data", no_work)
    monkeypatch.setattr(b, "staging_dir", no_work)
    with pytest.raises(InputError, match="'profile'.*accepts: method"):
        b.build(tiny_recognizer, "onnxruntime", "int8", options={"profile": [1, 8, 32]})


def test_parse_options():
    from kpface.export_cli import parse_options
    assert parse_options(["method=entropy", "per_channel=false", "profile=[1, 8, 16]",
                          "smooth_quant=0.5", "exclude=[\"a\"]", "note=a=b"]) == {
        "method": "entropy", "per_channel": False, "profile": [1, 8, 16], "smooth_quant": 0.5,
        "exclude": ["a"], "note": "a=b"}
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_options(["entropy"])


def test_cli_options_reach_the_builder(tiny_recognizer, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_recognizer, copy, ignore=shutil.ignore_patterns("builds"))
    code, _, err = kpface("build", copy, "--precision", "int8", "--option", "nope=1")
    line = one_error_line(err)
    assert code != 0 and "'nope'" in line and "method, per_channel" in line
    code, _, err = kpface("build", copy, "--option", "method")
    assert code != 0 and "KEY=VALUE" in one_error_line(err)
    code, out, err = kpface("build", copy, "--precision", "int8", "--detector", "none",
                            "--option", "quantize_attention=true", "--option", "method=minmax")
    assert code == 0, err
    record = json.loads((copy / "builds" / "onnxruntime-int8-cpu" / "build.json").read_text())
    assert record["graphs"]["model"]["attention_products"] == "int8"
    assert record["graphs"]["model"]["calibration_method"] == "minmax"


def test_cli_help_and_engines_show_options_and_status():
    code, out, _ = kpface("build", "--help")
    assert code == 0 and "--option KEY=VALUE" in out
    for e in ENGINES:
        assert f"{e.name}:" in out and all(k in out for k in e.option_keys)
    code, out, _ = kpface("--help")
    assert code == 0 and all(e.status in out for e in ENGINES)
    code, out, _ = kpface("engines")
    assert code == 0 and "| status |" in out and "calibration_cache" in out


@pytest.mark.skipif(importlib.util.find_spec("nncf") is None, reason="nncf not installed")
def test_openvino_int8_default_on_a_cpu_with_vnni(tiny_recognizer, tmp_path, monkeypatch):
    """Where int8 does not saturate, NNCF's overflow fix is first_layer_only (its enum value;
    "first_layer" made OverflowFix raise on such CPUs)."""
    from kpface.runtimes import build as b
    from kpface.runtimes import openvino_rt
    copy = tmp_path / "m"
    shutil.copytree(tiny_recognizer, copy, ignore=shutil.ignore_patterns("builds"))
    monkeypatch.setattr(openvino_rt, "int8_saturates", lambda: False)
    # force: this CPU does saturate, so the VNNI scheme may miss the gate here.
    info = b.build(copy, "openvino", "int8", force=True, n_calib=8, n_heldout=8, threads=2)
    assert info["graphs"]["model"]["overflow_fix"] == "first_layer_only"
