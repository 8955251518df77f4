"""The model directory contract: ``<dir>/model.onnx`` + ``<dir>/manifest.json``.

Every file a manifest names is listed with its sha256; :func:`load_manifest` refuses a
directory whose files are missing or whose hashes differ. Writes go through a temporary
name and a rename, so an interrupted export never leaves half a model behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ModelError

MANIFEST_NAME = "manifest.json"
BUILD_MANIFEST_NAME = "build.json"
SCHEMA_VERSION = 1


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling directory; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hash_files(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in names}


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


def verify_files(directory: Path, manifest: dict[str, Any], label: str) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ModelError(f"{label}: the manifest lists no files; re-export the model")
    for fname, expected in files.items():
        p = directory / fname
        if not p.is_file():
            raise ModelError(f"{label}: {fname} is missing; re-export the model")
        actual = sha256_file(p)
        if actual != expected:
            raise ModelError(
                f"{label}: {fname} does not match its manifest (sha256 {actual[:12]}... != "
                f"{str(expected)[:12]}...); the file was changed or truncated, re-export it")


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
        verify_files(directory, manifest, str(directory))
    return manifest
