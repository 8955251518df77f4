"""Which recognizer made a gallery's embeddings: its fingerprint and weights block.

The fingerprint is the sha256 of the recognizer's ``manifest.json`` (which lists the sha256 of
every model file, so it names the model exactly) and the build the embeddings came from:
runtime, precision and, for anything but ONNX Runtime fp32 (the exported file itself), the
sha256 of the build's ``build.json``. Embeddings of two fingerprints are not compared: a
gallery refuses queries from another model, and an index cache built for another fingerprint
is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..manifest import BUILD_MANIFEST_NAME, MANIFEST_NAME, load_manifest, sha256_file
from ..weights import describe, verdict_problem, weights_of


def _recognizer_dir(path: Path) -> Path:
    """A recognizer model directory, or a models directory holding ``recognizer/``."""
    if (path / MANIFEST_NAME).is_file():
        return path
    if (path / "recognizer" / MANIFEST_NAME).is_file():
        return path / "recognizer"
    raise ModelError(f"{path} is neither a recognizer model directory nor a models directory "
                     "with recognizer/; export one with `kpface export recognizer --out DIR`")


def _build_sha(model_dir: Path, runtime: str, precision: str, device: str | None) -> str | None:
    if runtime == "onnxruntime" and precision == "fp32":
        return None
    from kpface.runtimes.session import load_build  # lazy: engines only when a build is named
    d, _ = load_build(model_dir, runtime, precision, device)
    return sha256_file(d / BUILD_MANIFEST_NAME)


def describe_model(model: Any, runtime: str = "onnxruntime", precision: str = "fp32",
                   device: str | None = None) -> dict[str, Any]:
    """The ``model`` record a gallery stores, from a recognizer model directory (or a models
    directory), a :class:`~kpface.models.Recognizer` or a :class:`~kpface.FacePipeline`.

    ``{"fingerprint": hex, "arch", "embedding_size", "threshold", "manifest_sha256",
    "runtime", "precision", "build_sha256", "weights": {...}}``
    """
    rec = getattr(model, "recognizer", model)  # a FacePipeline holds its Recognizer
    if hasattr(rec, "manifest") and getattr(rec, "model_dir", None) is not None:
        runtime, precision, _, device = getattr(rec, "_open_args",
                                                (runtime, precision, None, device))
        model_dir = Path(rec.model_dir)
    elif isinstance(model, (str, os.PathLike)):
        model_dir = _recognizer_dir(Path(model).expanduser())
    else:
        raise ModelError(f"cannot tell which recognizer {type(model).__name__} is; pass its "
                         "model directory, a kpface Recognizer or a FacePipeline")
    manifest = load_manifest(model_dir, task="recognizer")
    record = {"arch": manifest.get("arch"), "embedding_size": manifest.get("embedding_size"),
              "threshold": manifest.get("threshold"),
              "manifest_sha256": sha256_file(model_dir / MANIFEST_NAME),
              "runtime": runtime, "precision": precision,
              "build_sha256": _build_sha(model_dir, runtime, precision, device),
              "weights": weights_of(manifest), "path": str(model_dir.resolve())}
    record["fingerprint"] = fingerprint(record)
    return record


def fingerprint(record: dict[str, Any]) -> str:
    keep = {k: record.get(k) for k in ("manifest_sha256", "runtime", "precision", "build_sha256")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def same_model(stored: dict[str, Any], given: dict[str, Any]) -> str | None:
    """None when ``given`` made embeddings comparable with ``stored``'s, else why not."""
    if stored.get("fingerprint") == given.get("fingerprint"):
        return None
    if stored.get("manifest_sha256") != given.get("manifest_sha256"):
        return (f"its embeddings come from another recognizer ({stored.get('arch')}, manifest "
                f"sha256 {str(stored.get('manifest_sha256'))[:12]}) than {given.get('path')} "
                f"({given.get('arch')}, {str(given.get('manifest_sha256'))[:12]})")
    return (f"its embeddings come from the {stored.get('runtime')} {stored.get('precision')} "
            f"build of this recognizer, not {given.get('runtime')} {given.get('precision')}")


def model_problem(stored: dict[str, Any] | None) -> str | None:
    """Why the gallery's model gives no identity verdict (random or partial weights)."""
    if not stored:
        return None
    return verdict_problem({"arch": stored.get("arch"), "weights": stored.get("weights") or {}})


def model_line(stored: dict[str, Any] | None) -> str:
    if not stored:
        return "no recognizer recorded (embeddings were added without a model)"
    weights = describe({"weights": stored.get("weights") or {}})
    return (f"{stored.get('arch')} on {stored.get('runtime')} {stored.get('precision')}, "
            f"{weights}; fingerprint {str(stored.get('fingerprint'))[:16]}")
