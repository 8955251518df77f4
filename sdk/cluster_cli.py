"""Command line of the cluster path: ``kpface serve``, ``kpface export-triton`` and the Ray
options of ``kpface gallery enroll`` (:func:`add_ray_options`, :func:`enroll_ray`).

``kpface.cli`` hooks these in with :func:`add_parsers`. Nothing here imports Ray or tritonclient
until a command runs, so ``kpface --help`` works without the ``cluster`` / ``triton`` extras.
Errors are :class:`~kpface.errors.KpfaceError`; ``kpface.cli.main`` turns them into one line.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time

from .cli_images import add_detector_options

log = logging.getLogger(__name__)

LOCAL = "local"


def _say(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet_ray(debug: bool) -> None:
    """Ray Data and Serve log through their own handlers; keep their chatter out of the CLI."""
    if not debug:
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # "progress bars disabled"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Ray's own SIGTERM handler ends the driver at once and leaves a local instance's agents
    running; inside this block SIGTERM raises KeyboardInterrupt, so cleanup code runs."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is not threading.main_thread():  # only main can catch
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- gallery enroll --ray -----------------------------------------------------------------------

def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``, ``--workers``, ``--batch-size`` for ``kpface gallery enroll``.
    ``args.ray`` is None without ``--ray``, ``"local"`` for a bare ``--ray``."""
    parser.add_argument("--ray", nargs="?", const=LOCAL, metavar="ADDRESS",
                        help="embed on Ray: a bare --ray starts a local Ray instance; ADDRESS "
                        "(auto, HOST:PORT, ray://HOST:PORT) joins a cluster whose nodes all see "
                        "DIR and the models at the same paths")
    parser.add_argument("--workers", type=int, help="Ray workers, each with one pipeline "
                        "(default: cluster CPUs / --threads)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per Ray batch (4)")


def enroll_ray(args: argparse.Namespace, gallery) -> int:
    """Run ``kpface gallery enroll DIR --ray [ADDRESS]`` into an opened ``gallery``.

    Reads ``args.dir``, ``args.ray``, ``args.models`` and, when present, ``args.workers``,
    ``args.threads`` (default 1 per worker), ``args.batch_size``; prints the summary and the
    skipped images; returns the exit code.
    """
    _quiet_ray(getattr(args, "debug", False))
    with _sigterm_as_interrupt():
        summary = _enroll(args, gallery)
    for r in summary.failed:
        _say(f"skipped: {r.error}")
    print(f"{summary.line()} on {len(summary.workers)} Ray worker(s)")
    return 0


def _enroll(args: argparse.Namespace, gallery):
    from .cluster import enroll_with_ray
    options = {k: getattr(args, k) for k in ("runtime", "precision") if getattr(args, k, None)}
    if getattr(args, "no_keypoints", False):
        options["use_keypoints"] = False
    return enroll_with_ray(args.dir, gallery, models_dir=getattr(args, "models", None),
                           address=None if args.ray == LOCAL else args.ray,
                           workers=getattr(args, "workers", None),
                           threads=getattr(args, "threads", None) or 1,
                           batch_size=getattr(args, "batch_size", 4), progress=_say,
                           **options)


# -- serve --------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from .cluster import import_ray, ray_session
    from .pipeline import default_models_dir
    import_ray()
    try:
        from . import serve as kserve
    except ImportError as e:
        from .errors import EngineUnavailable
        raise EngineUnavailable(f"kpface serve needs Ray Serve ({e.name} is missing): "
                                "pip install 'kpface[cluster]'") from None
    _quiet_ray(args.debug)
    kserve.check_address("127.0.0.1", args.port)
    models = str(args.models or default_models_dir())
    app = kserve.build_app(models, threads=args.threads, gallery=args.gallery,
                           replicas=args.replicas, max_batch_size=args.max_batch,
                           batch_wait_ms=args.batch_wait_ms, allow_random=args.allow_random,
                           use_keypoints=not args.no_keypoints, min_face=args.min_face,
                           score=args.score)
    with ray_session(args.ray, progress=_say), _sigterm_as_interrupt():
        try:
            url = kserve.start(app, port=args.port)
            print(f"serving {models} at {url} (POST /embed, POST /identify, GET /health); "
                  "Ctrl-C stops it", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            _say("stopping")
        finally:
            kserve.stop()
            if args.ray in (None, LOCAL):
                from ray import serve
                serve.shutdown()
    return 0




# -- export-triton ------------------------------------------------------------------------------

def cmd_export_triton(args: argparse.Namespace) -> int:
    from .triton import export_triton
    _say(f"writing a Triton model repository for {args.models} into {args.out}")
    models = export_triton(args.models, args.out, max_batch=args.max_batch,
                           delay_us=args.delay_us, instance_kind=args.instance_kind,
                           progress=_say)
    print(f"wrote {len(models)} Triton model(s) to {args.out}; serve them with "
          f"`tritonserver --model-repository {args.out}`")
    return 0


def add_parsers(sub) -> None:
    """Add ``serve`` and ``export-triton`` to the ``kpface`` sub-command parsers."""
    s = sub.add_parser("serve", help="serve the pipeline over HTTP JSON with Ray Serve "
                       "(127.0.0.1 only)")
    s.add_argument("--ray", metavar="ADDRESS", help="deploy on this Ray cluster (auto, HOST:PORT); "
                   "default: start a local Ray instance")
    s.add_argument("--models", help="models directory (default: $KPFACE_HOME/models)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (8000)")
    s.add_argument("--gallery", help="gallery file (kpface gallery enroll) that POST /identify "
                   "searches; refused if another recognizer made it")
    s.add_argument("--allow-random", action="store_true", help="identity verdicts from /identify "
                   "even if the recognizer has random or partial weights")
    s.add_argument("--threads", type=int, default=1, help="engine threads per replica (1)")
    s.add_argument("--replicas", type=int, default=1,
                   help="replicas of the detector (the HTTP ingress) and of the recognizer (1)")
    s.add_argument("--max-batch", type=int, default=8,
                   help="requests per recognizer batch (@serve.batch, 8)")
    s.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="how long the recognizer waits to fill a batch (0: it batches the "
                   "requests that queued while it was busy)")
    s.add_argument("--no-keypoints", action="store_true",
                   help="use the detector's landmarks even if a keypoint model exists")
    add_detector_options(s)
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("export-triton", help="write a Triton Inference Server model repository "
                       "(ONNX models + config.pbtxt with dynamic batching)")
    t.add_argument("models", metavar="MODELS",
                   help="models directory with detector/, keypoints/, recognizer/")
    t.add_argument("--out", required=True, metavar="REPO", help="repository folder to write")
    t.add_argument("--max-batch", type=int, help="the recognizer's max_batch_size (64)")
    t.add_argument("--delay-us", type=int, default=500,
                   help="dynamic batching max queue delay in microseconds (500)")
    t.add_argument("--instance-kind", choices=("cpu", "gpu"),
                   help="pin model instances to CPU or GPU (default: Triton decides)")
    t.set_defaults(func=cmd_export_triton)
