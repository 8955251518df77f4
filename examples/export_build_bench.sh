#!/usr/bin/env bash
# Export the KP-RPE recognizer, build it for one engine at one precision, and benchmark it.
#   examples/export_build_bench.sh [RUNTIME] [PRECISION] [CHECKPOINT]
# RUNTIME: onnxruntime | openvino | tensorrt | coreml (see `kpface engines`); PRECISION: fp32 | fp16 | int8
set -euo pipefail
runtime=${1:-onnxruntime}
precision=${2:-int8}
weights=${3:-}
models=${KPFACE_MODELS:-models}

kpface export detector --arch mtcnn --out "$models/detector"
if [ -n "$weights" ]; then
  kpface export recognizer --arch vit_kprpe_base --weights "$weights" --out "$models/recognizer"
else
  kpface export recognizer --arch vit_kprpe_small --out "$models/recognizer"   # random weights
fi
kpface build "$models/recognizer" --runtime "$runtime" --precision "$precision"
kpface bench --models "$models" --runtime "$runtime" --out "bench-$runtime"
