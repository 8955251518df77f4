"""Random-weight exports are seeded and have KP-RPE switched on (a non-zero keypoint_linear);
checkpoint loads keep the checkpoint's values."""
import numpy as np
import pytest
import torch

from kpface.export.onnx_export import build_model, export_model
from kpface.export.vit import KPRPE_RANDOM_STD
from kpface.manifest import load_manifest


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_arch_and_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    _, a, src_a = build_model("vit_kprpe_tiny", seed=5)
    assert torch.equal(torch.rand(3), before)  # the caller's generator is restored
    _, b, _ = build_model("vit_kprpe_tiny", seed=5)
    _, c, src_c = build_model("vit_kprpe_tiny", seed=6)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["keypoint_linear.weight"], sc["keypoint_linear.weight"])
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])
    assert (src_a["seed"], src_c["seed"]) == (5, 6) and src_a["random_weights"]


@pytest.fixture(scope="module")
def small():
    """vit_kprpe_small as a random export builds it (seed 0): (module, source)."""
    _, model, source = build_model("vit_kprpe_small", seed=0)
    return model, source


def test_random_keypoint_linear_is_non_zero_with_the_documented_scale(small):
    model, source = small
    w = model.keypoint_linear.weight.detach()
    assert abs(float(w.std()) - KPRPE_RANDOM_STD) < 0.05 * KPRPE_RANDOM_STD
    assert float(model.keypoint_linear.bias.detach().abs().max()) == 0.0
    init = source["init"]
    assert init["keypoint_linear"]["weight"] == f"normal(0, {KPRPE_RANDOM_STD:g})"
    sens = init["keypoint_sensitivity"]
    assert sens["shift_x"] == 0.05 and sens["cosine_max"] <= 0.9999


def test_keypoints_matter_on_a_real_face_crop(small):
    """Issue 14's bar, measured here on the astronaut's aligned crop, independently of the
    number the export records: +0.05 in x on all five keypoints -> cosine <= 0.9999."""
    from kpface.runtimes.calibration import align_crop
    from kpface.samples import ASTRONAUT_LANDMARKS, astronaut_bgr
    crop, kp_px = align_crop(astronaut_bgr(), ASTRONAUT_LANDMARKS, size=112)
    image = torch.from_numpy(crop[:, :, ::-1].transpose(2, 0, 1).copy()).float()[None] / 127.5 - 1
    kp = torch.from_numpy(np.asarray(kp_px, np.float32) / 112.0)[None]
    moved = kp.clone()
    moved[..., 0] += 0.05
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(small[0](image, kp), small[0](image, moved))
    assert float(cos) <= 0.9999, f"cosine {float(cos):.6f}"


def test_checkpoint_loads_are_unaffected(tmp_path):
    from kpface.export import registry
    from kpface.export.checkpoint import save_weights
    spec = registry.get("vit_kprpe_tiny")
    trained = spec.factory()  # training init: keypoint_linear all zeros
    assert float(trained.keypoint_linear.weight.detach().abs().max()) == 0.0
    path = tmp_path / "w.safetensors"
    save_weights(trained, path, arch=spec.name)
    _, model, source = build_model("vit_kprpe_tiny", weights=path, seed=3)
    assert not source["random_weights"] and "init" not in source
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_export_records_seed_and_init(tmp_path):
    m = export_model("vit_kprpe_tiny", tmp_path / "m", seed=7)
    assert m["source"]["seed"] == 7
    assert "keypoint_sensitivity" in m["source"]["init"]
    assert load_manifest(tmp_path / "m")["source"]["init"]["keypoint_linear"]["bias"] == "zeros"
    # plain ViTs have no keypoint path: only the seeded module init is recorded
    _, _, plain = build_model("vit_small", seed=7)
    assert set(plain["init"]) == {"modules"}
