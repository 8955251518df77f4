"""``kpface demo``: the whole path on a fresh machine, in one command.

1. export the default models into the models directory: MTCNN with the real weights shipped in
   the facenet-pytorch wheel, the DFA keypoint model (random weights unless
   ``KPFACE_ALIGNER_WEIGHTS``), and two recognizers. ``recognizer/`` is the one whose answers
   the demo shows: dlib_resnet_v1 with the real weights of face-recognition-models, unless
   ``KPFACE_WEIGHTS`` names a KP-RPE checkpoint (a path or ``hf:OWNER/REPO[@REVISION]``; then
   the published vit_kprpe_base); the other one sits beside it in a folder named after its
   arch (``vit_kprpe_small/`` with random weights, or ``dlib_resnet_v1/``), and
   ``--recognizer NAME`` picks it in ``kpface run`` / ``compare``;
2. build both recognizers for ONNX Runtime (int8) and OpenVINO (fp32, int8), each gated on
   accuracy (the detector's calibration faces are found once and reused);
3. run the pipeline on scikit-image's astronaut photo, write an annotated PNG, and answer
   same / different on real photo pairs at fp32 and int8, saying which model answered;
4. ``kpface eval`` on a small pair set made from the same photos (every build side by side);
5. benchmark and print the table;
6. say where each stage's weights came from (and that random ones give no identity verdict).
"""
from __future__ import annotations

import hashlib
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
REAL_ARCH = "dlib_resnet_v1"        # real weights that a package ships (face-recognition-models)
BUILDS = (("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "int8"))
# Real photo pairs the demo answers (kpface.sample_pairs variants): (a, b, same person?).
PAIRS = (("astronaut", "astronaut mirror", True), ("astronaut", "astronaut rotated", True),
         ("hopper", "hopper rescaled", True), ("camera", "camera mirror", True),
         ("astronaut", "hopper", False), ("astronaut", "camera", False),
         ("hopper", "camera", False))


def _existing(model_dir: Path, arch: str, weights: str | None) -> bool:
    """True when ``model_dir`` already holds a verified export of ``arch`` from ``weights``
    (None: random or packaged weights)."""
    from .weights import weights_of
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


def _cached(detect: Callable) -> Callable:
    """``detect`` remembering its answer per image (by content): every build of the demo
    calibrates and gates on the same photos, so each is searched once."""
    memo: dict[bytes, list] = {}

    def run(image):
        key = hashlib.sha1(image.tobytes()).digest() + str(image.shape).encode()
        if key not in memo:
            memo[key] = list(detect(image))
        return memo[key]
    return run


def _build_all(model_dir: Path, detect, say) -> list[str]:
    """BUILDS of one recognizer; returns the precisions built per runtime as 'rt-prec'."""
    from kpface.runtimes.build import build
    done = []
    for runtime, precision in BUILDS:
        say(f"[demo] building {model_dir.name} for {runtime} {precision}")
        try:
            info = build(model_dir, runtime, precision, detector=detect, progress=say)
        except EngineUnavailable as e:
            say(f"[demo] skipped {runtime} {precision}: {e}")
            continue
        acc = info.get("accuracy", {})
        say(f"[demo]   {model_dir.name} {runtime} {precision}: embedding cosine vs fp32 on "
            f"{acc.get('n')} held-out crops: mean {acc.get('mean', float('nan')):.5f}, "
            f"min {acc.get('min', float('nan')):.5f}")
        done.append(f"{runtime}-{precision}")
    return done


def _photos() -> dict[str, object]:
    from . import samples
    from .sample_pairs import _hopper_bgr, variant
    base = {"astronaut": samples.astronaut_bgr(), "hopper": _hopper_bgr(),
            "camera": samples.camera_bgr()}
    out = dict(base)
    for name, img in base.items():
        for kind in ("mirror", "rotated", "rescaled"):
            out[f"{name} {kind}"] = variant(img, kind)
    return out


def answer_pairs(models: Path, ways: list[tuple[str, str]], say) -> None:
    """Same / different on real photo pairs (:data:`PAIRS`) with ``recognizer/`` at each
    (runtime, precision) (the detector on ONNX Runtime fp32), and whether int8 changed any
    answer."""
    from .models import load_recognizer
    from .pipeline import FacePipeline
    from .weights import describe
    photos = _photos()
    answers: dict[tuple[str, str], list[bool]] = {}
    base = FacePipeline.from_dir(models)  # detection stays on ONNX Runtime fp32
    for runtime, precision in ways:
        try:
            rec = load_recognizer(models / "recognizer", runtime=runtime, precision=precision)
            pipe = FacePipeline(base.detector, rec, keypoints=base.keypoints)
        except KpfaceError as e:
            say(f"[demo]   {runtime} {precision}: not run ({e})")
            continue
        if not answers:
            say(f"[demo] identity answers from recognizer/ = {pipe.recognizer.arch} "
                f"(weights: {describe(pipe.manifest)}), cosine threshold {pipe.threshold} "
                "from its manifest")
        faces = {}
        for name, img in photos.items():
            found = pipe(img)
            faces[name] = max(found, key=lambda f: f.score) if found else None
        got = []
        for a, b, truth in PAIRS:
            if faces[a] is None or faces[b] is None:
                say(f"[demo]   {runtime} {precision}: {a} vs {b}: no face found")
                got.append(None)
                continue
            c = pipe.compare(faces[a], faces[b])
            got.append(c.same)
            say(f"[demo]   {runtime} {precision}: {a} vs {b}: cosine {c.cosine:.4f} -> "
                f"{'same person' if c.same else 'different people'}"
                f"{'' if c.same == truth else '  (WRONG)'}")
        answers[(runtime, precision)] = got
    ref = answers.get(("onnxruntime", "fp32"))
    for way, got in answers.items():
        if ref is not None and way != ("onnxruntime", "fp32"):
            same = sum(a == b for a, b in zip(ref, got))
            say(f"[demo]   {way[0]} {way[1]} vs fp32: {same} of {len(PAIRS)} answers unchanged")


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
    kprpe_arch = arch_for(weights, "recognizer") if is_hub_name(weights) else \
        PUBLISHED_ARCH if weights else DEFAULT_ARCH
    # recognizer/ answers: the KP-RPE ViT when it has real weights, else dlib's real model.
    answering, other = ((kprpe_arch, weights), (REAL_ARCH, None)) if weights else \
        ((REAL_ARCH, None), (kprpe_arch, None))

    _export("detector", "mtcnn", models / "detector", None, say)
    _export("keypoints", "dfa_mnet025", models / "keypoints", _aligner_weights(weights), say)
    _export("recognizer", answering[0], models / "recognizer", answering[1], say)
    _export("recognizer", other[0], models / other[0], other[1], say)
    say(f"[demo] recognizer/ = {answering[0]} (answers); {other[0]}/ = {other[0]} "
        f"(kpface run/compare --recognizer {other[0]})")

    from .detect import load_detector
    # Calibration and held-out faces come from the pipeline's own detector.
    detect = _cached(load_detector(models / "detector").detect)
    built = _build_all(models / "recognizer", detect, say)
    _build_all(models / other[0], detect, say)

    from .samples import astronaut_bgr
    image = astronaut_bgr()
    pipe = FacePipeline.from_dir(models)
    faces = pipe(image)
    say(f"[demo] astronaut: {len(faces)} face(s)")
    for i, f in enumerate(faces):
        pts = ", ".join(f"({x:.0f},{y:.0f})" for x, y in f.landmarks)
        say(f"[demo]   face {i}: box {[round(float(v)) for v in f.box]}, score {f.score:.3f}, "
            f"landmarks {pts}")
    annotated = out_dir / "astronaut_faces.png"
    cv2.imwrite(str(annotated), draw_faces(image, faces))
    say(f"[demo] wrote {annotated}")
    ways = [("onnxruntime", "fp32")] + [tuple(b.split("-")) for b in built
                                        if b.endswith("int8")]
    answer_pairs(models, ways, say)

    from .evaluation import evaluate, format_report
    from .sample_pairs import write_lfw_layout
    pairs, images = write_lfw_layout(out_dir / "pairs", n_lfw=10)
    say(f"[demo] kpface eval {models / 'recognizer'} --pairs {pairs} --images {images}")
    report = evaluate(models / "recognizer", pairs, images=images, out_dir=out_dir / "eval",
                      progress=say)
    for line in format_report(report).splitlines():
        say(f"[demo]   {line}")

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
        f"kpface compare PHOTO_A.jpg PHOTO_B.jpg")
    return 0
