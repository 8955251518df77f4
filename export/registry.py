"""The table of named architectures: a leaf module that imports no architecture.

Each architecture file describes its configurations and adds them here with :func:`register`;
``kpface/export/__init__.py`` imports those files, so the table is full as soon as anything
under ``kpface.export`` is imported (timm keeps its model registry the same way). Nothing in this
module imports an architecture, so there is no import circle.

    @register
    def retinaface_mnet025() -> ArchSpec:          # the function is named after the arch
        return ArchSpec(name="retinaface_mnet025", task="detector", ...)

An :class:`ArchSpec` says how to build the torch module, what its ONNX graph(s) look like and
which task-specific fields go into the manifest (pre-processing, keypoint convention, embedding
size, priors, ...), so that nothing downstream repeats those constants.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from kpface.errors import InputError

if TYPE_CHECKING:  # annotations only: the table itself needs no torch
    import torch
    from torch import nn


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
    factory: Callable[..., nn.Module]
    graphs: list[GraphSpec]
    manifest: dict[str, Any] = field(default_factory=dict)
    # Maps a raw checkpoint state dict to this module's keys (strips foreign prefixes, ...).
    remap_keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    # Path of real weights shipped by an installed package, if there is one; or, for weights
    # split over several files, {submodule name: path} (each loaded into that submodule).
    packaged_weights: Callable[[], str | dict[str, str]] | None = None
    # The distribution that ships those files (its name and version go into the manifest).
    package: str | None = None
    # Export-time choices {name: allowed values}, the first value the default; ``factory``
    # receives the chosen values as keyword arguments and the manifest records them.
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Random-weight exports only: re-initialises what the module's own (training) init leaves
    # inert, with ``generator``, and returns a description for the manifest's ``init``
    # (the KP-RPE ViT's keypoint_linear, zero at training init, see export/vit.py).
    random_init: Callable[[nn.Module, torch.Generator], dict[str, Any]] | None = None


TASKS = ("recognizer", "detector", "keypoints")

_ARCHS: dict[str, ArchSpec] = {}
_MODULES: dict[str, str] = {}  # arch name -> the module that registered it


def _add(spec: ArchSpec, module: str) -> None:
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"register() needs an ArchSpec, got {type(spec).__name__}")
    if spec.task not in TASKS:
        raise ValueError(f"architecture {spec.name!r}: task {spec.task!r} is not one of {TASKS}")
    if spec.name in _ARCHS:
        raise ValueError(f"architecture {spec.name!r} registered twice (first by "
                         f"{_MODULES[spec.name]}, again by {module})")
    _ARCHS[spec.name] = spec
    _MODULES[spec.name] = module


def register(entry):
    """Add an architecture to the table.

    As a decorator, on a function without arguments that returns the :class:`ArchSpec`; the
    function must carry the architecture's name, and is returned unchanged. Called with an
    ``ArchSpec`` (for configurations made in a loop), it adds that spec and returns it.
    """
    if isinstance(entry, ArchSpec):
        factory = getattr(entry.factory, "func", entry.factory)  # functools.partial
        _add(entry, str(getattr(factory, "__module__", "?")))
        return entry
    if not callable(entry):
        raise TypeError(f"register() takes an ArchSpec or a function, got {type(entry).__name__}")
    spec = entry()
    if getattr(spec, "name", None) != entry.__name__:
        raise ValueError(f"{entry.__module__}.{entry.__name__} returned the spec of "
                         f"{getattr(spec, 'name', spec)!r}; name the function after its architecture")
    _add(spec, entry.__module__)
    return entry


def archs(task: str | None = None) -> dict[str, ArchSpec]:
    """Registered architectures (of one task), by name."""
    return {k: v for k, v in _ARCHS.items() if task is None or v.task == task}


def module_of(name: str) -> str:
    """The module that registered ``name`` (where its torch definition lives)."""
    get(name)
    return _MODULES[name]


def get(name: str, task: str | None = None) -> ArchSpec:
    table = archs(task)
    if name not in table:
        kind = f"{task} " if task else ""
        raise InputError(f"unknown {kind}architecture {name!r}; choose one of: "
                         + ", ".join(sorted(table)))
    return table[name]
