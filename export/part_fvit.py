"""Part fViT (Sun & Tzimiropoulos, BMVC 2022), the backbone of LAFS (CVPR 2024).

A landmark CNN (``part_fvit_cnn``) predicts 196 points on the aligned 112x112 face; an 8x8
patch is bilinearly sampled around each point; a 12-layer pre-norm ViT runs over the 196
landmark tokens plus a CLS token; the output is LayerNorm(CLS), 768-d, raw. Specification:
shared/reference/lafs-part-fvit-facts.md (sections cited below). The module tree mirrors the
official checkpoint keys after ``module.`` is removed (section 3.1), so loading needs no
renaming beyond that prefix and dropping the training head ``loss.*``.

Exported graph: ``image`` [B,3,112,112] RGB in [-1,1] -> ``embedding`` [B,768] (raw) and
``landmarks`` [B,196,2] (x, y in pixels of the input, pixel centres at integers). The patch
geometry is stored as an initializer; nothing about it is computed at run time. Two sampling
forms, chosen at export with the export option ``sampling`` (recorded in the manifest under
``export_options``):

- ``gridsample`` (default): one GridSample over a 112x112 mosaic grid (opset >= 16). With the
  reference's float order ((offset + point) / 56 - 1) it is bit-identical to the official
  196-call loop (section 2.4).
- ``gather``: no GridSample. All 64 samples of a patch share one pair of bilinear fractions
  (the offsets are integers), so each patch is a fixed 2x2-tap blend of a 9x9 integer window
  of the image, fetched with one GatherElements (section 7.3); clamped indices and a 0/1 mask
  give the zero padding without a Pad op. It differs from GridSample by rounding only
  (GridSample goes through normalised coordinates): tokens within ~1e-5.

Decisions on the open questions of the sheet (section 10):

1. Input range: [-1, 1] ((pixel - 127.5) / 127.5), the convention with the most support (the
   training loop, the SSL pipeline, the BMVC class); recorded in the manifest's ``preprocess``
   (``mean``/``std`` and ``range``). [-0.5, 0.5] is a manifest edit (std 255) away; check it
   with verification pairs once a real checkpoint is at hand.
2. Colour order: RGB for every checkpoint, including the MS1MV3 (BMVC) one.
3. Checkpoint layout: ``module.`` prefixes are removed, ``loss.*`` is dropped (logged), and the
   rest must match all 432 tensors exactly (strict).
4. Self-supervised files (``teacher`` / ``student``): refused with one line. Their backbone was
   trained without the landmark CNN (no ``stn.*`` / ``output_layer.*``) and never fine-tuned for
   recognition, so they make no deployable recognizer on their own.
5-7. Paper-only content, the fine-tuning regulariser and layer-wise decay are training matters:
   nothing to decide for inference.
8. Degenerate min-max (all 392 head outputs equal): every point goes to 0 instead of NaN (a
   floored range, a no-op otherwise). fp16/int8: measured on the engines (README, "LAFS Part
   fViT"): int8 in the landmark CNN moves points by ~4 px, so builds keep the CNN, min-max and
   sampling in float (``kpface.runtimes.floatscope.landmark_path``).
9. GridSample support per engine: both forms are exported and checked; the engine table says
   which engines lack GridSample (``lacks``) and ``kpface export --for RUNTIME`` picks the form.

Test-time flip: the official evaluation sums the embeddings of the image and of its mirror.
The manifest carries ``"mirror_sum": false``: one pass per face by default, because the sum
doubles the recognizer cost (2 x 13.3 GMACs) and the single-view output is what the parity and
build gates measure; set it true to follow the official protocol (the published IJB figures).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kpface.errors import CheckpointError

from .part_fvit_cnn import LARGE, STEM_CHANNELS, LandmarkTrunk, minmax_points
from .registry import ArchSpec, GraphSpec, TensorSpec, register

log = logging.getLogger(__name__)

SAMPLING_FORMS = ("gridsample", "gather")


@dataclass(frozen=True)
class PartFViTConfig:
    """Section 1. ``heads * dim_head`` (704) need not equal ``dim`` (768)."""

    img_size: int = 112
    patch_size: int = 8
    num_landmarks: int = 196
    dim: int = 768
    depth: int = 12
    heads: int = 11
    dim_head: int = 64
    mlp_dim: int = 2048

    @property
    def side(self) -> int:
        return math.isqrt(self.num_landmarks)

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size ** 2

    def to_dict(self) -> dict:
        return asdict(self)


# --- ViT (section 2.5); class and attribute names give the official key names ----------------

class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn  # training-only DropPath omitted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class Attention(nn.Module):
    """No qkv bias; scale dim^-0.5 applied after q.k (not dim_head^-0.5)."""

    def __init__(self, dim: int, heads: int, dim_head: int, tokens: int):
        super().__init__()
        self.heads, self.dim_head, self.tokens = heads, dim_head, tokens
        self.scale = dim ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Identity())  # 1: dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, inner = self.tokens, self.heads * self.dim_head  # static shapes, batch as -1
        qkv = self.to_qkv(x).reshape(-1, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2)  # [B, N, heads, dim_head]
        return self.to_out(out.reshape(-1, n, inner))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # Indices 2 and 4 are the training-only dropouts of the reference.
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(),
                                 nn.Linear(hidden, dim), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, cfg: PartFViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([
                Residual(PreNorm(cfg.dim, Attention(cfg.dim, cfg.heads, cfg.dim_head,
                                                   cfg.num_landmarks + 1))),
                Residual(PreNorm(cfg.dim, FeedForward(cfg.dim, cfg.mlp_dim)))])
            for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = ff(attn(x))
        return x


# --- patch sampling (section 2.4 and 7.3) -------------------------------------------------------

def mosaic_offsets(patch: int) -> torch.Tensor:
    """[p, 1, p, 2]: element [a, 0, b] = (a - p/2, b - p/2). Patch row a steps along image x
    and column b along image y (the reference's transposed patches)."""
    o = torch.arange(patch, dtype=torch.float32) - patch // 2
    a, b = torch.meshgrid(o, o, indexing="ij")
    return torch.stack([a, b], dim=-1)[:, None]


def window_steps(patch: int) -> torch.Tensor:
    """[2, p + 1] float: the window's pixel steps from floor(x - 1/2), -p/2 .. p/2, for x (row
    0) and y (row 1)."""
    return (torch.arange(patch + 1, dtype=torch.float32) - patch // 2).expand(2, -1).clone()


class PartFViT(nn.Module):
    """``forward(image)`` -> (embedding [B, dim] raw, landmarks [B, K, 2] x,y in pixels).

    ``image``: [B, 3, 112, 112] RGB, normalised as the manifest says ([-1, 1]).
    ``sampling``: "gridsample" or "gather" (see the module docstring); the weights are the same.
    """

    def __init__(self, cfg: PartFViTConfig, sampling: str = "gridsample"):
        super().__init__()
        if sampling not in SAMPLING_FORMS:
            raise ValueError(f"sampling must be one of {SAMPLING_FORMS}, not {sampling!r}")
        if cfg.side ** 2 != cfg.num_landmarks or cfg.patch_size % 2:
            raise ValueError("num_landmarks must be a square and patch_size even")
        self.cfg, self.sampling = cfg, sampling
        k, dim = cfg.num_landmarks, cfg.dim
        # Registration order = the reference's state-dict order (section 3.1).
        self.pos_embedding = nn.Parameter(torch.randn(1, k + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.stn = LandmarkTrunk(LARGE)
        self.output_layer = nn.Sequential(nn.Identity(),  # 0: training-only dropout
                                          nn.Linear(self.stn.out_channels, 2 * k))
        self.patch_to_embedding = nn.Linear(cfg.patch_dim, dim)
        self.transformer = Transformer(cfg)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim))
        # Geometry constants (ONNX initializers): the mosaic offsets of the GridSample form,
        # the window steps and channel index of the gather form.
        self.register_buffer("patch_offsets", mosaic_offsets(cfg.patch_size), persistent=False)
        self.register_buffer("window_steps", window_steps(cfg.patch_size), persistent=False)
        self.register_buffer("channel_index", torch.arange(3), persistent=False)

    def landmarks(self, image: torch.Tensor) -> torch.Tensor:
        """[B, K, 2] (x, y) in pixel-index units of the input, in [0, img_size - 1]."""
        pooled = self.stn(image).mean(dim=(-2, -1))
        return minmax_points(self.output_layer(pooled), self.cfg.num_landmarks,
                             float(self.cfg.img_size - 1))

    def tokens(self, image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """[B, K, 3 p^2]: token k feature (p*a + b)*3 + c = channel c sampled at pixel
        (x_k + a - p/2 - 1/2, y_k + b - p/2 - 1/2), zero outside the image."""
        if self.sampling == "gather":
            return self._tokens_gather(image, points)
        return self._tokens_gridsample(image, points)

    def _tokens_gridsample(self, image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        s, p = self.cfg.side, self.cfg.patch_size
        # Mosaic grid: block (r, s) of p x p holds landmark k = r*side + s (section 2.4). The
        # batch and the block row r share one axis, so no tensor has more than 5 dimensions
        # (Core ML's limit); values and float order are those of the reference.
        grid = points.reshape(-1, 1, s, 1, 2) + self.patch_offsets  # [B*side, p, side, p, 2]
        grid = (grid / (self.cfg.img_size * 0.5) - 1).reshape(-1, s * p, s * p, 2)
        mosaic = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
        # [B, 3, 8r+a, 8s+b] -> [B*side (r), a, side (s), b*3 + c] -> token (r, s), (a, b, c).
        blocks = mosaic.permute(0, 2, 3, 1).reshape(-1, p, s, 3 * p).permute(0, 2, 1, 3)
        return blocks.reshape(-1, s * s, self.cfg.patch_dim)

    def _tokens_gather(self, image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        k, p, size = self.cfg.num_landmarks, self.cfg.patch_size, self.cfg.img_size
        # Sample a of point x sits at x - 1/2 + a - p/2: integer part floor(x - 1/2) + a - p/2,
        # fraction frac(x - 1/2), the same for every a. The (p+1)x(p+1) integer window of
        # pixels around it is fetched once; each sample blends 2x2 neighbours of it.
        shifted = points - 0.5
        base = torch.floor(shifted)
        fx, fy = (shifted - base).unbind(-1)  # [B, K]
        pos = base[..., None] + self.window_steps  # [B, K, 2, p+1], integer-valued pixels
        inside = ((pos >= 0) & (pos <= size - 1)).to(image.dtype)  # zero padding
        # Flat channel-last index (row * size + col) * 3 + c, in integers: computed in floats
        # it is exact in fp32 but not in an fp16 build (spacing 32 at 37,000).
        pos = pos.clamp(0, size - 1).to(torch.int64)
        index = (pos[:, :, 1, None, :, None] * (3 * size) + pos[:, :, 0, :, None, None] * 3
                 + self.channel_index)  # [B, K, p+1 (x), p+1 (y), 3]
        flat = image.permute(0, 2, 3, 1).reshape(-1, 3 * size * size)
        win = torch.gather(flat, 1, index.reshape(-1, k * (p + 1) ** 2 * 3))
        win = win.reshape(-1, k, p + 1, p + 1, 3) * (
            inside[:, :, 0, :, None, None] * inside[:, :, 1, None, :, None])
        w00, w10 = (1 - fx) * (1 - fy), fx * (1 - fy)
        w01, w11 = (1 - fx) * fy, fx * fy
        patch = (win[:, :, :-1, :-1] * w00[..., None, None, None]
                 + win[:, :, 1:, :-1] * w10[..., None, None, None]
                 + win[:, :, :-1, 1:] * w01[..., None, None, None]
                 + win[:, :, 1:, 1:] * w11[..., None, None, None])
        return patch.reshape(-1, k, self.cfg.patch_dim)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.patch_to_embedding(tokens)
        # expand_as exports as Expand(cls, Shape(x[:, :1])); expand(b, -1, -1) or repeat would
        # add ConstantOfShape/Where shape arithmetic.
        cls = self.cls_token.expand_as(x[:, :1])
        x = torch.cat([cls, x], dim=1) + self.pos_embedding
        return self.mlp_head(self.transformer(x)[:, 0])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        points = self.landmarks(image)
        return self.embed_tokens(self.tokens(image, points)), points


# --- checkpoints (section 4) --------------------------------------------------------------------

def remap_part_fvit_keys(state: dict) -> dict:
    """Official supervised files (``module.`` prefix, CosFace ``loss.weight``) and kpface's own
    safetensors (bare keys) -> this module's keys. Self-supervised files are refused."""
    if any(k.startswith(("teacher.", "student.")) for k in state):
        raise CheckpointError(
            "this is a LAFS self-supervised checkpoint (teacher/student of the DINO "
            "pre-training): its backbone has no landmark CNN (stn.*, output_layer.*) and was "
            "never fine-tuned for recognition; export a supervised Part fViT checkpoint instead "
            "(e.g. the LAFS fine-tuned WebFace4M file)")
    out, dropped = {}, []
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("loss."):
            dropped.append(f"{key} {list(value.shape)}")
            continue
        out[key] = value
    if dropped:
        log.info("dropped the training head (margin-loss classifier, unused at inference): %s",
                 ", ".join(dropped))
    return out


# --- registry -----------------------------------------------------------------------------------

def _manifest(cfg: PartFViTConfig) -> dict:
    from kpface.landmarks import LANDMARK_ORDER
    return {
        "config": cfg.to_dict(),
        # The trunk's layout, for analytic FLOP counts without the graph (kpface.bench.flops).
        "landmark_cnn": {"stem": STEM_CHANNELS, "head": [LARGE[-1][2], 2 * cfg.num_landmarks],
                         "blocks": [["kernel", "expansion", "out", "se", "act", "stride"]]
                         + [list(b) for b in LARGE]},
        "preprocess": {"size": [cfg.img_size, cfg.img_size], "color": "RGB", "layout": "NCHW",
                       "mean": [127.5] * 3, "std": [127.5] * 3, "range": [-1.0, 1.0]},
        # The detector's five points only align the crop; the graph takes no keypoints.
        "keypoints": {"count": 5, "order": list(LANDMARK_ORDER),
                      "coords": "x,y in [0,1] of the recognizer input image", "used": False},
        "landmarks": {"output": "landmarks", "count": cfg.num_landmarks,
                      "coords": f"x,y in pixels of the {cfg.img_size}x{cfg.img_size} input, "
                                "pixel centres at integers",
                      "semantic": False},  # learned without landmark supervision
        "embedding_size": cfg.dim,
        "normalize_embedding": True,
        "mirror_sum": False,
        # No verification threshold is published for Part fViT: kpface's cosine default.
        "threshold": 0.3,
    }


def _example_inputs(cfg: PartFViTConfig):
    def make(batch: int, gen: torch.Generator):
        # Smooth random images (noise upsampled 8x), closer to faces than pixel noise.
        low = torch.rand(batch, 3, cfg.img_size // 8, cfg.img_size // 8, generator=gen) * 2 - 1
        return (F.interpolate(low, size=(cfg.img_size, cfg.img_size), mode="bilinear",
                              align_corners=False),)
    return make


PART_FVIT = PartFViTConfig()
PART_FVIT_TINY = PartFViTConfig(dim=64, depth=2, heads=2, dim_head=24, mlp_dim=128)


def part_fvit_spec(name: str, cfg: PartFViTConfig, description: str) -> ArchSpec:
    """The ArchSpec of one Part fViT configuration."""
    s = cfg.img_size
    graph = GraphSpec(
        name="model", module=lambda m: m,
        inputs=[TensorSpec("image", ("batch", 3, s, s), layout="NCHW RGB [-1,1]")],
        outputs=[TensorSpec("embedding", ("batch", cfg.dim), layout="raw, not normalised"),
                 TensorSpec("landmarks", ("batch", cfg.num_landmarks, 2),
                            layout=f"x,y in pixels of the {s}x{s} input")],
        example_inputs=_example_inputs(cfg))
    return ArchSpec(
        name=name, task="recognizer", description=description,
        factory=functools.partial(PartFViT, cfg),  # sampling=... from the export option
        graphs=[graph], manifest=_manifest(cfg), remap_keys=remap_part_fvit_keys,
        options={"sampling": SAMPLING_FORMS})


register(part_fvit_spec("part_fvit", PART_FVIT, "LAFS Part fViT: landmark CNN + 196 landmark "
                                                "patches + ViT-B/11 heads (official configuration)"))
register(part_fvit_spec("part_fvit_tiny", PART_FVIT_TINY, "tiny Part fViT for tests (real "
                                                          "landmark CNN, 2-layer ViT; random weights only)"))
