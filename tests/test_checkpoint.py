"""Checkpoint loading: both published key layouts, kpface's own format, strictness, safety."""

import pytest
import torch
from safetensors.torch import save_file

from kpface.errors import CheckpointError
from kpface.export import registry
from kpface.export.checkpoint import load_weights, save_weights


def tiny():
    spec = registry.get("vit_kprpe_tiny")
    return spec, spec.factory().eval()


def randomised(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_cvlface_model_pt_round_trip(tmp_path):
    spec, src = tiny()
    randomised(src)
    path = tmp_path / "model.pt"
    torch.save({f"net.{k}": v for k, v in src.state_dict().items()}, path)
    _, dst = tiny()
    info = load_weights(dst, path, remap=spec.remap_keys, arch=spec.name)
    assert_same_weights(src, dst)
    assert info["missing"] == [] and info["unexpected"] == []
    assert "net.keypoint_linear.weight" in torch.load(path, weights_only=True)


def test_huggingface_safetensors_round_trip(tmp_path):
    spec, src = tiny()
    randomised(src)
    path = tmp_path / "model.safetensors"
    save_file({f"model.net.{k}": v.contiguous() for k, v in src.state_dict().items()},
              str(path), metadata={"format": "pt"})
    _, dst = tiny()
    load_weights(dst, path, remap=spec.remap_keys, arch=spec.name)
    assert_same_weights(src, dst)


def test_kpface_format_round_trip_and_arch_check(tmp_path):
    spec, src = tiny()
    randomised(src)
    path = tmp_path / "w.safetensors"
    save_weights(src, path, arch=spec.name)
    _, dst = tiny()
    load_weights(dst, path, remap=spec.remap_keys, arch=spec.name)
    assert_same_weights(src, dst)
    with pytest.raises(CheckpointError, match="vit_kprpe_tiny.*not 'vit_kprpe_small'"):
        load_weights(registry.get("vit_kprpe_small").factory(), path, arch="vit_kprpe_small")


def test_wrong_keys_are_named(tmp_path):
    spec, src = tiny()
    state = {f"net.{k}": v for k, v in src.state_dict().items()}
    state["net.blocks.0.attn.qkv.bias"] = torch.zeros(192)
    del state["net.keypoint_linear.weight"]
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        load_weights(tiny()[1], path, remap=spec.remap_keys, arch=spec.name)
    msg = str(e.value)
    assert "missing keys: keypoint_linear.weight" in msg
    assert "unexpected keys: blocks.0.attn.qkv.bias" in msg


def test_wrong_shapes_are_named(tmp_path):
    spec, _ = tiny()
    small = registry.get("vit_kprpe_small").factory().state_dict()
    own = tiny()[1].state_dict()
    path = tmp_path / "small.pt"
    # Same key names as the tiny model, the small model's (wider) tensors.
    torch.save({f"net.{k}": small[k] for k in own}, path)
    with pytest.raises(CheckpointError, match="wrong shape.*pos_embed"):
        load_weights(tiny()[1], path, remap=spec.remap_keys, arch=spec.name)


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"net.pos_embed": torch.zeros(1), "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(tiny()[1], path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_corrupt_checkpoints_give_clear_errors(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_weights(tiny()[1], path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tiny()[1], tmp_path / "nope.pt")


def test_published_base_checkpoint_layout_to_the_byte(tmp_path):
    """The HF model.safetensors of cvlface_adaface_vit_base_kprpe_webface4m is 460,344,344
    bytes (spec section 2.2, verified from its Git-LFS pointer). Serialising our module with
    the same `model.net.` prefix and metadata must give exactly that size: any wrong key name,
    shape, dtype or extra/missing tensor changes it. Then the file loads back strictly."""
    spec = registry.get("vit_kprpe_base")
    model = spec.factory()
    state = {f"model.net.{k}": v.contiguous() for k, v in model.state_dict().items()}
    assert len(state) == 283
    path = tmp_path / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    assert path.stat().st_size == 460_344_344
    del state
    info = load_weights(spec.factory(), path, remap=spec.remap_keys, arch=spec.name)
    assert info["tensors"] == 283 and not info["missing"] and not info["unexpected"]


def test_published_dfa_checkpoint_layout_to_the_byte(tmp_path):
    """The DFA aligner's HF model.safetensors (cvlface_DFA_mobilenet) is 2,007,980 bytes with
    338 `model.net.*` tensors (spec section 3.4); ours serialises to exactly that and loads back."""
    spec = registry.get("dfa_mnet025")
    state = {f"model.net.{k}": v.contiguous() for k, v in spec.factory().state_dict().items()}
    assert len(state) == 338
    path = tmp_path / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    assert path.stat().st_size == 2_007_980
    info = load_weights(spec.factory(), path, remap=spec.remap_keys, arch=spec.name)
    assert info["tensors"] == 338 and not info["missing"] and not info["unexpected"]
