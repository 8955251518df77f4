"""``kpface build``: make an engine artifact from a model directory and gate it on accuracy.

A build lives in ``MODEL_DIR/builds/<runtime>-<precision>-<device key>/`` next to its own
``build.json`` (sha256 of every artifact file, engine versions, calibration, accuracy figures).
It is written through :func:`kpface.manifest.staging_dir`: a build that fails (or fails its
gate) leaves nothing behind, and an older build stays in place until the new one is complete.

The work is done by the engine's builder module, imported by name from the engine table
(:mod:`kpface.runtimes.engines`; Core ML's lives in :mod:`kpface.export`). Every build is then
compared with the fp32 ONNX model (ONNX Runtime, CPU) on held-out inputs that took no part in
calibration, as :mod:`kpface.runtimes.gates` says. Below the gate the build raises
:class:`~kpface.errors.AccuracyGateError` with the figures in its message and installs
nothing; ``force=True`` installs it anyway with ``"gate": "forced"``. Only a measurement on the
engine itself is ``"gate": "passed"``: where the engine cannot run here and the builder's
stand-in was measured instead (Core ML on Linux), a build within its gate is recorded as
``"gate": "simulated"``, and opening it warns.

Detectors are the caller's: a recognizer's calibration faces come from a ``detect`` callable
(or known landmarks without one), and a detector build's detection gate from a
``make_detector`` factory (see :func:`kpface.export_cli.calibration_detector` and
:func:`kpface.export_cli.detector_factory`, which ``kpface build`` uses).
"""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import kpface
from kpface.errors import AccuracyGateError, InputError
from kpface.manifest import (BUILD_MANIFEST_NAME, MANIFEST_NAME, load_manifest, sha256_file,
                             staging_dir, write_manifest)

from . import gates
from .calibration import Detect, image_feeds, recognizer_data
from .engines import Session, check_graph_ops, get_engine
from .onnxruntime_rt import OrtSession
from .session import build_dir

log = logging.getLogger(__name__)

DEFAULT_CALIB = 128
DEFAULT_HELDOUT = 64


def build(model_dir: str | os.PathLike, runtime: str, precision: str,
          calib_images: str | os.PathLike | None = None, force: bool = False,
          device: str | None = None, progress: Callable[[str], None] | None = None, *,
          detector: Detect | None = None, make_detector: gates.DetectorFactory | None = None,
          threads: int | None = None, seed: int = 0, n_calib: int = DEFAULT_CALIB,
          n_heldout: int = DEFAULT_HELDOUT, options: dict | None = None,
          verify: gates.Verifier | None = None, max_drop: float = gates.EVAL_MAX_DROP
          ) -> dict[str, Any]:
    """Build ``model_dir`` for ``runtime`` at ``precision``; return the build's ``build.json``
    (plus ``"dir"``, where it was installed).

    ``calib_images``: a folder of face images for calibration (default: scikit-image's sample
    faces). ``detector``: for recognizers, a ``detect(image_bgr) -> [objects with
    .landmarks]`` callable that finds the calibration and held-out faces, or None (known
    landmarks of the sample faces). ``make_detector``: for detectors (required), a factory
    that makes the detector running on given sessions ({graph name: Session}; {} = the fp32
    ONNX graphs), so the gate can compare detections. ``options``: engine build options, only
    the keys of the engine table's ``options`` column (others are refused before any work),
    over the defaults the manifest recommends for this engine (``build_options``).
    ``verify``: for recognizers, a :data:`~kpface.runtimes.gates.Verifier` (face pairs:
    :func:`kpface.evaluation.make_verifier`, as ``kpface build --eval`` passes); the build then
    also may lose at most ``max_drop`` points of verification accuracy against fp32.
    """
    say = progress or (lambda m: log.info("%s", m))
    t_start = time.perf_counter()
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    engine = get_engine(runtime)
    engine.check_precision(precision)
    # A model may recommend build options per engine (manifest "build_options"); --option wins.
    defaults = (manifest.get("build_options") or {}).get(runtime) or {}
    options = engine.check_options({**defaults, **(options or {})})
    if detector is not None and not callable(detector):
        raise InputError(f"build() takes a detect(image) callable as detector, not "
                         f"{detector!r}; open a detector directory with "
                         "kpface.export_cli.calibration_detector (as `kpface build --detector` does)")
    builder = engine.require(device, purpose="build")
    task = manifest.get("task")
    graphs = manifest.get("graphs", {})
    if engine.lacks and not getattr(builder, "FROM_TORCH", False):
        # An engine without an op the graph uses (GridSample): refused before any work; a
        # builder that rebuilds from torch chooses the export options itself.
        for g in graphs.values():
            check_graph_ops(runtime, _op_types(model_dir / g["file"]), manifest)
    if task != "recognizer" and precision == "int8":
        raise InputError(f"int8 builds are made for recognizers only so far; {model_dir} is a "
                         f"{task}: build it at fp32 or fp16")
    if task != "recognizer" and runtime in ("tensorrt", "coreml"):
        raise InputError(f"{runtime} builds are made for recognizers only so far; run the "
                         f"{task} on onnxruntime or openvino")
    if verify is not None and task != "recognizer":
        raise InputError(f"{model_dir} is a {task}: verification accuracy gates recognizers")
    if task == "detector" and make_detector is None:
        raise InputError(f"{model_dir} is a detector: its gate compares detections, so build() "
                         "needs make_detector (kpface.export_cli.detector_factory; `kpface build` "
                         "passes it)")
    key = builder.device_key(device)
    dest = build_dir(model_dir, runtime, precision, key)

    data = calib_desc = None
    if task == "recognizer":
        say(f"preparing {'calibration and ' if precision == 'int8' else ''}held-out face crops")
        data = recognizer_data(manifest, n_calib=n_calib if precision == "int8" else 0,
                               n_heldout=n_heldout, seed=seed, detect=detector,
                               user_images=calib_images)
        calib_desc = data.description
    elif calib_images is not None:
        raise InputError("--calib is used for int8 recognizer builds only")

    artifacts: dict[str, dict[str, Any]] = {}
    accuracy: dict[str, Any] = {}
    candidates: dict[str, Session] = {}
    verification = None
    simulated = False
    with staging_dir(dest) as tmp:
        for gname, g in graphs.items():
            onnx_path = model_dir / g["file"]
            say(f"building {model_dir.name}:{gname} for {runtime} at {precision} ({key})")
            info = builder.build(onnx_path, tmp, precision,
                                 data.calibration if precision == "int8" else None, manifest,
                                 device=device, progress=say, options=options, name=gname)
            artifacts[gname] = info
            say(f"measuring {gname} against the fp32 ONNX model")
            ref = OrtSession(onnx_path, threads=threads)
            cand = _gate_session(engine, builder, tmp, info, threads, device, manifest,
                                 model_dir, gname)
            if task == "recognizer":
                dense = manifest.get("landmarks")  # Part fViT's points: gated too
                acc = gates.embedding_agreement(
                    ref, cand, data.heldout,
                    landmarks=dense.get("output") if isinstance(dense, dict) else None)
                acc["inputs"] = (f"{len(data.heldout)} held-out aligned face crops "
                                 f"({', '.join(data.description['sources'])})")
                if verify is not None:
                    say("measuring verification accuracy against fp32 on the --eval pairs")
                    verification = gates.verification_agreement(verify, ref, cand, max_drop)
            else:
                acc = gates.output_agreement(ref, cand, image_feeds(manifest, g, seed=seed))
                acc["inputs"] = "real images resized to the graph input"
            acc["method"] = getattr(cand, "gate_method",
                                    f"{runtime} {precision} vs fp32 ONNX (onnxruntime CPU)")
            acc["provider"] = cand.provider
            if getattr(cand, "simulated", False):
                simulated = True
                acc["simulated"] = True
            if task == "detector":
                candidates[gname] = cand
            if task != "detector":
                _close(cand)
            _close(ref)
            del cand, ref
            accuracy[gname] = acc
        detections = None
        if task == "detector":
            say("comparing detections (boxes, landmarks) with the fp32 detector on real photos")
            detections = gates.detection_agreement(make_detector, candidates)
            for c in candidates.values():
                _close(c)
            candidates.clear()
        summary = gates.decide(task, precision, accuracy, detections, verification)
        passed = summary["passed"]
        if not passed:
            figures = gates.figures(summary)
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
            "options": options,
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
            "gate": ("simulated" if simulated else "passed") if passed else "forced",
            "build_seconds": round(time.perf_counter() - t_start, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        record = write_manifest(tmp, record, files, name=BUILD_MANIFEST_NAME)
    lm = summary.get("landmarks")
    say(f"installed {dest} (cosine mean {summary['mean']:.5f}, min {summary['min']:.5f}"
        + (f"; landmarks mean {lm['mean']:.3f} px, p99 {lm['p99']:.3f} px" if lm else "")
        + f"; gate {record['gate']})")
    if simulated:
        log.warning("%s %s build of %s: gate simulated, not measured on %s itself (%s)",
                    runtime, precision, model_dir.name, runtime, summary.get("method"))
    return {**record, "dir": str(dest)}


def _close(session) -> None:
    close = getattr(session, "close", None)
    if close is not None:
        close()


def _op_types(onnx_path: Path) -> set[str]:
    """The op types of an ONNX graph (empty, with a log line, without the onnx package)."""
    try:
        import onnx
    except ImportError:
        log.info("onnx is not installed: %s is built without checking its ops", onnx_path.name)
        return set()
    return {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}


def _gate_session(engine, builder, build_path: Path, info: dict, threads, device, manifest,
                  model_dir, graph: str) -> Session:
    """The session the gate measures: the engine's own, or the builder's stand-in where the
    engine cannot run here (Core ML on Linux)."""
    make = getattr(builder, "gate_session", None)
    if make is not None:
        return make(build_path, info, threads=threads, manifest=manifest, model_dir=model_dir,
                    graph=graph)
    return engine.load_adapter().load(build_path, threads=threads, info=info, device=device)
