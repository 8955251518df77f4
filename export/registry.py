"""Registry of named architectures, the way timm keeps one: each architecture file registers
its configurations with :func:`register`, and the exporter and CLI read them from here.

An :class:`ArchSpec` says how to build the torch module, what its ONNX graph(s) look like
and which task-specific fields go into the manifest (pre-processing, keypoint convention,
embedding size, priors, ...), so that nothing downstream repeats those constants.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from kpface.errors import InputError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or strings for dynamic axes ("batch", "height", ...)
    dtype: str = "float32"
    layout: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "layout": self.layout}

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass
class GraphSpec:
    """One ONNX graph of an architecture (most have one, called ``model``)."""

    name: str
    module: Callable[[nn.Module], nn.Module]  # picks the submodule to export from the built model
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example_inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"


@dataclass
class ArchSpec:
    name: str
    task: str  # "recognizer" | "detector" | "keypoints"
    description: str
    factory: Callable[[], nn.Module]
    graphs: list[GraphSpec]
    manifest: dict[str, Any] = field(default_factory=dict)
    # Maps a raw checkpoint state dict to this module's keys (strips foreign prefixes, ...).
    remap_keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    # Path of real weights shipped by an installed package, if there is one; or, for weights
    # split over several files, {submodule name: path} (each loaded into that submodule).
    packaged_weights: Callable[[], str | dict[str, str]] | None = None
    # Export-time choices {name: allowed values}, the first value the default; ``factory``
    # receives the chosen values as keyword arguments and the manifest records them.
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)


_ARCHS: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    if spec.name in _ARCHS:
        raise ValueError(f"architecture {spec.name!r} registered twice")
    _ARCHS[spec.name] = spec
    return spec


_LOADED = False


def _load_all() -> None:
    # Importing an architecture module registers its configurations (once per process).
    global _LOADED
    from . import vit  # noqa: F401
    for optional in ("retinaface", "mtcnn", "dfa", "dlib_resnet", "part_fvit"):
        try:
            __import__(f"{__package__}.{optional}")
        except ModuleNotFoundError as e:  # an architecture file not written yet
            if e.name != f"{__package__}.{optional}":
                raise
    _LOADED = True


def archs(task: str | None = None) -> dict[str, ArchSpec]:
    if not _LOADED:  # not `if not _ARCHS`: one architecture imported directly fills it
        _load_all()
    return {k: v for k, v in _ARCHS.items() if task is None or v.task == task}


def get(name: str, task: str | None = None) -> ArchSpec:
    table = archs(task)
    if name not in table:
        kind = f"{task} " if task else ""
        raise InputError(f"unknown {kind}architecture {name!r}; choose one of: "
                         + ", ".join(sorted(table)))
    return table[name]
