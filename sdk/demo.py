"""``kpface demo``: the whole path on a fresh machine, in one command.

1. export the default models into the models directory (MTCNN with the real weights shipped in
   the facenet-pytorch wheel; the DFA keypoint model and the KP-RPE recognizer with random
   weights unless ``KPFACE_WEIGHTS`` / ``KPFACE_ALIGNER_WEIGHTS`` name checkpoints, as paths or
   ``hf:OWNER/REPO[@REVISION]``);
2. build the recognizer for ONNX Runtime (int8) and OpenVINO (fp32, int8), each gated on accuracy;
3. run the pipeline on scikit-image's astronaut photo and write an annotated PNG;
4. benchmark and print the table;
5. say where each stage's weights came from (and that random ones give no identity verdict).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from .errors import EngineUnavailable, KpfaceError
from .hub import arch_for, is_hub_name, parse
from .manifest import load_manifest
from .weights import describe, weights_of

log = logging.getLogger(__name__)

PUBLISHED_ARCH = "vit_kprpe_base"   # the published CVLface KP-RPE checkpoints
DEFAULT_ARCH = "vit_kprpe_small"    # random-weight default: same design, faster on a CPU
BUILDS = (("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "int8"))


def _existing(model_dir: Path, arch: str, weights: str | None) -> bool:
    """True when ``model_dir`` already holds a verified export of ``arch`` from ``weights``."""
    try:
        m = load_manifest(model_dir)
    except KpfaceError:
        return False
    block = weights_of(m)
    if weights is None:
        # a random export from before seeds (and KP-RPE's non-zero init) is made again
        same_weights = (block.get("source") == "random" and block.get("seed") == 0) or \
            block.get("source") == "package"
    elif is_hub_name(weights):
        hub = parse(weights)
        same_weights = block.get("repo") == hub.repo and hub.revision in (None, block.get("revision"))
    else:
        same_weights = block.get("file") == str(weights)
    return m.get("arch") == arch and bool(same_weights)


def _export(task: str, arch: str, out: Path, weights: str | None, say) -> dict:
    from kpface.export.onnx_export import export_model
    if _existing(out, arch, weights):
        say(f"[demo] {task}: reusing {out} ({arch})")
        return load_manifest(out)
    say(f"[demo] {task}: exporting {arch} -> {out}")
    m = export_model(arch, out, weights=weights, task=task, progress=say)
    if weights_of(m).get("source") == "random":
        say(f"[demo] WARNING: the {task} model {arch} has RANDOM weights "
            f"(set {'KPFACE_WEIGHTS' if task == 'recognizer' else 'KPFACE_ALIGNER_WEIGHTS'} "
            "to a checkpoint path or hf:OWNER/REPO for real ones)")
    for name, p in m.get("parity", {}).items():
        for oname, o in p["outputs"].items():
            say(f"[demo]   parity {name}/{oname}: max abs diff {o['max_abs_diff']:.2e}, "
                f"cosine {o['cosine']:.7f}")
    return m


def _aligner_weights(recognizer_weights: str | None) -> str | None:
    if os.environ.get("KPFACE_ALIGNER_WEIGHTS"):
        return os.environ["KPFACE_ALIGNER_WEIGHTS"]
    if recognizer_weights and not is_hub_name(recognizer_weights):
        # CVLface layout: pretrained_model/{model.pt, aligner.pt}
        sibling = Path(recognizer_weights).with_name("aligner.pt")
        if sibling.is_file():
            return str(sibling)
    return None


def run_demo(out_dir: Path, models_dir: str | os.PathLike | None = None, skip_bench: bool = False,
             progress: Callable[[str], None] | None = None) -> int:
    import cv2

    from .draw import draw_faces
    from .pipeline import FacePipeline, default_models_dir

    say = progress or (lambda m: log.info("%s", m))
    t0 = time.perf_counter()
    models = Path(models_dir) if models_dir else default_models_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = os.environ.get("KPFACE_WEIGHTS") or None
    arch = arch_for(weights, "recognizer") if is_hub_name(weights) else \
        PUBLISHED_ARCH if weights else DEFAULT_ARCH

    _export("detector", "mtcnn", models / "detector", None, say)
    _export("keypoints", "dfa_mnet025", models / "keypoints", _aligner_weights(weights), say)
    _export("recognizer", arch, models / "recognizer", weights, say)

    from kpface.runtimes.build import build

    from .detect import load_detector
    # Calibration and held-out faces come from the pipeline's own detector.
    detect = load_detector(models / "detector").detect
    for runtime, precision in BUILDS:
        say(f"[demo] building recognizer for {runtime} {precision}")
        try:
            info = build(models / "recognizer", runtime, precision, detector=detect,
                         progress=say)
        except EngineUnavailable as e:
            say(f"[demo] skipped {runtime} {precision}: {e}")
            continue
        acc = info.get("accuracy", {})
        say(f"[demo]   {runtime} {precision}: embedding cosine vs fp32 on {acc.get('n')} held-out "
            f"crops: mean {acc.get('mean', float('nan')):.5f}, min {acc.get('min', float('nan')):.5f}")

    from skimage import data
    image = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    pipe = FacePipeline.from_dir(models)
    faces = pipe(image)
    say(f"[demo] astronaut: {len(faces)} face(s)")
    for i, f in enumerate(faces):
        pts = ", ".join(f"({x:.0f},{y:.0f})" for x, y in f.landmarks)
        say(f"[demo]   face {i}: box {[round(float(v)) for v in f.box]}, score {f.score:.3f}, "
            f"landmarks {pts}")
    if faces:
        mirrored = pipe(image[:, ::-1].copy())
        if mirrored:
            c = pipe.compare(faces[0], max(mirrored, key=lambda f: f.score))
            say(f"[demo]   astronaut vs its mirror image: cosine {c.cosine:.4f}"
                + (" (random weights: not an identity verdict)" if pipe.verdict_problem else ""))
    annotated = out_dir / "astronaut_faces.png"
    cv2.imwrite(str(annotated), draw_faces(image, faces))
    say(f"[demo] wrote {annotated}")

    if not skip_bench:
        from .bench import format_table, run_bench
        report = run_bench(models, out_dir / "bench", repeats=20, threads=2, progress=say)
        print(format_table(report))
        say(f"[demo] bench report: {out_dir / 'bench' / 'report.md'}")
    say("[demo] weights: " + "; ".join(f"{stage} {describe({'weights': w})}"
                                        for stage, w in pipe.weights.items()))
    for line in pipe.warnings:
        say(f"[demo] WARNING: {line}")
    if pipe.verdict_problem:
        say("[demo] no identity verdicts (kpface compare exits 4): set KPFACE_WEIGHTS to a "
            "checkpoint or hf:minchul/cvlface_adaface_vit_base_kprpe_webface4m for real ones")
    say(f"[demo] done in {time.perf_counter() - t0:.0f} s; models in {models}; try: "
        f"kpface run YOUR_PHOTO.jpg --draw faces.png")
    return 0
