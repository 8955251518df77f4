"""KP-RPE against slow loops written directly from the specification (sections 1.5-1.8).

Nothing here calls the code under test to produce an expected value: the expected values are
plain-Python loops over the formulas in cvlface-kprpe-facts.md.
"""
import math

import numpy as np
import pytest
import torch

from kpface.export.kprpe import bucket_ids, patch_grid
from kpface.export.vit import FaceViT, ViTConfig

ALPHA, BETA, GAMMA = 1.9, 3.8, 15.2


def g_spec(r: int) -> int:
    """Section 1.5, one integer at a time."""
    if abs(r) <= ALPHA:
        return r
    v = ALPHA + math.log(abs(r) / ALPHA) / math.log(GAMMA / ALPHA) * (BETA - ALPHA)
    v = min(round(v), BETA)
    return int(math.copysign(1, r) * math.trunc(v))


def buckets_spec(side=14):
    n = side * side
    out = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        for j in range(n):
            dr = i // side - j // side
            dc = i % side - j % side
            out[i, j] = (g_spec(dr) + 3) * 7 + (g_spec(dc) + 3)
    return out


def test_piecewise_map_matches_spec_table():
    expected = {0: 0, 1: 1, 2: 2, 3: 2}
    expected.update({r: 3 for r in range(4, 14)})
    for r, v in expected.items():
        assert g_spec(r) == v and g_spec(-r) == -v


def test_bucket_ids_match_slow_loop_and_listed_row():
    ids = bucket_ids(14).numpy()
    assert ids.shape == (196, 196)
    np.testing.assert_array_equal(ids, buckets_spec())
    # The sample row quoted in section 1.5.
    assert ids[0, :16].tolist() == [24, 23, 22, 22, 21, 21, 21, 21, 21, 21, 21, 21, 21, 21, 17, 16]
    assert (np.diag(ids) == 24).all() and ids.min() == 0 and ids.max() == 48


def test_patch_grid_is_x_y_midpoints():
    grid = patch_grid(14).numpy()
    c = [(2 * k + 1) / 28 for k in range(14)]
    for n in (0, 1, 13, 14, 100, 195):
        row, col = divmod(n, 14)
        assert grid[n, 0] == pytest.approx(c[col], abs=1e-7)  # x = column
        assert grid[n, 1] == pytest.approx(c[row], abs=1e-7)  # y = row
    assert grid[0, 0] == np.float32(0.0357142873108387)


def bias_spec(w, b, kp, depth, heads, side=14):
    """Sections 1.6-1.8 as loops: rel features, T_d, Bias_d[i, j] = T_d[i, bucket[i, j]]."""
    n = side * side
    c = [(2 * k + 1) / 28 for k in range(side)]
    buckets = buckets_spec(side)
    out = np.zeros((depth, heads, n, n))
    for i in range(n):
        row, col = divmod(i, side)
        rel = []
        for k in range(5):
            rel += [c[col] - kp[k][0], c[row] - kp[k][1]]
        for d in range(depth):
            for h in range(heads):
                for m in range(49):
                    f = (d * heads + h) * 49 + m
                    t = sum(w[f][q] * rel[q] for q in range(10)) + b[f]
                    out[d, h, i][buckets[i] == m] = t
    return out


def test_bias_tensor_matches_spec_loop():
    cfg = ViTConfig(embed_dim=32, depth=2, num_heads=2, mlp_ratio=1.0)
    torch.manual_seed(0)
    model = FaceViT(cfg).eval()
    torch.nn.init.normal_(model.keypoint_linear.weight)
    torch.nn.init.normal_(model.keypoint_linear.bias)
    kp = torch.tensor([[[0.34, 0.46], [0.66, 0.46], [0.5, 0.64], [0.37, 0.83], [0.63, 0.82]]])
    with torch.no_grad():
        got = model.rpe(kp, model.keypoint_linear)
    expected = bias_spec(model.keypoint_linear.weight.double().tolist(),
                         model.keypoint_linear.bias.double().tolist(), kp[0].double().tolist(),
                         depth=2, heads=2)
    for d in range(2):
        assert got[d].shape == (1, 2, 196, 196)
        np.testing.assert_allclose(got[d][0].numpy(), expected[d], atol=2e-5)


def attention_spec(x, block, bias):
    """Section 1.3/1.9 for one block's attention, in float64 with explicit per-head loops."""
    x = x.double()
    ln = torch.nn.functional.layer_norm(x, (x.shape[-1],), block.norm1.weight.double(),
                                        block.norm1.bias.double(), 1e-5)
    wq = block.attn.qkv.weight.double()
    dim, heads = x.shape[-1], block.attn.num_heads
    hd = dim // heads
    q, k, v = (ln @ wq[i * dim:(i + 1) * dim].T for i in range(3))
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = (q[..., sl] * hd ** -0.5) @ k[..., sl].transpose(-1, -2) + bias[:, h].double()
        outs.append(torch.softmax(logits, -1) @ v[..., sl])
    o = torch.cat(outs, -1)
    return o @ block.attn.proj.weight.double().T + block.attn.proj.bias.double()


def test_attention_adds_bias_after_scaling():
    cfg = ViTConfig(embed_dim=32, depth=1, num_heads=2, mlp_ratio=1.0)
    torch.manual_seed(1)
    model = FaceViT(cfg).eval()
    x = torch.randn(2, 196, 32)
    bias = torch.randn(2, 2, 196, 196)
    block = model.blocks[0]
    with torch.no_grad():
        got = block.attn(block.norm1(x), bias)
        want = attention_spec(x, block, bias)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)


def test_extra_keypoints_are_ignored_and_any_count_is_supported():
    cfg = ViTConfig(embed_dim=32, depth=1, num_heads=2, mlp_ratio=1.0)
    model = FaceViT(cfg).eval()
    kp5 = torch.rand(1, 5, 2)
    kp49 = torch.cat([kp5, torch.rand(1, 44, 2)], 1)
    rel5, rel49 = model.rpe.relative_keypoints(kp5), model.rpe.relative_keypoints(kp49)
    assert torch.equal(rel5, rel49)
    # Body-pose style: 17 joints -> 34 relative features.
    body = FaceViT(ViTConfig(embed_dim=32, depth=1, num_heads=2, mlp_ratio=1.0, num_keypoints=17)).eval()
    assert body.keypoint_linear.in_features == 34
    assert body(torch.zeros(1, 3, 112, 112), torch.rand(1, 17, 2)).shape == (1, 512)
