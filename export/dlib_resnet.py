"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1``) in torch.

The network, as ``examples/dnn_face_recognition_ex.cpp`` in dlib declares it (``anet_type``)::

    loss_metric<fc_no_bias<128, avg_pool_everything<
        level0<level1<level2<level3<level4<
        max_pool<3,3,2,2, relu<affine<con<32,7,7,2,2, input_rgb_image_sized<150>>>>>>>>>>>>>

    level4 = 3 x ares<32>;  level3 = ares_down<64> + 3 x ares<64>;
    level2 = ares_down<128> + 2 x ares<128>;  level1 = ares_down<256> + 2 x ares<256>;
    level0 = ares_down<256>
    ares<N>      = relu(block(x) + x)                      block = affine(con3x3(relu(affine(con3x3_s(x)))))
    ares_down<N> = relu(block_s2(x) + avg_pool2x2_s2(x))

dlib's conventions, all reproduced here: a convolution or pooling with stride != 1 has no padding
(stride 1: padding k // 2); ``affine`` is a per-channel scale and shift (batch-norm folded at
training's end); ``add_prev`` adds tensors of different sizes by treating missing channels, rows
and columns as zeros (the shortcut has fewer channels, and at 8x8 -> 3x3 vs 4x4 also more rows
and columns than the block's output); ``fc_no_bias`` computes ``x @ W`` with W stored as
[inputs, outputs]. The input layer feeds ``(pixel - mean) / 256`` in RGB order, with the channel
means stored in the file. Output: the 128-d descriptor, raw (dlib compares Euclidean distances
of raw descriptors: same person below 0.6).

The weights ship in the ``face-recognition-models`` package (found with ``importlib.metadata``,
never imported) and are read by :mod:`kpface.export.dlib_dat`, dlib itself is never needed.
"""
from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kpface.errors import CheckpointError

from .dlib_dat import DlibNet, read_dnn
from .registry import ArchSpec, GraphSpec, TensorSpec, register

log = logging.getLogger(__name__)

INPUT_SIZE = 150
EMBEDDING_SIZE = 128
# dlib's input_rgb_image defaults (as float32), which the published model keeps; checked
# against the file on load.
DLIB_RGB_MEAN = [float(np.float32(v)) for v in (122.782, 117.001, 104.298)]
DLIB_INPUT_SCALE = 256.0
# dlib's recommended rule for this model: same person if the Euclidean distance of the raw
# descriptors is below 0.6 (dlib's face_recognition example and model documentation).
DLIB_DISTANCE_THRESHOLD = 0.6
# The SDK compares L2-normalised embeddings by cosine. For two descriptors of norm n,
# |a - b| = 0.6 <=> cos = 1 - 0.6**2 / (2 n**2). This model's descriptors of real faces have
# norms 1.24-1.49 (median 1.37 on scikit-image's 100 LFW-subset faces, 1.30-1.45 on the sample
# photos); at the typical n = 1.4 the equivalent cosine is 0.908 (0.90 at n = 1.37).
TYPICAL_NORM = 1.4
COSINE_THRESHOLD = round(1 - DLIB_DISTANCE_THRESHOLD ** 2 / (2 * TYPICAL_NORM ** 2), 3)

PACKAGE = "face-recognition-models"
PACKAGE_VERSION = "0.3.0"
DAT_FILE = "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"

# Residual blocks in forward order: (channels, downsample).
BLOCKS = ([(32, False)] * 3 + [(64, True)] + [(64, False)] * 3 + [(128, True)]
          + [(128, False)] * 2 + [(256, True)] + [(256, False)] * 2 + [(256, True)])


# --- the network's type, as dlib serialises it (outermost first) ----------------------------

def _block() -> list[str]:
    return ["affine", "con", "relu", "affine", "con"]


def dlib_stack() -> list[str]:
    """``anet_type`` as a layer stack for :func:`kpface.export.dlib_dat.parse_dnn`."""
    wrappers: list[str] = []
    for _, down in reversed(BLOCKS):  # outermost block first
        if down:
            wrappers += ["relu", "add_prev2", "avg_pool", "skip1", "tag2", *_block(), "tag1"]
        else:
            wrappers += ["relu", "add_prev1", *_block(), "tag1"]
    return (["loss_metric", "fc_no_bias", "avg_pool"] + wrappers
            + ["max_pool", "relu", "affine", "con", "input_rgb_image_sized"])


# --- torch modules ---------------------------------------------------------------------------

class Affine(nn.Module):
    """dlib ``affine`` in CONV_MODE: ``x * gamma[c] + beta[c]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _out(size: int, k: int, stride: int, pad: int) -> int:
    return 1 + (size + 2 * pad - k) // stride


class Residual(nn.Module):
    """``ares<N>`` / ``ares_down<N>`` at a fixed input size (so the zero padding of dlib's
    mismatched-size add is a constant of the graph)."""

    def __init__(self, cin: int, cout: int, down: bool, size: int):
        super().__init__()
        stride = 2 if down else 1
        pad = 0 if down else 1  # dlib: padding k // 2 only at stride 1
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, pad)
        self.affine1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.affine2 = Affine(cout)
        block = _out(size, 3, stride, pad)
        short = _out(size, 2, 2, 0) if down else size
        self.out_size = max(block, short)
        if not down and (cin != cout or block != size):
            raise ValueError("a non-downsampling block keeps its channels and size")
        # F.pad order: (W left, W right, H top, H bottom, C front, C back); dlib pads at the end.
        self.pad_block = (0, self.out_size - block, 0, self.out_size - block, 0, 0)
        self.pad_short = (0, self.out_size - short, 0, self.out_size - short, 0, cout - cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        s = F.avg_pool2d(x, 2, 2) if self.down else x
        if any(self.pad_block):
            y = F.pad(y, self.pad_block)
        if any(self.pad_short):
            s = F.pad(s, self.pad_short)
        return F.relu(y + s)


class DlibResNet(nn.Module):
    """``forward(image [B, 3, 150, 150], RGB, (x - mean) / 256)`` -> descriptor [B, 128]."""

    def __init__(self, size: int = INPUT_SIZE):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 7, 2, 0)
        self.affine = Affine(32)
        s = _out(_out(size, 7, 2, 0), 3, 2, 0)
        blocks, cin = [], 32
        for cout, down in BLOCKS:
            blocks.append(Residual(cin, cout, down, s))
            cin, s = cout, blocks[-1].out_size
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, EMBEDDING_SIZE, bias=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.affine(self.conv(image))), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))

    # kpface.export.checkpoint.load_weights asks a module for its own reader first.
    def read_foreign_checkpoint(self, path) -> tuple[dict, dict] | None:
        if Path(path).suffix.lower() != ".dat":
            return None
        return state_dict_from_dat(path), {"arch": "dlib_resnet_v1", "format": "dlib .dat"}


# --- weights ---------------------------------------------------------------------------------

def _check(cond: bool, path, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{path} is not dlib_face_recognition_resnet_model_v1: {what}")


def _param_layout() -> list[tuple[str, str, dict]]:
    """The parametrised layers in forward order: (state dict prefix, dlib layer kind,
    expected dlib settings)."""
    def con(n: int, k: int, stride: int, pad: int) -> dict:
        return {"num_filters": n, "nr": k, "nc": k, "stride_y": stride, "stride_x": stride,
                "padding_y": pad, "padding_x": pad, "use_bias": True, "use_relu": False}
    affine = {"mode": "conv", "disabled": False}
    out = [("conv", "con", con(32, 7, 2, 0)), ("affine", "affine", affine)]
    cin = 32
    for i, (cout, down) in enumerate(BLOCKS):
        out += [(f"blocks.{i}.conv1", "con", con(cout, 3, 2, 0) if down else con(cout, 3, 1, 1)),
                (f"blocks.{i}.affine1", "affine", affine),
                (f"blocks.{i}.conv2", "con", con(cout, 3, 1, 1)),
                (f"blocks.{i}.affine2", "affine", affine)]
        cin = cout
    return out + [("fc", "fc_no_bias", {"num_outputs": EMBEDDING_SIZE, "num_inputs": cin,
                                        "use_bias": False})]


def net_to_state_dict(net: DlibNet, path="dlib file") -> dict[str, torch.Tensor]:
    """Map a parsed ``anet_type`` onto :class:`DlibResNet`'s keys, checking every setting."""
    inp = net.input
    _check((inp["nr"], inp["nc"]) == (INPUT_SIZE, INPUT_SIZE), path,
           f"input size {inp['nr']}x{inp['nc']}")
    file_mean = [inp["avg_red"], inp["avg_green"], inp["avg_blue"]]
    _check(file_mean == DLIB_RGB_MEAN, path, f"input means {file_mean} != {DLIB_RGB_MEAN}")
    pools = [layer for layer in net.layers if layer.kind in ("max_pool", "avg_pool")]
    expect_pools = ([("max_pool", (3, 3, 2, 2, 0, 0))]
                    + [("avg_pool", (2, 2, 2, 2, 0, 0))] * sum(d for _, d in BLOCKS)
                    + [("avg_pool", (0, 0, 1, 1, 0, 0))])  # avg_pool_everything
    got_pools = [(p.kind, tuple(p.config[k] for k in ("nr", "nc", "stride_y", "stride_x",
                                                       "padding_y", "padding_x"))) for p in pools]
    _check(got_pools == expect_pools, path, f"pooling layers {got_pools}")
    _check(not any(layer.config.get("disabled") for layer in net.layers), path,
           "a disabled relu or affine layer")
    params = [layer for layer in net.layers if layer.params]
    layout = _param_layout()
    _check(len(params) == len(layout), path,
           f"{len(params)} layers with parameters, expected {len(layout)}")
    state: dict[str, torch.Tensor] = {}
    for layer, (prefix, kind, expect) in zip(params, layout):
        _check(layer.kind == kind, path, f"{prefix} is a {layer.kind} layer, expected {kind}")
        for key, value in expect.items():
            got = layer.config.get(key)
            _check(got == value, path, f"{prefix}: {key} = {got}, expected {value}")
        if kind == "con":
            state[f"{prefix}.weight"] = torch.from_numpy(layer.params["weight"].copy())
            state[f"{prefix}.bias"] = torch.from_numpy(layer.params["bias"].copy())
        elif kind == "affine":
            state[f"{prefix}.weight"] = torch.from_numpy(layer.params["gamma"].reshape(-1).copy())
            state[f"{prefix}.bias"] = torch.from_numpy(layer.params["beta"].reshape(-1).copy())
        else:  # fc_no_bias: dlib computes x @ W with W [inputs, outputs]; torch keeps W.T
            w = layer.params["weight"].reshape(expect["num_inputs"], expect["num_outputs"])
            state[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
    if net.state_floats:
        log.warning("%s carries %d floats of training state (gradients, cached outputs); "
                    "they were read and are not used", path, net.state_floats)
    return state


def state_dict_from_dat(path) -> dict[str, torch.Tensor]:
    net = read_dnn(path, dlib_stack())
    log.info("read %s: %d layers, %d parameters, %d bytes", path, len(net.layers),
             net.param_count(), net.size)
    return net_to_state_dict(net, path)


def packaged_weights() -> str:
    """Path of ``dlib_face_recognition_resnet_model_v1.dat`` in the installed
    face-recognition-models package."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"dlib_resnet_v1's weights come from the {PACKAGE} package, which "
                              f"is not installed: pip install {PACKAGE}=={PACKAGE_VERSION} "
                              "(a 100 MB download of model files), or pass --weights "
                              "dlib_face_recognition_resnet_model_v1.dat") from None
    path = Path(dist.locate_file(DAT_FILE))
    if not path.is_file():
        raise CheckpointError(f"the {PACKAGE} install has no {Path(DAT_FILE).name} ({path}); "
                              f"reinstall it: pip install --force-reinstall "
                              f"{PACKAGE}=={PACKAGE_VERSION}")
    log.info("dlib ResNet weights from %s %s (%s)", PACKAGE, dist.version, path)
    return str(path)


# --- registry --------------------------------------------------------------------------------

def _example_inputs(batch: int, gen: torch.Generator):
    pixels = torch.randint(0, 256, (batch, 3, INPUT_SIZE, INPUT_SIZE), generator=gen).float()
    return ((pixels - torch.tensor(DLIB_RGB_MEAN).view(1, 3, 1, 1)) / DLIB_INPUT_SCALE,)


def _manifest() -> dict:
    from kpface import facechip
    from kpface.landmarks import LANDMARK_ORDER
    return {
        "config": {"input_size": INPUT_SIZE, "blocks": [list(b) for b in BLOCKS],
                   "embedding_size": EMBEDDING_SIZE, "dlib_network": "anet_type of "
                   "dnn_face_recognition_ex.cpp (ResNet-29, affine instead of batch-norm)"},
        # dlib's input_rgb_image: (pixel - channel mean) / 256, RGB.
        "preprocess": {"size": [INPUT_SIZE, INPUT_SIZE], "color": "RGB", "layout": "NCHW",
                       "mean": DLIB_RGB_MEAN, "std": [DLIB_INPUT_SCALE] * 3},
        "keypoints": {"count": 5, "order": list(LANDMARK_ORDER), "used": False,
                      "coords": "image pixels, for the face chip only (no keypoints input)"},
        "alignment": {
            "method": "dlib_face_chip", "function": "kpface.facechip.face_chip",
            "size": facechip.CHIP_SIZE, "padding": facechip.CHIP_PADDING,
            "landmarks": "kpface five points (LANDMARK_ORDER)",
            "template": [[round(float(v), 4) for v in p] for p in facechip.chip_template()],
            "interpolation": "bilinear, truncated to uint8; dlib's 2x pyramid for faces more "
                             "than twice the chip size",
            "not": "the ArcFace 112x112 crop (kpface.align.crop_face) does not apply"},
        "embedding_size": EMBEDDING_SIZE,
        # dlib's own rule works on raw descriptors (verification below); the SDK's cosine
        # compare normalises them and uses the equivalent cosine threshold.
        "normalize_embedding": False,
        "threshold": COSINE_THRESHOLD,
        "verification": {"metric": "euclidean", "on": "raw descriptors",
                         "threshold": DLIB_DISTANCE_THRESHOLD, "same_if": "distance < threshold",
                         "source": "dlib (loss_metric distance threshold stored in the .dat)",
                         "cosine_equivalent": COSINE_THRESHOLD,
                         "cosine_equivalent_at_norm": TYPICAL_NORM},
        # Engine build options this model recommends (kpface build; --option overrides): a
        # ResNet's residual Adds, pools and Relus quantized too let ONNX Runtime keep the
        # int8 path (QLinearAdd / QLinearAveragePool, no NHWC transposes around float ops):
        # CPU time 2.70x fp32 at batch 8 instead of 2.42x, cosine mean / min 0.99958 / 0.99887.
        "build_options": {"onnxruntime": {"op_types": ["Conv", "MatMul", "Gemm", "Relu", "Add",
                                                       "AveragePool", "MaxPool", "Pad"]}},
        # kpface.weights' block: where the weights came from (a package that ships them).
        "weights": {"source": "package", "package": f"{PACKAGE} {PACKAGE_VERSION}",
                    "version": PACKAGE_VERSION, "file": DAT_FILE,
                    "license": "CC0 (dlib model files); LFW accuracy 99.38% as published"},
    }


@register
def dlib_resnet_v1() -> ArchSpec:
    graph = GraphSpec(
        name="model", module=lambda m: m,
        inputs=[TensorSpec("image", ("batch", 3, INPUT_SIZE, INPUT_SIZE),
                           layout="NCHW RGB, (x - mean) / 256, dlib face chip")],
        outputs=[TensorSpec("embedding", ("batch", EMBEDDING_SIZE),
                            layout="raw dlib descriptor (Euclidean metric), not normalised")],
        example_inputs=_example_inputs)
    return ArchSpec(name="dlib_resnet_v1", task="recognizer",
                    description="dlib ResNet-29 face descriptor, 128-d, 150x150 chip "
                                "(face-recognition-models weights)",
                    factory=DlibResNet, graphs=[graph], manifest=_manifest(),
                    packaged_weights=packaged_weights, package=PACKAGE)
