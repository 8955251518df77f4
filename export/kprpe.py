"""KeyPoint Relative Position Encoding (KP-RPE), contextual 'product' variant.

Geometry-only constants (the patch-centre grid and the flat gather indices that encode the
relative-position bucket of every query/key pair) are computed once, here, in numpy/torch at
construction, and registered as buffers: they become ONNX initializers, so an exported graph
computes no linspace, meshgrid or range at run time.

Specification: shared/reference/cvlface-kprpe-facts.md sections 1.4-1.9.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# Section 1.4: ratio 1.9 -> alpha, beta, gamma; beta_int = 3, S = 7, 49 buckets.
RATIO = 1.9
ALPHA, BETA, GAMMA = 1.0 * RATIO, 2.0 * RATIO, 8.0 * RATIO
BETA_INT = int(BETA)
SIDE_BUCKETS = 2 * BETA_INT + 1
NUM_BUCKETS = SIDE_BUCKETS ** 2


def piecewise_index(rel: torch.Tensor) -> torch.Tensor:
    """Section 1.5: identity for |r| <= alpha, log-compressed, rounded, clipped to beta, truncated."""
    rel = rel.to(torch.int64)
    near = rel.abs() <= ALPHA
    sign = torch.sign(rel)
    abs_f = rel.abs().clamp(min=1)  # avoid log(0); those entries take the `near` branch anyway
    far = ALPHA + torch.log(abs_f / ALPHA) / math.log(GAMMA / ALPHA) * (BETA - ALPHA)
    far = torch.round(far).clip(max=BETA)
    far = (sign * far).to(torch.int64)  # integer cast truncates toward zero: 3.8 -> 3
    return torch.where(near, rel, far)


def bucket_ids(side: int) -> torch.Tensor:
    """[side^2, side^2] int64 bucket of (query i, key j), vertical offset major."""
    n = torch.arange(side * side)
    row, col = n // side, n % side
    dr = row[:, None] - row[None, :]
    dc = col[:, None] - col[None, :]
    return (piecewise_index(dr) + BETA_INT) * SIDE_BUCKETS + (piecewise_index(dc) + BETA_INT)


def patch_grid(side: int) -> torch.Tensor:
    """[side^2, 2] patch centres as (x, y) in [0, 1], float32, token n = row*side + col.

    Midpoints of torch.linspace(0, 1, side+1) in float32, matching the reference bit for bit.
    """
    c = torch.linspace(0, 1, side + 1, dtype=torch.float32)
    mid = (c[:-1] + c[1:]) / 2
    rows, cols = torch.meshgrid(mid, mid, indexing="ij")
    return torch.stack([cols, rows], dim=-1).reshape(-1, 2)


class KPRPE(nn.Module):
    """Geometry of KP-RPE for one ViT: no parameters, only precomputed buffers.

    The learned part is the ViT's ``keypoint_linear`` (10 -> 49*H*depth); this module turns
    keypoints into its input and its output into one bias per block, each [B, H, N, N].
    """

    def __init__(self, side: int, depth: int, num_heads: int, num_keypoints: int = 5):
        super().__init__()
        self.side, self.depth, self.num_heads = side, depth, num_heads
        self.num_keypoints = num_keypoints
        n = side * side
        self.register_buffer("grid", patch_grid(side), persistent=False)
        # Bias[i, j] = T[i, bucket[i, j]] is a gather from T flattened over (N, 49).
        flat = torch.arange(n)[:, None] * NUM_BUCKETS + bucket_ids(side)
        self.register_buffer("gather_index", flat.reshape(-1), persistent=False)

    @property
    def table_size(self) -> int:
        return NUM_BUCKETS * self.num_heads * self.depth

    def relative_keypoints(self, keypoints: torch.Tensor) -> torch.Tensor:
        """[B, K, 2] (x, y) in [0, 1] -> [B, N, 2K'] (patch centre - keypoint), [dx0, dy0, dx1, ...].

        Only the first ``num_keypoints`` points are used when more are given.
        """
        kp = keypoints[:, : self.num_keypoints].to(self.grid.dtype)
        diff = self.grid[None, :, None, :] - kp[:, None, :, :]
        return diff.flatten(2)

    def biases(self, table: torch.Tensor) -> list[torch.Tensor]:
        """``keypoint_linear`` output [B, N, depth*H*49] (feature (d*H + h)*49 + m) -> per-block bias."""
        b, n = table.shape[0], table.shape[1]
        table = table.view(b, n, self.depth, self.num_heads, NUM_BUCKETS)
        out = []
        for d in range(self.depth):
            t = table[:, :, d].transpose(1, 2).reshape(b, self.num_heads, n * NUM_BUCKETS)
            bias = torch.index_select(t, 2, self.gather_index)
            out.append(bias.view(b, self.num_heads, n, n))
        return out
