"""Part fViT (LAFS) in torch against the fact sheet (shared/reference/lafs-part-fvit-facts.md).

The reference below is written from the sheet alone, in float64, with loops: the landmark CNN
block by block from the table of section 2.2, the head and the joint min-max of 2.3, every one
of the 196 x 8 x 8 samples of 2.4 as an explicit bilinear interpolation, and the ViT of 2.5
head by head. The model must agree with it for both sampling forms.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kpface.export import registry
from kpface.export.part_fvit import PartFViT

# Section 2.2: (inp, out, exp, kernel, stride, squeeze-excite, activation) of modules 1..15.
TRUNK = [(16, 16, 16, 3, 1, False, "RE"), (16, 24, 64, 3, 2, False, "RE"),
         (24, 24, 72, 3, 1, False, "RE"), (24, 40, 72, 5, 2, True, "RE"),
         (40, 40, 120, 5, 1, True, "RE"), (40, 40, 120, 5, 1, True, "RE"),
         (40, 80, 240, 3, 2, False, "HS"), (80, 80, 200, 3, 1, False, "HS"),
         (80, 80, 184, 3, 1, False, "HS"), (80, 80, 184, 3, 1, False, "HS"),
         (80, 112, 480, 3, 1, True, "HS"), (112, 112, 672, 3, 1, True, "HS"),
         (112, 160, 672, 5, 2, True, "HS"), (160, 160, 960, 5, 1, True, "HS"),
         (160, 160, 960, 5, 1, True, "HS")]
# Section 2.2, last column: parameters of modules 0..15.
TRUNK_PARAMS = [464, 752, 3440, 4440, 9368, 20360, 20360, 32080, 34760, 31992, 31992, 213824,
                385280, 428384, 796160, 796160]


def build(arch, sampling="gridsample", seed=0):
    """The registered model with (seeded) random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = registry.get(arch).factory(sampling=sampling).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_mean"):
                t.normal_(0, 0.1)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    return model


def face_like(batch, seed=1):
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 14, 14, generator=gen) * 2 - 1
    return F.interpolate(low, size=(112, 112), mode="bilinear", align_corners=False)


# --- the slow reference, from the sheet ---------------------------------------------------------

def ref_landmarks(sd, image):
    """Sections 2.2-2.3 -> [B, 196, 2] (x, y) in pixels."""
    def bn(x, p):
        shape = (1, -1, 1, 1)
        return ((x - sd[p + ".running_mean"].view(shape))
                / torch.sqrt(sd[p + ".running_var"].view(shape) + 1e-5)
                * sd[p + ".weight"].view(shape) + sd[p + ".bias"].view(shape))

    def hswish(x):
        return x * torch.clamp(x + 3, 0, 6) / 6

    x = hswish(bn(F.conv2d(image, sd["stn.features.0.0.weight"], stride=2, padding=1),
                  "stn.features.0.1"))
    for i, (inp, out, exp, k, s, se, act) in enumerate(TRUNK, start=1):
        p = f"stn.features.{i}.conv."
        f = torch.relu if act == "RE" else hswish
        y = f(bn(F.conv2d(x, sd[p + "0.weight"]), p + "1"))
        y = bn(F.conv2d(y, sd[p + "3.weight"], stride=s, padding=(k - 1) // 2, groups=exp),
               p + "4")
        if se:
            g = torch.relu(y.mean(dim=(2, 3)) @ sd[p + "5.fc.0.weight"].T)
            g = torch.clamp(g @ sd[p + "5.fc.2.weight"].T + 3, 0, 6) / 6
            y = y * g[:, :, None, None]
        y = bn(F.conv2d(f(y), sd[p + "7.weight"]), p + "8")
        x = x + y if s == 1 and inp == out else y
    assert x.shape[1:] == (160, 4, 4)  # section 2.2: B x 160 x 4 x 4 for a 112 input
    t = x.mean(dim=(2, 3)) @ sd["output_layer.1.weight"].T + sd["output_layer.1.bias"]
    points = []
    for row in t:  # per image, all 392 values jointly
        lo, hi = row.min(), row.max()
        points.append(((row - lo) / (hi - lo) * 111).view(196, 2))
    return torch.stack(points)


def bilinear(img, x, y):
    """img [C, H, W] numpy; (x, y) pixel-index position; zero outside the image."""
    x0, y0 = math.floor(x), math.floor(y)
    fx, fy = x - x0, y - y0
    value = np.zeros(img.shape[0])
    for xi, yi, w in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                      (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
        if 0 <= xi < img.shape[2] and 0 <= yi < img.shape[1]:
            value += w * img[:, yi, xi]
    return value


def ref_tokens(image, points):
    """Section 2.4: token k, feature (8a + b)*3 + c = channel c at (x_k + a - 4.5,
    y_k + b - 4.5)."""
    image, points = image.double().numpy(), points.double().numpy()
    out = np.zeros((image.shape[0], 196, 192))
    for n in range(image.shape[0]):
        for k in range(196):
            x, y = points[n, k]
            for a in range(8):
                for b in range(8):
                    out[n, k, (8 * a + b) * 3:(8 * a + b) * 3 + 3] = bilinear(
                        image[n], x + a - 4.5, y + b - 4.5)
    return torch.from_numpy(out)


def ref_vit(sd, tokens, heads, dim_head):
    """Section 2.5, head by head."""
    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[p + ".weight"] + sd[p + ".bias"]

    dim = sd["cls_token"].shape[-1]
    x = tokens @ sd["patch_to_embedding.weight"].T + sd["patch_to_embedding.bias"]
    x = torch.cat([sd["cls_token"].expand(len(x), 1, dim), x], dim=1) + sd["pos_embedding"]
    inner = heads * dim_head
    layer = 0
    while f"transformer.layers.{layer}.0.fn.norm.weight" in sd:
        p = f"transformer.layers.{layer}."
        qkv = ln(x, p + "0.fn.norm") @ sd[p + "0.fn.fn.to_qkv.weight"].T
        q, k, v = qkv[..., :inner], qkv[..., inner:2 * inner], qkv[..., 2 * inner:]
        outs = []
        for h in range(heads):
            cols = slice(h * dim_head, (h + 1) * dim_head)
            logits = (q[..., cols] @ k[..., cols].transpose(1, 2)) * dim ** -0.5
            weights = torch.exp(logits - logits.max(-1, keepdim=True).values)
            outs.append(weights / weights.sum(-1, keepdim=True) @ v[..., cols])
        x = x + torch.cat(outs, -1) @ sd[p + "0.fn.fn.to_out.0.weight"].T \
            + sd[p + "0.fn.fn.to_out.0.bias"]
        hidden = ln(x, p + "1.fn.norm") @ sd[p + "1.fn.fn.net.0.weight"].T \
            + sd[p + "1.fn.fn.net.0.bias"]
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        x = x + hidden @ sd[p + "1.fn.fn.net.3.weight"].T + sd[p + "1.fn.fn.net.3.bias"]
        layer += 1
    return ln(x[:, 0], "mlp_head.0")


def cosine(a, b):
    return F.cosine_similarity(a.double().flatten(1), b.double().flatten(1)).min().item()


# --- the configuration and the key layout (sections 1, 2.2, 3) -----------------------------------

def test_parameter_count_and_layout_match_the_sheet():
    model = registry.get("part_fvit").factory()
    assert sum(p.numel() for p in model.parameters()) == 66_955_616
    sd = model.state_dict()
    assert len(sd) == 432  # 433 with the CosFace head
    assert sum(t.numel() for t in sd.values()) == 66_978_174  # backbone-only file, section 4.2
    assert sum(p.numel() for p in model.stn.parameters()) == 2_809_816
    assert [sum(p.numel() for p in m.parameters()) for m in model.stn.features] == TRUNK_PARAMS
    assert sum(p.numel() for p in model.output_layer.parameters()) == 63_112
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["pos_embedding"] == (1, 197, 768) and shapes["cls_token"] == (1, 1, 768)
    assert shapes["transformer.layers.11.0.fn.fn.to_qkv.weight"] == (2112, 768)
    assert shapes["transformer.layers.11.0.fn.fn.to_out.0.weight"] == (768, 704)
    assert "transformer.layers.0.0.fn.fn.to_qkv.bias" not in shapes
    assert shapes["transformer.layers.0.1.fn.fn.net.3.weight"] == (768, 2048)
    assert shapes["output_layer.1.weight"] == (392, 160) and shapes["mlp_head.0.bias"] == (768,)
    assert shapes["stn.features.1.conv.0.weight"] == (16, 16, 1, 1)  # expansion even at 16 -> 16
    se = sorted({int(k.split(".")[2]) for k in shapes if ".conv.5.fc." in k})
    assert se == [4, 5, 6, 11, 12, 13, 14, 15]
    assert shapes["stn.features.13.conv.5.fc.0.weight"] == (168, 672)
    assert list(sd)[:3] == ["pos_embedding", "cls_token", "stn.features.0.0.weight"]
    assert model.transformer.layers[0][0].fn.fn.scale == pytest.approx(0.03608439182435161)


# --- the model against the reference --------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["gridsample", "gather"])
def test_tiny_model_matches_the_slow_reference(sampling):
    model = build("part_fvit_tiny", sampling)
    image = face_like(2)
    with torch.no_grad():
        emb, points = model(image)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    ref_points = ref_landmarks(sd, image.double())
    assert points.shape == (2, 196, 2) and emb.shape == (2, 64)
    assert (points.amin(dim=(1, 2)) == 0).all() and (points.amax(dim=(1, 2)) == 111).all()
    assert (points.double() - ref_points).abs().max() < 1e-3
    ref_tok = ref_tokens(image, ref_points)
    with torch.no_grad():
        tok = model.tokens(image, ref_points.float())
    assert (tok.double() - ref_tok).abs().max() < 2e-5
    ref_emb = ref_vit(sd, ref_tok, heads=2, dim_head=24)
    rel = (emb.double() - ref_emb).abs().max() / ref_emb.abs().max()
    assert rel < 1e-4 and cosine(emb, ref_emb) > 0.99999


def test_full_model_matches_the_slow_reference():
    """The official configuration: 11 heads x 64 = 704, scale 768^-0.5, 12 layers. (The
    reference runs in float32 here to save time; the tiny model's test runs it in float64.)"""
    model = build("part_fvit", "gridsample", seed=5)
    image = face_like(1, seed=7)
    with torch.no_grad():
        emb, points = model(image)
    sd = model.state_dict()
    ref_points = ref_landmarks(sd, image)
    assert (points - ref_points).abs().max() < 1e-3
    ref_emb = ref_vit(sd, ref_tokens(image, ref_points).float(), heads=11, dim_head=64)
    assert emb.shape == (1, 768)
    rel = (emb.double() - ref_emb).abs().max() / ref_emb.abs().max()
    assert rel < 1e-4 and cosine(emb, ref_emb) > 0.99999


def test_gridsample_form_is_bit_identical_to_the_official_196_call_loop():
    """Section 2.4: one grid_sample over the mosaic == one call per landmark, to the bit."""
    model = build("part_fvit_tiny", "gridsample")
    image = face_like(2, seed=3)
    with torch.no_grad():
        points = model.landmarks(image)
        tokens = model.tokens(image, points)
    o = torch.arange(-4, 4, dtype=torch.float32)
    rows, cols = torch.meshgrid(o, o, indexing="ij")
    offsets = torch.stack([rows, cols], dim=-1)  # S[a, b] = (o_a, o_b)
    patches = []
    for k in range(196):
        grid = (offsets[None] + points[:, k, None, None, :]) / (112 * 0.5) - 1
        patches.append(F.grid_sample(image, grid, align_corners=False))  # B x 3 x 8 x 8
    patches = torch.stack(patches, dim=2).reshape(2, 3, 14, 14, 8, 8)
    mosaic = patches.permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 112, 112)
    official = mosaic.reshape(2, 3, 14, 8, 14, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 196, 192)
    assert torch.equal(tokens, official)


def test_gather_form_samples_like_the_reference_at_awkward_points():
    """Integers, half-integers, the borders and random points: the gather form's zero padding,
    floor and fractions against the explicit bilinear formula."""
    model = build("part_fvit_tiny", "gather")
    image = face_like(1, seed=4)
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, 0.5, 1.0, 3.5, 4.0, 55.5, 106.5, 107.0, 110.5, 111.0])
    xs = torch.cat([special.repeat_interleave(10), torch.rand(96, generator=gen) * 111])
    ys = torch.cat([special.repeat(10), torch.rand(96, generator=gen) * 111])
    points = torch.stack([xs, ys], -1)[None]
    with torch.no_grad():
        gather = model.tokens(image, points)
        model.sampling = "gridsample"
        grid = model.tokens(image, points)
    ref = ref_tokens(image, points)
    assert (gather.double() - ref).abs().max() < 2e-6
    assert (grid.double() - ref).abs().max() < 2e-5


def test_sampling_forms_agree_on_the_embedding():
    image = face_like(3, seed=9)
    with torch.no_grad():
        a, pa = build("part_fvit_tiny", "gridsample")(image)
        b, pb = build("part_fvit_tiny", "gather")(image)
    assert torch.equal(pa, pb)
    assert (a - b).abs().max() / a.abs().max() < 1e-5 and cosine(a, b) > 0.999999


def test_landmarks_move_with_the_face_and_degenerate_head_gives_no_nan():
    model = build("part_fvit_tiny")
    with torch.no_grad():
        image = face_like(1)
        p1 = model.landmarks(image)
        p2 = model.landmarks(torch.roll(image, 9, dims=-1))
        assert not torch.equal(p1, p2)
        model.output_layer[1].weight.zero_()  # all 392 outputs equal: the reference gives NaN
        model.output_layer[1].bias.fill_(0.25)
        emb, points = model(image)
    assert torch.isfinite(emb).all() and torch.equal(points, torch.zeros_like(points))


def test_unknown_sampling_form_is_refused():
    with pytest.raises(ValueError, match="sampling must be one of"):
        PartFViT(registry.get("part_fvit_tiny").factory().cfg, sampling="nearest")
