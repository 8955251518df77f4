"""Command line of verification accuracy: ``kpface eval`` and the ``--eval`` options of
``kpface build`` (:func:`add_build_options`, :func:`build_verifier`).

``kpface.cli`` hooks them in with :func:`add_parsers`. Errors are
:class:`~kpface.errors.KpfaceError`; ``kpface.cli.main`` turns them into one line.
"""
from __future__ import annotations

import sys

from .errors import InputError

DEFAULT_MAX_DROP = 0.5  # accuracy points a build may lose against fp32 (kpface build --eval)


def _say(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def _pairs_help(what: str, images: str = "--images") -> str:
    return (f"{what}: an LFW-style pairs.txt (with {images}) or an InsightFace validation "
            ".bin (read with a restricted unpickler)")


def add_parsers(sub) -> None:
    """Add ``eval`` to the ``kpface`` sub-command parsers."""
    e = sub.add_parser("eval", help="verification accuracy (10-fold, TAR@FAR, ROC) of a "
                       "recognizer and of each of its builds, side by side")
    e.add_argument("model_dir", metavar="MODEL_DIR", help="a recognizer model directory")
    e.add_argument("--pairs", required=True, help=_pairs_help("the pairs"))
    e.add_argument("--images", metavar="DIR", help="the images of a pairs.txt, LFW layout: "
                   "DIR/name/name_0001.jpg")
    e.add_argument("--detector", metavar="DIR", help="detector model directory that finds the "
                   "faces (default: MODEL_DIR/../detector)")
    e.add_argument("--aligned", action="store_true", help="the images are ArcFace-aligned face "
                   "crops (InsightFace .bin files are): no detector, the five points are the "
                   "template scaled to each image")
    e.add_argument("--exclude-missing", action="store_true", help="leave out pairs with an "
                   "image where no face is found (default: they count as wrong, as LFW does)")
    e.add_argument("--out", default="eval-out", help="folder for roc.png and eval.json "
                   "(default ./eval-out)")
    e.add_argument("--threads", type=int, help="engine threads (default: all cores)")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .evaluation import evaluate, format_report
    report = evaluate(args.model_dir, args.pairs, images=args.images, detector=args.detector,
                      aligned=args.aligned, out_dir=args.out, threads=args.threads,
                      missing="exclude" if args.exclude_missing else "wrong", progress=_say)
    print(f"{report['arch']} ({report['model_dir']}) on {report['pairs']['file']}: "
          f"{report['pairs']['count']} pairs, {report['pairs']['folds']}")
    print(format_report(report))
    if report.get("roc_png"):
        print(f"ROC chart: {report['roc_png']}; figures: {report['json']}")
    return 0


def add_build_options(parser) -> None:
    """``--eval PAIRS``, ``--eval-images``, ``--eval-aligned``, ``--eval-max-drop``."""
    parser.add_argument("--eval", metavar="PAIRS", help=_pairs_help(
        "also gate the build on verification accuracy", "--eval-images") + "; the build is refused when it "
        "loses more than --eval-max-drop points against fp32 (recorded in build.json)")
    parser.add_argument("--eval-images", metavar="DIR", help="the images of an --eval pairs.txt")
    parser.add_argument("--eval-aligned", action="store_true",
                        help="the --eval images are aligned face crops (no detector)")
    parser.add_argument("--eval-max-drop", type=float, default=DEFAULT_MAX_DROP, metavar="POINTS",
                        help=f"accuracy points the build may lose against fp32 "
                        f"(default {DEFAULT_MAX_DROP})")


def build_verifier(args, task: str | None):
    """The ``verify`` callable for :func:`kpface.runtimes.build.build`, or None without --eval."""
    if not args.eval:
        if args.eval_images or args.eval_aligned:
            raise InputError("--eval-images / --eval-aligned need --eval PAIRS")
        return None
    if task != "recognizer":
        raise InputError("--eval measures face verification: it applies to recognizer builds")
    if not args.eval_max_drop >= 0:
        raise InputError(f"--eval-max-drop {args.eval_max_drop} must be >= 0 points")
    from .evaluation import make_verifier
    detector = None if args.detector in (None, "auto", "none") else args.detector
    return make_verifier(args.model_dir, args.eval, images=args.eval_images, detector=detector,
                         aligned=args.eval_aligned, progress=_say)
