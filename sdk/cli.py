"""The ``kpface`` command line: run, compare, bench, demo, engines, info, and the parser that
hooks in the commands of their own modules: export and build (:mod:`kpface.export_cli`), eval
(:mod:`kpface.eval_cli`), gallery (:mod:`kpface.gallery_cli`), serve and export-triton
(:mod:`kpface.cluster_cli`).

Only the CLI modules print. Every :class:`KpfaceError` becomes one line on stderr and a non-zero
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
from .eval_cli import add_parsers as add_eval_parsers
from .export_cli import PRECISIONS, list_archs
from .export_cli import add_parsers as add_export_parsers
from .errors import InputError, KpfaceError, RandomWeightsError
from .cli_images import add_detector_options, add_image_options, faces_of, quiet_opencv

log = logging.getLogger("kpface")


def say(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def engine_names() -> list[str]:
    from kpface.runtimes.engines import ENGINES
    return [e.name for e in ENGINES]


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
    from kpface.runtimes.engines import help_text
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

    add_export_parsers(sub, engines)  # export, build

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
