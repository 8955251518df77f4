"""Torch-on-GPU latency of kpface's recognizers (not run by CI; needs CUDA and torch).

    python scripts/gpu_torch_latency.py [--archs vit_kprpe_small vit_small ...] [--out F.json]

What it measures, per architecture, dtype (fp32, fp16 autocast, bf16 autocast) and batch:
median and p90 latency of ``model(*inputs)`` with CUDA events, after warm-up, with every
configuration of one dtype and batch timed side by side in alternating rounds (so a ratio such
as KP-RPE vs plain ViT survives clock and load changes). Weights are random (latency does not
depend on their values). It also reports the GPU's bf16/fp32 GEMM peak (torch.matmul 8192^3)
and ``kprpe_overhead`` = vit_kprpe_X / vit_X per dtype and batch.

Run it from the repository root; it imports kpface from the working tree (``sdk/`` is the
``kpface`` package, ``export/`` is ``kpface.export``) through a symlink shim when kpface is not
installed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_kpface():
    try:
        import kpface.export  # noqa: F401
        return
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="kpface-shim-")) / "kpface"
    shim.mkdir()
    for p in (ROOT / "sdk").iterdir():
        (shim / p.name).symlink_to(p)
    (shim / "export").symlink_to(ROOT / "export")
    (shim / "runtimes").symlink_to(ROOT / "runtimes")
    sys.path.insert(0, str(shim.parent))


def gemm_peak(torch, dtype, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["vit_kprpe_small", "vit_small",
                                                   "vit_kprpe_base", "vit_base",
                                                   "part_fvit", "dlib_resnet_v1"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--cuda-graph", action="store_true",
                    help="replay each forward as a captured CUDA graph (kernel time without "
                    "Python launch overhead, which dominates eager latency at small batches)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    _import_kpface()
    from kpface.export import registry

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    models = {}
    for arch in args.archs:
        spec = registry.get(arch)
        torch.manual_seed(0)
        model = spec.factory().eval().to(dev)
        graph = spec.graphs[0]
        models[arch] = (graph.module(model).eval(), graph)
        print(f"{arch}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)

    casts = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    results = []
    for dtype in args.dtypes:
        for batch in args.batches:
            inputs = {a: [t.to(dev) for t in g.example_inputs(batch, gen)]
                      for a, (_, g) in models.items()}
            samples: dict[str, list[float]] = {a: [] for a in models}

            def eager(arch):
                module = models[arch][0]
                with torch.inference_mode(), torch.autocast("cuda", dtype=casts[dtype],
                                                            enabled=casts[dtype] is not None):
                    return module(*inputs[arch])
            for arch in models:  # warm-up (cuDNN autotune, allocator)
                for _ in range(5):
                    eager(arch)
            torch.cuda.synchronize()
            call = eager
            if args.cuda_graph:
                graphs = {}
                for arch in models:
                    g = torch.cuda.CUDAGraph()
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        eager(arch)
                    torch.cuda.current_stream().wait_stream(side)
                    with torch.cuda.graph(g):
                        eager(arch)
                    graphs[arch] = g
                torch.cuda.synchronize()

                def call(arch):
                    graphs[arch].replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(args.rounds):
                for arch in models:
                    for _ in range(args.per_round):
                        start.record()
                        call(arch)
                        end.record()
                        torch.cuda.synchronize()
                        samples[arch].append(start.elapsed_time(end))
            for arch, xs in samples.items():
                xs = sorted(xs)
                row = {"arch": arch, "dtype": dtype, "batch": batch,
                       "mode": "cuda-graph" if args.cuda_graph else "eager",
                       "p50_ms": statistics.median(xs), "p90_ms": xs[int(0.9 * (len(xs) - 1))],
                       "n": len(xs)}
                results.append(row)
                print(f"{arch:16s} {dtype} b{batch:<3d} p50 {row['p50_ms']:8.3f} ms  "
                      f"p90 {row['p90_ms']:8.3f} ms", flush=True)

    def p50(arch, dtype, batch):
        return next((r["p50_ms"] for r in results if (r["arch"], r["dtype"], r["batch"])
                     == (arch, dtype, batch)), None)
    ratios = {}
    for size in ("small", "base"):
        for dtype in args.dtypes:
            for batch in args.batches:
                a, b = p50(f"vit_kprpe_{size}", dtype, batch), p50(f"vit_{size}", dtype, batch)
                if a and b:
                    ratios[f"kprpe_overhead_{size}_{dtype}_b{batch}"] = a / b
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    peaks = {"bf16_tflops": gemm_peak(torch, torch.bfloat16),
             "fp32_tflops_no_tf32": gemm_peak(torch, torch.float32)}
    print(f"GEMM peak: bf16 {peaks['bf16_tflops']:.0f} TFLOP/s, fp32 (no TF32) "
          f"{peaks['fp32_tflops_no_tf32']:.1f} TFLOP/s")
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "settings": vars(args), "results": results, "ratios": ratios, "gemm": peaks}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    sys.exit(main())
