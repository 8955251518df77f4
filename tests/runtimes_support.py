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


def realistic_part_fvit(arch: str = "part_fvit_tiny", seed: int = 0, sampling: str = "gridsample",
                        n_faces: int = 48, move_px: float = 4.0, qk_gain: float = 2.0):
    """A Part fViT whose random weights behave more like a trained one, for quantization
    measurements (no trained checkpoint can be fetched here).

    The registry's init gives a landmark CNN whose BatchNorm statistics do not match its
    activations, points driven by whatever the random head makes of them, and a CLS token and
    position embeddings (N(0, 1)) that drown the patch content, so the embedding hardly depends
    on the face and every quantization looks harmless. Here:

    - the trunk's BatchNorm statistics are re-estimated on real aligned faces (each BN then
      normalises, as in a trained network);
    - the landmark head puts point k near cell (k // 14, k % 14) of a regular 14 x 14 grid over
      the crop and moves it with the face by about ``move_px`` pixels (std over faces), the
      way a landmark detector adapts to face geometry; the min-max then spans the crop;
    - CLS token and position embeddings are N(0, 0.02) (timm's init), and the qkv weights are
      scaled by ``qk_gain`` (peakier attention).
    """
    import numpy as np

    from kpface.export import registry
    from kpface.runtimes.calibration import recognizer_data

    torch.manual_seed(seed)
    model = registry.get(arch).factory(sampling=sampling).eval()
    manifest = registry.get(arch).manifest
    faces = torch.from_numpy(recognizer_data(manifest, n_calib=0, n_heldout=n_faces,
                                             seed=seed + 101).heldout.images)
    with torch.no_grad():
        bns = [m for m in model.stn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches below
        model.stn.train()
        for chunk in faces.split(16):
            model.stn(chunk)
        model.stn.eval()
        pooled = model.stn(faces).mean(dim=(-2, -1))                       # [N, 160]
        head = model.output_layer[1]
        k, side = model.cfg.num_landmarks, model.cfg.side
        w = torch.randn(head.weight.shape) / pooled.shape[1] ** 0.5
        moves = (pooled - pooled.mean(0)) @ w.T                             # [N, 2K]
        w *= move_px / moves.std(0).clamp_min(1e-6)[:, None]
        cell = model.cfg.img_size / side
        r, s = np.divmod(np.arange(k), side)
        grid = torch.tensor(np.stack([(s + 0.5) * cell, (r + 0.5) * cell], -1).ravel(),
                            dtype=torch.float32)
        head.weight.copy_(w)
        head.bias.copy_(grid - pooled.mean(0) @ w.T)
        model.cls_token.normal_(0, 0.02)
        model.pos_embedding.normal_(0, 0.02)
        for attn, _ in model.transformer.layers:
            attn.fn.fn.to_qkv.weight.mul_(qk_gain)
    return model


def export_realistic_part_fvit(out: Path, arch: str = "part_fvit_tiny",
                               sampling: str = "gridsample", seed: int = 0) -> Path:
    """Export :func:`realistic_part_fvit` to ``out`` with its torch weights (for Core ML)."""
    from kpface.export.checkpoint import save_weights
    from kpface.export.onnx_export import export_model
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out.with_name(out.name + ".safetensors")
    save_weights(realistic_part_fvit(arch, seed, sampling), ckpt, arch)
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    export_model(arch, out, weights=ckpt, save_weights=True, options={"sampling": sampling})
    return out
