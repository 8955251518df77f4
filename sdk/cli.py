"""The ``kpface`` command line: export, build, run, compare, bench, demo, engines, info (and
eval, serve, export-triton from their own modules).

Only this module prints. Every :class:`KpfaceError` becomes one line on stderr and a non-zero
exit; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from . import __version__
from .cluster_cli import add_parsers as add_cluster_parsers
from .eval_cli import add_build_options as add_eval_build_options
from .eval_cli import add_parsers as add_eval_parsers
from .errors import InputError, KpfaceError, RandomWeightsError
from .cli_images import add_detector_options, add_image_options, faces_of, quiet_opencv

log = logging.getLogger("kpface")

TASKS = ("recognizer", "detector", "keypoints")
DEFAULT_ARCH = {"recognizer": "vit_kprpe_small", "detector": "mtcnn", "keypoints": "dfa_mnet025"}
PRECISIONS = ("fp32", "fp16", "int8")


def say(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def engine_names() -> list[str]:
    from kpface.runtimes.engines import ENGINES
    return [e.name for e in ENGINES]


# -- export -----------------------------------------------------------------------------------

def cmd_export(args) -> int:
    from .hub import arch_for, download, is_hub_name
    from .weights import describe, is_partial, is_random
    weights = args.weights
    if is_hub_name(weights):  # the repo says which architecture it holds
        arch = arch_for(weights, args.task, args.arch)
        weights = download(weights)  # before torch is imported: a failure costs nothing
    else:
        arch = args.arch or DEFAULT_ARCH[args.task]
    try:
        from kpface.export.onnx_export import export_model
    except ImportError as e:
        raise KpfaceError(f"export needs torch and onnx ({e.name} is missing): "
                          "pip install 'kpface[export]'") from None
    out = Path(args.out or arch)
    options = {}
    for item in args.option or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise InputError(f"--option {item!r} is not NAME=VALUE (e.g. --option sampling=gather)")
        options[name] = value
    if args.for_runtime:
        options = _options_for(args.for_runtime, arch, args.task, options)
    manifest = export_model(arch, out, weights=weights, opset=args.opset,
                            strict=not args.no_strict, task=args.task, progress=say,
                            save_weights=args.save_weights, options=options, seed=args.seed,
                            force=args.force)
    print(f"exported {arch} to {out}/ in {manifest['export_seconds']:.1f} s")
    for name, g in manifest["graphs"].items():
        line = f"  {g['file']}: {g['bytes'] / 1e6:.1f} MB"
        p = manifest["parity"].get(name)
        if p:
            for oname, o in p["outputs"].items():
                line += (f" | parity {oname}: max abs diff {o['max_abs_diff']:.2e} "
                         f"(rel {o['rel_max_diff']:.2e}), cosine {o['cosine']:.7f}")
        print(line)
    print(f"weights: {describe(manifest)}")
    if is_random(manifest):
        say(f"WARNING: {arch} was exported with RANDOM weights (KP-RPE and all): its answers mean "
            "nothing for real faces; pass --weights PATH or hf:OWNER/REPO for a real model")
    elif is_partial(manifest):
        say(f"WARNING: {arch} was loaded non-strictly and is PARTIAL: {describe(manifest)}")
    print(f"next: kpface build {out} --runtime onnxruntime --precision int8")
    return 0


def _options_for(runtime: str, arch: str, task: str, options: dict) -> dict:
    """``options`` plus what the engine table says ``runtime`` needs (e.g. Part fViT's gather
    sampling for an engine without GridSample); a contradicting ``--option`` is refused."""
    from kpface.export.registry import get
    from kpface.runtimes.engines import export_options_for
    needed = export_options_for(runtime, get(arch, task).options)
    for key, value in needed.items():
        if options.get(key, value) != value:
            raise InputError(f"--option {key}={options[key]} does not run on {runtime} (it "
                             f"lacks an op that form uses); drop it or use {key}={value}")
    if needed:
        say(f"exporting for {runtime}: {', '.join(f'{k}={v}' for k, v in needed.items())}")
    return {**options, **needed}


# -- build ------------------------------------------------------------------------------------

def calibration_detector(spec, model_dir, threads: int | None = None):
    """The ``detect(image_bgr)`` that finds a recognizer's calibration faces, or None.

    ``spec``: ``"auto"`` (``MODEL_DIR/../detector`` when it holds an exported model: the layout
    of a models directory, so calibration faces come from the pipeline's own detection stage),
    a detector model directory, ``"none"`` / None (known landmarks of the sample faces), or a
    callable (returned as it is).
    """
    from .manifest import MANIFEST_NAME
    if spec is None or spec == "none" or callable(spec):
        return spec if callable(spec) else None
    if spec == "auto":
        candidate = Path(model_dir).parent / "detector"
        if not (candidate / MANIFEST_NAME).is_file():
            return None
        spec = candidate
    from .detect import load_detector
    det = load_detector(spec, threads=threads)
    log.info("calibration faces come from the detector in %s", spec)
    return det.detect


def detector_factory(model_dir, threads: int | None = None):
    """``make_detector(sessions)`` for a detector build's gate: the detector of ``model_dir``
    with the sessions of ``sessions`` ({graph name: Session}) in place of its fp32 graphs.
    Graph ``model`` is the detector's ``session``; other graphs (MTCNN's pnet, rnet, onet) are
    attributes of their own name."""
    from .detect import load_detector

    def make(sessions):
        det = load_detector(model_dir, threads=threads)
        for graph, sess in sessions.items():
            setattr(det, "session" if graph == "model" else graph, sess)
        return det
    return make


def parse_options(pairs: list[str] | None) -> dict:
    """``["KEY=VALUE", ...]`` -> ``{KEY: VALUE}``; a value is JSON when it parses, else text."""
    options = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option {pair!r} is not KEY=VALUE (e.g. --option method=entropy)")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        options[key.strip()] = value
    return options


def cmd_build(args) -> int:
    from kpface.runtimes.build import build
    from kpface.runtimes.engines import get_engine

    from .manifest import load_manifest
    engine = get_engine(args.runtime)
    options = engine.check_options(parse_options(args.option))
    engine.require(args.device, purpose="build")  # a missing engine fails before any work
    task = load_manifest(args.model_dir).get("task")
    from .eval_cli import build_verifier
    verify = build_verifier(args, task)  # bad pairs input fails before any build work
    detect = make_detector = None
    if task == "recognizer":
        detect = calibration_detector(args.detector, args.model_dir)
    elif task == "detector":
        make_detector = detector_factory(args.model_dir)
    info = build(args.model_dir, args.runtime, args.precision, calib_images=args.calib,
                 force=args.force, device=args.device, detector=detect,
                 make_detector=make_detector, options=options, progress=say,
                 verify=verify, max_drop=args.eval_max_drop)
    print(json.dumps(info.get("accuracy", {}), indent=2))
    gate = info.get("gate")
    if gate == "simulated":
        print(f"gate: simulated, not measured on {args.runtime} itself "
              f"({info.get('accuracy', {}).get('method', 'a stand-in')})")
    else:
        print(f"gate: {gate}")
    print(f"built {info.get('dir', '')}")
    return 0


# -- run / compare ----------------------------------------------------------------------------

def _pipeline(args):
    from .pipeline import FacePipeline
    return FacePipeline.from_dir(args.models, runtime=args.runtime, precision=args.precision,
                                 threads=args.threads, use_keypoints=not args.no_keypoints,
                                 recognizer=args.recognizer,
                                 min_face=args.min_face, score=args.score)


def _stage_info(pipe) -> dict:
    """{stage: {arch, weights block}} of the stages that ran (full blocks: the file is the
    user's own, so local checkpoint paths are kept)."""
    stages = {"detector": pipe.detector, "keypoints": pipe.keypoints,
              "recognizer": pipe.recognizer}
    return {stage: {"arch": getattr(stages[stage], "arch", None), "weights": block}
            for stage, block in pipe.weights.items()}


def cmd_run(args) -> int:
    from .draw import draw_faces
    import cv2

    pipe = _pipeline(args)
    results = {}
    failures = 0
    for i, path in enumerate(args.images):
        try:
            image, faces = faces_of(pipe, path, args.max_pixels)
        except KpfaceError as e:
            say(f"error: {e}")
            failures += 1
            continue
        results[str(path)] = [f.to_dict(embedding=True) for f in faces]
        if not faces:
            say(f"{path}: no faces found")
        for j, f in enumerate(faces):
            print(f"{path}: face {j}: box {[round(float(v)) for v in f.box]} score {f.score:.3f}")
        if args.draw:
            target = Path(args.draw)
            if len(args.images) > 1:
                target = target.with_name(f"{target.stem}_{i}{target.suffix or '.png'}")
            if not cv2.imwrite(str(target), draw_faces(image, faces)):
                raise InputError(f"could not write {target}; check the folder and the suffix")
            say(f"drew {len(faces)} face(s) into {target}")
    if args.json:
        from .manifest import write_json
        write_json(args.json, {"models": _stage_info(pipe), "warnings": pipe.warnings,
                               "images": results})
        say(f"wrote {args.json}")
    if failures:
        raise InputError(f"{failures} of {len(args.images)} image(s) could not be read; "
                         f"results for the other {len(args.images) - failures}")
    return 0


def cmd_compare(args) -> int:
    from .image import load_image
    pipe = _pipeline(args)
    faces = []
    for path in (args.image_a, args.image_b):
        found = pipe(load_image(path, max_pixels=args.max_pixels))
        if not found:
            raise InputError(f"{path}: no face found, nothing to compare")
        if len(found) > 1:
            say(f"{path}: {len(found)} faces, comparing the highest-scoring one")
        faces.append(max(found, key=lambda f: f.score))
    c = pipe.compare(*faces)
    verdict = f"{'same person' if c.same else 'different people'} (threshold {c.threshold}"
    problem = pipe.verdict_problem
    if problem is None:
        print(f"cosine {c.cosine:.4f} -> {verdict})")
    elif not args.allow_random:
        print(f"cosine {c.cosine:.4f} (no same/different verdict)")
        print(answered_by(pipe.recognizer, args.runtime, args.precision))
        raise RandomWeightsError(f"no verdict: {problem}; --allow-random shows one anyway")
    else:
        print(f"cosine {c.cosine:.4f} -> {verdict}; MEANINGLESS: {pipe.recognizer.arch} has "
              f"{'RANDOM' if pipe.recognizer.random_weights else 'PARTIAL'} weights)")
        say(f"warning: {problem}")
    print(answered_by(pipe.recognizer, args.runtime, args.precision))
    return 0


def answered_by(recognizer, runtime: str, precision: str) -> str:
    """``recognizer: ARCH (DIR) on RUNTIME PRECISION; weights: ...`` (kpface.weights)."""
    from .weights import describe
    return (f"recognizer: {recognizer.arch} ({recognizer.model_dir}) on {runtime} {precision}; "
            f"weights: {describe(recognizer.manifest)}")


# -- bench / demo / engines / info ------------------------------------------------------------

def cmd_bench(args) -> int:
    from .bench import format_table, run_bench
    from .pipeline import default_models_dir
    report = run_bench(args.models or default_models_dir(), args.out, runtimes=args.runtime,
                       precisions=args.precision, batches=tuple(args.batch),
                       repeats=args.repeats, threads=args.threads, progress=say,
                       recognizers=args.recognizer or ())
    print(format_table(report))
    say(f"wrote {args.out}/report.md, report.json and the chart")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(out_dir=Path(args.out), models_dir=args.models, skip_bench=args.skip_bench,
                    progress=say)


def cmd_engines(args) -> int:
    from kpface.runtimes.engines import engine_table
    print(engine_table())
    return 0


def cmd_info(args) -> int:
    from .manifest import load_manifest
    m = load_manifest(args.model_dir, verify=True)
    keep = ("name", "arch", "task", "opset", "graphs", "preprocess", "keypoints",
            "embedding_size", "threshold", "parity")
    from .weights import weights_of
    print(json.dumps({**{k: m[k] for k in keep if k in m}, "weights": weights_of(m)}, indent=2))
    builds = Path(args.model_dir) / "builds"
    if builds.is_dir():
        names = sorted(p.name for p in builds.iterdir()
                       if p.is_dir() and not p.name.startswith("."))  # staging dirs are not builds
        print("builds: " + (", ".join(names) or "none"))
    return 0


# -- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from kpface.runtimes.engines import help_text, options_text
    engines = engine_names()
    p = argparse.ArgumentParser(
        prog="kpface", description="Landmark-conditioned (KP-RPE) face recognition: export, "
        "build for an engine, run, benchmark.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="engines (name, precisions, devices, status):\n" + help_text()
        + "\n`kpface engines` says which run here.")
    p.add_argument("--version", action="version", version=f"kpface {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="export a torch model to an ONNX model directory")
    e.add_argument("task", choices=TASKS)
    e.add_argument("--arch", help="architecture (default: recognizer vit_kprpe_small, detector "
                   "mtcnn, keypoints dfa_mnet025); see `kpface export TASK --list`")
    e.add_argument("--weights", help="checkpoint: CVLface model.pt, HF model.safetensors, LAFS "
                   "Part fViT .pth, dlib .dat (dlib_resnet_v1) or kpface .safetensors; or "
                   "hf:OWNER/REPO[@REVISION] (its model.safetensors through the Hugging Face "
                   "cache; needs kpface[hub]; --arch follows from a known repo) (default: "
                   "packaged weights, else RANDOM)")
    e.add_argument("--out", help="output model directory (default: ./ARCH)")
    e.add_argument("--seed", type=int, default=0, help="seed of random weights (default 0; "
                   "same arch and seed, same weights; recorded in the manifest)")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    e.add_argument("--no-strict", action="store_true",
                   help="load a checkpoint even if keys are missing or unexpected")
    e.add_argument("--save-weights", action="store_true",
                   help="also store the torch weights (weights.safetensors): CoreML builds "
                   "convert from torch and need them when the weights are random")
    e.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="an export option of the architecture (repeatable), e.g. "
                   "sampling=gather for part_fvit; `--list` shows what each accepts")
    e.add_argument("--force", action="store_true",
                   help="replace a model whose builds/ were made from another graph (they are "
                   "dropped); without it such a re-export is refused. Builds of an unchanged "
                   "graph are always kept")
    e.add_argument("--for", dest="for_runtime", choices=engines, metavar="RUNTIME",
                   help="choose the export options RUNTIME needs from the engine table (e.g. "
                   "part_fvit's gather sampling where an engine has no GridSample)")
    e.add_argument("--list", action="store_true", help="list the architectures of TASK and exit")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("build", help="build MODEL_DIR for an engine and gate it on accuracy",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="build options of each engine (--option KEY=VALUE):\n"
                       + options_text())
    b.add_argument("model_dir")
    b.add_argument("--runtime", choices=engines, default="onnxruntime")
    b.add_argument("--precision", choices=PRECISIONS, default="fp32")
    b.add_argument("--calib", help="folder of face images for int8 calibration "
                   "(default: scikit-image's sample faces)")
    b.add_argument("--force", action="store_true", help="keep a build that fails its accuracy gate")
    b.add_argument("--device", help="target device (default: the engine's first: cpu, cuda, ...)")
    b.add_argument("--detector", default="auto",
                   help="where calibration faces come from: 'auto' (detector/ beside MODEL_DIR), "
                   "a detector model directory, or 'none' (known landmarks of the sample faces)")
    b.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="an engine build option (repeatable; VALUE is JSON when it parses, "
                   "e.g. --option method=entropy --option 'profile=[1,8,16]'); the keys each "
                   "engine accepts are listed below, others are refused")
    add_eval_build_options(b)  # --eval PAIRS: gate on verification accuracy
    b.set_defaults(func=cmd_build)

    def stage_opts(sp):
        sp.add_argument("--models", help="models directory with detector/, keypoints/, "
                        "recognizer/ (default: $KPFACE_HOME/models, made by `kpface demo`)")
        sp.add_argument("--runtime", choices=engines, default="onnxruntime")
        sp.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="recognizer precision (a build must exist for fp16/int8)")
        sp.add_argument("--threads", type=int, help="engine threads (default: all cores)")
        sp.add_argument("--no-keypoints", action="store_true",
                        help="use the detector's landmarks even if a keypoint model exists")
        sp.add_argument("--recognizer", metavar="NAME|DIR",
                        help="another recognizer than MODELS/recognizer: a folder of the models "
                        "directory (e.g. vit_kprpe_small) or a model directory")
        add_detector_options(sp)
        add_image_options(sp)

    r = sub.add_parser("run", help="detect, align and embed the faces of images")
    r.add_argument("images", nargs="+", metavar="IMAGE")
    stage_opts(r)
    r.add_argument("--json", help="write {models: {stage: {arch, weights}}, warnings, images: "
                   "{IMAGE: faces (box, score, landmarks, embedding)}} to this file")
    r.add_argument("--draw", help="write the image with boxes and landmarks to this PNG")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="are the faces in two images the same person?",
                       description="Print the cosine of the two faces and a same/different "
                       "verdict at the recognizer's threshold. A recognizer with random or "
                       "partial weights gets no verdict and exit status 4.")
    c.add_argument("image_a")
    c.add_argument("image_b")
    stage_opts(c)
    c.add_argument("--allow-random", action="store_true",
                   help="give the verdict (marked meaningless) and exit 0 even when the "
                   "recognizer's weights are random or partial")
    c.set_defaults(func=cmd_compare)

    be = sub.add_parser("bench", help="latency, memory and accuracy per stage/engine/precision")
    be.add_argument("--models", help="models directory (default: $KPFACE_HOME/models)")
    be.add_argument("--out", default="bench", help="report folder (default: ./bench)")
    be.add_argument("--runtime", nargs="*", choices=engines, help="engines (default: all available)")
    be.add_argument("--precision", nargs="*", choices=PRECISIONS, help="precisions (default: all built)")
    be.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="recognizer batches")
    be.add_argument("--repeats", type=int, default=30, help="timed runs per configuration")
    be.add_argument("--threads", type=int, default=2, help="engine threads (default 2)")
    be.add_argument("--recognizer", action="append", metavar="DIR",
                    help="another recognizer model directory to measure beside the models "
                    "dir's recognizer/ (repeatable; MODELS/recognizers/*/ are measured too)")
    be.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="export default models, build engines, run on a sample photo, bench")
    d.add_argument("--out", default="demo-out", help="folder for the annotated image and report")
    d.add_argument("--models", help="models directory (default: $KPFACE_HOME/models)")
    d.add_argument("--skip-bench", action="store_true", help="skip the benchmark")
    d.set_defaults(func=cmd_demo)

    en = sub.add_parser("engines", help="the engine table (options, status) and what runs on "
                        "this machine")
    en.set_defaults(func=cmd_engines)

    i = sub.add_parser("info", help="show a model directory's manifest (and verify its hashes)")
    i.add_argument("model_dir")
    i.set_defaults(func=cmd_info)
    add_cluster_parsers(sub)  # serve, export-triton
    __import__("kpface.gallery_cli").gallery_cli.add_parsers(sub)  # kpface gallery ...
    add_eval_parsers(sub)  # eval
    return p


def list_archs(task: str) -> int:
    from kpface.export.registry import archs
    for name, spec in sorted(archs(task).items()):
        options = "".join(f" [--option {k}={'|'.join(v)}]" for k, v in spec.options.items())
        print(f"{name:20s} {spec.description}{options}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("nncf", "openvino", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.debug:
        quiet_opencv()
    # coremltools warns about untested torch/scikit-learn versions and missing macOS libraries
    # on every import (and resets its logger's level when imported); kpface reports what
    # matters (prediction needs macOS) itself, so those records are filtered at the handler.
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: not (r.name.startswith("coremltools")
                                         and r.levelno < logging.ERROR and not args.debug))
    try:
        if args.command == "export" and args.list:
            return list_archs(args.task)
        return args.func(args)
    except KpfaceError as e:
        if args.debug:
            traceback.print_exc()
        say(f"kpface: error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        say("kpface: interrupted")
        return 130
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        say(f"kpface: internal error: {type(e).__name__}: {e} (re-run with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
