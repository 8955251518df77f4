"""``kpface build``: make an engine artifact from a model directory and gate it on accuracy.

A build lives in ``MODEL_DIR/builds/<runtime>-<precision>-<device key>/`` next to its own
``build.json`` (sha256 of every artifact file, engine versions, calibration, accuracy figures).
It is written through :func:`kpface.manifest.staging_dir`: a build that fails (or fails its
gate) leaves nothing behind, and an older build stays in place until the new one is complete.

Accuracy gate: every build is compared with the fp32 ONNX model (ONNX Runtime, CPU) on held-out
inputs that took no part in calibration.

* recognizers: cosine of the embeddings on aligned face crops (see
  :mod:`kpface.runtimes.calibration`), gated on the mean and the minimum (:data:`GATES`);
* detectors and keypoint models (fp32 / fp16 only so far): cosine of every raw output on real
  images resized to each graph's input, gated on the worst output. Box IoU and landmark error
  gates are not implemented yet.

Below the gate the build raises :class:`~kpface.errors.AccuracyGateError` with the figures in
its message and installs nothing; ``force=True`` installs it anyway with ``"gate": "forced"``.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import kpface
from kpface.errors import AccuracyGateError, InputError, ModelError
from kpface.postprocess import box_iou, row_cosines
from kpface.manifest import (BUILD_MANIFEST_NAME, MANIFEST_NAME, load_manifest, read_json,
                             sha256_file, staging_dir, verify_files, write_manifest)

from .engines import get_engine
from .session import OrtSession, Session

log = logging.getLogger(__name__)

# Minimum embedding cosine vs the fp32 ONNX model on held-out crops: (mean, min).
GATES: dict[str, dict[str, float]] = {
    "fp32": {"mean": 0.9999, "min": 0.999},
    "fp16": {"mean": 0.999, "min": 0.99},
    "int8": {"mean": 0.99, "min": 0.97},
}
# Detector / keypoint graphs: minimum cosine of each raw output (worst output, worst image).
OUTPUT_GATES: dict[str, float] = {"fp32": 0.9999, "fp16": 0.999}

DEFAULT_CALIB = 128
DEFAULT_HELDOUT = 64


def build_dir(model_dir: str | os.PathLike, runtime: str, precision: str, key: str) -> Path:
    return Path(model_dir) / "builds" / f"{runtime}-{precision}-{key}"


def _resolve_detector(detector: Any, model_dir: Path, threads: int | None):
    """A ``detect(image_bgr) -> [Detection]`` callable, or None.

    ``"auto"`` uses ``MODEL_DIR/../detector`` when it holds an exported detector (the layout of
    a models directory), so calibration faces come from the pipeline's own detection stage.
    """
    if detector is None or callable(detector):
        return detector
    if detector == "auto":
        candidate = model_dir.parent / "detector"
        if not (candidate / MANIFEST_NAME).is_file():
            return None
        detector = candidate
    from kpface.detect import load_detector
    det = load_detector(detector, threads=threads)
    log.info("calibration faces come from the detector in %s", detector)
    return det.detect


def embedding_agreement(ref: Session, cand: Session, faces, batch: int = 8,
                        output: str = "embedding") -> dict[str, Any]:
    """Cosine of ``cand``'s embeddings against ``ref``'s on ``faces`` (a FaceSet)."""
    names = [n for n in ref.input_names]
    a, b = [], []
    for feeds in faces.feeds(names, batch):
        a.append(ref.run(feeds)[output])
        b.append(cand.run(feeds)[output])
    cos = row_cosines(np.concatenate(a), np.concatenate(b))
    return {"n": int(len(cos)), "mean": float(cos.mean()), "min": float(cos.min()),
            "p01": float(np.percentile(cos, 1))}


def output_agreement(ref: Session, cand: Session, feeds_list: list[dict]) -> dict[str, Any]:
    per: dict[str, list[np.ndarray]] = {}
    for feeds in feeds_list:
        r, c = ref.run(feeds), cand.run(feeds)
        for name in ref.output_names:
            per.setdefault(name, []).append(row_cosines(r[name], c[name]))
    outs = {k: {"mean": float(np.concatenate(v).mean()), "min": float(np.concatenate(v).min())}
            for k, v in per.items()}
    return {"n": int(sum(len(f[next(iter(f))]) for f in feeds_list)), "outputs": outs,
            "mean": min(o["mean"] for o in outs.values()),
            "min": min(o["min"] for o in outs.values())}


# Detector builds must find the same faces as fp32: matched boxes with IoU >= 0.9, landmarks
# within 5% of the face size (sqrt of the fp32 box area; the eye distance is unstable on profile
# faces), no face missed or added.
DETECTION_GATES = {"iou_min": 0.9, "landmark_nme_max": 0.05}


def _detection_scenes() -> list[tuple[str, np.ndarray]]:
    """Real photographs for detector gates: faces at several sizes and a face-free scene."""
    import cv2
    import skimage.data as skd
    astro = cv2.cvtColor(skd.astronaut(), cv2.COLOR_RGB2BGR)
    return [("astronaut", astro),
            ("astronaut 0.5x", cv2.resize(astro, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)),
            ("camera", cv2.cvtColor(skd.camera(), cv2.COLOR_GRAY2BGR)),
            ("coffee (no face)", cv2.cvtColor(skd.coffee(), cv2.COLOR_RGB2BGR))]


def detection_agreement(model_dir: Path, candidates: dict[str, Session],
                        threads: int | None = None) -> dict[str, Any]:
    """Run the detector with its fp32 graphs and with ``candidates`` (graph name -> session) on
    real photographs; match faces by IoU and compare boxes and landmarks.

    Graph ``model`` is the detector's ``session``; other graphs (MTCNN's pnet, rnet, onet) are
    attributes of their own name.
    """
    from kpface.detect import load_detector
    ref = load_detector(model_dir, threads=threads)
    cand = load_detector(model_dir, threads=threads)
    for gname, sess in candidates.items():
        setattr(cand, "session" if gname == "model" else gname, sess)
    ious, nmes, missed, extra, images = [], [], 0, 0, []
    for name, image in _detection_scenes():
        r, c = ref.detect(image), cand.detect(image)
        images.append(f"{name}: {len(r)} face(s)")
        used: set[int] = set()
        for face in r:
            free = [k for k in range(len(c)) if k not in used]
            overlap = box_iou(face.box, np.array([c[k].box for k in free]).reshape(-1, 4))
            best, k = (float(overlap.max()), free[int(overlap.argmax())]) if free else (0.0, -1)
            if best < 0.5:
                missed += 1
                continue
            used.add(k)
            ious.append(best)
            x1, y1, x2, y2 = face.box
            size = np.sqrt(max((x2 - x1) * (y2 - y1), 1e-6))
            err = np.linalg.norm(face.landmarks - c[k].landmarks, axis=1).max()
            nmes.append(float(err / size))
        extra += len(c) - len(used)
    return {"images": images, "faces": len(ious) + missed, "missed": missed, "extra": extra,
            "iou_min": min(ious, default=1.0), "iou_mean": float(np.mean(ious)) if ious else 1.0,
            "landmark_nme_max": max(nmes, default=0.0),
            "gate": DETECTION_GATES}


def build(model_dir: str | os.PathLike, runtime: str, precision: str,
          calib_images: str | os.PathLike | None = None, force: bool = False,
          device: str | None = None, progress: Callable[[str], None] | None = None, *,
          detector: Any = "auto", threads: int | None = None, seed: int = 0,
          n_calib: int = DEFAULT_CALIB, n_heldout: int = DEFAULT_HELDOUT,
          options: dict | None = None) -> dict[str, Any]:
    """Build ``model_dir`` for ``runtime`` at ``precision``; return the build's ``build.json``
    (plus ``"dir"``, where it was installed).

    ``calib_images``: a folder of face images for calibration (default: scikit-image's sample
    faces). ``detector``: ``"auto"`` (the ``detector/`` model beside ``model_dir``, if any), a
    detector directory, a ``detect(image_bgr)`` callable, or None (known landmarks).
    ``options``: engine-specific quantization knobs (see each adapter's ``build``).
    """
    say = progress or (lambda m: log.info("%s", m))
    t_start = time.perf_counter()
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    engine = get_engine(runtime)
    engine.check_precision(precision)
    adapter = engine.require(device, purpose="build")
    task = manifest.get("task")
    graphs = manifest.get("graphs", {})
    if task != "recognizer" and precision == "int8":
        raise InputError(f"int8 builds are made for recognizers only so far; {model_dir} is a "
                         f"{task}: build it at fp32 or fp16")
    if task != "recognizer" and runtime in ("tensorrt", "coreml"):
        raise InputError(f"{runtime} builds are made for recognizers only so far; run the "
                         f"{task} on onnxruntime or openvino")
    key = adapter.device_key(device)
    dest = build_dir(model_dir, runtime, precision, key)
    gate = GATES[precision] if task == "recognizer" else {"min": OUTPUT_GATES[precision]}

    data = calib_desc = None
    if task == "recognizer":
        from .calibration import recognizer_data
        detect = _resolve_detector(detector, model_dir, threads)
        say(f"preparing {'calibration and ' if precision == 'int8' else ''}held-out face crops")
        data = recognizer_data(manifest, n_calib=n_calib if precision == "int8" else 0,
                               n_heldout=n_heldout, seed=seed, detect=detect,
                               user_images=calib_images)
        calib_desc = data.description
    elif calib_images is not None:
        raise InputError("--calib is used for int8 recognizer builds only")

    artifacts: dict[str, dict[str, Any]] = {}
    accuracy: dict[str, Any] = {}
    candidates: dict[str, Session] = {}
    with staging_dir(dest) as tmp:
        for gname, g in graphs.items():
            onnx_path = model_dir / g["file"]
            say(f"building {model_dir.name}:{gname} for {runtime} at {precision} ({key})")
            info = adapter.build(onnx_path, tmp, precision,
                                 data.calibration if precision == "int8" else None, manifest,
                                 device=device, progress=say, options=options, name=gname)
            artifacts[gname] = info
            say(f"measuring {gname} against the fp32 ONNX model")
            ref = OrtSession(onnx_path, threads=threads)
            cand = _gate_session(adapter, tmp, info, threads, device, manifest, model_dir, gname)
            if task == "recognizer":
                acc = embedding_agreement(ref, cand, data.heldout)
                acc["inputs"] = (f"{len(data.heldout)} held-out aligned face crops "
                                 f"({', '.join(data.description['sources'])})")
            else:
                from .calibration import image_feeds
                acc = output_agreement(ref, cand, image_feeds(manifest, g, seed=seed))
                acc["inputs"] = "real images resized to the graph input"
            acc["method"] = getattr(cand, "gate_method",
                                    f"{runtime} {precision} vs fp32 ONNX (onnxruntime CPU)")
            acc["provider"] = cand.provider
            if task == "detector":
                candidates[gname] = cand
            del cand, ref
            accuracy[gname] = acc
        worst = min(accuracy.values(), key=lambda a: a["min"])
        passed = all(a["min"] >= gate["min"] and a["mean"] >= gate.get("mean", -1)
                     for a in accuracy.values())
        detections = None
        if task == "detector":
            say("comparing detections (boxes, landmarks) with the fp32 detector on real photos")
            detections = detection_agreement(model_dir, candidates, threads)
            candidates.clear()
            passed = passed and detections["missed"] == 0 and detections["extra"] == 0 \
                and detections["iou_min"] >= DETECTION_GATES["iou_min"] \
                and detections["landmark_nme_max"] <= DETECTION_GATES["landmark_nme_max"]
        summary = {"metric": "embedding cosine" if task == "recognizer" else "output cosine",
                   "reference": "fp32 ONNX on onnxruntime CPU", "gate": gate, "passed": passed,
                   "mean": min(a["mean"] for a in accuracy.values()), "min": worst["min"],
                   "n": worst["n"]}
        if len(accuracy) == 1:
            summary.update({k: v for k, v in worst.items() if k not in summary})
        else:
            summary["graphs"] = accuracy
        if detections is not None:
            summary["detections"] = detections
        if not passed:
            figures = (f"cosine vs fp32 mean {summary['mean']:.5f} (gate >= "
                       f"{gate.get('mean', 0):g}), min {summary['min']:.5f} (gate >= "
                       f"{gate['min']:g}) on {summary['n']} held-out inputs")
            if detections is not None:
                figures += (f"; detections: {detections['missed']} missed, {detections['extra']} "
                            f"extra, box IoU min {detections['iou_min']:.3f} (gate >= "
                            f"{DETECTION_GATES['iou_min']}), landmark error max "
                            f"{detections['landmark_nme_max']:.3f} of the face size (gate <= "
                            f"{DETECTION_GATES['landmark_nme_max']})")
            if not force:
                raise AccuracyGateError(
                    f"{runtime} {precision} build of {model_dir.name} failed its accuracy gate: "
                    f"{figures}; nothing was installed. Calibrate on more or other faces "
                    f"(--calib FOLDER), choose another precision, or pass --force to keep it")
            log.warning("%s %s build of %s is below its gate (%s); kept because forced",
                        runtime, precision, model_dir.name, figures)
        files = [f for info in artifacts.values() for f in info["files"]]
        main = artifacts.get("model") or next(iter(artifacts.values()))
        record = {
            "kpface_version": kpface.__version__,
            "runtime": runtime, "precision": precision,
            "device": device or engine.devices[0], "device_key": key,
            "file": main["file"],
            "model": {"name": manifest.get("name", model_dir.name), "arch": manifest.get("arch"),
                      "task": task, "manifest_sha256": sha256_file(model_dir / MANIFEST_NAME),
                      "onnx": {g: graphs[g]["file"] for g in graphs},
                      "onnx_sha256": {g: manifest["files"][graphs[g]["file"]] for g in graphs}},
            "graphs": artifacts,
            "versions": main.get("versions", {}),
            "host": {"machine": platform.machine(), "system": platform.system()},
            "calibration": calib_desc if precision == "int8" else None,
            "heldout": {k: v for k, v in (calib_desc or {}).items()
                        if k in ("sources", "heldout_faces", "heldout_crops", "seed", "landmarks")}
            or None,
            "accuracy": summary,
            "gate": "passed" if passed else "forced",
            "build_seconds": round(time.perf_counter() - t_start, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        record = write_manifest(tmp, record, files, name=BUILD_MANIFEST_NAME)
    say(f"installed {dest} (cosine mean {summary['mean']:.5f}, min {summary['min']:.5f}; "
        f"gate {record['gate']})")
    return {**record, "dir": str(dest)}


def _gate_session(adapter, build_path: Path, info: dict, threads, device, manifest, model_dir,
                  graph: str):
    """The session the gate measures: the real one, or the adapter's stand-in where the engine
    cannot run here (Core ML on Linux)."""
    make = getattr(adapter, "gate_session", None)
    if make is not None:
        return make(build_path, info, threads=threads, manifest=manifest, model_dir=model_dir,
                    graph=graph)
    return adapter.load(build_path, threads=threads, info=info, device=device)


def load_build(model_dir: str | os.PathLike, runtime: str, precision: str,
               device: str | None = None, manifest: dict | None = None
               ) -> tuple[Path, dict[str, Any]]:
    """The installed build for this device: (directory, verified build.json)."""
    model_dir = Path(model_dir)
    engine = get_engine(runtime)
    engine.check_precision(precision)
    adapter = engine.require(device)
    key = adapter.device_key(device)
    d = build_dir(model_dir, runtime, precision, key)
    command = f"kpface build {model_dir} --runtime {runtime} --precision {precision}"
    if not (d / BUILD_MANIFEST_NAME).is_file():
        raise ModelError(f"{model_dir} has no {runtime} {precision} build for this device "
                         f"({key}); run `{command}`")
    info = read_json(d / BUILD_MANIFEST_NAME, f"the {runtime} {precision} build")
    try:
        verify_files(d, info, str(d))
    except ModelError as e:
        raise ModelError(f"{str(e).rsplit(';', 1)[0]}; rebuild it with `{command}`") from None
    if manifest is not None:
        graphs = manifest.get("graphs", {})
        built = info.get("model", {}).get("onnx_sha256", {})
        for g, meta in graphs.items():
            if g in built and built[g] != manifest.get("files", {}).get(meta["file"]):
                raise ModelError(f"{d} was built from another {meta['file']} than the one in "
                                 f"{model_dir}; rebuild it with `{command}`")
    return d, info


def open_build(model_dir: str | os.PathLike, runtime: str, precision: str, graph: str = "model",
               threads: int | None = None, manifest: dict | None = None,
               device: str | None = None) -> Session:
    """A session on ``graph`` of the installed ``runtime``/``precision`` build."""
    d, info = load_build(model_dir, runtime, precision, device, manifest)
    graphs = info.get("graphs", {})
    if graph not in graphs:
        raise ModelError(f"{d} holds no graph {graph!r} (it has: {', '.join(graphs)}); rebuild "
                         f"it with `kpface build {model_dir} --runtime {runtime} "
                         f"--precision {precision}`")
    adapter = get_engine(runtime).load_adapter()
    return adapter.load(d, threads=threads, info=graphs[graph], device=device)
