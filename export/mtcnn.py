"""MTCNN (Zhang et al. 2016): P-Net, R-Net and O-Net, with the real weights that ship in the
``facenet-pytorch`` wheel (``facenet_pytorch/data/{pnet,rnet,onet}.pt``).

The wheel is found with ``importlib.metadata`` and never imported (it imports torchvision).
The module names mirror those files' keys (``conv1``, ``prelu1``, ``dense4``, ...), prefixed
with ``pnet.`` / ``rnet.`` / ``onet.`` in the combined module.

Inputs are RGB, (x - 127.5) / 128, NCHW. The weights were converted from a transposed-image
(Matlab, column-major) original: the dense layers read the last conv map flattened in
(width, height, channel) order, which ``_flatten_wh`` reproduces.

One architecture, three graphs in one model directory: ``pnet.onnx`` (dynamic H, W),
``rnet.onnx`` [B, 3, 24, 24] and ``onet.onnx`` [B, 3, 48, 48]. The cascade (image pyramid,
NMS, box regression, squaring, crops) runs in numpy in :mod:`kpface.detect`.
"""
from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kpface.errors import CheckpointError

from .registry import ArchSpec, GraphSpec, TensorSpec, register

log = logging.getLogger(__name__)

RNET_SIZE, ONET_SIZE = 24, 48


def _flatten_wh(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Fully convolutional proposal net: 12x12 receptive field, stride 2.
    ``forward(x)`` -> (reg [B, 4, h, w], prob [B, 2, h, w] softmax)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement net on 24x24 crops. ``forward(x)`` -> (reg [B, 4], prob [B, 2])."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_wh(x)))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net on 48x48 crops.
    ``forward(x)`` -> (reg [B, 4], landmarks [B, 10] = x0..x4, y0..y4 in [0, 1] of the crop,
    prob [B, 2])."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_wh(x)))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)


class MTCNN(nn.Module):
    """Container of the three nets (each exported as its own graph)."""

    def __init__(self):
        super().__init__()
        self.pnet = PNet()
        self.rnet = RNet()
        self.onet = ONet()


# --- weights -------------------------------------------------------------------------------

NETS = ("pnet", "rnet", "onet")


def packaged_weights() -> dict[str, str]:
    """Paths of the three weight files in the installed facenet-pytorch wheel, by submodule."""
    try:
        dist = importlib.metadata.distribution("facenet-pytorch")
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError("MTCNN weights come from the facenet-pytorch wheel, which is not "
                              "installed: pip install --no-deps facenet-pytorch==2.6.0, or pass "
                              "--weights PATH") from None
    paths = {}
    for net in NETS:
        path = dist.locate_file(f"facenet_pytorch/data/{net}.pt")
        if not path.is_file():
            raise CheckpointError(f"the facenet-pytorch install has no {net}.pt ({path}); "
                                  "reinstall it: pip install --no-deps --force-reinstall "
                                  "facenet-pytorch==2.6.0")
        paths[net] = str(path)
    log.info("MTCNN weights from facenet-pytorch %s (%s)", dist.version, Path(paths["pnet"]).parent)
    return paths


def remap_mtcnn_keys(state: dict) -> dict:
    """Drop a ``module.`` prefix (DataParallel); keys are otherwise used as they are."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


# --- registry ------------------------------------------------------------------------------

def _manifest() -> dict:
    from kpface.landmarks import LANDMARK_ORDER
    return {
        "preprocess": {"color": "RGB", "layout": "NCHW", "mean": [127.5] * 3,
                       "std": [128.0] * 3, "resize": "area"},
        "mtcnn": {
            # The cascade as facenet-pytorch runs it: 20-pixel floor, P/R/O-Net thresholds.
            "min_face_size": 20, "scale_factor": 0.709,
            "thresholds": [0.6, 0.7, 0.7],  # P-Net, R-Net, O-Net face probability
            # What the SDK reports by default (kpface.models.mtcnn): faces of at least 0.1 of
            # the shorter image side (Google ML Kit's minFaceSize) with a final score of at
            # least 0.9 (OpenCV YuNet's conf_threshold); --min-face / --score override.
            "min_face": 0.1, "score": 0.9,
            "pnet_stride": 2, "pnet_cell": 12,
            "rnet_size": RNET_SIZE, "onet_size": ONET_SIZE,
            # IoU thresholds: within one pyramid scale, across scales, after R-Net, after O-Net
            # (the last one divides by the smaller box's area).
            "nms": {"per_scale": 0.5, "pnet": 0.7, "rnet": 0.7, "onet": 0.7, "onet_mode": "min"},
        },
        "landmarks": {"count": 5, "order": list(LANDMARK_ORDER),
                      "coords": "O-Net: x0..x4, y0..y4 in [0,1] of the square box"},
    }


def _pnet_inputs(batch: int, gen: torch.Generator):
    h, w = 30 + 7 * batch, 41 + 5 * batch  # varies with batch: exercises dynamic H, W
    return ((torch.rand(batch, 3, h, w, generator=gen) * 255 - 127.5) / 128,)


def _crop_inputs(size: int):
    def make(batch: int, gen: torch.Generator):
        return ((torch.rand(batch, 3, size, size, generator=gen) * 255 - 127.5) / 128,)
    return make


@register
def mtcnn() -> ArchSpec:
    rgb = "NCHW RGB, (x - 127.5) / 128"
    graphs = [
        GraphSpec(name="pnet", module=lambda m: m.pnet,
                  inputs=[TensorSpec("image", ("batch", 3, "height", "width"), layout=rgb)],
                  outputs=[TensorSpec("reg", ("batch", 4, "out_height", "out_width"),
                                      layout="box offsets x1,y1,x2,y2 / 12-pixel cell"),
                           TensorSpec("prob", ("batch", 2, "out_height", "out_width"),
                                      layout="softmax (background, face)")],
                  example_inputs=_pnet_inputs),
        GraphSpec(name="rnet", module=lambda m: m.rnet,
                  inputs=[TensorSpec("image", ("batch", 3, RNET_SIZE, RNET_SIZE), layout=rgb)],
                  outputs=[TensorSpec("reg", ("batch", 4), layout="box offsets / box size"),
                           TensorSpec("prob", ("batch", 2), layout="softmax (background, face)")],
                  example_inputs=_crop_inputs(RNET_SIZE)),
        GraphSpec(name="onet", module=lambda m: m.onet,
                  inputs=[TensorSpec("image", ("batch", 3, ONET_SIZE, ONET_SIZE), layout=rgb)],
                  outputs=[TensorSpec("reg", ("batch", 4), layout="box offsets / box size"),
                           TensorSpec("landmarks", ("batch", 10),
                                      layout="x0..x4, y0..y4 in [0,1] of the box"),
                           TensorSpec("prob", ("batch", 2), layout="softmax (background, face)")],
                  example_inputs=_crop_inputs(ONET_SIZE)),
    ]
    return ArchSpec(name="mtcnn", task="detector",
                    description="MTCNN P/R/O-Net (facenet-pytorch weights)",
                    factory=MTCNN, graphs=graphs, manifest=_manifest(),
                    remap_keys=remap_mtcnn_keys, packaged_weights=packaged_weights,
                    package="facenet-pytorch")
