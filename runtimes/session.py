"""The dispatcher: the one seam between the SDK and the engines.

:func:`open_session` opens a graph of a model directory on an engine at a precision: the
exported ONNX file itself for ONNX Runtime fp32, else the installed build for this device
(``MODEL_DIR/builds/<runtime>-<precision>-<device key>/``), checked against its build.json.
Engine adapters are imported by name from the engine table, only when a build is opened (the
ONNX Runtime adapter, the reference engine, directly); this module sits on top of the package
and no module below it imports it back.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import logging

from kpface.errors import ModelError
from kpface.manifest import (BUILD_MANIFEST_NAME, contained, load_manifest, read_json,
                             verified_file, verify_files)

from .engines import Session, default_threads, get_engine  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def check_artifact(build: Path, info: dict[str, Any], name: Any) -> Path:
    """The path of a build's artifact ``name``: a file listed (and hashed) in build.json, or
    a directory (a Core ML package) every file of which is listed; inside the build."""
    label = str(build)
    path = contained(build, name, label)
    files = info.get("files") or {}
    if path.is_dir():
        unlisted = [str(p.relative_to(build.resolve())) for p in path.rglob("*")
                    if not p.is_dir() and str(p.relative_to(build.resolve())) not in files]
        if unlisted or not any(str(f).startswith(f"{name}/") for f in files):
            raise ModelError(f"{label}: {name} holds files build.json does not list "
                             f"({', '.join(unlisted[:3]) or 'none listed'}); refusing to open "
                             "it, rebuild it with `kpface build`")
        return path
    if name not in files:
        raise ModelError(f"{label}: {name!r} is not listed in build.json's files (no sha256 "
                         "vouches for it); refusing to open it, rebuild it with `kpface build`")
    return path


def build_dir(model_dir: str | os.PathLike, runtime: str, precision: str, key: str) -> Path:
    return Path(model_dir) / "builds" / f"{runtime}-{precision}-{key}"


def load_build(model_dir: str | os.PathLike, runtime: str, precision: str,
               device: str | None = None, manifest: dict | None = None,
               at: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any]]:
    """The installed build for this device, or the one in folder ``at``: (directory,
    verified build.json)."""
    model_dir = Path(model_dir)
    engine = get_engine(runtime)
    engine.check_precision(precision)
    try:  # the build is found and checked even where the engine cannot run (open_build says)
        adapter = engine.load_adapter()
    except ImportError:
        adapter = engine.require(device)
    key = adapter.device_key(device)
    d = Path(at) if at is not None else build_dir(model_dir, runtime, precision, key)
    command = f"kpface build {model_dir} --runtime {runtime} --precision {precision}"
    if not (d / BUILD_MANIFEST_NAME).is_file():
        engine.require(device)  # an engine that cannot run here says so first
        raise ModelError(f"{model_dir} has no {runtime} {precision} build for this device "
                         f"({key}); run `{command}`")
    info = read_json(d / BUILD_MANIFEST_NAME, f"the {runtime} {precision} build")
    try:
        verify_files(d, info, str(d))
        graphs = info.get("graphs")
        for g in (graphs.values() if isinstance(graphs, dict) else ()):
            check_artifact(d, info, g.get("file") if isinstance(g, dict) else None)
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
               device: str | None = None, at: str | os.PathLike | None = None) -> Session:
    """A session on ``graph`` of the installed ``runtime``/``precision`` build (or of the
    build in folder ``at``)."""
    d, info = load_build(model_dir, runtime, precision, device, manifest, at=at)
    graphs = info.get("graphs", {})
    if graph not in graphs:
        raise ModelError(f"{d} holds no graph {graph!r} (it has: {', '.join(graphs)}); rebuild "
                         f"it with `kpface build {model_dir} --runtime {runtime} "
                         f"--precision {precision}`")
    gate = info.get("gate")
    if gate == "simulated":
        log.warning("%s: this build's accuracy gate was simulated (%s), not measured on %s "
                    "itself; measure it where the engine runs before trusting it", d,
                    (info.get("accuracy") or {}).get("method", "a stand-in"), runtime)
    elif gate not in ("passed", None):
        log.warning("%s: this build is below its accuracy gate (gate %r, kept with --force)",
                    d, gate)
    adapter = get_engine(runtime).require(device)
    return adapter.load(d, threads=threads, info=graphs[graph], device=device)


def _has_build(model_dir: Path, runtime: str, precision: str, device: str | None) -> bool:
    key = get_engine(runtime).load_adapter().device_key(device)
    return (build_dir(model_dir, runtime, precision, key) / BUILD_MANIFEST_NAME).is_file()


def open_session(model_dir: str | os.PathLike, runtime: str = "onnxruntime",
                 precision: str = "fp32", graph: str = "model", threads: int | None = None,
                 manifest: dict | None = None, device: str | None = None,
                 exported: bool = False) -> Session:
    """Open ``graph`` of ``model_dir`` on ``runtime`` at ``precision``.

    Every runtime / precision opens the build made by ``kpface build`` for this device
    (``model_dir/builds/<runtime>-<precision>-<device key>/``), checked against its
    build.json; ONNX Runtime at fp32 without such a build (one with fused attention, say) runs
    the exported ONNX file itself, and so does it with ``exported=True``.
    """
    model_dir = Path(model_dir)
    manifest = manifest or load_manifest(model_dir)
    graphs = manifest.get("graphs", {})
    if graph not in graphs:
        raise ModelError(f"{model_dir} has no graph {graph!r} (it has: {', '.join(graphs)})")
    if runtime == "onnxruntime" and precision == "fp32" and (exported or not _has_build(
            model_dir, runtime, precision, device)):
        from .onnxruntime_rt import open_onnx
        path = verified_file(model_dir, manifest, graphs[graph].get("file"))
        return open_onnx(path, threads=threads, device=device)
    return open_build(model_dir, runtime, precision, graph=graph, threads=threads,
                      manifest=manifest, device=device)
