"""`kpface gallery enroll / search / info / remove / compact / calibrate` on real photos (MTCNN +
the tiny random-weight recognizer), run through kpface.cli.main in this process."""
import cv2
import pytest

from kpface import samples
from kpface.cli import main
from kpface.gallery import Gallery

pytest.importorskip("faiss", reason="kpface gallery needs faiss-cpu (extra 'gallery')")


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    root = tmp_path_factory.mktemp("people")
    for person, image in (("eileen", samples.astronaut_bgr()), ("cameraman", samples.camera_bgr())):
        (root / person).mkdir()
        cv2.imwrite(str(root / person / "0.png"), image)
        cv2.imwrite(str(root / person / "1.png"), image[:, ::-1])
    cv2.imwrite(str(root / "coffee.jpg"), samples.coffee_bgr())  # no face
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_enroll_info_search_remove_compact(models_dir, people, tmp_path, capsys):
    g = tmp_path / "g.kpg"
    m = ["--models", models_dir, "--threads", "1"]
    code, out, err = run(capsys, "gallery", "enroll", people, "--gallery", g, *m)
    assert code == 0, err
    assert "enrolled 4 of 5 image(s)" in out and "4 row(s), 2 identities; index exact" in out
    assert "enrolling 5 image(s)" in err and "skipped: " in err and "no face found" in err
    code, out, _ = run(capsys, "gallery", "info", g)
    assert code == 0 and "rows        4 (2 identities, 512-d)" in out
    assert "vit_kprpe_tiny" in out and "RANDOM weights" in out
    assert "verdicts    the recognizer (vit_kprpe_tiny) has RANDOM weights" in out
    # Random weights: the candidates are listed, the verdict is refused with one line, exit 4.
    photo = people / "eileen" / "0.png"
    code, out, err = run(capsys, "gallery", "search", photo, "--gallery", g, "-k", "2", *m)
    assert code == 4 and "1. eileen/0.png  cosine 1.0000" in out and "2. eileen/1.png" in out
    assert err.count("\n") == 1 and err.startswith("kpface: error: no identity verdict")
    code, out, err = run(capsys, "gallery", "search", photo, "--gallery", g, "--allow-random", *m)
    assert code == 0 and "-> eileen (cosine 1.0000 >= threshold" in out
    code, out, err = run(capsys, "gallery", "remove", "eileen", "--label", "--gallery", g)
    assert code == 0 and "removed 2 row(s)" in out and "compact" in err
    with Gallery.open(g) as gal:
        assert gal.labels() == ["cameraman"]
    code, out, _ = run(capsys, "gallery", "compact", g)
    assert code == 0 and "compacted" in out
    # Enrolling again with another recognizer build is refused in one line.
    code, _, err = run(capsys, "gallery", "enroll", people, "--gallery", g, "--precision", "int8", *m)
    assert code == 2 and err.count("\n") == 1 and "no onnxruntime int8 build" in err


def test_calibrate_cli(models_dir, people, tmp_path, capsys):
    g = tmp_path / "g.kpg"
    m = ["--models", models_dir, "--threads", "1"]
    assert run(capsys, "gallery", "enroll", people / "eileen", "--gallery", g, *m)[0] == 0
    # (rows of an image directly in DIR are labelled by the file stem: "0", "1")
    strangers = tmp_path / "strangers"
    strangers.mkdir()
    cv2.imwrite(str(strangers / "cam.png"), samples.camera_bgr())
    cv2.imwrite(str(strangers / "cam2.png"), samples.camera_bgr()[:, ::-1])
    code, out, err = run(capsys, "gallery", "calibrate", strangers, "--gallery", g,
                         "--mated", people, "--target-fpir", "0.5", *m)
    assert code != 0 and "not in the gallery: cameraman" in err  # mates must be enrolled
    code, out, err = run(capsys, "gallery", "calibrate", strangers, "--gallery", g,
                         "--target-fpir", "0.5", *m)
    assert code == 0, err
    assert "FPIR 0.5000 on 2 non-mated searches (target 0.5)" in out
    with Gallery.open(g) as gal:
        assert gal.info()["threshold_source"] == "calibrated"
        assert f"threshold {gal.threshold:.4f}:" in out
        assert gal.labels() == ["0", "1"]


def test_bad_input_is_one_line(models_dir, tmp_path, capsys):
    m = ["--models", models_dir]
    cases = [("gallery", "info", tmp_path / "none.kpg"),
             ("gallery", "search", tmp_path / "none.png", "--gallery", tmp_path / "g.kpg", *m),
             ("gallery", "enroll", tmp_path / "empty", "--gallery", tmp_path / "g.kpg", *m),
             ("gallery", "remove", "x", "--gallery", tmp_path / "none.kpg")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.kpg").write_bytes(b"junk" * 50)
    cases.append(("gallery", "info", tmp_path / "junk.kpg"))
    for argv in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and err.startswith("kpface: error: "), (argv, err)
