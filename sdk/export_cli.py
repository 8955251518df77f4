"""Command line of the export side: ``kpface export`` (torch -> ONNX model directory) and
``kpface build`` (an engine build gated on accuracy), hooked into :mod:`kpface.cli` with
:func:`add_parsers`. Torch and the engine libraries are imported only when a command runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import InputError, KpfaceError
from .eval_cli import add_build_options as add_eval_build_options

log = logging.getLogger("kpface")

TASKS = ("recognizer", "detector", "keypoints")
DEFAULT_ARCH = {"recognizer": "vit_kprpe_small", "detector": "mtcnn", "keypoints": "dfa_mnet025"}
PRECISIONS = ("fp32", "fp16", "int8")


def say(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


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


def list_archs(task: str) -> int:
    from kpface.export.registry import archs
    for name, spec in sorted(archs(task).items()):
        options = "".join(f" [--option {k}={'|'.join(v)}]" for k, v in spec.options.items())
        print(f"{name:20s} {spec.description}{options}")
    return 0


def add_parsers(sub, engines: list[str]) -> None:
    """Add ``export`` and ``build`` to the ``kpface`` sub-command parsers."""
    from kpface.runtimes.engines import options_text
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
