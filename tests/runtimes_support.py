"""Helpers shared by the runtime tests (imported by tests/test_runtimes*.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch


def realistic_tiny(seed: int = 0, kp_std: float = 0.5, qk_gain: float = 2.0):
    """A vit_kprpe_tiny whose random weights behave more like a trained KP-RPE model.

    The registry's init leaves ``keypoint_linear`` at zero (no KP-RPE bias at all) and gives
    near-uniform attention, which makes every quantization look harmless. Here the keypoint
    linear is N(0, kp_std) (attention biases of about +-1 logit that depend on the landmarks)
    and the qkv weights are scaled by ``qk_gain`` (peakier attention).
    """
    from kpface.export import registry
    torch.manual_seed(seed)
    model = registry.get("vit_kprpe_tiny").factory().eval()
    with torch.no_grad():
        model.keypoint_linear.weight.normal_(0, kp_std)
        model.keypoint_linear.bias.normal_(0, kp_std)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(qk_gain)
    return model


def export_realistic_tiny(out: Path) -> Path:
    """Export :func:`realistic_tiny` to ``out`` with its torch weights (for Core ML)."""
    from kpface.export.checkpoint import save_weights
    from kpface.export.onnx_export import export_model
    out = Path(out)
    ckpt = out.with_name(out.name + ".safetensors")
    save_weights(realistic_tiny(), ckpt, "vit_kprpe_tiny")
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    export_model("vit_kprpe_tiny", out, weights=ckpt, save_weights=True)
    return out
