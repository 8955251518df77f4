"""What session options and model-file layouts cost in memory and latency (issue 12).

Each variant runs in its own fresh process: it opens one recognizer session, notes the peak
resident memory it added (VmHWM over the baseline after importing the engine) at batch 1 and
at batch 8, and then answers timing requests; the parent times the variants in alternating
rounds (the way ``kpface bench`` interleaves), so a load change hits all alike, and reports
medians of wall time and of process CPU time (all threads).

    python scripts/memory_options.py MODELS_DIR --out docs/measurements/memory-options.json

MODELS_DIR is a ``kpface bench`` models directory (recognizer/ with its builds). Variants:
ONNX Runtime on model.onnx with the default options, without the memory pattern, without
pre-packing, without the CPU arena, and on an inline (single-file) copy of the graph; the
int8 build with and without the memory pattern; OpenVINO fp32 with and without giving back
the mapped weight pages.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])
def status():
    out = {}
    for line in open('/proc/self/status'):
        k = line.split(':')[0]
        if k in ('VmHWM', 'VmRSS'):
            out[k] = int(line.split()[1]) * 1024
    return out
import onnxruntime as ort
import openvino
base = status()
if cfg['engine'] == 'onnxruntime':
    o = ort.SessionOptions()
    o.intra_op_num_threads = cfg['threads']; o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.enable_mem_pattern = cfg.get('mem_pattern', True)
    o.enable_cpu_mem_arena = cfg.get("arena", True)
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as kpface sessions
    for k, v in cfg.get('config', {}).items():
        o.add_session_config_entry(k, v)
    s = ort.InferenceSession(cfg['path'], o, providers=['CPUExecutionProvider'])
    names = [i.name for i in s.get_inputs()]
    run = lambda feeds: s.run(None, feeds)
else:
    from kpface.runtimes.openvino_rt import OpenVinoSession
    s = OpenVinoSession(cfg['path'], threads=cfg['threads'], release_pages=cfg.get('release', True))
    names = s.input_names
    run = s.run
rng = np.random.default_rng(0)
def feeds(b):
    f = {'image': rng.uniform(-1, 1, (b, 3, 112, 112)).astype(np.float32),
         'keypoints': (0.5 + rng.uniform(-0.15, 0.15, (b, 5, 2))).astype(np.float32)}
    return {n: f[n] for n in names}
opened = status()
f1 = feeds(1); run(f1); run(f1)
b1 = status()
f8 = feeds(8); run(f8)
b8 = status()
print(json.dumps({'open_peak': opened['VmHWM'] - base['VmHWM'], 'b1_peak': b1['VmHWM'] - base['VmHWM'],
                  'b8_peak': b8['VmHWM'] - base['VmHWM'], 'b8_end': b8['VmRSS'] - base['VmRSS']}), flush=True)
for line in sys.stdin:
    b, n = (int(x) for x in line.split())
    f = f8 if b == 8 else f1
    out = []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        run(f)
        out.append([time.perf_counter() - t, time.process_time() - c])
    print(json.dumps(out), flush=True)
"""


def files_bytes(path: Path) -> int:
    if path.suffix == ".xml":
        return path.stat().st_size + path.with_suffix(".bin").stat().st_size
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data"))
               if p.is_file())


def variants(models: Path, inline: Path) -> list[dict]:
    rec = models / "recognizer"
    onnx = str(rec / "model.onnx")
    out = [
        {"name": "ort fp32, model.onnx + .data, defaults", "engine": "onnxruntime", "path": onnx},
        {"name": "ort fp32, no memory pattern", "engine": "onnxruntime", "path": onnx,
         "mem_pattern": False},
        {"name": "ort fp32, no pre-packing", "engine": "onnxruntime", "path": onnx,
         "config": {"session.disable_prepacking": "1"}},
        {"name": "ort fp32, no CPU arena", "engine": "onnxruntime", "path": onnx, "arena": False},
        {"name": "ort fp32, inline single-file graph", "engine": "onnxruntime",
         "path": str(inline)},
    ]
    i8 = rec / "builds" / "onnxruntime-int8-cpu" / "model.onnx"
    if i8.is_file():
        out += [{"name": "ort int8, defaults", "engine": "onnxruntime", "path": str(i8)},
                {"name": "ort int8, no memory pattern", "engine": "onnxruntime",
                 "path": str(i8), "mem_pattern": False}]
    ov = rec / "builds" / "openvino-fp32-cpu" / "model.xml"
    if ov.is_file():
        out += [{"name": "openvino fp32, pages given back", "engine": "openvino",
                 "path": str(ov)},
                {"name": "openvino fp32, pages kept", "engine": "openvino", "path": str(ov),
                 "release": False}]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=3)
    a = ap.parse_args()
    import onnx
    with tempfile.TemporaryDirectory(prefix="kpface-memopt-") as tmp:
        inline = Path(tmp) / "inline.onnx"
        onnx.save(onnx.load(str(a.models / "recognizer" / "model.onnx")), str(inline))
        vs = variants(a.models, inline)
        procs = []
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        for v in vs:
            v["threads"] = a.threads
            print(f"opening: {v['name']}", flush=True)
            p = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(v)], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            v["memory"] = json.loads(p.stdout.readline())
            v["file_bytes"] = files_bytes(Path(v["path"]))
            procs.append(p)
        samples = {(i, b): [] for i in range(len(vs)) for b in (1, 8)}
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}", flush=True)
            for b in (1, 8):
                order = list(range(len(vs)))
                order = order[r % len(order):] + order[:r % len(order)]
                for i in order:
                    procs[i].stdin.write(f"{b} {a.per_round}\n")
                    procs[i].stdin.flush()
                    samples[(i, b)] += json.loads(procs[i].stdout.readline())
                    time.sleep(0.05)
        for p in procs:
            p.stdin.close()
            p.wait()
    import numpy as np
    rows = []
    for i, v in enumerate(vs):
        row = {k: v[k] for k in ("name", "engine", "file_bytes", "memory")}
        row["path"] = os.path.relpath(v["path"], a.models) if v["path"].startswith(
            str(a.models)) else "inline copy of recognizer/model.onnx"
        for b in (1, 8):
            s = np.asarray(samples[(i, b)])
            row[f"b{b}"] = {"wall_ms_p50": round(float(np.median(s[:, 0])) * 1e3, 1),
                            "cpu_ms_p50": round(float(np.median(s[:, 1])) * 1e3, 1),
                            "n": int(len(s))}
        m = row["memory"]
        row["peak_over_file"] = {k: round(m[k] / v["file_bytes"], 3)
                                 for k in ("open_peak", "b1_peak", "b8_peak")}
        rows.append(row)
        print(f"{v['name']:42s} peak/file open {row['peak_over_file']['open_peak']:.2f} "
              f"b1 {row['peak_over_file']['b1_peak']:.2f} b8 {row['peak_over_file']['b8_peak']:.2f}"
              f" | b1 {row['b1']['wall_ms_p50']} ms (cpu {row['b1']['cpu_ms_p50']})"
              f" b8 {row['b8']['wall_ms_p50']} ms (cpu {row['b8']['cpu_ms_p50']})")
    result = {"script": "scripts/memory_options.py", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": platform.processor() or platform.machine(),
              "load_average": [round(x, 2) for x in os.getloadavg()],
              "threads": a.threads, "rounds": a.rounds, "per_round": a.per_round,
              "variants": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
