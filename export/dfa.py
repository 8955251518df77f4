"""DFA (CVLface ``differentiable_face_aligner``, ``minchul/cvlface_DFA_mobilenet``).

A RetinaFace-MobileNet0.25 on a 160x160 face crop whose 1050 decoded anchors
(box, raw class logits, landmarks) are pooled by an MLP-Mixer aggregator into one face, followed
by the differentiable similarity alignment onto the ArcFace template. Specification:
cvlface-kprpe-facts.md sections 3.1, 3.2 and 3.4.

Exported graph (opset 17; everything in basic ops plus GridSample):
- input ``image`` [B, 3, 160, 160]: the square face crop, **RGB in [-1, 1]**, already resized
  (the SDK pads / crops and resizes; the network flips to BGR inside, as the reference does);
- ``landmarks`` [B, 5, 2]: (x, y) in [0, 1] of the input crop (pixel = value * 160);
- ``aligned`` [B, 3, 112, 112]: the crop warped onto the template, RGB in [-1, 1];
- ``aligned_landmarks`` [B, 5, 2]: the landmarks in [0, 1] of ``aligned``;
- ``score`` [B, 1]: face probability of the aggregated logits;
- ``theta`` [B, 2, 3]: affine_grid theta (normalised output -> normalised input coords).

Instead of ``affine_grid`` (an ONNX op only from opset 20) the sampling grid is a constant
[112*112, 3] mesh (an initializer) times theta; the Umeyama similarity is its closed form for
2-D (a complex least-squares ratio), which equals skimage's ``SimilarityTransform.estimate``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ArchSpec, GraphSpec, TensorSpec, register
from .retinaface import MNET025, RetinaFaceNet, fill_bn_counters, strip_prefix

INPUT_SIZE = 160
OUTPUT_SIZE = 112
DFA_PRIORS = {"min_sizes": [[64, 80], [96, 112], [128, 144]], "steps": [8, 16, 32],
              "variances": [0.1, 0.2], "clip": False}


def num_anchors(size: int = INPUT_SIZE) -> int:
    return sum(2 * (-(-size // s)) ** 2 for s in DFA_PRIORS["steps"])


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    """timm MixerBlock(dim, seq_len), mlp_ratio (0.5, 4.0), LayerNorm eps 1e-6, no drop path."""

    def __init__(self, dim: int, seq_len: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(seq_len, int(0.5 * dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, int(4.0 * dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


def _template() -> torch.Tensor:
    from kpface.landmarks import ARCFACE_TEMPLATE_112
    return torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64)


class DFA(RetinaFaceNet):
    """Keys = the CVLface checkpoint's after ``net.``: the RetinaFace keys plus ``aggregator.*``."""

    def __init__(self, in_channels: int = 32, out_channels: int = 64,
                 input_size: int = INPUT_SIZE, output_size: int = OUTPUT_SIZE):
        super().__init__(in_channels, out_channels)
        self.input_size, self.output_size = input_size, output_size
        n = num_anchors(input_size)
        dim = 4 + 2 + 10
        self.aggregator = nn.Sequential(*[MixerBlock(dim, n) for _ in range(3)],
                                        nn.Linear(dim, 1))
        from kpface.postprocess import prior_boxes
        priors = prior_boxes(input_size, input_size, DFA_PRIORS["min_sizes"], DFA_PRIORS["steps"])
        # Geometry-only constants: non-persistent buffers (not checkpoint keys), exported as
        # named initializers.
        priors = torch.from_numpy(priors.copy())
        self.register_buffer("prior_centres", priors[:, :2].clone(), persistent=False)
        self.register_buffer("prior_sizes", priors[:, 2:].clone(), persistent=False)
        # The same, tiled to the (x, y) x 5 landmark layout.
        self.register_buffer("prior_centres_x5", priors[:, :2].repeat(1, 5), persistent=False)
        self.register_buffer("prior_sizes_x5", priors[:, 2:].repeat(1, 5), persistent=False)
        tpl = _template() * (output_size / 112.0)
        self.register_buffer("template_mean", tpl.mean(0).float(), persistent=False)
        self.register_buffer("template_centred", (tpl - tpl.mean(0)).float(), persistent=False)
        self._init_landmark_bias(tpl / output_size)
        lin = torch.linspace(-1, 1, output_size, dtype=torch.float64)  # align_corners=True
        gy, gx = torch.meshgrid(lin, lin, indexing="ij")
        base = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).reshape(-1, 3)
        self.register_buffer("base_grid", base.float(), persistent=False)

    @torch.no_grad()
    def _init_landmark_bias(self, shape: torch.Tensor) -> None:
        """Random-init only (a checkpoint overwrites it): each anchor starts by predicting the
        template face filling its prior box, so an untrained model's five landmarks are
        spread like a face and the alignment stays well conditioned (parity checks)."""
        offsets = ((shape - 0.5) / DFA_PRIORS["variances"][0]).reshape(-1).float()
        for head in self.LandmarkHead:
            head.conv1x1.bias.copy_(offsets.repeat(head.conv1x1.out_channels // offsets.numel()))

    def decode(self, loc, landms):
        """Box [B, N, 4] (x1, y1, x2, y2) and landmarks [B, N, 10] in [0, 1] of the input."""
        v0, v1 = DFA_PRIORS["variances"]
        centre = self.prior_centres + loc[..., :2] * v0 * self.prior_sizes
        wh = self.prior_sizes * torch.exp(loc[..., 2:] * v1)
        xy1 = centre - wh / 2
        boxes = torch.cat([xy1, xy1 + wh], dim=-1)  # xmax from the updated xmin, as the reference
        points = self.prior_centres_x5 + landms * v0 * self.prior_sizes_x5
        return boxes, points

    def similarity_theta(self, landmarks: torch.Tensor) -> torch.Tensor:
        """Least-squares similarity (input px -> template px) as affine_grid theta [B, 2, 3]."""
        src = landmarks * self.input_size  # [B, 5, 2] input pixels
        mu = src.mean(dim=1, keepdim=True)
        s = src - mu
        d = self.template_centred
        var = (s * s).sum(dim=(1, 2))
        a = (s[..., 0] * d[:, 0] + s[..., 1] * d[:, 1]).sum(dim=1) / var
        b = (s[..., 0] * d[:, 1] - s[..., 1] * d[:, 0]).sum(dim=1) / var
        # M = [A | t], A = [[a, -b], [b, a]], t = mean_dst - A mean_src.
        mx, my = mu[:, 0, 0], mu[:, 0, 1]
        tx = self.template_mean[0] - (a * mx - b * my)
        ty = self.template_mean[1] - (b * mx + a * my)
        # theta = [(out/in) A^-1 | (2/in) A^-1 (out/2 - t) - 1], A^-1 = [[a, b], [-b, a]]/(a²+b²).
        n2 = a * a + b * b
        ia, ib = a / n2, b / n2
        half = self.output_size / 2
        k = self.output_size / self.input_size
        ux, uy = half - tx, half - ty
        row0 = torch.stack([k * ia, k * ib, (2 / self.input_size) * (ia * ux + ib * uy) - 1], -1)
        row1 = torch.stack([-k * ib, k * ia, (2 / self.input_size) * (-ib * ux + ia * uy) - 1], -1)
        return torch.stack([row0, row1], dim=1)

    @staticmethod
    def aligned_points(landmarks: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Landmarks in [0, 1] of the input -> [0, 1] of the aligned crop (inverse of theta)."""
        l00, l01, c0 = theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2]
        l10, l11, c1 = theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2]
        det = l00 * l11 - l01 * l10
        u = landmarks * 2 - 1
        ux = u[..., 0] - c0[:, None]
        uy = u[..., 1] - c1[:, None]
        vx = (l11[:, None] * ux - l01[:, None] * uy) / det[:, None]
        vy = (-l10[:, None] * ux + l00[:, None] * uy) / det[:, None]
        return torch.stack([vx, vy], dim=-1) / 2 + 0.5

    def forward(self, image: torch.Tensor):
        bgr = image.flip(1)  # RGB [-1, 1] -> BGR [-1, 1] (no 0..255 scaling, no mean)
        loc, logits, landms = self.heads(bgr)
        boxes, points = self.decode(loc, landms)
        combined = torch.cat([boxes, logits, points], dim=-1)  # [B, N, 16]
        weights = F.softmax(self.aggregator(combined), dim=1)  # over anchors
        agg = (weights * combined).sum(dim=1)
        score = F.softmax(agg[:, 4:6], dim=-1)[:, 1:]
        landmarks = agg[:, 6:16].reshape(-1, 5, 2)
        theta = self.similarity_theta(landmarks)
        aligned = self.warp(image, theta)
        return landmarks, aligned, self.aligned_points(landmarks, theta), score, theta

    def warp(self, image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """affine_grid(theta, align_corners=True) + grid_sample; outside pixels become -1."""
        grid = (self.base_grid @ theta.transpose(1, 2)).reshape(
            -1, self.output_size, self.output_size, 2)
        return F.grid_sample(image + 1, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=True) - 1


def remap_dfa_keys(state: dict) -> dict:
    """CVLface ``net.*`` (aligner.pt / model.pt) and HF ``model.net.*`` keys -> module keys."""
    return fill_bn_counters({strip_prefix(k, ("model.net.", "net.")): v for k, v in state.items()})


# --- registry ------------------------------------------------------------------------------

def _manifest() -> dict:
    from kpface.landmarks import LANDMARK_ORDER
    return {
        "config": {"backbone": "mobilenet0.25", **MNET025, "input_size": INPUT_SIZE,
                   "output_size": OUTPUT_SIZE, "anchors": num_anchors()},
        "preprocess": {
            "size": [INPUT_SIZE, INPUT_SIZE], "color": "RGB", "layout": "NCHW",
            "mean": [127.5] * 3, "std": [127.5] * 3,
            # Square crop of side crop_scale * max(box w, h) around a detection, zero (black)
            # padded, bilinear resize with align_corners=True (the reference's F.interpolate).
            "crop": "square", "crop_scale": 1.25, "align_corners": True,
        },
        "priors": DFA_PRIORS,
        "aligned_size": [OUTPUT_SIZE, OUTPUT_SIZE],
        "landmarks": {"count": 5, "order": list(LANDMARK_ORDER),
                      "coords": "x,y in [0,1] of the input crop; pixel = value * size"},
        "alignment": "Umeyama similarity onto the ArcFace template; aligned = "
                     "grid_sample(image + 1, base_grid @ theta^T, bilinear, zeros, "
                     "align_corners) - 1 (in-graph, no affine_grid op)",
    }


def _example_inputs(batch: int, gen: torch.Generator):
    # Smooth random images (20x20 noise upsampled), closer to natural images than pixel noise.
    low = torch.rand(batch, 3, INPUT_SIZE // 8, INPUT_SIZE // 8, generator=gen) * 2 - 1
    img = F.interpolate(low, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return (img,)


@register
def dfa_mnet025() -> ArchSpec:
    graph = GraphSpec(
        name="model",
        module=lambda m: m,
        inputs=[TensorSpec("image", ("batch", 3, INPUT_SIZE, INPUT_SIZE),
                           layout="NCHW RGB [-1,1], square face crop")],
        outputs=[TensorSpec("landmarks", ("batch", 5, 2), layout="x,y in [0,1] of the input"),
                 TensorSpec("aligned", ("batch", 3, OUTPUT_SIZE, OUTPUT_SIZE),
                            layout="NCHW RGB [-1,1]"),
                 TensorSpec("aligned_landmarks", ("batch", 5, 2),
                            layout="x,y in [0,1] of aligned"),
                 TensorSpec("score", ("batch", 1), layout="face probability"),
                 TensorSpec("theta", ("batch", 2, 3), layout="affine_grid theta")],
        example_inputs=_example_inputs,
    )
    return ArchSpec(name="dfa_mnet025", task="keypoints",
                    description="DFA aligner: RetinaFace-MobileNet0.25 + Mixer aggregator "
                                "(CVLface cvlface_DFA_mobilenet)",
                    factory=lambda: DFA(**MNET025), graphs=[graph], manifest=_manifest(),
                    remap_keys=remap_dfa_keys)
