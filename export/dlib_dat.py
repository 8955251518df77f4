"""Reader for dlib's DNN serialisation (``deserialize("net.dat") >> net``), written from the
format as dlib's sources define it (``dlib/serialize.h``, ``dlib/float_details.h``,
``dlib/cuda/tensor.h``, ``dlib/dnn/{core,layers,input,loss}.h``, dlib 20.0.1). No dlib needed.

The format is not self-describing: like dlib itself, the reader needs the network's type, given
here as its *stack*, the layer names from the outside in as the C++ template spells them::

    ["loss_metric", "fc_no_bias", "avg_pool", "relu", "add_prev1", ..., "con",
     "input_rgb_image_sized"]

(tag and skip numbers, e.g. ``tag1`` / ``skip2`` / ``add_prev2``, do not change the bytes and are
accepted for readability). How the bytes are laid out:

- primitives: an integer is a control byte (bit 7: negative; bits 0-3: byte count, 1..8)
  followed by its magnitude, little endian; a bool is the ASCII byte ``'0'`` / ``'1'``; a
  float or double is ``float_details``: the integer mantissa, then the integer exponent
  (value = mantissa * 2**exponent; exponents 32000/32001/32002 mean inf/-inf/nan); a string is
  its length (integer) then its bytes; a tensor is version 2, then num_samples, k, nr, nc, then
  that many little-endian IEEE float32 values; an ``alias_tensor`` (a view into a layer's
  params) is version 1 and the four sizes, no data.
- ``add_loss_layer``: version 1, the loss's fields, then the network.
- ``add_layer`` (a computational layer): version 1 or 2, then its *sub-network* (recursively),
  then the layer's own fields (a version string such as ``"con_6"``, then parameters), three
  bools (setup called, gradient stale, output disabled), the tensors ``x_grad`` and
  ``cached_output``, and ``params_grad`` (version 2). The ``add_layer`` directly over the input
  is version 2 or 3: the input layer's fields come before its own, and it ends with
  ``grad_final`` and (version 3) the sample expansion factor.
- ``add_tag_layer`` / ``add_skip_layer``: version 1 and the sub-network, nothing else.

So a file lists every wrapper's version from the outside in, then the input layer, then each
computational layer's fields from the inside out. :func:`parse_dnn` follows that recursion and
returns the computational layers in forward order; it refuses a file with bytes left over or a
parameter tensor whose views do not cover it exactly.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kpface.errors import CheckpointError


class DatError(CheckpointError):
    """A dlib ``.dat`` file that does not hold the expected network."""


# float_details' special exponents
_INF, _NINF, _NAN = 32000, 32001, 32002


class DatReader:
    """A cursor over the bytes of a dlib serialisation, one primitive per call."""

    def __init__(self, data: bytes, name: str = "dlib file"):
        self.data = memoryview(data)
        self.pos = 0
        self.name = name

    def fail(self, what: str, why: str) -> DatError:
        return DatError(f"{self.name}: {why} while reading {what} at byte {self.pos}; "
                        "it is not the dlib network kpface expects (or it is truncated)")

    def _take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise self.fail(what, f"the file ends ({n} bytes needed, "
                                  f"{len(self.data) - self.pos} left)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, what: str = "an integer") -> int:
        ctrl = self._take(1, what)[0]
        size = ctrl & 0x0F
        if size == 0 or size > 8 or ctrl & 0x70:
            self.pos -= 1
            raise self.fail(what, f"control byte 0x{ctrl:02x} is not a dlib integer")
        value = int.from_bytes(self._take(size, what), "little")
        return -value if ctrl & 0x80 else value

    def bool(self, what: str = "a bool") -> bool:
        ch = self._take(1, what)[0]
        if ch not in (0x30, 0x31):
            self.pos -= 1
            raise self.fail(what, f"byte 0x{ch:02x} is not a dlib bool ('0' or '1')")
        return ch == 0x31

    def float(self, what: str = "a float") -> float:
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.fail(what, "the number is in dlib's old ASCII float format, "
                                  "which kpface does not read")
        mantissa = self.int(what)
        exponent = self.int(what)
        if exponent == _INF:
            return math.inf
        if exponent == _NINF:
            return -math.inf
        if exponent == _NAN:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def string(self, what: str = "a string") -> str:
        n = self.int(what)
        if n < 0:
            raise self.fail(what, f"negative string length {n}")
        raw = bytes(self._take(n, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(what, f"{raw[:20]!r} is not an ASCII string") from None

    def version(self, allowed: Sequence[str], what: str) -> str:
        start = self.pos
        got = self.string(what)
        if got not in allowed:
            self.pos = start
            raise self.fail(what, f"found {got!r} where one of {list(allowed)} belongs")
        return got

    def int_version(self, allowed: Sequence[int], what: str) -> int:
        start = self.pos
        got = self.int(what)
        if got not in allowed:
            self.pos = start
            raise self.fail(what, f"found version {got}, expected {list(allowed)}")
        return got

    def tensor(self, what: str = "a tensor") -> np.ndarray:
        """A dlib tensor as a float32 array of shape (num_samples, k, nr, nc)."""
        self.int_version((2,), what)
        shape = tuple(self.int(what) for _ in range(4))
        if any(d < 0 for d in shape):
            raise self.fail(what, f"negative tensor size {shape}")
        count = math.prod(shape)
        raw = self._take(4 * count, what)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self, what: str = "an alias_tensor") -> tuple[int, int, int, int]:
        self.int_version((1,), what)
        return tuple(self.int(what) for _ in range(4))  # type: ignore[return-value]

    def remaining(self) -> int:
        return len(self.data) - self.pos


# --- one reader per layer type ---------------------------------------------------------------
# Each returns (config, params): config holds the layer's settings, params its float arrays.

def _views(r: DatReader, params: np.ndarray, shapes: dict[str, tuple], what: str
           ) -> dict[str, np.ndarray]:
    """Cut ``params`` into consecutive views of ``shapes``; they must cover it exactly."""
    flat = params.reshape(-1)
    out, at = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[at:at + n].reshape(shape)
        at += n
    if at != flat.size:
        raise r.fail(what, f"its parameter tensor holds {flat.size} values but its views "
                           f"{ {k: list(v) for k, v in shapes.items()} } cover {at}")
    return out


def _read_con(r: DatReader):
    v = r.version(("con_4", "con_5", "con_6"), "con_ layer")
    params = r.tensor("con_ params")
    cfg: dict[str, Any] = {"num_filters": r.int(), "nr": r.int(), "nc": r.int(),
                           "stride_y": r.int(), "stride_x": r.int(),
                           "padding_y": r.int(), "padding_x": r.int()}
    filters, biases = r.alias("con_ filters"), r.alias("con_ biases")
    cfg["multipliers"] = [r.float() for _ in range(4)]
    cfg["use_bias"] = r.bool() if v in ("con_5", "con_6") else True
    cfg["use_relu"] = r.bool() if v == "con_6" else False
    shapes = {"weight": filters}
    if cfg["use_bias"]:
        shapes["bias"] = (math.prod(biases),)
    return cfg, _views(r, params, shapes, "con_ layer")


def _read_bn_as_affine(r: DatReader, v: str):
    # dlib's affine_ reads a bn_ in its place and folds it (running statistics) into
    # gamma / sqrt(var + eps) and beta - gamma' * mean.
    params = r.tensor("bn_ params")
    gamma, beta = r.alias("bn_ gamma"), r.alias("bn_ beta")
    r.tensor("bn_ means"), r.tensor("bn_ invstds")  # batch statistics of the last step
    mean = r.tensor("bn_ running_means").reshape(-1).astype(np.float64)
    var = r.tensor("bn_ running_variances").reshape(-1).astype(np.float64)
    r.int("bn_ num_updates"), r.int("bn_ running_stats_window_size")
    for _ in range(4):
        r.float("bn_ multipliers")
    eps = r.float("bn_ eps")
    p = _views(r, params, {"gamma": gamma, "beta": beta}, "bn_ layer")
    g = p["gamma"].reshape(-1) / np.sqrt(var + eps)
    b = p["beta"].reshape(-1) - g * mean
    mode = "conv" if v == "bn_con2" else "fc"
    return ({"mode": mode, "disabled": False, "from": v, "eps": eps},
            {"gamma": g.astype(np.float32).reshape(gamma), "beta": b.astype(np.float32).reshape(beta)})


def _read_affine(r: DatReader):
    v = r.version(("affine_", "affine_2", "bn_con2", "bn_fc2"), "affine_ layer")
    if v.startswith("bn_"):
        return _read_bn_as_affine(r, v)
    params = r.tensor("affine_ params")
    gamma, beta = r.alias("affine_ gamma"), r.alias("affine_ beta")
    mode = r.int("affine_ mode")
    if mode not in (0, 1):
        raise r.fail("affine_ mode", f"mode {mode} is neither CONV_MODE (0) nor FC_MODE (1)")
    cfg = {"mode": "conv" if mode == 0 else "fc",
           "disabled": r.bool("affine_ disabled") if v == "affine_2" else False}
    if cfg["disabled"]:
        return cfg, {}
    return cfg, _views(r, params, {"gamma": gamma, "beta": beta}, "affine_ layer")


def _read_relu(r: DatReader):
    v = r.version(("relu_", "relu_2"), "relu_ layer")
    return {"disabled": r.bool() if v == "relu_2" else False}, {}


def _pool_reader(name: str):
    def read(r: DatReader):
        r.version((f"{name}_2",), f"{name}_ layer")
        cfg = {"nr": r.int(), "nc": r.int(), "stride_y": r.int(), "stride_x": r.int(),
               "padding_y": r.int(), "padding_x": r.int()}
        return cfg, {}
    return read


def _read_add_prev(r: DatReader):
    r.version(("add_prev_",), "add_prev_ layer")
    return {}, {}


def _read_fc(r: DatReader):
    v = r.version(("fc_2", "fc_3"), "fc_ layer")
    cfg: dict[str, Any] = {"num_outputs": r.int(), "num_inputs": r.int()}
    params = r.tensor("fc_ params")
    weights, biases = r.alias("fc_ weights"), r.alias("fc_ biases")
    mode = r.int("fc_ bias mode")  # FC_HAS_BIAS = 0, FC_NO_BIAS = 1
    if mode not in (0, 1):
        raise r.fail("fc_ bias mode", f"bias mode {mode} is neither 0 nor 1")
    cfg["multipliers"] = [r.float() for _ in range(4)]
    use_bias = r.bool("fc_ use_bias") if v == "fc_3" else True
    cfg["bias_mode"] = "has_bias" if mode == 0 else "no_bias"
    cfg["use_bias"] = mode == 0 and use_bias
    shapes = {"weight": weights}  # (num_inputs, num_outputs, 1, 1): output = input @ weight
    if cfg["use_bias"]:
        shapes["bias"] = (math.prod(biases),)
    return cfg, _views(r, params, shapes, "fc_ layer")


def _read_input_rgb_sized(r: DatReader):
    r.version(("input_rgb_image_sized",), "input layer")
    cfg = {"avg_red": r.float(), "avg_green": r.float(), "avg_blue": r.float(),
           "nr": r.int(), "nc": r.int()}
    return cfg


def _read_loss_metric(r: DatReader):
    v = r.version(("loss_metric_", "loss_metric_2"), "loss layer")
    if v == "loss_metric_":  # dlib's defaults before they were stored
        return {"margin": 0.1, "dist_thresh": 0.75}
    return {"margin": r.float(), "dist_thresh": r.float()}


LAYERS: dict[str, Callable[[DatReader], tuple[dict, dict]]] = {
    "con": _read_con, "affine": _read_affine, "relu": _read_relu,
    "max_pool": _pool_reader("max_pool"), "avg_pool": _pool_reader("avg_pool"),
    "add_prev": _read_add_prev, "fc": _read_fc, "fc_no_bias": _read_fc,
}
STRUCTURAL = ("tag", "skip")  # no fields of their own
INPUTS: dict[str, Callable[[DatReader], dict]] = {"input_rgb_image_sized": _read_input_rgb_sized}
LOSSES: dict[str, Callable[[DatReader], dict]] = {"loss_metric": _read_loss_metric}


@dataclass
class Layer:
    kind: str  # "con", "affine", ... (the stack name without a tag number)
    name: str  # the stack name as given ("add_prev2", ...)
    config: dict[str, Any]
    params: dict[str, np.ndarray]
    offset: int  # where its fields start in the file


@dataclass
class DlibNet:
    loss: dict[str, Any]
    input: dict[str, Any]
    layers: list[Layer]  # computational layers, forward order (input side first)
    size: int  # bytes read: the whole file
    state_floats: int = 0  # floats in the non-parameter tensors (gradients, cached outputs)
    versions: dict[str, int] = field(default_factory=dict)

    def param_count(self) -> int:
        return sum(a.size for layer in self.layers for a in layer.params.values())


def _kind(name: str) -> str:
    base = re.sub(r"\d+$", "", name)
    if base in LAYERS or base in STRUCTURAL:
        return base
    raise ValueError(f"unknown dlib layer {name!r} in the network stack")


def parse_dnn(data: bytes, stack: Sequence[str], name: str = "dlib file") -> DlibNet:
    """Parse a serialised ``add_loss_layer<LOSS, ...INPUT>`` network whose layer types are
    ``stack`` (outermost first: the loss, the layers, the input layer last)."""
    if len(stack) < 3 or stack[0] not in LOSSES or stack[-1] not in INPUTS:
        raise ValueError("a stack starts with a loss and ends with an input layer, got "
                         f"{list(stack[:1])} ... {list(stack[-1:])}")
    kinds = [_kind(s) for s in stack[1:-1]]
    if kinds[-1] in STRUCTURAL:
        raise ValueError("a tag or skip directly over the input layer is not supported")
    r = DatReader(data, name)
    r.int_version((1,), "add_loss_layer version")
    loss = LOSSES[stack[0]](r)
    net = DlibNet(loss=loss, input={}, layers=[], size=0)
    seen_versions: dict[str, int] = {}

    def state_tensor(what: str) -> None:
        net.state_floats += r.tensor(what).size

    def read(i: int) -> None:  # the wrapper kinds[i] (stack[i + 1])
        kind, label = kinds[i], stack[i + 1]
        over_input = i == len(kinds) - 1
        if kind in STRUCTURAL:
            r.int_version((1,), f"{label} version")
            read(i + 1)
            return
        v = r.int_version((2, 3) if over_input else (1, 2), f"add_layer<{label}> version")
        key = f"add_layer{'_over_input' if over_input else ''} v{v}"
        seen_versions[key] = seen_versions.get(key, 0) + 1
        if over_input:
            net.input = INPUTS[stack[-1]](r)
        else:
            read(i + 1)
        offset = r.pos
        cfg, params = LAYERS[kind](r)
        net.layers.append(Layer(kind=kind, name=label, config=cfg, params=params, offset=offset))
        for flag in ("setup_called", "gradient_input_is_stale", "output_disabled"):
            r.bool(f"add_layer<{label}> {flag}")
        state_tensor(f"add_layer<{label}> x_grad")
        state_tensor(f"add_layer<{label}> cached_output")
        if over_input:
            state_tensor(f"add_layer<{label}> grad_final")
            if v == 3:
                r.int(f"add_layer<{label}> sample_expansion_factor")
        elif v == 2:
            state_tensor(f"add_layer<{label}> params_grad")

    read(0)
    if r.remaining():
        raise DatError(f"{name}: {r.remaining()} bytes are left after the network "
                       f"(read {r.pos} of {len(data)}); the file holds more than this network")
    net.size = r.pos
    net.versions = seen_versions
    return net


def read_dnn(path: str | os.PathLike, stack: Sequence[str]) -> DlibNet:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"dlib network file {path} does not exist")
    return parse_dnn(path.read_bytes(), stack, name=str(path))
