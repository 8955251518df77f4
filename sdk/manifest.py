"""The model directory contract: ``<dir>/model.onnx`` + ``<dir>/manifest.json``.

Every file a manifest names is listed in its ``files`` with its sha256, as a plain relative
path that stays inside the directory: :func:`load_manifest` refuses a directory whose files
are missing, changed, named by an absolute path or with ``..``, or reached through a symlink
that leaves the directory, and a manifest whose graphs (or torch weights) name a file that
``files`` does not list. :func:`model_file` is how every reader gets the path of a file to
open. Writes go through :mod:`kpface.atomic`: a temporary name and one rename, so an
interrupted export never leaves half a model behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .atomic import atomic_write_bytes, atomic_write_text, staging_dir  # noqa: F401
from .errors import InputError, ModelError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
BUILD_MANIFEST_NAME = "build.json"
SCHEMA_VERSION = 1


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def hash_files(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(contained(directory, name, str(directory))) for name in names}


def contained(directory: str | os.PathLike, name: Any, label: str) -> Path:
    """The real path of ``directory/name``, or ModelError unless ``name`` is a relative path
    without ``..`` that stays inside ``directory`` once symlinks are followed."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelError(f"{label}: the manifest names a file {name!r} that is not a file "
                         "name; re-export the model")
    pure = PurePosixPath(name)
    if (pure.is_absolute() or PureWindowsPath(name).drive or "\\" in name
            or ".." in pure.parts):
        raise ModelError(f"{label}: the manifest names {name!r}, a path outside the model "
                         "directory (absolute or with '..'); refusing to open it")
    root = Path(directory).resolve()
    real = (root / pure).resolve()
    if real != root and root not in real.parents:
        raise ModelError(f"{label}: {name} is a symlink that leaves the model directory "
                         f"(to {real}); refusing to open it")
    return real


def model_file(directory: str | os.PathLike, manifest: dict[str, Any], name: Any,
               label: str | None = None) -> Path:
    """The path of a file the manifest vouches for: listed in its ``files`` (with a sha256)
    and inside ``directory`` (:func:`contained`). Every file a reader opens goes through
    this; a file the manifest does not list is refused."""
    label = label or str(directory)
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(name, str) or name not in files:
        raise ModelError(f"{label}: {name!r} is not listed in the manifest's files (no sha256 "
                         "vouches for it); refusing to open it, re-export the model")
    return contained(directory, name, label)


def verified_file(directory: str | os.PathLike, manifest: dict[str, Any], name: Any,
                  label: str | None = None) -> Path:
    """:func:`model_file`, with its sha256 checked now (right before it is opened)."""
    label = label or str(directory)
    path = model_file(directory, manifest, name, label)
    _check_hash(path, name, manifest["files"][name], label)
    return path


def referenced_files(manifest: dict[str, Any]) -> list[Any]:
    """The files a model manifest's readers open: each graph's file and the torch weights."""
    graphs = manifest.get("graphs")
    names = [g.get("file") for g in graphs.values()] if isinstance(graphs, dict) else []
    if manifest.get("torch_weights"):
        names.append(manifest["torch_weights"])
    return names


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any],
                   files: list[str], name: str = MANIFEST_NAME) -> dict[str, Any]:
    """Hash ``files`` (relative to ``directory``) into ``manifest['files']`` and write it."""
    directory = Path(directory)
    manifest = dict(manifest)
    manifest.setdefault("schema", SCHEMA_VERSION)
    manifest["files"] = hash_files(directory, files)
    write_json(directory / name, manifest)
    return manifest


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"{path} is missing: {what} needs it; re-run the step that writes it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e}); re-export the model") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object; re-export the model")
    return data


def _check_hash(path: Path, name: str, expected: Any, label: str) -> None:
    if not path.is_file():
        raise ModelError(f"{label}: {name} is missing; re-export the model")
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(
            f"{label}: {name} does not match its manifest (sha256 {actual[:12]}... != "
            f"{str(expected)[:12]}...); the file was changed or truncated, re-export it")


def verify_files(directory: Path, manifest: dict[str, Any], label: str,
                 referenced: list[Any] | None = None) -> None:
    """Check every file of ``files`` (inside ``directory``, present, same sha256), and that
    each name in ``referenced`` is one of them."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ModelError(f"{label}: the manifest lists no files; re-export the model")
    for name in referenced or ():
        model_file(directory, manifest, name, label)
    for fname, expected in files.items():
        _check_hash(contained(directory, fname, label), fname, expected, label)


def load_manifest(directory: str | os.PathLike, verify: bool = True,
                  task: str | None = None) -> dict[str, Any]:
    """Read ``directory/manifest.json``; check file hashes and, if given, the task."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"model directory {directory} does not exist; run `kpface export` first")
    manifest = read_json(directory / MANIFEST_NAME, f"model directory {directory}")
    if task is not None and manifest.get("task") != task:
        raise ModelError(f"{directory} holds a {manifest.get('task')!r} model, "
                         f"expected a {task!r} model")
    if verify:
        verify_files(directory, manifest, str(directory), referenced_files(manifest))
    return manifest


def carry_builds(final: str | os.PathLike, staged: str | os.PathLike, graph_files: list[str],
                 force: bool = False) -> list[str]:
    """Before a re-export of ``final`` is switched in from ``staged``: keep the builds of the
    old export when its graphs are byte for byte those of the new one (hard links into
    ``staged/builds``, a copy where links are not possible); otherwise refuse, unless
    ``force``, since the builds would no longer match the graph. Returns the builds kept."""
    final, staged = Path(final), Path(staged)
    builds = final / "builds"
    names = sorted(p.name for p in builds.iterdir()
                   if p.is_dir() and not p.name.startswith(".")) if builds.is_dir() else []
    if not names:
        return []
    try:
        old = load_manifest(final, verify=False).get("files", {})
    except ModelError:
        old = {}
    new = hash_files(staged, graph_files)
    changed = [f for f in graph_files if old.get(f) != new[f]]
    if not changed:
        def link(src, dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        shutil.copytree(builds, staged / "builds", copy_function=link, symlinks=True,
                        ignore=shutil.ignore_patterns(".*"))
        log.info("%s: the graph is unchanged; kept its %d build(s)", final, len(names))
        return names
    what = ", ".join(f"{f} (sha256 {str(old.get(f) or 'none')[:12]}... -> {new[f][:12]}...)"
                     for f in changed)
    if not force:
        raise InputError(f"{final} holds {len(names)} engine build(s) ({', '.join(names)}) of "
                         f"its current graph, and this export changes {what}: the builds would "
                         "no longer match it. Nothing was changed; pass --force (force=True) "
                         "to replace the model and drop its builds, or export to another "
                         "directory")
    log.warning("%s: the graph changed (%s); its %d build(s) are dropped (forced)", final, what,
                len(names))
    return []
