"""Core ML adapter, run side: availability, device key, the saved spec's check, prediction.

A Core ML build is an ML program (``<graph>.mlpackage``) converted from the torch model by
:mod:`kpface.export.coreml_convert` (the engine table names it as Core ML's builder: conversion
needs torch, which :mod:`kpface.runtimes` never imports). This module only reads what it wrote:
:func:`check_spec` reads a saved package's spec back (names, fp32 dtypes, enumerated batch
sizes) anywhere coremltools installs, and :class:`CoreMLSession` predicts, which needs macOS:
``load()`` says so elsewhere.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from kpface.errors import EngineUnavailable, ModelError

from .engines import Closable

log = logging.getLogger(__name__)

INSTALL = "pip install 'kpface[coreml]'  (coremltools)"
DEFAULT_BATCHES = (1, 8)


def import_coremltools():
    """The coremltools module, or :class:`EngineUnavailable` saying how to install it.

    Not silenced: this also runs when a build is opened, and nothing may redirect the
    process's stdout/stderr or logger levels at run time. (coremltools warns through
    ``logging`` about untested torch / scikit-learn versions; the CLI filters those.)"""
    try:
        import coremltools as ct
    except ImportError:
        raise EngineUnavailable(f"coremltools is not installed: {INSTALL}") from None
    return ct


def available(device: str | None = None, purpose: str = "run") -> tuple[bool, str]:
    """``"run"``: can Core ML predict here (macOS only)? ``"build"``: is coremltools here (the
    builder, :mod:`kpface.export.coreml_convert`, also needs torch and says so)?"""
    try:
        ct = import_coremltools()
    except EngineUnavailable as e:
        return False, str(e)
    if purpose == "build":
        return True, f"coremltools {ct.__version__} (conversion)"
    if sys.platform != "darwin":
        return False, (f"Core ML prediction needs macOS (this is {sys.platform}); "
                       f"`kpface build --runtime coreml` still converts here")
    return True, f"coremltools {ct.__version__}"


def device_key(device: str | None = None) -> str:
    return "apple"


def check_spec(path: str | os.PathLike, graph: dict, batches=DEFAULT_BATCHES) -> dict[str, Any]:
    """Read the saved package's spec back and check names, dtypes and enumerated shapes."""
    ct = import_coremltools()
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    fp32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    got_in = {}
    for i in spec.description.input:
        arr = i.type.multiArrayType
        got_in[i.name] = {"fp32": arr.dataType == fp32,
                          "shapes": [list(s.shape) for s in arr.enumeratedShapes.shapes]}
    got_out = {o.name: o.type.multiArrayType.dataType == fp32 for o in spec.description.output}
    problems = []
    for s in graph["inputs"]:
        want = [[b] + list(s["shape"][1:]) for b in batches]
        have = got_in.get(s["name"])
        if have is None:
            problems.append(f"input {s['name']} is missing")
        elif not have["fp32"] or have["shapes"] != want:
            problems.append(f"input {s['name']} is {have}, expected fp32 {want}")
    for o in graph["outputs"]:
        if not got_out.get(o["name"]):
            problems.append(f"output {o['name']} is missing or not fp32")
    if problems:
        raise ModelError(f"{path}: the converted Core ML spec is wrong ({'; '.join(problems)})")
    return {"inputs": got_in, "outputs": sorted(got_out),
            "spec_version": int(spec.specificationVersion)}


# --- sessions ------------------------------------------------------------------------------

class CoreMLSession(Closable):
    """``MLModel.predict`` over batches, padded to the enumerated batch sizes (macOS only).
    ``close()`` / ``with`` releases it."""

    def __init__(self, path: Path, batches, input_names, output_names):
        ct = import_coremltools()
        self._model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL)
        self._batches = sorted(batches)
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.provider = "CoreML:ALL"

    def _release(self) -> None:
        self._model = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        n = len(next(iter(feeds.values())))
        outs: dict[str, list] = {k: [] for k in self.output_names}
        i = 0
        while i < n:
            take = min(n - i, self._batches[-1])
            size = next(b for b in self._batches if b >= take)
            chunk = {}
            for k, v in feeds.items():
                part = np.asarray(v[i:i + take], np.float32)
                if size > take:
                    part = np.concatenate([part, np.repeat(part[-1:], size - take, 0)])
                chunk[k] = part
            res = self._model.predict(chunk)
            for k in self.output_names:
                outs[k].append(np.asarray(res[k], np.float32)[:take])
            i += take
        return {k: np.concatenate(v) for k, v in outs.items()}


def load(build_dir: str | os.PathLike, threads: int | None = None, info: dict | None = None,
         device: str | None = None) -> CoreMLSession:
    ok, why = available(device)
    if not ok:
        raise EngineUnavailable(f"{why}; copy {Path(build_dir)} to a Mac to run it")
    info = info or {}
    spec = info.get("spec", {})
    return CoreMLSession(Path(build_dir) / info.get("file", "model.mlpackage"),
                         info.get("batch_sizes", DEFAULT_BATCHES),
                         list(spec.get("inputs", ["image", "keypoints"])),
                         spec.get("outputs", ["embedding"]))
