"""How much the keypoints matter in a random-weight KP-RPE export (not run by CI).

    python scripts/kprpe_random_init.py [--arch vit_kprpe_small] [--seeds 0 1 2] [--out F.json]

For each seed, the model exactly as a random ``kpface export`` builds it
(``build_model(arch, seed=S)``), on real aligned face crops (``kpface.runtimes.calibration``'s
held-out crops: the astronaut and LFW faces, no augmentation):

- sensitivity: cosine between the embedding of each crop and that of the same crop with all
  five keypoints moved by +0.05 in x (units of the [0, 1] image); 1.0 means the keypoints do
  not matter;
- bias vs logit scales, per block: the rms of the KP-RPE bias and of the attention logits
  q.k/sqrt(d), each centred per query row (softmax ignores a per-row constant), their ratio,
  and the largest |bias| and |logit|.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch


def bias_and_logit_scales(model, image, keypoints) -> list[dict]:
    rows = []

    def hook(attn, args):
        x, bias = args
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        logit = (qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)
        lc = logit - logit.mean(-1, keepdim=True)
        bc = bias - bias.mean(-1, keepdim=True)
        rows.append({"logit_rms": lc.pow(2).mean().sqrt().item(),
                     "bias_rms": bc.pow(2).mean().sqrt().item(),
                     "logit_absmax": logit.abs().max().item(), "bias_absmax": bias.abs().max().item()})

    handles = [blk.attn.register_forward_pre_hook(hook) for blk in model.blocks]
    with torch.no_grad():
        model(image, keypoints)
    for h in handles:
        h.remove()
    for r in rows:
        r["ratio"] = r["bias_rms"] / r["logit_rms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="vit_kprpe_small")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()
    from kpface.export.onnx_export import build_model
    from kpface.runtimes.calibration import Augment, recognizer_data
    torch.set_num_threads(2)
    data = recognizer_data(n_calib=1, n_heldout=args.crops, augment=Augment.none()).heldout
    image, kp = torch.from_numpy(data.images), torch.from_numpy(data.keypoints)
    moved = kp.clone()
    moved[..., 0] += 0.05
    report = {"arch": args.arch, "crops": len(data), "sources": sorted(set(data.sources)),
              "seeds": {}}
    for seed in args.seeds:
        _, model, source = build_model(args.arch, seed=seed)
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(model(image, kp), model(image, moved))
        scales = bias_and_logit_scales(model, image, kp)
        report["seeds"][seed] = {"init": source.get("init"), "cosine_max": float(cos.max()),
                                 "cosine_mean": float(cos.mean()), "blocks": scales}
        print(f"seed {seed}: +0.05 x on all keypoints, cosine over {len(cos)} crops: "
              f"max {float(cos.max()):.6f}, mean {float(cos.mean()):.6f}", flush=True)
        print("  block  logit_rms  bias_rms  bias/logit  |logit|max  |bias|max")
        for i, r in enumerate(scales):
            print(f"  {i:5d} {r['logit_rms']:10.3f} {r['bias_rms']:9.3f} {r['ratio']:11.1f} "
                  f"{r['logit_absmax']:11.2f} {r['bias_absmax']:10.2f}")
    ratios = [r["ratio"] for s in report["seeds"].values() for r in s["blocks"]]
    print(f"bias/logit rms ratio over all blocks and seeds: median {statistics.median(ratios):.1f}, "
          f"range {min(ratios):.1f}-{max(ratios):.1f}; worst cosine "
          f"{max(s['cosine_max'] for s in report['seeds'].values()):.6f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
