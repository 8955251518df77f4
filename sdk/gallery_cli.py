"""``kpface gallery ...``: enrol a photo folder, search, describe, remove, compact, calibrate.

``kpface.cli`` hooks these in with :func:`add_parsers`. Errors are
:class:`~kpface.errors.KpfaceError`s, which ``kpface.cli.main`` prints as one line.
"""
from __future__ import annotations

import argparse
import sys

from .errors import InputError, RandomWeightsError


def _say(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def _pipeline(args):
    from .pipeline import FacePipeline
    return FacePipeline.from_dir(args.models, runtime=args.runtime, precision=args.precision,
                                 threads=args.threads, use_keypoints=not args.no_keypoints)


def _open(path, model=None, create=False, **kw):
    from .gallery import Gallery
    return Gallery.open(path, model=model, create=create, progress=_say, **kw)


def _summary(gallery) -> str:
    info = gallery.info()
    threshold = info["threshold"]
    t = "none" if threshold is None else f"{threshold:.4f} ({info['threshold_source']})"
    return (f"{info['path']}: {info['rows']} row(s), {info['identities']} identities; index "
            f"{info['index']['kind']}; threshold {t}")


# -- enroll -------------------------------------------------------------------------------------

def cmd_enroll(args) -> int:
    from .enrolment import embed_local, enroll, list_enrolment
    if args.ray is not None:
        from .cluster_cli import enroll_ray
        from .pipeline import default_models_dir
        models = args.models or default_models_dir()
        with _open(args.gallery, model=models, create=True, runtime=args.runtime,
                   precision=args.precision) as gallery:
            code = enroll_ray(args, gallery)
            gallery.build_index()
            print(_summary(gallery))
        return code
    items = list_enrolment(args.dir)  # a missing or empty folder fails before any model opens
    pipe = _pipeline(args)
    with _open(args.gallery, model=pipe, create=True) as gallery:
        _say(f"enrolling {len(items)} image(s) from {args.dir} into {args.gallery}")
        summary = enroll(embed_local(items, pipe), gallery, total=len(items), progress=_say)
        for r in summary.failed:
            _say(f"skipped: {r.error}")
        print(summary.line())
        gallery.build_index()
        print(_summary(gallery))
    return 0


# -- search -------------------------------------------------------------------------------------

def cmd_search(args) -> int:
    from .image import load_image
    if args.k < 1 or args.k > 100:
        raise InputError(f"-k must be from 1 to 100, got {args.k}")
    image = load_image(args.image)
    pipe = _pipeline(args)
    refused = None
    with _open(args.gallery, model=pipe) as gallery:
        faces = pipe(image)
        if not faces:
            _say(f"{args.image}: no faces found")
        for i, face in enumerate(faces):
            box = [round(float(v)) for v in face.box]
            ids, scores = gallery.search(face.embedding, k=args.k)
            print(f"face {i} at {box}:")
            for rank, (id_, s) in enumerate(zip(ids[0], scores[0]), 1):
                if id_ is not None:
                    print(f"  {rank}. {id_}  cosine {s:.4f}")
            try:
                m = gallery.identify(face.embedding, allow_random=args.allow_random)
            except RandomWeightsError as e:
                refused = e
                continue
            if m is None:
                print("  the gallery is empty")
            elif m.match:
                print(f"  -> {m.label} (cosine {m.score:.4f} >= threshold {m.threshold:.4f})")
            else:
                print(f"  -> unknown (best {m.label} at {m.score:.4f} < threshold "
                      f"{m.threshold:.4f})")
    if refused is not None:
        raise refused
    return 0


# -- info / remove / compact / calibrate --------------------------------------------------------

def cmd_info(args) -> int:
    import json
    with _open(args.gallery_file) as gallery:
        info = gallery.info()
    print(_summary_from(info))
    if args.json:
        print(json.dumps(info, indent=2))
    return 0


def _summary_from(info: dict) -> str:
    cal = info.get("calibration")
    lines = [f"gallery     {info['path']} ({info['bytes'] / 1e6:.1f} MB)",
             f"rows        {info['rows']} ({info['identities']} identities, {info['dim']}-d)",
             f"recognizer  {info['model']}",
             f"verdicts    {info['verdicts']}",
             f"threshold   {info['threshold']} ({info['threshold_source']})"]
    if cal:
        from .gallery import Calibration
        lines.append(f"calibrated  {Calibration(**cal).line()}")
    index = info["index"]
    cache = index["cache"]
    state = "no cache file" if cache is None else (
        f"cache {cache['kind']} {cache['params']}" + ("" if index["cache_current"] else
                                                     " (behind the file: caught up on open)"))
    lines.append(f"index       {index['kind']}; {state}")
    return "\n".join(lines)


def cmd_remove(args) -> int:
    with _open(args.gallery) as gallery:
        if args.label:
            n = sum(gallery.remove_label(label) for label in args.ids)
        else:
            n = gallery.remove(args.ids)
        print(f"removed {n} row(s) from {args.gallery}; they are gone from the index")
        if args.compact:
            gallery.compact()
            print("compacted: their bytes are gone from the file too")
        else:
            _say(f"run `kpface gallery compact {args.gallery}` to purge them from the file")
    return 0


def cmd_compact(args) -> int:
    with _open(args.gallery_file) as gallery:
        before = gallery.info()["bytes"]
        gallery.compact()
        after = gallery.info()["bytes"]
    print(f"compacted {args.gallery_file}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    return 0


def _embed_folder(pipe, folder):
    import numpy as np

    from .enrolment import embed_local, list_enrolment
    results = [r for r in embed_local(list_enrolment(folder), pipe)]
    for r in results:
        if not r.ok:
            _say(f"skipped: {r.error}")
    ok = [r for r in results if r.ok]
    if not ok:
        raise InputError(f"no face found in any image of {folder}")
    return np.stack([r.embedding for r in ok]), [r.label for r in ok]


def cmd_calibrate(args) -> int:
    pipe = _pipeline(args)
    with _open(args.gallery, model=pipe) as gallery:
        _say(f"embedding the non-mated searches in {args.non_mated}")
        non_mated, _ = _embed_folder(pipe, args.non_mated)
        mated = None
        if args.mated:
            _say(f"embedding the mated searches in {args.mated}")
            mated = _embed_folder(pipe, args.mated)
        cal = gallery.calibrate(non_mated, mated=mated, target_fpir=args.target_fpir)
    print(cal.line())
    return 0


# -- parser -------------------------------------------------------------------------------------

def _stage_options(p: argparse.ArgumentParser) -> None:
    from kpface.runtimes.engines import ENGINES
    p.add_argument("--models", help="models directory (default: $KPFACE_HOME/models)")
    p.add_argument("--runtime", choices=[e.name for e in ENGINES], default="onnxruntime")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="recognizer precision; the gallery records it and refuses another")
    p.add_argument("--threads", type=int, help="engine threads (default: all cores; 1 per "
                   "Ray worker)")
    p.add_argument("--no-keypoints", action="store_true",
                   help="use the detector's landmarks even if a keypoint model exists")


def add_parsers(sub) -> None:
    """Add ``gallery`` and its sub-commands to the ``kpface`` sub-command parsers."""
    from .cluster_cli import add_ray_options
    g = sub.add_parser("gallery", help="1:N galleries: enroll, search, info, remove, compact, "
                       "calibrate (SQLite file + FAISS index)")
    gs = g.add_subparsers(dest="gallery_command", required=True, metavar="ACTION")

    e = gs.add_parser("enroll", help="add a folder of photos: DIR/alice/*.jpg -> label alice "
                      "(an image directly in DIR: its file stem); largest face per image")
    e.add_argument("dir", metavar="DIR")
    e.add_argument("--gallery", required=True, metavar="G", help="gallery file (created if new)")
    _stage_options(e)
    add_ray_options(e)
    e.set_defaults(func=cmd_enroll)

    s = gs.add_parser("search", help="the top-k gallery rows for each face of an image, and "
                      "the identity verdict at the gallery's threshold")
    s.add_argument("image", metavar="IMAGE")
    s.add_argument("--gallery", required=True, metavar="G")
    s.add_argument("-k", type=int, default=5, help="candidates per face (5)")
    s.add_argument("--allow-random", action="store_true", help="give a verdict even if the "
                   "recognizer has random or partial weights")
    _stage_options(s)
    s.set_defaults(func=cmd_search)

    i = gs.add_parser("info", help="rows, identities, recognizer, threshold, calibration, index")
    i.add_argument("gallery_file", metavar="G")
    i.add_argument("--json", action="store_true", help="also print everything as JSON")
    i.set_defaults(func=cmd_info)

    r = gs.add_parser("remove", help="remove rows by id (or, with --label, whole identities)")
    r.add_argument("ids", nargs="+", metavar="ID")
    r.add_argument("--gallery", required=True, metavar="G")
    r.add_argument("--label", action="store_true", help="the IDs are identity labels")
    r.add_argument("--compact", action="store_true", help="also rewrite the file without them")
    r.set_defaults(func=cmd_remove)

    c = gs.add_parser("compact", help="rewrite the file without removed rows; rebuild the index")
    c.add_argument("gallery_file", metavar="G")
    c.set_defaults(func=cmd_compact)

    ca = gs.add_parser("calibrate", help="set the threshold for a target FPIR from photos of "
                       "people not enrolled; report FNIR on photos of people enrolled")
    ca.add_argument("non_mated", metavar="NON_MATED_DIR", help="photos of people not enrolled")
    ca.add_argument("--gallery", required=True, metavar="G")
    ca.add_argument("--mated", metavar="DIR", help="photos of enrolled people, DIR/label/*.jpg")
    ca.add_argument("--target-fpir", type=float, default=0.01, help="(0.01)")
    _stage_options(ca)
    ca.set_defaults(func=cmd_calibrate)
