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

    The learned part is the ViT's ``keypoint_linear`` (2K -> 49*H*depth, rows in the
    checkpoint's (block, head, bucket) order); :meth:`forward` turns keypoints into its input
    and its output into one bias per block.

    Layout, chosen by measurement in ONNX Runtime (12 blocks x 8 heads, 2 threads): the rows
    of ``keypoint_linear`` are read in (block, bucket, head) order through a constant
    permutation (folded into the weights at export); one single-axis transpose brings batch
    next to head, so each block gathers whole (batch, head) rows of 8*B values and needs only
    a 2-D transpose to land in the attention's [B, H, N, N] layout. That is about 2.3x faster
    at batch 8 and 2x at batch 1 than gathering single elements along the bucket axis.
    """

    def __init__(self, side: int, depth: int, num_heads: int, num_keypoints: int = 5):
        super().__init__()
        self.side, self.depth, self.num_heads = side, depth, num_heads
        self.num_keypoints = num_keypoints
        n, m, h = side * side, NUM_BUCKETS, num_heads
        self.register_buffer("grid", patch_grid(side), persistent=False)
        # Row p = (d*49 + m)*H + h of the reordered linear is checkpoint row (d*H + h)*49 + m.
        d_, m_, h_ = torch.meshgrid(torch.arange(depth), torch.arange(m), torch.arange(h),
                                    indexing="ij")
        self.register_buffer("feature_order", ((d_ * h + h_) * m + m_).reshape(-1),
                             persistent=False)
        # Block d's bias[i, j] reads row (i*depth + d)*49 + bucket[i, j] of the table.
        buckets = bucket_ids(side)
        query = torch.arange(n)[:, None]
        for d in range(depth):
            self.register_buffer(f"gather_index_{d}",
                                 ((query * depth + d) * m + buckets).reshape(-1), persistent=False)

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

    def forward(self, keypoints: torch.Tensor, linear: nn.Linear) -> list[torch.Tensor]:
        """One bias per block, each [B, H, N, N]: bias[b, h, i, j] = T_d[b, h, i, bucket[i, j]]."""
        rel = self.relative_keypoints(keypoints)
        b, n, h = rel.shape[0], rel.shape[1], self.num_heads
        # 2-D input so ONNX Runtime runs the linear and its bias as one Gemm.
        table = nn.functional.linear(rel.reshape(b * n, -1), linear.weight[self.feature_order],
                                     linear.bias[self.feature_order])  # [B*N, (d, m, h)]
        rows = table.reshape(b, -1, h).transpose(0, 1).reshape(-1, b * h)  # [(n, d, m), (b, h)]
        out = []
        for d in range(self.depth):
            g = torch.index_select(rows, 0, getattr(self, f"gather_index_{d}"))  # [N*N, B*H]
            out.append(g.t().reshape(b, h, n, n))
        return out
