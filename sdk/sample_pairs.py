"""Small verification pair sets made from the real photos available offline, for the demo, the
tests and a first look at ``kpface eval`` (no LFW download is possible here).

Identities: scikit-image's astronaut (Eileen Collins) and cameraman, matplotlib's Grace Hopper,
and the LFW faces of ``skimage.data.lfw_subset()`` (25x25 crops, enlarged and set into a
replicated border so a scene detector finds them; the subset has no names, so each crop counts
as one person; it may hold the same person twice, a little label noise in "different" pairs).
A "same" pair is a photo and a changed copy of it (mirror image, rescaled, rotated, brighter);
a "different" pair is two photos of different identities. These pairs are easier than LFW's
(the same photo on both sides): they show that a build keeps its answers, not how well a model
recognises people across photos.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError

NAMED = ("Eileen_Collins", "Grace_Hopper", "Cameraman")
VARIANTS = ("mirror", "rescaled", "rotated", "brighter")


def _hopper_bgr() -> np.ndarray:
    import cv2
    try:
        import matplotlib.cbook
        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except (ImportError, ValueError, OSError) as e:
        raise InputError(f"Grace Hopper's photo comes with matplotlib ({e}): "
                         "pip install 'kpface[bench]'") from None
    img = cv2.imread(str(path))
    if img is None:
        raise InputError(f"{path} cannot be read")
    return img


def _lfw_scene(crop: np.ndarray) -> np.ndarray:
    """A 25x25 LFW crop enlarged 5x inside a replicated border of 1.5 crop sizes: MTCNN finds
    all 100 faces of the subset in these (in 4x with a border of 2 sizes it misses 2)."""
    import cv2
    h, w = crop.shape[:2]
    big = cv2.resize(crop, (5 * w, 5 * h), interpolation=cv2.INTER_LINEAR)
    ph, pw = int(1.5 * h), int(1.5 * w)
    return cv2.copyMakeBorder(big, ph, ph, pw, pw, cv2.BORDER_REPLICATE)


def variant(image: np.ndarray, kind: str) -> np.ndarray:
    """A changed copy of a photo: ``mirror``, ``rescaled`` (0.7x), ``rotated`` (10 degrees
    about the centre, border replicated) or ``brighter`` (+35, contrast x1.1)."""
    import cv2
    if kind == "mirror":
        return np.ascontiguousarray(image[:, ::-1])
    if kind == "rescaled":
        return cv2.resize(image, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA)
    if kind == "rotated":
        h, w = image.shape[:2]
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 10, 1.0)
        return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    if kind == "brighter":
        return np.clip(image.astype(np.float32) * 1.1 + 35, 0, 255).astype(np.uint8)
    raise InputError(f"unknown variant {kind!r}; choose one of {', '.join(VARIANTS)}")


def identities(n_lfw: int = 20) -> dict[str, np.ndarray]:
    """``{name: photo BGR uint8}``: the three named photos and ``n_lfw`` LFW-subset faces."""
    from . import samples
    out = {"Eileen_Collins": samples.astronaut_bgr(), "Grace_Hopper": _hopper_bgr(),
           "Cameraman": samples.camera_bgr()}
    for i, crop in enumerate(samples.lfw_subset_bgr()[:n_lfw]):
        out[f"LFW_subset_{i:03d}"] = _lfw_scene(crop)
    return out


def make_pairs(n_lfw: int = 20, sets: int = 10, seed: int = 0
               ) -> tuple[dict[str, list[np.ndarray]], list[tuple[str, int, str, int]], int]:
    """(images per person, pairs ``(name_a, index_a, name_b, index_b)`` ordered set by set,
    same pairs first in each set, pairs of each kind per set). Image 0 of a person is the photo,
    the others its variants; every same pair is (photo, variant)."""
    people = identities(n_lfw)
    images = {name: [img] + [variant(img, k) for k in VARIANTS] for name, img in people.items()}
    same = [(n, 0, n, k + 1) for n in people for k in range(len(VARIANTS))]
    rng = np.random.default_rng(seed)
    names = list(people)
    per_kind = len(same) // sets
    if per_kind < 1:
        raise InputError(f"{len(same)} same pairs cannot fill {sets} sets")
    diff: list[tuple[str, int, str, int]] = []
    seen = set()
    while len(diff) < per_kind * sets:
        a, b = rng.choice(len(names), 2, replace=False)
        pair = (names[a], int(rng.integers(len(VARIANTS) + 1)), names[b],
                int(rng.integers(len(VARIANTS) + 1)))
        if pair not in seen:
            seen.add(pair)
            diff.append(pair)
    order = rng.permutation(len(same))[:per_kind * sets]
    same = [same[i] for i in order]
    pairs = []
    for s in range(sets):
        pairs += same[s * per_kind:(s + 1) * per_kind] + diff[s * per_kind:(s + 1) * per_kind]
    return images, pairs, per_kind


def write_lfw_layout(out: str | os.PathLike, n_lfw: int = 20, sets: int = 10, seed: int = 0
                     ) -> tuple[Path, Path]:
    """Write ``out/images/<name>/<name>_<n:04d>.jpg`` and ``out/pairs.txt`` (LFW's format);
    returns (pairs file, images folder). Image numbers start at 1 as in LFW."""
    import cv2
    out = Path(out)
    images, pairs, per_kind = make_pairs(n_lfw, sets, seed)
    root = out / "images"
    for name, imgs in images.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            cv2.imwrite(str(root / name / f"{name}_{i + 1:04d}.jpg"), img,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
    lines = [f"{sets}\t{per_kind}"]
    for a, ia, b, ib in pairs:
        lines.append(f"{a}\t{ia + 1}\t{ib + 1}" if a == b else f"{a}\t{ia + 1}\t{b}\t{ib + 1}")
    (out / "pairs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "pairs.txt", root


def write_bin_set(path: str | os.PathLike, n_lfw: int = 20, sets: int = 10, seed: int = 0) -> Path:
    """The same pairs as an InsightFace-layout ``.bin`` (JPEG bytes of the whole photos)."""
    import cv2

    from .pairs import write_bin
    images, pairs, _ = make_pairs(n_lfw, sets, seed)
    blobs, flags = [], []
    for a, ia, b, ib in pairs:
        for name, i in ((a, ia), (b, ib)):
            ok, buf = cv2.imencode(".jpg", images[name][i], [cv2.IMWRITE_JPEG_QUALITY, 95])
            blobs.append(buf.tobytes())
        flags.append(a == b)
    write_bin(path, blobs, flags)
    return Path(path)
