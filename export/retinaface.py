"""RetinaFace with a MobileNetV1-0.25 body (the widely used ``mobilenet0.25_Final.pth`` model).

Body stages 1-3, a three-level FPN, one SSH context module per level and per-level 1x1 heads
(2 anchors per location). Specification: cvlface-kprpe-facts.md sections 3.1 (network), 3.3
(standard priors, BGR minus (104, 117, 123) input) and 3.4 (key layout without the aggregator).
The module tree mirrors the checkpoint keys (``body.stage1.0.0.weight``, ``fpn.output1.0...``,
``ssh1.conv3X3...``, ``ClassHead.0.conv1x1...``); :func:`remap_retinaface_keys` strips the
``module.`` (DataParallel), ``net.`` (CVLface) and ``model.net.`` (Hugging Face) prefixes.

The exported graph takes ``image`` [B, 3, H, W] (dynamic H, W) and returns the raw regressions
``loc`` [B, N, 4], ``landms`` [B, N, 10] and the softmaxed ``conf`` [B, N, 2]; anchors and
decoding live in the SDK (:mod:`kpface.postprocess`), configured from the manifest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ArchSpec, GraphSpec, TensorSpec, register

NUM_ANCHORS = 2
MNET025 = {"in_channels": 32, "out_channels": 64}
PRIORS = {"min_sizes": [[16, 32], [64, 128], [256, 512]], "steps": [8, 16, 32],
          "variances": [0.1, 0.2], "clip": False}
MEAN_BGR = [104.0, 117.0, 123.0]


def conv_bn(inp: int, out: int, stride: int = 1, slope: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out),
                         nn.LeakyReLU(slope, inplace=True))


def conv_bn_no_relu(inp: int, out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out))


def conv_bn1x1(inp: int, out: int, slope: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out),
                         nn.LeakyReLU(slope, inplace=True))


def conv_dw(inp: int, out: int, stride: int, slope: float = 0.1) -> nn.Sequential:
    # Indices 0/1 depthwise conv + BN, 3/4 pointwise conv + BN (2 and 5 are activations).
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
        nn.LeakyReLU(slope, inplace=True),
        nn.Conv2d(inp, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out),
        nn.LeakyReLU(slope, inplace=True))


class MobileNetV1Body(nn.Module):
    """MobileNetV1 x0.25, stages 1-3 only (strides 8, 16, 32; 64, 128, 256 channels)."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, slope=0.1), conv_dw(8, 16, 1), conv_dw(16, 32, 2), conv_dw(32, 32, 1),
            conv_dw(32, 64, 2), conv_dw(64, 64, 1))
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *[conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out: int):
        super().__init__()
        slope = 0.1 if out <= 64 else 0.0
        self.output1 = conv_bn1x1(in_channels[0], out, slope)
        self.output2 = conv_bn1x1(in_channels[1], out, slope)
        self.output3 = conv_bn1x1(in_channels[2], out, slope)
        self.merge1 = conv_bn(out, out, slope=slope)
        self.merge2 = conv_bn(out, out, slope=slope)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    """Single-stage context module: 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) branches."""

    def __init__(self, inp: int, out: int):
        super().__init__()
        slope = 0.1 if out <= 64 else 0.0
        self.conv3X3 = conv_bn_no_relu(inp, out // 2)
        self.conv5X5_1 = conv_bn(inp, out // 4, slope=slope)
        self.conv5X5_2 = conv_bn_no_relu(out // 4, out // 4)
        self.conv7X7_2 = conv_bn(out // 4, out // 4, slope=slope)
        self.conv7x7_3 = conv_bn_no_relu(out // 4, out // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv5X5_1(x)
        branches = [self.conv3X3(x), self.conv5X5_2(t), self.conv7x7_3(self.conv7X7_2(t))]
        return F.relu(torch.cat(branches, dim=1))


class Head(nn.Module):
    """1x1 conv, NHWC flatten: [B, A*k, h, w] -> [B, h*w*A, k] (anchor-major channels)."""

    def __init__(self, inp: int, k: int):
        super().__init__()
        self.k = k
        self.conv1x1 = nn.Conv2d(inp, NUM_ANCHORS * k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.k)


class RetinaFaceNet(nn.Module):
    """``forward(x)`` -> (loc [B, N, 4], class logits [B, N, 2], landmarks [B, N, 10])."""

    def __init__(self, in_channels: int = 32, out_channels: int = 64):
        super().__init__()
        self.body = MobileNetV1Body()
        chans = [in_channels * 2, in_channels * 4, in_channels * 8]
        self.fpn = FPN(chans, out_channels)
        self.ssh1 = SSH(out_channels, out_channels)
        self.ssh2 = SSH(out_channels, out_channels)
        self.ssh3 = SSH(out_channels, out_channels)
        self.ClassHead = nn.ModuleList(Head(out_channels, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(Head(out_channels, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(Head(out_channels, 10) for _ in range(3))

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.fpn(self.body(x))
        feats = [self.ssh1(feats[0]), self.ssh2(feats[1]), self.ssh3(feats[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], dim=1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], dim=1)
        landms = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, conf, landms


class RetinaFaceDetector(RetinaFaceNet):
    """Exported detector: ``image`` = BGR minus mean (std 1), any H, W.
    Returns (loc, softmax(conf), landms)."""

    def forward(self, image: torch.Tensor):
        loc, conf, landms = self.heads(image)
        return loc, F.softmax(conf, dim=-1), landms


# --- checkpoint keys -----------------------------------------------------------------------

PREFIXES = ("model.net.", "module.", "net.")


def strip_prefix(key: str, prefixes=PREFIXES) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def fill_bn_counters(state: dict) -> dict:
    """Old checkpoints lack BatchNorm ``num_batches_tracked`` (unused in eval): add zeros."""
    out = dict(state)
    for k in list(state):
        if k.endswith(".running_var"):
            counter = k[: -len("running_var")] + "num_batches_tracked"
            out.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return out


def remap_retinaface_keys(state: dict) -> dict:
    """``mobilenet0.25_Final.pth`` (bare or ``module.`` keys), CVLface ``net.*`` and HF
    ``model.net.*`` layouts -> this module's keys."""
    return fill_bn_counters({strip_prefix(k): v for k, v in state.items()})


# --- registry ------------------------------------------------------------------------------

def _detector_manifest() -> dict:
    from kpface.landmarks import LANDMARK_ORDER
    return {
        "config": {"backbone": "mobilenet0.25", **MNET025, "anchors_per_location": NUM_ANCHORS},
        "preprocess": {
            "color": "BGR", "layout": "NCHW", "mean": MEAN_BGR, "std": [1.0, 1.0, 1.0],
            # The graph accepts any H, W; the SDK letterboxes to this size (top-left, zero pad)
            # so the anchors are computed once per model.
            "width": 640, "height": 480, "dynamic_size": True, "resize": "letterbox",
        },
        "priors": PRIORS,
        "score_threshold": 0.5,
        "nms": {"iou": 0.4, "top_k": 5000, "keep_top_k": 750},
        "landmarks": {"count": 5, "order": list(LANDMARK_ORDER),
                      "coords": "x,y in input pixels, decoded with the priors"},
        "outputs_note": "loc/landms are raw regressions; conf is softmax (background, face)",
    }


def _example_inputs(batch: int, gen: torch.Generator):
    # The spatial size depends on the batch, so the parity run (another batch size) also
    # exercises the dynamic H and W, including sizes that are not multiples of 32.
    h, w = 64 + 40 * batch, 96 + 30 * batch
    img = torch.rand(batch, 3, h, w, generator=gen) * 255
    return (img - torch.tensor(MEAN_BGR).view(1, 3, 1, 1),)


@register
def retinaface_mnet025() -> ArchSpec:
    graph = GraphSpec(
        name="model",
        module=lambda m: m,
        inputs=[TensorSpec("image", ("batch", 3, "height", "width"),
                           layout="NCHW BGR minus mean (104,117,123), std 1")],
        outputs=[TensorSpec("loc", ("batch", "anchors", 4), layout="raw box regression"),
                 TensorSpec("conf", ("batch", "anchors", 2), layout="softmax (background, face)"),
                 TensorSpec("landms", ("batch", "anchors", 10), layout="raw landmark regression")],
        example_inputs=_example_inputs,
    )
    return ArchSpec(name="retinaface_mnet025", task="detector",
                    description="RetinaFace MobileNet0.25 (mobilenet0.25_Final.pth layout)",
                    factory=lambda: RetinaFaceDetector(**MNET025), graphs=[graph],
                    manifest=_detector_manifest(), remap_keys=remap_retinaface_keys)
