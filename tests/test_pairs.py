"""kpface.pairs: LFW pairs.txt and InsightFace .bin files made here from the real sample photos,
and .bin files that try to run code (refused in one line, nothing runs)."""
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest

from kpface.errors import InputError
from kpface.pairs import load_bin, read_bin, read_pairs, write_bin

pytest.importorskip("skimage")


def _jpg(img):
    return cv2.imencode(".jpg", img)[1].tobytes()


@pytest.fixture(scope="module")
def photos():
    from kpface import samples
    a = samples.astronaut_bgr()
    return {"a": a, "a_mirror": a[:, ::-1].copy(), "c": samples.camera_bgr()}


def _lfw(tmp_path, photos, lines):
    for person, imgs in (("Eileen_Collins", [photos["a"], photos["a_mirror"]]),
                         ("Cameraman", [photos["c"]])):
        (tmp_path / "img" / person).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            cv2.imwrite(str(tmp_path / "img" / person / f"{person}_{i + 1:04d}.jpg"), img)
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, tmp_path / "img"


def test_lfw_pairs_file(tmp_path, photos):
    path, img = _lfw(tmp_path, photos, ["2 1", "Eileen_Collins 1 2",
                                        "Eileen_Collins 1 Cameraman 1",
                                        "Eileen_Collins 2 1", "Cameraman 1 Eileen_Collins 2"])
    ps = read_pairs(path, img)
    assert len(ps) == 4 and ps.same.tolist() == [True, False, True, False]
    assert ps.folds.tolist() == [0, 0, 1, 1] and "2 folds" in ps.fold_note
    assert len(ps.image_names) == 3  # each image once
    i, j = ps.pairs[0]
    np.testing.assert_array_equal(ps.load(i), cv2.imread(str(img / ps.image_names[i])))
    assert ps.load(j).shape == photos["a"].shape


@pytest.mark.parametrize("lines, message", [
    (["1 1", "Eileen_Collins 1 3", "Eileen_Collins 1 Cameraman 1"], "does not exist"),
    (["3 1", "Eileen_Collins 1 2", "Eileen_Collins 1 Cameraman 1"], "pair lines follow"),
    (["ten", "Eileen_Collins 1 2"], "header"),
    (["1 1", "Eileen_Collins 1", "Eileen_Collins 1 Cameraman 1"], "expected 'name n1 n2'"),
])
def test_lfw_pairs_file_errors_are_one_line(tmp_path, photos, lines, message):
    path, img = _lfw(tmp_path, photos, lines)
    with pytest.raises(InputError, match=message) as e:
        read_pairs(path, img)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="--images"):
        read_pairs(path)


def test_bin_round_trip_and_numpy_flags(tmp_path, photos):
    blobs = [_jpg(photos["a"]), _jpg(photos["a_mirror"]), _jpg(photos["a"]), _jpg(photos["c"])]
    write_bin(tmp_path / "set.bin", blobs, [True, False])
    ps = read_bin(tmp_path / "set.bin")
    assert ps.same.tolist() == [True, False] and ps.pairs.tolist() == [[0, 1], [2, 3]]
    assert ps.load(3).shape[:2] == photos["c"].shape[:2]
    # Flags as a numpy bool array, at every pickle protocol (some .bin files hold one).
    for proto in (2, 3, 4, 5):
        data = pickle.dumps((blobs, np.array([True, False])), protocol=proto)
        assert load_bin(data)[1] == [True, False], proto
    for bad in (np.array([1, 0]), np.array([True, False], object), np.zeros((1, 2), bool)):
        with pytest.raises(pickle.UnpicklingError):
            load_bin(pickle.dumps((blobs, bad)))


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("make", [
    lambda marker: ([_System(f"touch {marker}")], [True]),      # os.system as an image
    lambda marker: ([b"x", b"y"], _System(f"touch {marker}")),  # ... as the flags
    lambda marker: _System(f"touch {marker}"),                   # ... as the whole file
    lambda marker: ([b"x", b"y"], [_Eval()]),
    lambda marker: {"images": [b"x", b"y"], "flags": [True]},   # a dict
    lambda marker: ([b"x", "y"], [True]),                        # a str image
    lambda marker: ([b"x", b"y"], [1]),                          # an int flag
    lambda marker: ([b"x", b"y", b"z"], [True]),                 # odd image count
])
def test_hostile_or_wrong_bin_is_refused(tmp_path, make):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(make(marker)))
    with pytest.raises(InputError, match="refused") as e:
        read_bin(path)
    assert "\n" not in str(e.value) and not marker.exists()


def test_unreadable_bin(tmp_path):
    path = tmp_path / "broken.bin"
    path.write_bytes(pickle.dumps(([b"x", b"y"], [True]))[:-5])
    with pytest.raises(InputError, match="not a readable .bin"):
        read_bin(path)
    (tmp_path / "noise.bin").write_bytes(os.urandom(200))
    with pytest.raises(InputError):
        read_bin(tmp_path / "noise.bin")
    with pytest.raises(InputError, match="does not exist"):
        read_pairs(tmp_path / "missing.bin")


def test_cli_refuses_a_bin_that_calls_os_system_in_one_line(tmp_path, tiny_recognizer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"x", b"y"], _System(f"touch {marker}"))))
    p = subprocess.run([sys.executable, "-m", "kpface", "eval", str(tiny_recognizer),
                        "--pairs", str(path), "--aligned", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "refused" in errors[0] and "posix.system" in errors[0]
    assert "Traceback" not in p.stderr and not marker.exists()
