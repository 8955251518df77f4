"""``kpface eval``: verification accuracy of a recognizer and of every build of it.

    report = evaluate("models/recognizer", "pairs.txt", images="lfw/")     # or "lfw.bin"

A pair set (:mod:`kpface.pairs`) is read once; each image it uses is loaded once, its face found
once (the pipeline's detector, largest face; or ``aligned=True``: the image is an ArcFace-aligned
crop, the five points are the template scaled to it) and cut once the way the recognizer's
manifest says; then every way of running the model embeds the same crops: the exported fp32 ONNX
file on ONNX Runtime (the reference) and each build in ``MODEL_DIR/builds/`` that can run here,
each opened through :func:`kpface.runtimes.open_session`. Per way, :mod:`kpface.verification`
gives 10-fold accuracy, the best threshold, the accuracy at the manifest's threshold, TAR at
FAR=1e-3 (with >= 1,000 impostor pairs), how many same/different answers differ from the
reference's, and one ROC chart shows them all. An image without a face leaves its pairs without
a similarity: they count as wrong (the LFW convention) unless ``missing="exclude"``.

:func:`make_verifier` is the same measurement for ``kpface build --eval``: a callable that
takes open sessions ({name: Session}) and returns their verification figures, so the build
(:mod:`kpface.runtimes`, which imports no SDK class) can gate on the accuracy drop.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import EngineUnavailable, InputError, ModelError
from .manifest import BUILD_MANIFEST_NAME, MANIFEST_NAME, load_manifest, read_json
from .pairs import PairSet, read_pairs
from .verification import kfold_accuracy, roc_curve

log = logging.getLogger(__name__)

REFERENCE = ("onnxruntime", "fp32")
PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}
Progress = Callable[[str], None]


@dataclass
class Way:
    """One way of running the model: the exported ONNX file or one build."""

    label: str
    runtime: str
    precision: str
    device: str | None = None
    build: str | None = None           # build folder name; None: model.onnx
    skipped: str | None = None         # why it cannot run here
    recognizer: Any = field(default=None, repr=False)


def ways(model_dir: str | os.PathLike, manifest: dict) -> list[Way]:
    """The reference (fp32 ONNX on ONNX Runtime) then every build, by engine and precision
    (an ONNX Runtime fp32 CPU build is a copy of the reference and is not listed again)."""
    model_dir = Path(model_dir)
    out = [Way("onnxruntime fp32 (model.onnx)", *REFERENCE)]
    root = model_dir / "builds"
    found = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not (d / BUILD_MANIFEST_NAME).is_file():
            continue
        try:
            info = read_json(d / BUILD_MANIFEST_NAME, f"build {d.name}")
        except ModelError as e:
            found.append(Way(d.name, "?", "?", build=d.name, skipped=str(e)))
            continue
        rt, prec = str(info.get("runtime")), str(info.get("precision"))
        dev = info.get("device") or info.get("device_key")
        way = Way(f"{rt} {prec} ({info.get('device_key', dev)})", rt, prec, dev, d.name)
        if (rt, prec) == REFERENCE and info.get("device_key") == "cpu":
            continue  # a copy of model.onnx: the reference row measures it
        found.append(way)
    found.sort(key=lambda w: (w.runtime, PRECISION_ORDER.get(w.precision, 9), w.label))
    return out + found


def _open(model_dir: Path, manifest: dict, way: Way, threads: int | None) -> None:
    from .models import Recognizer
    try:
        way.recognizer = Recognizer(model_dir, way.runtime, way.precision, threads,
                                    manifest=manifest, device=way.device)
    except (ModelError, EngineUnavailable, InputError) as e:
        way.skipped = str(e)


class FaceFinder:
    """Where the face of an evaluation image is: (landmarks [5, 2], box) or None."""

    def __init__(self, detector_dir: str | os.PathLike | None = None, aligned: bool = False,
                 threads: int | None = None):
        self.aligned = aligned
        self.description = "aligned crops (ArcFace template points scaled to each image)"
        self._detect = None
        if aligned:
            return
        if detector_dir is None or not (Path(detector_dir) / MANIFEST_NAME).is_file():
            raise InputError(f"no detector model in {detector_dir}: pass --detector DIR, or "
                             "--aligned (kpface build: --eval-aligned) if the images are "
                             "already aligned face crops")
        from .models import load_detector, load_keypoints
        from .weights import is_random
        root = Path(detector_dir)
        det = load_detector(root, threads=threads)
        kp = None
        kp_dir = root.parent / "keypoints"
        if (kp_dir / MANIFEST_NAME).is_file():
            kp_man = load_manifest(kp_dir, task="keypoints")
            if not is_random(kp_man):
                kp = load_keypoints(kp_dir, threads=threads, manifest=kp_man)
        self._det, self._kp = det, kp
        self.description = (f"detector {root} ({det.arch}), largest face"
                            + (f", landmarks by {kp_dir} ({kp.arch})" if kp else ""))

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        if self.aligned:
            from .samples import template_landmarks
            h, w = image.shape[:2]
            return template_landmarks(w, h), np.array([0, 0, w - 1, h - 1], np.float32)
        from .enrolment import choose_face
        found = list(self._det.detect(image))
        if not found:
            return None
        face = choose_face(found)
        pts = face.landmarks
        if self._kp is not None:
            pts = self._kp.predict_many(image, [face])[0]
        return np.asarray(pts, np.float32).reshape(5, 2), np.asarray(face.box, np.float32)


def embed_images(pairset: PairSet, recognizers: Mapping[str, Any], finder: FaceFinder,
                 batch: int = 32, progress: Progress | None = None
                 ) -> tuple[dict[str, np.ndarray], list[int]]:
    """Embeddings [N images, D] per recognizer (NaN rows: no face) and the faceless images.
    Each image is loaded, searched and cropped once; every recognizer embeds the same crops."""
    say = progress or (lambda m: log.info("%s", m))
    first = next(iter(recognizers.values()))
    n = len(pairset.image_names)
    dims = {k: r.embedding_size for k, r in recognizers.items()}
    emb = {k: np.full((n, d), np.nan, np.float32) for k, d in dims.items()}
    faceless: list[int] = []
    t0, step = time.perf_counter(), max(batch, (n // 10) // batch * batch)
    for start in range(0, n, batch):
        ids, crops, pts = [], [], []
        for i in range(start, min(n, start + batch)):
            image = pairset.load(i)
            found = finder(image)
            if found is None:
                faceless.append(i)
                continue
            crop, p, _ = first.crop(image, found[0], box=found[1])
            ids.append(i)
            crops.append(crop)
            pts.append(p)
        if ids:
            for k, rec in recognizers.items():
                emb[k][ids] = rec.embed(crops, pts)
        done = min(n, start + batch)
        if done == n or done % step == 0:
            el = time.perf_counter() - t0
            say(f"embedding: {done}/{n} images with {len(recognizers)} way(s), {el:.0f} s"
                + (f", ~{el / done * (n - done):.0f} s left" if done < n else ""))
    return emb, faceless


def pair_cosines(emb: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine of each pair of rows (NaN where an image had no face)."""
    a, b = emb[pairs[:, 0]].astype(np.float64), emb[pairs[:, 1]].astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(na * nb, 1e-12)


def score(pairset: PairSet, sims: np.ndarray, threshold: float | None, missing: str,
          reference: np.ndarray | None = None) -> dict[str, Any]:
    """Verification figures of one way's pair similarities."""
    named = {"manifest": threshold} if threshold is not None else None
    v = kfold_accuracy(sims, pairset.same, pairset.folds, missing=missing, thresholds=named)
    out = v.to_dict()
    if reference is not None and threshold is not None:
        both = ~np.isnan(sims) & ~np.isnan(reference)
        out["answers_changed_vs_reference"] = int(((sims >= threshold) != (reference >= threshold))
                                                  [both].sum())
    return out


def evaluate(model_dir: str | os.PathLike, pairs: str | os.PathLike,
             images: str | os.PathLike | None = None, detector: str | os.PathLike | None = None,
             aligned: bool = False, out_dir: str | os.PathLike | None = None,
             threads: int | None = None, missing: str = "wrong", batch: int = 32,
             progress: Progress | None = None) -> dict[str, Any]:
    """Verification accuracy of every way of running ``model_dir`` (see the module
    docstring). ``detector``: a detector model directory (default ``MODEL_DIR/../detector``).
    Writes ``roc.png`` and ``eval.json`` into ``out_dir`` when given."""
    say = progress or (lambda m: log.info("%s", m))
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir, task="recognizer")
    pairset = read_pairs(pairs, images)
    say(f"pairs: {pairset.describe()}")
    finder = FaceFinder(None if aligned else (detector or model_dir.parent / "detector"),
                        aligned=aligned, threads=threads)
    say(f"faces: {finder.description}")
    all_ways = ways(model_dir, manifest)
    for w in all_ways:
        if w.skipped is None:
            _open(model_dir, manifest, w, threads)
    if all_ways[0].skipped:
        raise ModelError(f"{model_dir}: the fp32 ONNX model cannot be opened: "
                         f"{all_ways[0].skipped}")
    live = {w.label: w.recognizer for w in all_ways if w.skipped is None}
    say(f"ways: {', '.join(live)}" + "".join(f"; skipped {w.label}: {w.skipped}"
                                               for w in all_ways if w.skipped))
    emb, faceless = embed_images(pairset, live, finder, batch=batch, progress=say)
    threshold = all_ways[0].recognizer.threshold
    ref = pair_cosines(emb[all_ways[0].label], pairset.pairs)
    results = []
    for w in all_ways:
        row: dict[str, Any] = {"label": w.label, "runtime": w.runtime, "precision": w.precision,
                               "build": w.build}
        if w.skipped is not None:
            row["skipped"] = w.skipped
        else:
            sims = pair_cosines(emb[w.label], pairset.pairs)
            row.update(score(pairset, sims, threshold, missing,
                             None if w is all_ways[0] else ref))
            row["_sims"] = sims
        results.append(row)
    lost_pairs = int(np.isin(pairset.pairs, faceless).any(axis=1).sum())
    report = {"model_dir": str(model_dir), "arch": manifest.get("arch"),
              "pairs": {"file": str(pairs), "kind": pairset.kind, "count": len(pairset),
                        "same": int(pairset.same.sum()), "images": len(pairset.image_names),
                        "folds": pairset.fold_note},
              "faces": {"how": finder.description, "images_without_face": len(faceless),
                        "examples": [pairset.image_names[i] for i in faceless[:5]],
                        "pairs_without_face": lost_pairs,
                        "policy": ("counted as wrong (LFW convention)" if missing == "wrong"
                                   else "left out")},
              "threshold_manifest": threshold, "results": results}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        png = roc_chart(report, pairset, out / "roc.png")
        report["roc_png"] = str(png) if png else None
    for r in results:
        r.pop("_sims", None)
    if out_dir is not None:
        from .manifest import write_json
        write_json(Path(out_dir) / "eval.json", report)
        report["json"] = str(Path(out_dir) / "eval.json")
    return report


def roc_chart(report: dict, pairset: PairSet, path: Path) -> Path | None:
    """One ROC chart (TAR against FAR, log FAR) with a curve per way that ran."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no ROC chart (pip install 'kpface[bench]')")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for r in report["results"]:
        if "_sims" not in r:
            continue
        fpr, tpr = roc_curve(r["_sims"], pairset.same)
        floor = 0.5 / max(1, int((~pairset.same).sum()))
        ax.step(np.maximum(fpr, floor), tpr, where="post",
                label=f"{r['label']}: {100 * r['accuracy']:.2f}% +- {100 * r['std']:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate (impostor pairs accepted)")
    ax.set_ylabel("true accept rate (genuine pairs accepted)")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{report['arch']} on {pairset.name} ({len(pairset)} pairs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_verifier(model_dir: str | os.PathLike, pairs: str | os.PathLike,
                  images: str | os.PathLike | None = None,
                  detector: str | os.PathLike | None = None, aligned: bool = False,
                  threads: int | None = None, missing: str = "wrong",
                  progress: Progress | None = None
                  ) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """``verify({name: Session}) -> {"pairs": ..., name: figures, ...}`` for the build gate
    (``kpface build --eval``). The pairs file and the detector are opened at once, so bad
    input fails before any build work."""
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir, task="recognizer")
    pairset = read_pairs(pairs, images)
    finder = FaceFinder(None if aligned else (detector or model_dir.parent / "detector"),
                        aligned=aligned, threads=threads)

    def verify(sessions: Mapping[str, Any]) -> dict[str, Any]:
        from .models import Recognizer
        say = progress or (lambda m: log.info("%s", m))
        say(f"verification pairs: {pairset.describe()}; faces: {finder.description}")
        recs = {k: Recognizer(manifest=manifest, session=s) for k, s in sessions.items()}
        emb, faceless = embed_images(pairset, recs, finder, progress=say)
        threshold = next(iter(recs.values())).threshold
        out: dict[str, Any] = {"pairs": f"{pairset.describe()}", "faces": finder.description,
                               "images_without_face": len(faceless), "missing": missing}
        for k in recs:
            figures = score(pairset, pair_cosines(emb[k], pairset.pairs), threshold, missing)
            out[k] = {key: figures[key] for key in ("accuracy", "std", "threshold", "pairs",
                                                     "missing", "at_threshold")}
        return out
    return verify


def ways_table(report: dict) -> list[list[str]]:
    """Rows of the printed table: one per way."""
    rows = []
    thr = report["threshold_manifest"]
    ref_acc = next((r["accuracy"] for r in report["results"] if "accuracy" in r), None)
    for r in report["results"]:
        if "skipped" in r:
            rows.append([r["label"], f"skipped: {r['skipped']}"])
            continue
        tar = r.get("tar_at_far")
        drop = "" if ref_acc is None or r is report["results"][0] else \
            f"{100 * (r['accuracy'] - ref_acc):+.2f}"
        rows.append([r["label"], f"{100 * r['accuracy']:.2f} +- {100 * r['std']:.2f}", drop,
                     f"{r['threshold']:.3f}",
                     f"{100 * r['at_threshold'].get('manifest', float('nan')):.2f} (at {thr:g})",
                     f"{100 * tar['tar']:.2f}" if tar else "-",
                     str(r.get("answers_changed_vs_reference", "-"))])
    return rows


def format_report(report: dict) -> str:
    head = ["way", "accuracy % (10-fold)", "vs fp32", "best thr", "accuracy % at manifest thr",
            "TAR@FAR=1e-3 %", "answers changed"]
    rows = ways_table(report)
    full = [r for r in rows if len(r) == len(head)]
    widths = [max([len(h)] + [len(r[i]) for r in full]) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        if len(cells) != len(head):
            return f"{cells[0].ljust(widths[0])}  {cells[1]}"
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    p, f = report["pairs"], report["faces"]
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    first = next((r for r in report["results"] if "accuracy" in r), {})
    if not first.get("tar_at_far"):
        out.append(f"TAR@FAR=1e-3: needs >= 1000 different-person pairs "
                   f"(this set has {p['count'] - p['same']})")
    if f["images_without_face"]:
        out.append(f"no face found in {f['images_without_face']} image(s) (e.g. "
                   f"{', '.join(f['examples'])}): their {f['pairs_without_face']} pair(s) "
                   f"are {f['policy']}")
    else:
        out.append("a face was found in every image")
    return "\n".join(out)

