"""The landmark CNN of Part fViT: a MobileNetV3-Large-like trunk (``stn``) that ends at 160
channels, plus the pooling, the 392-way linear head and the per-image min-max that turn it into
196 (x, y) points in pixels of the 112x112 input.

Specification: shared/reference/lafs-part-fvit-facts.md section 2.2 (trunk) and 2.3 (head and
coordinates). The module tree mirrors the official keys ``stn.features.{i}.conv.{j}...`` so a
checkpoint loads without renaming. Unlike torchvision's MobileNetV3, every block has its 1x1
expansion conv (even 16 -> 16), 'RE' is plain ReLU, and squeeze-excite (hard-sigmoid gate) sits
after the depthwise BatchNorm and before the activation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, expansion, out channels, squeeze-excite, activation, stride) of modules 1..15.
LARGE = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)
STEM_CHANNELS = 16


class HardSwish(nn.Module):
    """x * relu6(x + 3) / 6, in the reference's operation order (exports as Clip, which every
    engine has, rather than the opset-14 HardSwish op)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class HardSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False),
                                nn.ReLU(),
                                nn.Linear(channels // reduction, channels, bias=False),
                                HardSigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return x * gate[:, :, None, None]


class Bottleneck(nn.Module):
    """1x1 expand, BN, act, depthwise kxk, BN, SE or identity, act, 1x1 project, BN (+ x)."""

    def __init__(self, inp: int, out: int, kernel: int, stride: int, exp: int, se: bool,
                 act: str):
        super().__init__()
        make_act = nn.ReLU if act == "RE" else HardSwish
        self.residual = stride == 1 and inp == out
        self.conv = nn.Sequential(
            nn.Conv2d(inp, exp, 1, bias=False), nn.BatchNorm2d(exp), make_act(),
            nn.Conv2d(exp, exp, kernel, stride, (kernel - 1) // 2, groups=exp, bias=False),
            nn.BatchNorm2d(exp),
            SqueezeExcite(exp) if se else nn.Identity(),
            make_act(),
            nn.Conv2d(exp, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class LandmarkTrunk(nn.Module):
    """``stn``: image [B, 3, H, W] -> feature map [B, out_channels, H/32 (ceil), W/32]."""

    def __init__(self, blocks=LARGE):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(3, STEM_CHANNELS, 3, 2, 1, bias=False), nn.BatchNorm2d(STEM_CHANNELS),
            HardSwish())]
        inp = STEM_CHANNELS
        for kernel, exp, out, se, act, stride in blocks:
            layers.append(Bottleneck(inp, out, kernel, stride, exp, se, act))
            inp = out
        self.features = nn.Sequential(*layers)
        self.out_channels = inp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def minmax_points(t: torch.Tensor, num_points: int, extent: float) -> torch.Tensor:
    """Section 2.3: per-image min-max of all 2K head outputs jointly, scaled to [0, extent],
    then viewed as K (x, y) pairs: point k = (t[2k], t[2k+1]).

    Operation order as in the reference (subtract, divide, multiply). The reference divides by
    zero when all outputs are equal (open question 8); here the range is floored at 1e-12 so
    such an image gets every point at 0 instead of NaN. For any other input the floor is a
    no-op and the result is bit-identical.
    """
    lo = t.min(dim=1, keepdim=True).values
    hi = t.max(dim=1, keepdim=True).values
    scaled = (t - lo) / (hi - lo).clamp_min(1e-12) * extent
    # The batch size from t.shape (not -1) lets the exporter declare the output [batch, K, 2].
    return scaled.view(t.shape[0], num_points, 2)
