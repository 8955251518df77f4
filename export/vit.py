"""Face ViT (CVLface ``vit`` / ``vit_kprpe``), with or without KP-RPE.

No cls token; pre-norm blocks with ReLU6 MLPs; a token-major flatten into a
Linear-BN-Linear-BN feature head. Specification: cvlface-kprpe-facts.md sections 1-2.
The module tree mirrors the checkpoint keys after the ``net.`` prefix is removed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .kprpe import KPRPE
from .registry import ArchSpec, GraphSpec, TensorSpec, register


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 112
    patch_size: int = 8
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 5.0
    output_dim: int = 512
    kprpe: bool = True
    num_keypoints: int = 5

    @property
    def side(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.side ** 2

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, kprpe: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kprpe = kprpe
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: [B, H, N, N] or None."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.kprpe:
            # KP-RPE variant: scale q first, add the (unscaled) bias to the logits.
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
        else:
            # Plain CVLface ViT: scale after the product (differs only in rounding).
            attn = (q @ k.transpose(-2, -1)) * self.scale
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2)  # [B, N, H, hd]
        return self.proj(out.reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kprpe: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, kprpe)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # token n = row*side + col


class FaceViT(nn.Module):
    """``forward(image, keypoints)`` -> raw [B, output_dim] embedding (not normalised).

    ``image``: [B, 3, H, W] RGB in [-1, 1]; ``keypoints``: [B, K, 2] (x, y) in [0, 1] of
    that image. The plain ViT accepts and ignores ``keypoints`` so both share one signature.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, dim))
        self.patch_embed = PatchEmbed(cfg.patch_size, dim)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.kprpe) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * cfg.num_tokens, cfg.output_dim, bias=False),
            nn.BatchNorm1d(cfg.output_dim, eps=2e-5),
            nn.Linear(cfg.output_dim, cfg.output_dim, bias=False),
            nn.BatchNorm1d(cfg.output_dim, eps=2e-5),
        )
        if cfg.kprpe:
            # Registered last so the state-dict order matches the reference (section 2.1).
            self.rpe = KPRPE(cfg.side, cfg.depth, cfg.num_heads, cfg.num_keypoints)
            self.keypoint_linear = nn.Linear(2 * cfg.num_keypoints, self.rpe.table_size)
            nn.init.zeros_(self.keypoint_linear.weight)
            nn.init.zeros_(self.keypoint_linear.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, image: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(image) + self.pos_embed
        feats = None
        if self.cfg.kprpe:
            if keypoints is None:
                raise ValueError("a KP-RPE model needs keypoints")
            feats = self.rpe.features(keypoints)
        for d, block in enumerate(self.blocks):
            # Each block makes its bias just before it runs, so an engine that follows the
            # graph's order holds one [B, H, N, N] bias at a time, not all of them.
            bias = None if feats is None else self.rpe.block_bias(feats, self.keypoint_linear, d)
            x = block(x, bias)
        x = self.norm(x.float()).flatten(1)
        if torch.onnx.is_in_onnx_export() and not self.training:
            return self.export_head(x)
        return self.feature(x)

    def export_head(self, x: torch.Tensor) -> torch.Tensor:
        """The feature head as exported (eval mode): each BatchNorm folded into the Linear
        before it, and the first Linear (dim*N -> out, 205 MB for ViT-small) split along its
        input into slices of at most :data:`HEAD_SLICE_BYTES`, summed.

        Same function as ``self.feature`` in eval mode (the export parity check compares the
        two). Why: an engine that repacks a constant weight (ONNX Runtime's pre-packing,
        OpenVINO's weight reorder) holds the packed copy and the original at once while it
        packs; one 205 MB weight doubled is what made a session's peak memory twice the model
        file. Slices of a few tens of MB are packed and released one at a time.
        """
        lin1, bn1, lin2, bn2 = self.feature
        w1, b1 = fold_batchnorm(lin1, bn1)
        w2, b2 = fold_batchnorm(lin2, bn2)
        # Python ints from the module's own sizes: the tracer would record tensor shapes.
        k, out = lin1.in_features, lin1.out_features
        step = -(-k // max(1, -(-k * out * 4 // HEAD_SLICE_BYTES)))
        parts = [nn.functional.linear(x[:, start:start + step], w1[:, start:start + step])
                 for start in range(0, k, step)]
        # One reduction rather than a chain of Adds: ONNX Runtime would fuse each MatMul + Add
        # into a Gemm with a non-constant C, which its int8 quantizer cannot fold.
        y = torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]
        return nn.functional.linear(y + b1, w2, b2)


# Largest slice of the exported head's first weight (see FaceViT.export_head).
HEAD_SLICE_BYTES = 32 * 2 ** 20


def fold_batchnorm(linear: nn.Linear, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(linear(x))`` in eval mode as one affine map."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if linear.bias is not None:
        bias = bias + linear.bias * scale
    return linear.weight * scale[:, None], bias


# --- random-weight exports ------------------------------------------------------------------
# The training init of keypoint_linear is zero (section 2.1), so a random export's KP-RPE bias
# is all zeros and its keypoint input is dead. Random exports draw its weight from
# N(0, KPRPE_RANDOM_STD^2) instead (bias stays zero). Measured on vit_kprpe_small, seeds 0-5,
# 8 real aligned face crops (scripts/kprpe_random_init.py): the bias of a block has rms ~3 in
# logit units against q.k/sqrt(d) logits of rms 0.12-0.33 (bias/logit 9-27, median 18), and
# moving all five keypoints by +0.05 in x gives an embedding cosine of 0.9977 on average, 0.99935
# at worst (the bar is <= 0.9999), against 1.0 at zero init, ~0.99997 at std 1, ~0.99985 at std 2.
# Checkpoint loads overwrite it.
KPRPE_RANDOM_STD = 3.0
SENSITIVITY_SHIFT_X = 0.05  # in units of the [0, 1] image


def keypoint_sensitivity(model: "FaceViT", batch: int = 4, seed: int = 0) -> dict:
    """Cosine between the embeddings of the spec's example inputs and of the same inputs with
    all keypoints moved by SENSITIVITY_SHIFT_X in x (1.0: the keypoints do not matter)."""
    image, kp = _example_inputs(model.cfg)(batch, torch.Generator().manual_seed(seed))
    moved = kp.clone()
    moved[..., 0] += SENSITIVITY_SHIFT_X
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(model(image, kp), model(image, moved), dim=1)
    return {"shift_x": SENSITIVITY_SHIFT_X, "inputs": f"{batch} example inputs (uniform images, "
            f"jittered ArcFace-template keypoints, seed {seed})",
            "cosine_max": round(float(cos.max()), 6), "cosine_mean": round(float(cos.mean()), 6)}


def init_random_kprpe(model: "FaceViT", generator: torch.Generator) -> dict:
    """Random exports: a non-zero keypoint_linear (see KPRPE_RANDOM_STD); returns the
    manifest's description of it with the measured keypoint sensitivity."""
    if not model.cfg.kprpe:
        return {}
    with torch.no_grad():
        model.keypoint_linear.weight.normal_(0.0, KPRPE_RANDOM_STD, generator=generator)
        model.keypoint_linear.bias.zero_()
    return {"keypoint_linear": {"weight": f"normal(0, {KPRPE_RANDOM_STD:g})", "bias": "zeros",
                                "why": "the training init (zeros) switches KP-RPE off"},
            "keypoint_sensitivity": keypoint_sensitivity(model)}


# --- registry -----------------------------------------------------------------------------

def _recognizer_manifest(cfg: ViTConfig) -> dict:
    from kpface.landmarks import LANDMARK_ORDER
    return {
        "config": cfg.to_dict(),
        "preprocess": {"size": [cfg.img_size, cfg.img_size], "color": "RGB", "layout": "NCHW",
                       "mean": [127.5] * 3, "std": [127.5] * 3},
        "keypoints": {"count": cfg.num_keypoints, "order": list(LANDMARK_ORDER),
                      "coords": "x,y in [0,1] of the recognizer input image",
                      "used": cfg.kprpe},
        "embedding_size": cfg.output_dim,
        "normalize_embedding": True,
        # Cosine threshold of the CVLface verification app (section 4).
        "threshold": 0.3,
    }


def _example_inputs(cfg: ViTConfig):
    def make(batch: int, gen: torch.Generator):
        image = torch.rand(batch, 3, cfg.img_size, cfg.img_size, generator=gen) * 2 - 1
        # Plausible landmarks: the ArcFace template jittered by a few percent.
        base = torch.tensor([[0.342, 0.462], [0.657, 0.460], [0.500, 0.640],
                             [0.371, 0.825], [0.632, 0.824]])
        kp = base + 0.05 * (torch.rand(batch, cfg.num_keypoints, 2, generator=gen) - 0.5)
        return image, kp
    return make


def remap_vit_keys(state: dict) -> dict:
    """CVLface ``net.*`` and Hugging Face ``model.net.*`` keys -> this module's keys."""
    out = {}
    for k, v in state.items():
        for prefix in ("model.net.", "net."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def vit_spec(name: str, description: str, **kw) -> ArchSpec:
    """The ArchSpec of one face-ViT configuration (``kw``: :class:`ViTConfig` fields)."""
    cfg = ViTConfig(**kw)
    inputs = [TensorSpec("image", ("batch", 3, cfg.img_size, cfg.img_size), layout="NCHW RGB [-1,1]"),
              TensorSpec("keypoints", ("batch", cfg.num_keypoints, 2), layout="x,y in [0,1]")]
    make = _example_inputs(cfg)
    # A plain ViT ignores keypoints, so its graph has the image input only.
    graph = GraphSpec(
        name="model",
        module=lambda m: m,
        inputs=inputs if cfg.kprpe else inputs[:1],
        outputs=[TensorSpec("embedding", ("batch", cfg.output_dim), layout="raw, not normalised")],
        example_inputs=make if cfg.kprpe else (lambda b, g: make(b, g)[:1]),
    )
    return ArchSpec(name=name, task="recognizer", description=description,
                    factory=lambda: FaceViT(cfg), graphs=[graph],
                    manifest=_recognizer_manifest(cfg), remap_keys=remap_vit_keys,
                    random_init=init_random_kprpe if cfg.kprpe else None)


def _register(name: str, description: str, **kw) -> ArchSpec:
    """Register one more configuration (tests add baselines this way)."""
    return register(vit_spec(name, description, **kw))


register(vit_spec("vit_kprpe_base", "ViT-base + KP-RPE (published CVLface checkpoints)",
                  depth=24, num_heads=16, mlp_ratio=3.0))
register(vit_spec("vit_kprpe_small", "ViT-small + KP-RPE (published config, no checkpoint)",
                  depth=12, num_heads=8, mlp_ratio=5.0))
register(vit_spec("vit_base", "ViT-base without KP-RPE (overhead baseline)",
                  depth=24, num_heads=16, mlp_ratio=3.0, kprpe=False))
register(vit_spec("vit_small", "ViT-small without KP-RPE (overhead baseline)",
                  depth=12, num_heads=8, mlp_ratio=5.0, kprpe=False))
register(vit_spec("vit_kprpe_tiny", "tiny KP-RPE ViT for tests (random weights only)",
                  embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0))
