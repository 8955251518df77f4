"""CPU time per call of a recognizer's fp32 and int8 builds, one engine thread, interleaved.

On a machine shared with other work, wall-clock latency (what ``kpface bench`` reports) mostly
measures how long a process waits for a core: on the 2-core machine of the README, with a load
average of 15-18, dlib_resnet_v1 took 200-400 ms of wall time for 42 ms of CPU time at batch 8.
The CPU time a call consumes on one thread does not depend on that wait, so the ratio
fp32 / int8 of it says what the int8 kernels save. It is not a latency: with more threads, or
on a quiet machine, ``kpface bench`` is the figure to quote.

    python scripts/int8_cpu_time.py MODEL_DIR [--rounds 20] [--runtime onnxruntime openvino]

Inputs are the held-out face crops of the build gate (kpface.runtimes.calibration), cut the way
the model's manifest says. Prints the median CPU ms per call and the ratio to fp32.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--runtime", nargs="+", default=["onnxruntime", "openvino"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)

    from kpface.manifest import load_manifest
    from kpface.runtimes import open_session
    from kpface.runtimes.calibration import recognizer_data
    manifest = load_manifest(args.model_dir, task="recognizer")
    crops = recognizer_data(manifest, n_calib=0, n_heldout=max(args.batch), seed=1).heldout
    feeds = {b: {"image": np.ascontiguousarray(crops.images[:b]),
                 "keypoints": np.ascontiguousarray(crops.keypoints[:b])} for b in args.batch}
    sessions = {}
    for rt in args.runtime:
        for prec in ("fp32", "int8"):
            sessions[(rt, prec)] = s = open_session(args.model_dir, runtime=rt, precision=prec,
                                                    threads=1, manifest=manifest)
            names = s.input_names
            s.run({n: feeds[args.batch[-1]][n] for n in names})  # warm-up
    cpu = collections.defaultdict(list)
    keys = list(sessions)
    for _ in range(args.rounds):
        random.shuffle(keys)
        for key in keys:
            s = sessions[key]
            for b in args.batch:
                f = {n: feeds[b][n] for n in s.input_names}
                t = time.process_time()
                s.run(f)
                cpu[(key, b)].append(time.process_time() - t)
    print(f"{manifest.get('arch')}: median CPU ms per call, 1 engine thread, {args.rounds} "
          "interleaved rounds")
    for (rt, prec) in sessions:
        cells = []
        for b in args.batch:
            mine = np.median(cpu[((rt, prec), b)]) * 1e3
            ref = np.median(cpu[((rt, "fp32"), b)]) * 1e3
            cells.append(f"b{b} {mine:6.1f} ms ({ref / mine:.2f}x fp32)")
        print(f"  {rt:12s} {prec}: " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
