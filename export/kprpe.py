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
    checkpoint's (block, head, bucket) order); :meth:`features` turns keypoints into its input
    and :meth:`block_bias` its output into one block's bias.

    Layout ("key rows", chosen by measurement on ONNX Runtime and OpenVINO, 12 blocks x 8
    heads): block d's table holds, for each query i, head h and row bucket a, the biases of
    one key row (the 14 keys of a patch row, in key order), so its bias [B, H, N, N] is one
    Gather of whole 14-value rows in the attention's own layout: no transpose, and a table
    of half the bias's size, made by one MatMul right before the block (it stays in cache).
    The keypoint linear's weights and bias, read through the constant ``expand_index_d``, fold
    into that MatMul's weight at export. Per block and batch 8 this cost about a third of the
    previous form (a gather of (batch, head) rows from one table of all blocks and a 2-D
    transpose) on both engines; see the README.
    """

    def __init__(self, side: int, depth: int, num_heads: int, num_keypoints: int = 5):
        super().__init__()
        self.side, self.depth, self.num_heads = side, depth, num_heads
        self.num_keypoints = num_keypoints
        h = num_heads
        self.register_buffer("grid", patch_grid(side), persistent=False)
        rel = torch.arange(side)[:, None] - torch.arange(side)[None, :]  # [query, key] offset
        near = piecewise_index(rel) + BETA_INT                              # 0..6
        # expand_index_d[ci, k, (h, a, cj)]: where block d's MatMul weight [k, (h, a, cj)]
        # for query column ci comes from: keypoint-linear weight row (d*H + h)*49 + a*7 +
        # g(ci - cj) + 3, column k; the last k (feature 1) reads the linear's bias instead.
        heads = torch.arange(h)[:, None, None]
        a = torch.arange(SIDE_BUCKETS)[None, :, None]
        for d in range(depth):
            rows = ((d * h + heads)[None] * NUM_BUCKETS + a[None] * SIDE_BUCKETS
                    + near[:, None, None, :])                        # [ci, h, a, cj]
            self.register_buffer(f"expand_index_{d}", rows.reshape(side, -1), persistent=False)
        # gather_index[(h, i, rj)]: the table row of query i = ri*side + ci, head h and key row
        # rj, the same in every block: ((ci*side + ri)*H + h)*7 + g(ri - rj) + 3.
        ri = torch.arange(side)[:, None, None]
        ci = torch.arange(side)[None, :, None]
        query = ((ci * side + ri) * h)[None] + torch.arange(h).reshape(h, 1, 1, 1)
        self.register_buffer("gather_index", (query * SIDE_BUCKETS
                                              + near[None, :, None, :]).reshape(-1),
                             persistent=False)

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

    def features(self, keypoints: torch.Tensor) -> torch.Tensor:
        """[B, K, 2] keypoints -> [B, query column, query row, 2K + 1]: the relative keypoints
        of every query patch and a constant 1 (which carries the keypoint linear's bias)."""
        rel = self.relative_keypoints(keypoints)
        one = rel[..., :1] * 0 + 1  # from the input: no ConstantOfShape in the graph
        x = torch.cat([rel, one], -1)
        return x.reshape(x.shape[0], self.side, self.side, -1).transpose(1, 2)

    def block_bias(self, features: torch.Tensor, linear: nn.Linear, d: int) -> torch.Tensor:
        """Block ``d``'s bias [B, H, N, N]: bias[b, h, i, j] = T_d[b, h, i, bucket[i, j]]."""
        side, n, h = self.side, self.side * self.side, self.num_heads
        index = getattr(self, f"expand_index_{d}").reshape(-1)
        table = torch.cat([linear.weight, linear.bias[:, None]], 1)   # [rows, 2K + 1]
        w = table.index_select(0, index).reshape(side, -1, linear.in_features + 1)
        e = torch.matmul(features, w.transpose(1, 2))                  # [B, ci, ri, (h, a, cj)]
        rows = e.reshape(features.shape[0], -1, side)                  # [B, (ci, ri, h, a), cj]
        g = torch.index_select(rows, 1, self.gather_index)
        return g.reshape(features.shape[0], h, n, n)

    def forward(self, keypoints: torch.Tensor, linear: nn.Linear) -> list[torch.Tensor]:
        """One bias per block, each [B, H, N, N]: bias[b, h, i, j] = T_d[b, h, i, bucket[i, j]]."""
        x = self.features(keypoints)
        return [self.block_bias(x, linear, d) for d in range(self.depth)]
