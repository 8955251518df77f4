"""Issue 13, model directories: only files the manifest lists and hashes, inside the directory,
are opened; export and build switch directories in one step, keep or refuse builds/, and
clean up after killed runs (SIGKILL at random points, several seeds)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kpface import atomic
from kpface.cli import main as cli_main
from kpface.errors import InputError, ModelError
from kpface.manifest import load_manifest, sha256_file, staging_dir, write_manifest
from kpface.runtimes import open_session
from kpface.runtimes.session import load_build

HERE = Path(__file__).parent


def one_line_error(capsys, argv, pattern):
    code = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("kpface: ")]
    assert code != 0 and "Traceback" not in err and len(lines) == 1, err
    assert pattern in lines[0], lines[0]
    return lines[0]


def rewrite(model_dir: Path, edit) -> None:
    m = json.loads((model_dir / "manifest.json").read_text())
    edit(m)
    (model_dir / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def copy(tiny_recognizer, tmp_path):
    d = tmp_path / "models" / "recognizer"
    shutil.copytree(tiny_recognizer, d, ignore=shutil.ignore_patterns("builds"))
    return d


# --- containment ----------------------------------------------------------------------------

def _point_graph_at(model_dir: Path, name: str) -> None:
    """Make the manifest name ``name`` for the graph, with a correct sha256 of what it is."""
    target = (model_dir / name) if not os.path.isabs(name) else Path(name)
    digest = sha256_file(target)

    def edit(m):
        m["graphs"]["model"]["file"] = name
        m["files"] = {name: digest}
    rewrite(model_dir, edit)


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_a_graph_outside_the_directory_is_refused(copy, tmp_path, capsys, kind):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(copy / "model.onnx", elsewhere / "x.onnx")
    name = "../../elsewhere/x.onnx" if kind == "dotdot" else str(elsewhere / "x.onnx")
    _point_graph_at(copy, name)
    with pytest.raises(ModelError, match="outside the model directory"):
        load_manifest(copy)
    with pytest.raises(ModelError, match="outside the model directory"):
        open_session(copy)
    line = one_line_error(capsys, ["info", copy], "outside the model directory")
    print(f"\nrefusal ({kind}): {line}")


def test_etc_hostname_is_not_opened(copy, capsys):
    if not Path("/etc/hostname").is_file():
        pytest.skip("this machine has no /etc/hostname")
    _point_graph_at(copy, "/etc/hostname")
    one_line_error(capsys, ["info", copy], "outside the model directory")


def test_a_symlink_leaving_the_directory_is_refused(copy, tmp_path, capsys):
    outside = tmp_path / "outside.onnx"
    shutil.move(copy / "model.onnx", outside)
    os.symlink(outside, copy / "model.onnx")
    with pytest.raises(ModelError, match="symlink that leaves the model directory"):
        load_manifest(copy)
    line = one_line_error(capsys, ["info", copy], "symlink that leaves the model directory")
    print(f"\nrefusal (symlink): {line}")
    # A symlink that stays inside is fine.
    os.unlink(copy / "model.onnx")
    (copy / "data").mkdir()
    shutil.move(outside, copy / "data" / "model.onnx")
    os.symlink("data/model.onnx", copy / "model.onnx")
    assert load_manifest(copy)["arch"] == "vit_kprpe_tiny"
    open_session(copy, threads=1).close()


def test_a_graph_file_the_manifest_does_not_hash_is_refused(copy, capsys):
    shutil.copyfile(copy / "model.onnx", copy / "other.onnx")
    rewrite(copy, lambda m: m["graphs"]["model"].__setitem__("file", "other.onnx"))
    with pytest.raises(ModelError, match="not listed in the manifest's files"):
        load_manifest(copy)
    # Also when a caller hands open_session a manifest it read without checking.
    m = load_manifest(copy, verify=False)
    with pytest.raises(ModelError, match="not listed in the manifest's files"):
        open_session(copy, manifest=m)
    line = one_line_error(capsys, ["info", copy], "not listed in the manifest's files")
    print(f"\nrefusal (unlisted): {line}")


def test_the_graph_is_hashed_right_before_it_is_opened(copy):
    m = load_manifest(copy)
    with open(copy / "model.onnx", "r+b") as f:  # changed after the manifest was checked
        f.seek(2000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ModelError, match="does not match its manifest"):
        open_session(copy, manifest=m)


def test_build_artifacts_must_be_listed_and_inside(copy, tmp_path):
    from kpface.runtimes.build import build
    build(copy, "onnxruntime", "fp32", n_calib=0, n_heldout=4, threads=1)
    d, info = load_build(copy, "onnxruntime", "fp32")
    path = d / "build.json"

    def edit_build(change):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    original = path.read_text()
    shutil.copyfile(d / "model.onnx", d / "extra.onnx")
    edit_build(lambda b: b["graphs"]["model"].__setitem__("file", "extra.onnx"))
    with pytest.raises(ModelError, match="not listed in build.json's files"):
        load_build(copy, "onnxruntime", "fp32")
    path.write_text(original)
    shutil.copyfile(d / "model.onnx", tmp_path / "x.onnx")
    edit_build(lambda b: (b["graphs"]["model"].__setitem__("file", "../../../x.onnx"),
                          b["files"].__setitem__("../../../x.onnx", sha256_file(tmp_path / "x.onnx"))))
    with pytest.raises(ModelError, match="outside the model directory"):
        load_build(copy, "onnxruntime", "fp32")


# --- switching directories --------------------------------------------------------------------

def _write_model(d: Path, tag: str) -> None:
    (d / "model.onnx").write_bytes(tag.encode() * 100)
    write_manifest(d, {"name": "m", "task": "recognizer", "tag": tag,
                       "graphs": {"model": {"file": "model.onnx"}}}, ["model.onnx"])


def test_the_target_always_holds_a_complete_directory(tmp_path, monkeypatch):
    final = tmp_path / "m"
    with staging_dir(final) as d:
        _write_model(d, "first")
    seen = []

    def check(what):
        seen.append(what)
        assert load_manifest(final)["files"], f"no valid directory at the target after {what}"

    real_rename, real_replace, real_exchange = os.rename, os.replace, atomic.exchange
    monkeypatch.setattr(os, "rename", lambda a, b: (real_rename(a, b), check("rename"))[0])
    monkeypatch.setattr(os, "replace", lambda a, b: (real_replace(a, b), check("replace"))[0])
    monkeypatch.setattr(atomic, "exchange", lambda a, b: (real_exchange(a, b),
                                                          check("exchange"))[0])
    for i in range(3):
        with staging_dir(final) as d:
            _write_model(d, f"v{i}")
        assert load_manifest(final)["tag"] == f"v{i}"
    assert "exchange" in seen
    assert not [p for p in tmp_path.iterdir() if p.name != "m"]  # nothing left beside it


def test_two_writers_in_one_process_do_not_collide(tmp_path):
    final = tmp_path / "m"
    errors = []
    for round_ in range(10):
        barrier = threading.Barrier(2)

        def writer(tag):
            try:
                with staging_dir(final) as d:
                    _write_model(d, tag)
                    barrier.wait(timeout=10)
            except Exception as e:  # surfaced below
                errors.append(e)
        threads = [threading.Thread(target=writer, args=(f"{round_}{w}",)) for w in "ab"]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        assert load_manifest(final)["tag"] in (f"{round_}a", f"{round_}b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_leftovers_of_dead_writers_are_removed_and_never_listed(copy, tmp_path, capsys):
    root = copy.parent
    dead = root / ".recognizer.partial-999999999-abc"   # no such process
    dead.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = root / f".recognizer.partial-{sleeper.pid}-xyz"
        alive.mkdir()
        old_style = root / ".recognizer.partial-k2j3h4"   # an older kpface's, fresh
        old_style.mkdir()
        (copy / "builds" / ".onnxruntime-fp32-cpu.partial-999999999-q").mkdir(parents=True)
        assert cli_main(["info", str(copy)]) == 0
        assert "builds: none" in capsys.readouterr().out  # a staging dir is not a build
        removed = atomic.clean_leftovers(copy)
        assert removed == [dead] and alive.exists() and old_style.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# --- re-export and builds/ ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    from runtimes_support import realistic_tiny

    from kpface.export.checkpoint import save_weights
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(realistic_tiny(), path, "vit_kprpe_tiny")
    return path


def test_reexport_keeps_builds_of_an_unchanged_graph_and_refuses_otherwise(
        weights_file, tmp_path, capsys):
    from kpface.export.onnx_export import export_model
    from kpface.runtimes.build import build
    d = tmp_path / "recognizer"
    export_model("vit_kprpe_tiny", d, weights=weights_file)
    build(d, "onnxruntime", "fp32", n_calib=0, n_heldout=4, threads=1)
    before = load_manifest(d)["files"]
    export_model("vit_kprpe_tiny", d, weights=weights_file)      # same graph: builds kept
    assert load_manifest(d)["files"] == before
    load_build(d, "onnxruntime", "fp32", manifest=load_manifest(d))
    # Random weights: another graph. Refused, and nothing changed.
    line = one_line_error(capsys, ["export", "recognizer", "--arch", "vit_kprpe_tiny",
                                   "--out", d], "pass --force")
    assert "onnxruntime-fp32-cpu" in line and "model.onnx (sha256" in line
    print(f"\nrefusal (re-export): {line}")
    assert load_manifest(d)["files"] == before
    load_build(d, "onnxruntime", "fp32", manifest=load_manifest(d))
    with pytest.raises(InputError, match="pass --force"):
        export_model("vit_kprpe_tiny", d)
    assert cli_main(["export", "recognizer", "--arch", "vit_kprpe_tiny", "--out", str(d),
                     "--force"]) == 0
    capsys.readouterr()
    assert load_manifest(d)["files"] != before
    assert not (d / "builds").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recognizer"]


# --- SIGKILL at random points -----------------------------------------------------------------

CHILD = textwrap.dedent("""
    import logging, sys
    logging.disable(logging.CRITICAL)
    kind, model, weights = sys.argv[1:4]
    if kind == "export":
        from kpface.export.onnx_export import export_model
        work = lambda: export_model("vit_kprpe_tiny", model, weights=weights)
    else:
        from kpface.runtimes.build import build
        work = lambda: build(model, "onnxruntime", "fp32", n_calib=0, n_heldout=4, threads=1)
    print("ready", flush=True)
    while True:
        work()
        print("done", flush=True)
""")


def _check_intact(d: Path) -> None:
    m = load_manifest(d)                      # every hash
    sess = open_session(d, threads=1, manifest=m)
    out = sess.run({"image": np.zeros((1, 3, 112, 112), np.float32),
                    "keypoints": np.full((1, 5, 2), 0.5, np.float32)})
    assert out["embedding"].shape == (1, 512)
    sess.close()
    load_build(d, "onnxruntime", "fp32", manifest=m)  # the build too, every hash


@pytest.mark.parametrize("kind, seeds, window", [("export", (1, 2, 3), 6.0),
                                                 ("build", (4, 5, 6), 4.0)])
def test_sigkill_at_random_points_leaves_the_previous_directory(
        weights_file, tmp_path, kind, seeds, window):
    from kpface.export.onnx_export import export_model
    from kpface.runtimes.build import build
    d = tmp_path / "recognizer"
    export_model("vit_kprpe_tiny", d, weights=weights_file)
    build(d, "onnxruntime", "fp32", n_calib=0, n_heldout=4, threads=1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    survived = []
    for seed in seeds:
        delay = random.Random(seed).uniform(0.2, window)
        child = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(d), str(weights_file)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 env=env)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        _check_intact(d)
        partial = sum(".partial-" in p.name for p in
                      list(tmp_path.iterdir()) + list((d / "builds").iterdir()))
        survived.append((seed, round(delay, 2), partial))
    print(f"\n{kind}: {len(survived)} SIGKILLs survived (seed, seconds after start, staging "
          f"directories left so far): {survived}")
    # A later run removes what the killed ones left.
    (export_model("vit_kprpe_tiny", d, weights=weights_file) if kind == "export"
     else build(d, "onnxruntime", "fp32", n_calib=0, n_heldout=4, threads=1))
    left = [p.name for p in list(tmp_path.iterdir()) + list((d / "builds").iterdir())
            if ".partial-" in p.name]
    assert not left, left
    _check_intact(d)
