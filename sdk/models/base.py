"""What every SDK model class shares: its manifest (loaded, checked, read with clear errors) and
its graphs, opened through :func:`kpface.runtimes.open_session` on the runtime and precision the
caller picks. Torch-free."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError, ModelError
from ..landmarks import LANDMARK_ORDER
from ..manifest import load_manifest


@dataclass
class Detection:
    """One face: ``box`` (x1, y1, x2, y2) float pixels, ``score`` in [0, 1], ``landmarks``
    [5, 2] (x, y) pixels in LANDMARK_ORDER."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray = field(default_factory=lambda: np.full((5, 2), np.nan, np.float32))

    def __post_init__(self):
        self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
        self.score = float(self.score)
        self.landmarks = np.asarray(self.landmarks, dtype=np.float32).reshape(5, 2)

    def to_dict(self) -> dict[str, Any]:
        return {"box": [float(v) for v in self.box], "score": float(self.score),
                "landmarks": np.asarray(self.landmarks, dtype=float).round(2).tolist()}


def check_min_face(value, what: str = "min_face") -> float:
    """``value`` as a float > 0, or InputError: below 1 a fraction of the shorter side, else
    pixels."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not v > 0:
        raise InputError(f"{what} must be a fraction of the image's shorter side (0 < x < 1) "
                         f"or pixels (>= 1), got {value!r}")
    return v


def check_score(value, what: str = "score") -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0.0 <= v <= 1.0:
        raise InputError(f"{what} must be a face probability in [0, 1], got {value!r}")
    return v


def label(manifest: dict) -> str:
    return str(manifest.get("name") or manifest.get("arch") or "model")


def require(manifest: dict, *keys: str) -> Any:
    """``manifest[k0][k1]...``, or a ModelError naming the missing entry."""
    node: Any = manifest
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise ModelError(f"{label(manifest)}: manifest has no {'.'.join(keys)!r}; "
                             "re-export it with this kpface version")
        node = node[k]
    return node


def check_landmark_order(manifest: dict, *keys: str) -> None:
    """The five points the model reads or writes must be in kpface's LANDMARK_ORDER."""
    order = tuple(require(manifest, *keys, "order"))
    if order != LANDMARK_ORDER:
        raise ModelError(f"{label(manifest)}: landmark order {order} is not kpface's "
                         f"{LANDMARK_ORDER}; re-export the model")


def graph_tensors(manifest: dict, kind: str, graph: str = "model") -> list[str] | None:
    """Names of a graph's ``inputs`` or ``outputs`` as the manifest lists them (None if it
    does not list them)."""
    specs = ((manifest.get("graphs") or {}).get(graph) or {}).get(kind)
    if not isinstance(specs, list):
        return None
    return [str(s.get("name")) for s in specs if isinstance(s, dict)]


def open_graph(model_dir, manifest: dict, graph: str = "model", runtime: str = "onnxruntime",
               precision: str = "fp32", threads: int | None = None, device: str | None = None):
    from kpface.runtimes import open_session  # lazy: keeps `import kpface` light
    return open_session(model_dir, runtime=runtime, precision=precision, graph=graph,
                        threads=threads, manifest=manifest, device=device)


class Model:
    """A model directory of one task, opened on one runtime. Subclasses name the task and the
    architecture prefix they handle, read their constants from ``self.manifest`` and open their
    graphs with :meth:`_session`.

    ``close()`` (or leaving a ``with`` block) closes the sessions it opened itself (not one a
    caller handed in); a closed model refuses to run."""

    arch_prefix = ""
    task = ""
    landmarks_key: tuple[str, ...] = ("landmarks",)  # where the manifest states the point order

    def __init__(self, model_dir: str | os.PathLike | None, runtime: str = "onnxruntime",
                 precision: str = "fp32", threads: int | None = None,
                 manifest: dict | None = None, device: str | None = None):
        if manifest is None:
            if model_dir is None:
                raise ModelError(f"{type(self).__name__} needs a model directory or a manifest")
            manifest = load_manifest(model_dir, task=self.task)
        self.model_dir = model_dir
        self.manifest = manifest
        self.name = label(manifest)
        self.arch = arch = str(manifest.get("arch", ""))
        if not arch.startswith(self.arch_prefix):
            raise ModelError(f"{model_dir or self.name} holds a {arch!r} model; "
                             f"{type(self).__name__} needs a {self.arch_prefix}* model")
        if self.landmarks_key:
            check_landmark_order(manifest, *self.landmarks_key)
        self._open_args = (runtime, precision, threads, device)
        self._owned: list = []

    def _session(self, graph: str = "model", threads: int | None = None):
        """Open ``graph`` with this model's runtime, precision and device (and its thread count
        unless ``threads`` is given); :meth:`close` closes it."""
        if self.model_dir is None:
            raise ModelError(f"{self.name}: no model directory to open graph {graph!r} from")
        runtime, precision, own, device = self._open_args
        session = open_graph(self.model_dir, self.manifest, graph, runtime, precision,
                             threads or own, device)
        self._owned.append(session)
        return session

    def close(self) -> None:
        """Close the sessions this model opened (idempotent)."""
        owned, self._owned = getattr(self, "_owned", []), []
        for session in owned:
            close = getattr(session, "close", None)
            if close is not None:
                close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
