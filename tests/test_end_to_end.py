"""The whole path on a real photo through the CLI and the examples: MTCNN (real weights) ->
alignment -> tiny KP-RPE recognizer (random weights)."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from test_cli import assert_one_line_error, kpface

ROOT = Path(__file__).resolve().parents[1]


def test_run_writes_json_and_drawing(models_dir, astronaut_png, tmp_path):
    code, out, err = kpface("run", astronaut_png, "--models", models_dir,
                            "--json", tmp_path / "f.json", "--draw", tmp_path / "d.png")
    assert code == 0, err
    written = json.loads((tmp_path / "f.json").read_text())
    faces = written["images"][str(astronaut_png)]
    # each stage's weights block: MTCNN from its package, the tiny recognizer random
    assert written["models"]["detector"]["weights"]["source"] == "package"
    assert written["models"]["recognizer"]["weights"]["source"] == "random"
    assert written["models"]["recognizer"]["arch"] == "vit_kprpe_tiny"
    assert any(w.startswith("recognizer vit_kprpe_tiny: RANDOM") for w in written["warnings"])
    assert len(faces) == 1
    f = faces[0]
    assert set(f) == {"box", "score", "landmarks", "embedding"}
    assert len(f["embedding"]) == 512
    assert abs(np.linalg.norm(f["embedding"]) - 1) < 1e-3
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = f["landmarks"]
    assert lx < rx and mlx < mrx and max(ly, ry) < ny < min(mly, mry)
    drawn = cv2.imread(str(tmp_path / "d.png"))
    original = cv2.imread(str(astronaut_png))
    assert drawn.shape == original.shape and (drawn != original).any()


def test_no_face_is_not_an_error(models_dir, tmp_path):
    cv2.imwrite(str(tmp_path / "grey.png"), np.full((240, 320, 3), 128, np.uint8))
    code, out, err = kpface("run", tmp_path / "grey.png", "--models", models_dir,
                            "--json", tmp_path / "f.json")
    assert code == 0 and "no faces found" in err
    assert json.loads((tmp_path / "f.json").read_text())["images"] == {str(tmp_path / "grey.png"): []}


def test_bad_image_among_good_ones_loses_nothing(models_dir, astronaut_png, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, out, err = kpface("run", astronaut_png, tmp_path / "broken.jpg", "--models", models_dir,
                            "--json", tmp_path / "f.json")
    assert code != 0 and "Traceback" not in err and "broken.jpg" in err
    results = json.loads((tmp_path / "f.json").read_text())["images"]
    assert len(results[str(astronaut_png)]) == 1  # the good image's faces were still written


def test_compare_same_photo_and_mirror(models_dir, astronaut_png, tmp_path):
    mirrored = tmp_path / "mirror.png"
    cv2.imwrite(str(mirrored), cv2.imread(str(astronaut_png))[:, ::-1])
    code, out, err = kpface("compare", astronaut_png, astronaut_png, "--models", models_dir,
                            "--allow-random")
    assert code == 0, err
    assert "cosine 1.0000 -> same person" in out and "MEANINGLESS" in out
    code, out, err = kpface("compare", astronaut_png, mirrored, "--models", models_dir,
                            "--allow-random")
    assert code == 0 and "cosine" in out


def test_compare_gives_no_verdict_from_random_weights(models_dir, astronaut_png):
    """Issue 14: the cosine, what is wrong and how to fix it, no same/different, exit 4."""
    code, out, err = kpface("compare", astronaut_png, astronaut_png, "--models", models_dir)
    assert code == 4
    assert "cosine 1.0000" in out
    assert "same person" not in out + err and "different people" not in out + err
    assert_one_line_error(code, err, "no verdict: the recognizer (vit_kprpe_tiny) has RANDOM "
                                     "weights")
    assert "--weights PATH or hf:OWNER/REPO" in err and "--allow-random" in err


def test_compare_without_face(models_dir, astronaut_png, tmp_path):
    cv2.imwrite(str(tmp_path / "grey.png"), np.full((100, 100, 3), 90, np.uint8))
    code, _, err = kpface("compare", astronaut_png, tmp_path / "grey.png", "--models", models_dir)
    assert_one_line_error(code, err, "no face found")


def test_example_compare_two_photos(models_dir, astronaut_png):
    p = subprocess.run([sys.executable, str(ROOT / "examples/compare_two_photos.py"),
                        str(astronaut_png), str(astronaut_png), "--models", str(models_dir)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 4, p.stderr  # the tiny recognizer's weights are random
    assert "cosine 1.000; no verdict: the recognizer (vit_kprpe_tiny) has RANDOM" in p.stderr
    assert "same person" not in p.stdout


def test_example_enroll_and_identify(models_dir, astronaut_png, tmp_path):
    people = tmp_path / "people" / "eileen"
    people.mkdir(parents=True)
    (people / "a.png").write_bytes(astronaut_png.read_bytes())
    cmd = [sys.executable, str(ROOT / "examples/enroll_and_identify.py"), str(tmp_path / "people"),
           str(astronaut_png), "--models", str(models_dir), "--gallery", str(tmp_path / "g.kpg")]
    p = subprocess.run(cmd + ["--allow-random"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "enrolled eileen: 1 photo(s)" in p.stdout and ": eileen (cosine 1.000)" in p.stdout
    # Second run: the gallery file is reused (no enrolment); without --allow-random the
    # random-weight recognizer gives the closest row and its score, but no verdict.
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "enrolled" not in p.stdout
    assert "closest eileen/a.png (cosine 1.000); no identity verdict" in p.stdout
    assert "RANDOM weights" in p.stdout


def test_pipeline_is_torch_free(models_dir, astronaut_png):
    code = (
        "import sys, kpface\n"
        "from kpface.image import load_image\n"
        f"pipe = kpface.FacePipeline.from_dir({str(models_dir)!r}, threads=1)\n"
        f"faces = pipe(load_image({str(astronaut_png)!r}))\n"
        "assert len(faces) == 1 and faces[0].embedding.shape == (512,)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
