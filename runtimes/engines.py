"""The one table of engines. ``kpface build``, ``kpface bench``, the CLI help and the README
read it; nothing else lists engines, precisions, build options or install commands.

Each row names two modules: the one that *builds* the engine artifact (``builder``) and the
one that *loads and runs* it (``adapter``). For most engines they are the same runtimes module;
Core ML converts from the torch model, so its builder lives on the export side
(:mod:`kpface.export.coreml_convert`) and :mod:`kpface.runtimes` never imports torch code.
Modules are imported by name from this table, only when needed.

Both kinds of module answer, as module-level functions:

``available(device=None, purpose="run") -> (bool, reason)``
    can this engine run (or, ``purpose="build"``, build) here: library importable, device
    present? ``reason`` is one line that says what is missing and the pip command to install it.
``device_key(device=None) -> str``
    the part of ``builds/<runtime>-<precision>-<device key>/`` that says which machines a
    build is valid on (``cpu``, ``cuda``, ``sm89``, ``apple``, ...).

A builder also answers ``build(onnx_path, out_dir, precision, calibration, manifest,
device=None, progress=None, options=None, name="model")``: it writes the engine artifact for
``onnx_path`` into ``out_dir`` and returns its description (``{"file": ..., "files": [...],
"versions": {...}, ...}``) for ``build.json``; ``options`` holds only the keys of the row's
``options`` column (:meth:`Engine.check_options` refuses others before any work). It may
answer ``gate_session(build_dir, info, threads, manifest, model_dir, graph)`` when the engine
cannot run where it builds (the accuracy gate then measures that stand-in).

An adapter also answers ``load(build_dir, threads=None, info=None, device=None) -> Session``:
the session's ``run(feeds) -> dict`` takes and returns numpy arrays and its ``provider`` says
which device really runs it (a GPU that fell back to CPU is refused or reported, never silent).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Iterator, Protocol

import numpy as np

from kpface.errors import EngineUnavailable, InputError

PRECISIONS = ("fp32", "fp16", "int8")
# What every build needs besides its engine: onnx (graph passes, quantization) and
# scikit-image (the real face photos of calibration and of the accuracy gates). The extra
# ``build`` installs them; ``openvino``, ``coreml`` and ``tensorrt`` include it.
BUILD_NEEDS = (("onnx", "onnx"), ("skimage", "scikit-image"))
BUILD_EXTRA = "pip install 'kpface[build]'"


def build_requirements() -> tuple[bool, str]:
    """Are the packages every build needs importable? (ok, one line naming the extra)."""
    import importlib.util
    missing = []
    for module, package in BUILD_NEEDS:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    if missing:
        return False, (f"kpface build needs {' and '.join(missing)} (not installed): "
                       f"{BUILD_EXTRA}")
    return True, "build requirements installed"


class Session(Protocol):
    """What every engine's ``load`` returns (and :func:`kpface.runtimes.open_session`).

    ``run`` may be called from several threads at once. ``close()`` (or leaving a ``with``
    block) releases the engine's memory and device resources; a closed session refuses to
    run. Close a session only when no thread is running it."""

    provider: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Closable:
    """``close()`` + context-manager support for sessions: subclasses implement
    ``_release()`` and call ``_check_open()`` at the start of ``run``."""

    _closed = False

    def _release(self) -> None:  # pragma: no cover - overridden
        pass

    def close(self) -> None:
        """Release the engine's resources (idempotent); the session refuses to run after."""
        if not self._closed:
            self._closed = True
            self._release()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            from kpface.errors import ModelError
            raise ModelError(f"this {type(self).__name__} was closed; open the model again")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_threads() -> int:
    """Engine threads when the caller gives none: ``$KPFACE_THREADS``, else the cores this
    process may run on (``os.sched_getaffinity``: a container or ``taskset`` limit, not the
    machine's core count)."""
    env = os.environ.get("KPFACE_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise InputError(f"KPFACE_THREADS={env!r} is not a positive number of threads")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Engine:
    name: str                      # the --runtime value
    title: str
    suffix: str                    # the artifact's file suffix
    module: str                    # the python module the engine needs at run time
    adapter: str                   # kpface module that loads and runs it
    builder: str                   # kpface module that builds it
    precisions: tuple[str, ...]
    devices: tuple[str, ...]       # the first is the default
    builds_from: str               # what the build starts from and what does the work
    install: str                   # one pip command
    options: tuple[tuple[str, str], ...]  # (build option key, one-line meaning)
    status: str                    # what has really run: "tested here", "untested", ...
    notes: str = ""
    # ONNX ops this engine cannot run: a build of a graph with one is refused before any work,
    # naming the export option that avoids it (:data:`AVOIDS`), and ``kpface export --for``
    # this engine chooses that option. ``ops`` says how the engine runs the ops that differ
    # between engines (GridSample, for Part fViT's sampling forms) and what backs that.
    lacks: tuple[str, ...] = ()
    ops: str = ""

    def load_adapter(self) -> ModuleType:
        """The module that loads and runs this engine's builds."""
        return importlib.import_module(self.adapter)

    def load_builder(self) -> ModuleType:
        """The module that builds this engine's artifacts."""
        return importlib.import_module(self.builder)

    def _module(self, purpose: str) -> ModuleType:
        return self.load_builder() if purpose == "build" else self.load_adapter()

    def available(self, device: str | None = None, purpose: str = "run") -> tuple[bool, str]:
        """Can this engine run (``purpose="run"``) or build (``"build"``) here?"""
        if purpose == "build":
            ok, reason = build_requirements()
            if not ok:
                return ok, reason
        try:
            module = self._module(purpose)
        except ImportError as e:  # the module itself needs something missing
            return False, f"{self.name} {purpose} module cannot be imported ({e}): {self.install}"
        return module.available(device, purpose=purpose)

    def require(self, device: str | None = None, purpose: str = "run") -> ModuleType:
        """The adapter (``purpose="run"``) or builder (``"build"``) module, or
        :class:`EngineUnavailable` saying how to get the engine (or, for a build, the
        packages every build needs)."""
        if purpose == "build":
            ok, reason = build_requirements()
            if not ok:
                raise EngineUnavailable(reason)
        try:
            module = self._module(purpose)
        except ImportError as e:
            raise EngineUnavailable(f"{self.name} {purpose} module cannot be imported ({e}): "
                                    f"{self.install}") from None
        ok, reason = module.available(device, purpose=purpose)
        if not ok:
            raise EngineUnavailable(reason)
        return module

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise InputError(f"{self.name} has no {precision} build; choose one of: "
                             + ", ".join(self.precisions))

    @property
    def option_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.options)

    def check_options(self, options: dict | None) -> dict:
        """``options`` as a dict, or :class:`InputError` naming the first unknown key."""
        options = dict(options or {})
        for key in options:
            if key not in self.option_keys:
                accepted = ", ".join(self.option_keys) or "none"
                raise InputError(f"{self.name} builds take no option {key!r}; it accepts: "
                                 f"{accepted} (see `kpface build --help`)")
        return options

    def row(self) -> dict:
        return asdict(self)


ENGINES: tuple[Engine, ...] = (
    Engine(
        "onnxruntime", "ONNX Runtime", ".onnx", "onnxruntime",
        adapter="kpface.runtimes.onnxruntime_rt", builder="kpface.runtimes.onnxruntime_rt",
        precisions=("fp32", "fp16", "int8"), devices=("cpu", "cuda"),
        builds_from="ONNX: float16 pass (fp32 I/O, LayerNorm/Softmax fp32) or static QDQ int8 "
                    "(onnxruntime.quantization)",
        install="pip install onnxruntime  (CUDA: pip install onnxruntime-gpu)",
        options=(
            ("method", "int8 calibration: minmax (default), entropy or percentile"),
            ("per_channel", "int8 weights per output channel (default true) or per tensor"),
            ("activation", "int8 activations: uint8 asymmetric (default) or int8 symmetric"),
            ("weights", "int8 weight type: uint8 or int8 (default uint8 on x86 without VNNI)"),
            ("exclude", "extra node names kept in float (a list)"),
            ("keep_kprpe_float", "keep the KP-RPE keypoint path in float (default true)"),
            ("keep_landmarks_float", "Part fViT's landmark CNN, min-max and sampling in "
                                     "float: true (default), head (not the CNN) or false"),
            ("quantize_attention", "quantize the q.k and attn.v MatMuls too (default false)"),
            ("quantize_outputs", "op types whose outputs are quantized too: a list, true or "
                                 "false (default [\"Conv\"]: QLinearConv)"),
            ("preprocess", "symbolic shape inference before quantizing (default true)"),
            ("op_types", "op types quantized (default [\"Conv\", \"MatMul\", \"Gemm\"]; a "
                         "ResNet may add Add, AveragePool, MaxPool, Relu, Pad)"),
            ("quantize_bias", "int8: biases as int32 (default true; TensorRT's Q/DQ keeps "
                              "them float)"),
            ("attention", "portable (default) or fused: each ViT attention as ONNX Runtime's "
                          "contrib Attention (fp32) / MultiHeadAttention (int8) op, the KP-RPE "
                          "bias its attention_bias (this engine only)"),
        ),
        status="tested here (cpu; cuda untested)",
        notes="the fp32 model.onnx needs no build",
        ops="GridSample: CPU kernel (tested here); CUDA kernel 4-D (untested)"),
    Engine(
        "openvino", "OpenVINO", ".xml", "openvino",
        adapter="kpface.runtimes.openvino_rt", builder="kpface.runtimes.openvino_rt",
        precisions=("fp32", "fp16", "int8"), devices=("cpu", "gpu", "npu"),
        builds_from="ONNX -> IR (openvino.convert_model); fp16 weight compression; int8 with "
                    "nncf.quantize",
        install="pip install 'kpface[openvino]'  (openvino nncf)",
        options=(
            ("exclude", "extra op names NNCF leaves in float (a list)"),
            ("keep_kprpe_float", "keep the KP-RPE keypoint path in float (default true)"),
            ("keep_landmarks_float", "Part fViT's landmark CNN, min-max and sampling in "
                                     "float: true (default), head (not the CNN) or false"),
            ("quantize_attention", "quantize the attention products too (default false)"),
            ("smooth_quant", "SmoothQuant alpha for MatMuls (default -1: off)"),
            ("activation", "uint8 (default: NNCF preset MIXED) or int8 (preset PERFORMANCE)"),
            ("overflow_fix", "NNCF overflow fix: enable, first_layer_only or disable "
                             "(default enable on x86 without VNNI)"),
        ),
        status="tested here (cpu; gpu, npu untested)",
        ops="GridSample: GridSample-9 (tested here on CPU)"),
    Engine(
        "tensorrt", "TensorRT", ".engine", "tensorrt",
        adapter="kpface.runtimes.tensorrt_rt", builder="kpface.runtimes.tensorrt_rt",
        precisions=("fp32", "fp16", "int8"), devices=("cuda",),
        builds_from="ONNX -> serialized engine (TensorRT builder, dynamic batch profile); "
                    "int8 by explicit quantization: a Q/DQ ONNX graph calibrated with "
                    "onnxruntime.quantization",
        install="pip install 'kpface[tensorrt]'  (tensorrt cuda-python; needs an NVIDIA GPU)",
        options=(
            ("profile", "dynamic batch profile [min, opt, max] (default [1, 8, 32])"),
            ("workspace", "builder workspace limit in bytes (default 2 GiB)"),
            ("calibration_cache", "reuse the Q/DQ graph of the installed int8 build when it "
                                  "was calibrated on the same model and crops (default true)"),
        ),
        status="untested (never run: no NVIDIA GPU with TensorRT here)",
        notes="an engine runs only on the GPU model and TensorRT version it was built with",
        ops="GridSample: IGridSampleLayer, 4-D (TensorRT >= 8.5; untested)"),
    Engine(
        "coreml", "Core ML", ".mlpackage", "coremltools",
        adapter="kpface.runtimes.coreml_rt", builder="kpface.export.coreml_convert",
        precisions=("fp32", "fp16", "int8"), devices=("apple",),
        builds_from="torch model (arch + weights from the manifest) -> mlprogram "
                    "(coremltools.convert); int8 weights with coremltools.optimize",
        install="pip install 'kpface[coreml]'  (coremltools; prediction needs macOS)",
        options=(
            ("batches", "enumerated batch sizes of the ML program (default [1, 8])"),
            ("weights", "the torch checkpoint the model was exported from, when its "
                        "directory holds no weights.safetensors (sha256 must match)"),
        ),
        status="converts here (tested); predicts on macOS only (untested)",
        notes="converts on Linux, predicts only on macOS",
        ops="GridSample: MIL resample (iOS 16 / macOS 13; converts here, prediction "
            "untested); tensors of rank <= 5 only"),
)

_BY_NAME = {e.name: e for e in ENGINES}

# The export option that avoids an op an engine lacks: op -> (option, value). Part fViT's
# ``gather`` form samples its 196 patches with GatherElements instead of GridSample.
AVOIDS: dict[str, tuple[str, str]] = {"GridSample": ("sampling", "gather")}


def export_options_for(runtime: str, accepted: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """The export options an architecture (``accepted``: its ``ArchSpec.options``) needs to run
    on ``runtime``: for each op the engine lacks, the option that avoids it, when the
    architecture has that option. ``{}`` when nothing needs changing."""
    out = {}
    for op in get_engine(runtime).lacks:
        key, value = AVOIDS.get(op, (None, None))
        if key in accepted and value in accepted[key]:
            out[key] = value
    return out


def check_graph_ops(runtime: str, ops, manifest: dict | None = None) -> None:
    """:class:`InputError` when the graph (its op types ``ops``) uses an op ``runtime`` lacks,
    saying how to re-export it without that op when the architecture can."""
    engine = get_engine(runtime)
    missing = [op for op in engine.lacks if op in set(ops)]
    if not missing:
        return
    m = manifest or {}
    op = missing[0]
    key, value = AVOIDS.get(op, (None, None))
    if key is not None and key in (m.get("export_options") or {}):
        fix = (f"re-export it with `kpface export {m.get('task', 'recognizer')} --arch "
               f"{m.get('arch')} --for {runtime}` (export option {key}={value} has no {op})")
    else:
        fix = "run it on an engine that has the op (`kpface engines`)"
    raise InputError(f"{engine.title} has no {op}, which {m.get('name') or 'this model'} "
                     f"uses; {fix}")


def engine_names() -> list[str]:
    return [e.name for e in ENGINES]


def get_engine(name: str) -> Engine:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise InputError(f"unknown runtime {name!r}; choose one of: "
                         + ", ".join(engine_names())) from None


def availability(device: str | None = None) -> dict[str, tuple[bool, str]]:
    """``{engine: (available, reason)}`` for every engine, on its default device."""
    return {e.name: e.available(device) for e in ENGINES}


def markdown_table(check: bool = False) -> str:
    """The table as Markdown, for the README (``check`` adds an 'here' column)."""
    head = ["runtime", "file", "precisions", "devices", "built from", "build options", "status",
            "ops", "install"]
    if check:
        head.append("here")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in ENGINES:
        cells = [f"`{e.name}`", f"`{e.suffix}`", ", ".join(e.precisions), ", ".join(e.devices),
                 e.builds_from, ", ".join(f"`{k}`" for k in e.option_keys) or "none", e.status,
                 _ops_cell(e), f"`{e.install.split('  (')[0]}`"]
        if check:
            ok, why = e.available()
            cells.append("yes" if ok else f"no: {why}")
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _ops_cell(e: Engine) -> str:
    lacks = [f"no {op}: export with {'='.join(AVOIDS[op])}" if op in AVOIDS else f"no {op}"
             for op in e.lacks]
    return "; ".join(lacks + ([e.ops] if e.ops else [])) or "-"


def help_text() -> str:
    """One line per engine, for CLI ``--help``."""
    return "\n".join(f"  {e.name:12s} {'/'.join(e.precisions):15s} {','.join(e.devices):12s} "
                     f"{e.status}" for e in ENGINES)


def options_text() -> str:
    """Every engine's build options with their meaning, for ``kpface build --help`` and
    ``kpface engines``."""
    lines = []
    for e in ENGINES:
        lines.append(f"  {e.name}:" + ("" if e.options else " none"))
        lines += [f"    {k:19s} {meaning}" for k, meaning in e.options]
    return "\n".join(lines)


def engine_table(check: bool = True) -> str:
    """What ``kpface engines`` prints: the table, with whether each engine runs here, and
    the build options of each engine."""
    return (markdown_table(check=check) + "\n\nbuild options (kpface build --option KEY=VALUE):\n"
            + options_text())


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def int8_saturates() -> bool:
    """True on x86 CPUs without VNNI (AVX2 / AVX-512F only).

    Their int8 GEMM kernels multiply uint8 activations by int8 weights with ``vpmaddubsw``, whose
    16-bit pair sums saturate; on such a CPU an 8-bit-weight vit_kprpe_tiny fell from cosine
    0.9996 to 0.926 against fp32. Builds there use saturation-free schemes (ONNX Runtime: uint8
    weights; OpenVINO: NNCF's overflow fix, 7-bit weights) and say so in build.json.
    """
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = cpu_flags()
    if not flags:
        return False
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Silence an engine library that prints (progress bars, banners) or logs at INFO: library
    code must not print. What it writes to stdout/stderr is dropped; its loggers are raised to
    WARNING for the duration.

    Build time only (conversion, quantization): it swaps the process's ``sys.stdout`` /
    ``sys.stderr`` and logger levels, which must never happen while an application runs
    models (opening and running sessions never calls it)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in saved:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)
