"""Export a registered architecture to a model directory and prove parity with torch.

``export_model`` builds the torch module, loads weights (or warns loudly that they are random),
writes one ONNX file per graph into a staging directory, runs each file in ONNX Runtime against
the torch module on fresh random inputs (a batch size other than the one traced, to exercise
the dynamic axes), and only then switches the directory into place with its manifest, in one
rename (:func:`kpface.manifest.staging_dir`). A re-export keeps the old directory's ``builds/``
when its graphs are unchanged, and refuses (unless ``force``) when they changed
(:func:`kpface.manifest.carry_builds`).
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import kpface
from kpface.errors import InputError, KpfaceError
from kpface.hub import HubFile, arch_for, download, is_hub_name
from kpface.manifest import carry_builds, staging_dir, write_manifest
from kpface.runtimes import onnxfile
from kpface.weights import from_source

from . import registry
from .checkpoint import load_weights
from .checkpoint import save_weights as write_weights

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# Parity gate (issue 2): max |onnx - torch| <= 1e-4 * max |torch|, and cosine >= 0.99999.
PARITY_REL_TOL = 1e-4
PARITY_MIN_COSINE = 0.99999
TORCH_WEIGHTS = "weights.safetensors"


class ParityError(KpfaceError):
    """The exported graph does not reproduce the torch module."""


def resolve_options(spec: registry.ArchSpec, options: dict[str, str] | None) -> dict[str, str]:
    """The architecture's export options with defaults filled in; unknown names or values
    are refused with the list of accepted ones."""
    options = dict(options or {})
    accepted = "; ".join(f"{k}={'|'.join(v)}" for k, v in spec.options.items()) or "none"
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise InputError(f"{spec.name} has no export option {', '.join(unknown)}; "
                         f"it accepts: {accepted}")
    resolved = {}
    for name, allowed in spec.options.items():
        value = str(options.get(name, allowed[0]))
        if value not in allowed:
            raise InputError(f"export option {name}={value} is not accepted by {spec.name}; "
                             f"choose {name}={'|'.join(allowed)}")
        resolved[name] = value
    return resolved


def _package(spec: registry.ArchSpec) -> str:
    """``"name version"`` of the distribution that ships ``spec``'s packaged weights."""
    import importlib.metadata
    if not spec.package:
        return "an installed package"
    try:
        return f"{spec.package} {importlib.metadata.version(spec.package)}"
    except importlib.metadata.PackageNotFoundError:
        return spec.package


def build_model(arch: str, weights: str | os.PathLike | None = None, strict: bool = True,
                task: str | None = None, options: dict[str, str] | None = None, seed: int = 0):
    """Return (spec, eval-mode module, source description for the manifest).

    ``weights``: a checkpoint path, ``hf:OWNER/REPO[@REVISION]`` (its model.safetensors from
    the Hugging Face cache, see :mod:`kpface.hub`) or a :class:`~kpface.hub.HubFile` already
    resolved, or None (the weights an installed package
    ships for ``arch``, else random). :func:`kpface.weights.from_source` turns the returned
    description into the manifest's ``weights`` block.

    The module is built under ``torch.manual_seed(seed)`` (the global generator is restored
    afterwards), so a random export, and the tensors a non-strict load leaves alone, are the
    same for the same architecture and seed; a random export also gets the architecture's
    ``random_init`` (the KP-RPE ViT's non-zero keypoint_linear).
    """
    spec = registry.get(arch, task)
    package = None
    if weights is None and spec.packaged_weights is not None:
        weights, package = spec.packaged_weights(), _package(spec)
    hub = None
    if is_hub_name(weights):
        arch_for(str(weights), spec.task, arch)  # a known repo must hold this arch
        weights = download(str(weights))
    if isinstance(weights, HubFile):  # resolved already (the CLI does it before torch loads)
        hub, weights = weights, weights.path
    init: dict[str, Any] = {"modules": f"the modules' own init under torch.manual_seed({seed})"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.factory(**resolve_options(spec, options)).eval()
        if weights is None and spec.random_init is not None:
            init.update(spec.random_init(model, torch.default_generator))  # the seeded stream
    if isinstance(weights, dict):
        # Packaged weights split over several files: {submodule name: path}.
        source = {"parts": {name: load_weights(model.get_submodule(name), path,
                                                remap=spec.remap_keys, strict=strict,
                                                arch=f"{arch}.{name}")
                            for name, path in weights.items()},
                  "random_weights": False}
    elif weights is not None:
        source = load_weights(model, weights, remap=spec.remap_keys, strict=strict, arch=arch)
        source["random_weights"] = False
    else:
        log.warning("!!! %s has RANDOM WEIGHTS: no --weights given. Its outputs are "
                    "meaningless for real faces; pass --weights PATH for a real model. !!!", arch)
        return spec, model, {"random_weights": True, "seed": seed, "init": init}
    source["strict"] = strict
    if package:
        source["package"] = package
    if hub is not None:
        source["hub"] = {"repo": hub.repo, "revision": hub.revision, "file": hub.file}
    return spec, model, source


def compare_outputs(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    ref64, got64 = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    diff = float(np.max(np.abs(ref64 - got64))) if ref64.size else 0.0
    scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
    denom = np.linalg.norm(ref64) * np.linalg.norm(got64)
    cosine = float(ref64 @ got64 / denom) if denom > 0 else float(np.array_equal(ref64, got64))
    return {"max_abs_diff": diff, "output_scale": scale,
            "rel_max_diff": diff / scale if scale > 0 else diff, "cosine": cosine}


def _onnx_session(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(module: torch.nn.Module, graph: registry.GraphSpec, onnx_path: Path,
                 batch: int = 3, seed: int = 1234) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    inputs = graph.example_inputs(batch, gen)
    with torch.no_grad():
        ref = module(*inputs)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    sess = _onnx_session(onnx_path)
    feeds = {s.name: t.numpy() for s, t in zip(graph.inputs, inputs)}
    got = sess.run([o.name for o in graph.outputs], feeds)
    per_output = {o.name: compare_outputs(r.detach().float().numpy(), g)
                  for o, r, g in zip(graph.outputs, ref, got)}
    ok = all(v["rel_max_diff"] <= PARITY_REL_TOL and v["cosine"] >= PARITY_MIN_COSINE
             for v in per_output.values())
    return {"batch": batch, "seed": seed, "rel_tol": PARITY_REL_TOL,
            "min_cosine": PARITY_MIN_COSINE, "passed": ok, "outputs": per_output}


def _torch_export(module, inputs, path: Path, graph: registry.GraphSpec, opset: int) -> None:
    dynamic_axes = {s.name: s.dynamic_axes() for s in graph.inputs + graph.outputs
                    if s.dynamic_axes()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow
        torch.onnx.export(module, inputs, str(path), input_names=[s.name for s in graph.inputs],
                          output_names=[s.name for s in graph.outputs],
                          dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)


def constants_to_initializers(path: Path, module: torch.nn.Module, min_size: int = 16) -> list[str]:
    """Move large ``Constant`` nodes into initializers, named after the buffer they hold.

    The tracer folds geometry-only buffers (KP-RPE patch grid, bucket gather indices, priors)
    into Constant nodes with anonymous names; as initializers named after their buffer they are
    easy to find, check and share. Returns the initializer names that came from buffers.
    """
    import onnx
    from onnx import numpy_helper

    buffers = {name: b.detach().cpu().numpy() for name, b in module.named_buffers()
               if b.numel() >= min_size}
    model = onnx.load(str(path))
    g = model.graph
    named, keep = [], []
    for node in g.node:
        if node.op_type != "Constant" or node.attribute[0].name != "value":
            keep.append(node)
            continue
        arr = numpy_helper.to_array(node.attribute[0].t)
        if arr.size < min_size:
            keep.append(node)
            continue
        name = node.output[0]
        for bname, buf in buffers.items():
            if buf.size == arr.size and buf.dtype == arr.dtype and np.array_equal(buf.ravel(), arr.ravel()):
                name = bname
                named.append(bname)
                break
        if name != node.output[0]:
            for other in g.node:
                for i, inp in enumerate(other.input):
                    if inp == node.output[0]:
                        other.input[i] = name
        if name not in {i.name for i in g.initializer}:  # a buffer used twice is stored once
            g.initializer.append(numpy_helper.from_array(arr, name))
    del g.node[:]
    g.node.extend(keep)
    onnxfile.save(model, path)  # large graphs: weights in a page-aligned <file>.data beside it
    return named


def export_model(arch: str, out_dir: str | os.PathLike, weights: str | os.PathLike | None = None,
                 opset: int = DEFAULT_OPSET, strict: bool = True, task: str | None = None,
                 check: bool = True, progress: Callable[[str], None] | None = None,
                 save_weights: bool = False, options: dict[str, str] | None = None,
                 seed: int = 0, force: bool = False) -> dict[str, Any]:
    """Export ``arch`` into ``out_dir`` (model.onnx + manifest.json); return the manifest.

    ``options``: the architecture's export options (``ArchSpec.options``, e.g. Part fViT's
    ``sampling``); the values used, defaults included, are recorded as ``export_options``.

    ``seed``: the seed of random weights (recorded; same arch and seed, same weights).

    ``save_weights`` also stores the torch weights as ``weights.safetensors`` (listed in the
    manifest as ``torch_weights``), for engines that convert from torch (Core ML) when the
    weights are random or the checkpoint may move.

    Over an existing model directory: its ``builds/`` are kept when every graph file is byte
    for byte the same; when a graph changed the export is refused (nothing changes) unless
    ``force``, which drops them.
    """
    import onnx

    say = progress or (lambda msg: log.info("%s", msg))
    if opset < 17:
        raise KpfaceError(f"opset {opset} is too old: LayerNormalization needs opset >= 17")
    spec = registry.get(arch, task)
    options = resolve_options(spec, options)
    spec, model, source = build_model(arch, weights, strict=strict, task=task,
                                      options=options, seed=seed)
    out_dir = Path(out_dir)
    graphs_meta: dict[str, Any] = {}
    parity: dict[str, Any] = {}
    t_start = time.perf_counter()
    with staging_dir(out_dir) as tmp:
        for graph in spec.graphs:
            module = graph.module(model).eval()
            path = tmp / graph.filename
            say(f"exporting {arch}:{graph.name} to ONNX (opset {opset})")
            t0 = time.perf_counter()
            with torch.no_grad():
                _torch_export(module, graph.example_inputs(2, torch.Generator().manual_seed(0)),
                              path, graph, opset)
            constants_to_initializers(path, module)
            onnx.checker.check_model(str(path))
            export_s = time.perf_counter() - t0
            graphs_meta[graph.name] = {
                "file": graph.filename,
                **({"data_files": extra} if (extra := onnxfile.data_files(path)) else {}),
                "inputs": [s.to_dict() for s in graph.inputs],
                "outputs": [s.to_dict() for s in graph.outputs],
                "bytes": onnxfile.nbytes(path), "export_seconds": round(export_s, 2)}
            if check:
                say(f"checking {graph.name}.onnx against torch in ONNX Runtime")
                result = check_parity(module, graph, path)
                parity[graph.name] = result
                if not result["passed"]:
                    worst = max(result["outputs"].items(), key=lambda kv: kv[1]["rel_max_diff"])
                    raise ParityError(
                        f"{arch}:{graph.name} failed parity: output {worst[0]} rel max diff "
                        f"{worst[1]['rel_max_diff']:.2e} (limit {PARITY_REL_TOL:g}), cosine "
                        f"{worst[1]['cosine']:.7f} (limit {PARITY_MIN_COSINE}); nothing was written")
        manifest = {
            "kpface_version": kpface.__version__,
            "name": out_dir.name,
            "arch": arch,
            "task": spec.task,
            "description": spec.description,
            "opset": opset,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "graphs": graphs_meta,
            **spec.manifest,
            **({"export_options": options} if options else {}),
            "weights": from_source(source),
            "source": source,  # what the loader reported; older readers look here
            "parity": parity,
            "export_seconds": round(time.perf_counter() - t_start, 2),
        }
        files = [f for g in graphs_meta.values() for f in [g["file"], *g.get("data_files", [])]]
        if save_weights:
            write_weights(model, tmp / TORCH_WEIGHTS, arch)
            manifest["torch_weights"] = TORCH_WEIGHTS
            files.append(TORCH_WEIGHTS)
        carry_builds(out_dir, tmp, [g["file"] for g in graphs_meta.values()], force=force)
        manifest = write_manifest(tmp, manifest, files)
    return manifest
