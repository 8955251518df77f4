"""``kpface bench``: latency, throughput, memory, size and accuracy per stage, engine, precision
and batch, plus the machine's GEMM peak and a few ratios, all measured in one run.

    report = run_bench("~/.cache/kpface/models", "bench-out", threads=2)
    print(format_table(report))          # bench-out/report.md, report.json, latency.png

How it measures
---------------
* Every configuration (stage x runtime x precision x batch) runs in a fresh Python process
  (a subprocess of the same interpreter, like ``multiprocessing`` 'spawn' but without
  re-importing the caller's ``__main__``): it imports the engine library, notes its peak RSS
  (``VmHWM`` on Linux, else ``ru_maxrss``; see :func:`_peak_rss`), opens the session, runs
  ``warmup`` untimed calls and ``repeats`` timed ones, and notes the peak again. The
  difference is the config's peak memory (model, arenas, activations), free of anything an
  earlier configuration left behind.
* Latency is reported as p50 / p90 / p99 over the timed calls (p50 is the median, and every
  figure derived from latency uses it); throughput is ``batch / p50``.
* The thread count is applied to every engine: ONNX Runtime ``intra_op_num_threads`` (through
  ``open_session(threads=...)``), ``torch.set_num_threads``, and OpenMP / OpenBLAS / MKL through
  the environment of the spawned process and ``threadpoolctl`` when it is installed.
* The fp32 GEMM peak is numpy's ``matmul`` of two square float32 matrices at the same thread
  count (median of repeats); each recognizer configuration's FLOPs are counted analytically
  (:mod:`kpface.flops`), so achieved GFLOP/s and the fraction of that peak follow.
* Accuracy against fp32 is read from each build's ``build.json`` when it holds figures, else
  computed here: cosine between the build's and ONNX Runtime fp32's outputs on the same inputs.

Library code logs and reports progress through ``progress(message)``; it never prints.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import EngineUnavailable, InputError, KpfaceError, ModelError
from .manifest import (BUILD_MANIFEST_NAME, MANIFEST_NAME, atomic_write_bytes, atomic_write_text,
                       load_manifest, write_json)
from .postprocess import box_iou, row_cosines

log = logging.getLogger(__name__)

STAGES = ("detect", "keypoints", "embed", "e2e")
REFERENCE = ("onnxruntime", "fp32")        # always measured: the accuracy reference
DETECTOR_SIZE = (640, 480)                 # width, height of the bench scene image
OVERHEAD_PAIR = ("vit_kprpe_small", "vit_small")
MAX_E2E_FACES = 16                          # more faces than this: a random-weight detector
_TURN_PAUSE_S = 0.05                        # between two processes' turns in a round
REPORT_SCHEMA = 1
CHART_NAME = "latency.png"

# Engine -> python module, used only when kpface.runtimes.engines cannot be imported.
_FALLBACK_ENGINES = {"onnxruntime": ("onnxruntime", "pip install onnxruntime"),
                     "openvino": ("openvino", "pip install 'kpface[openvino]'"),
                     "tensorrt": ("tensorrt", "pip install 'kpface[tensorrt]'"),
                     "coreml": ("coremltools", "pip install 'kpface[coreml]'")}
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

Progress = Callable[[str], None]


class _Skip(Exception):
    """A configuration that cannot run here; the message is the reason."""


# =============================================================================================
# Machine information
# =============================================================================================

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
              "amx_int8", "amx_bf16", "neon", "asimd")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _mem_total_mb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def _version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _versions() -> dict[str, str | None]:
    import kpface
    out = {"kpface": kpface.__version__, "python": platform.python_version(),
           "numpy": np.__version__}
    for dist in ("onnxruntime", "onnxruntime-gpu", "openvino", "torch", "onnx", "nncf",
                 "opencv-python-headless", "threadpoolctl", "matplotlib"):
        v = _version(dist)
        if v is not None or dist in ("onnxruntime", "openvino", "torch"):
            out[dist] = v
    return out


def _numpy_blas() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 1.25
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        info = {"name": blas.get("name"), "version": blas.get("version"),
                "config": blas.get("openblas configuration")}
    except Exception:  # older numpy: no dict mode
        pass
    return {k: v for k, v in info.items() if v}


def machine_info() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {"cpu_model": _cpu_model(), "cpu_flags": _cpu_flags(), "logical_cores": os.cpu_count(),
            "usable_cores": affinity, "memory_mb": _mem_total_mb(),
            "platform": platform.platform(), "machine": platform.machine(),
            "versions": _versions(), "numpy_blas": _numpy_blas(), "load_average_start": load}


# =============================================================================================
# Engines and builds
# =============================================================================================

def _engine_table(only: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{runtime: {available, reason, module, device_key}}`` for every known engine.

    With ``only``, engines outside it (and outside the reference, ONNX Runtime) are listed
    without asking their adapters, which may import heavy libraries.
    """
    out: dict[str, dict[str, Any]] = {}
    try:
        from kpface.runtimes.engines import ENGINES
    except ImportError:
        ENGINES = None
    if ENGINES is None:
        for name, (module, install) in _FALLBACK_ENGINES.items():
            ok = importlib.util.find_spec(module) is not None
            out[name] = {"available": ok, "module": module, "device_key": None,
                         "reason": module if ok else f"{module} is not installed: {install}"}
        return out
    for e in ENGINES:
        if only is not None and e.name not in only and e.name != REFERENCE[0]:
            out[e.name] = {"available": None, "reason": "not requested", "module": e.module,
                           "device_key": None}
            continue
        try:
            ok, why = e.available()
        except ModuleNotFoundError as exc:
            ok, why = False, (f"{e.name} adapter is missing ({exc.name}); "
                              f"this kpface has no {e.name} support yet")
        except Exception as exc:  # an adapter that fails to answer must not stop the bench
            ok, why = False, f"{e.name} availability check failed: {type(exc).__name__}: {exc}"
        key = None
        if ok:
            try:
                key = e.load_adapter().device_key()
            except Exception:
                key = None
        out[e.name] = {"available": bool(ok), "reason": str(why), "module": e.module,
                       "device_key": key}
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def find_builds(model_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Builds under ``model_dir/builds/<runtime>-<precision>-<device key>/``."""
    root = Path(model_dir) / "builds"
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        info = _read_json(d / BUILD_MANIFEST_NAME)
        parts = d.name.split("-", 2)
        runtime = info.get("runtime") or parts[0]
        precision = info.get("precision") or (parts[1] if len(parts) > 1 else "?")
        device_key = info.get("device_key") or (parts[2] if len(parts) > 2 else None)
        out.append({"dir": d, "runtime": str(runtime), "precision": str(precision),
                    "device_key": device_key, "info": info,
                    "has_build_json": (d / BUILD_MANIFEST_NAME).is_file()})
    return out


def _dir_bytes(path: Path, exclude: Iterable[str] = (BUILD_MANIFEST_NAME,)) -> int:
    skip = set(exclude)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name not in skip)


def _model_bytes(model_dir: Path, manifest: dict) -> int:
    files = manifest.get("files") or {}
    names = [n for n in files if n != MANIFEST_NAME] or \
        [g["file"] for g in manifest.get("graphs", {}).values()]
    return sum((model_dir / n).stat().st_size for n in names if (model_dir / n).is_file())


def _accuracy_from_build(info: dict) -> dict[str, Any] | None:
    acc = info.get("accuracy")
    if isinstance(acc, dict) and acc:
        return {"source": "build.json", **acc}
    return None


def _plan_runtimes(model_dir: Path, engines: dict[str, dict], runtimes: Sequence[str] | None,
                   precisions: Sequence[str] | None, stage: str
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runnable (runtime, precision, build) entries, skipped entries) for one model dir.

    ONNX Runtime fp32 (the exported model.onnx) is always first: it is the reference.
    """
    runnable = [{"runtime": REFERENCE[0], "precision": REFERENCE[1], "build": None}]
    skipped: list[dict[str, Any]] = []
    wanted_rt = list(runtimes) if runtimes else None
    builds = find_builds(model_dir)
    seen = {REFERENCE}
    for b in builds:
        key = (b["runtime"], b["precision"])
        if wanted_rt is not None and b["runtime"] not in wanted_rt:
            continue
        if precisions and b["precision"] not in precisions:
            continue
        if key == REFERENCE:
            continue  # a copy of model.onnx: the reference row measures it
        eng = engines.get(b["runtime"])
        where = f"{model_dir.name}/builds/{b['dir'].name}"
        if eng is None:
            skipped.append({"stage": stage, "runtime": b["runtime"], "precision": b["precision"],
                            "reason": f"{where}: unknown runtime {b['runtime']!r}"})
            continue
        if not eng["available"]:
            skipped.append({"stage": stage, "runtime": b["runtime"], "precision": b["precision"],
                            "reason": f"{where}: {eng['reason']}"})
            continue
        if eng.get("device_key") and b["device_key"] and b["device_key"] != eng["device_key"]:
            skipped.append({"stage": stage, "runtime": b["runtime"], "precision": b["precision"],
                            "reason": f"{where} was built for device {b['device_key']!r}; this "
                                      f"machine is {eng['device_key']!r}"})
            continue
        if key in seen:
            skipped.append({"stage": stage, "runtime": b["runtime"], "precision": b["precision"],
                            "reason": f"{where}: another {key[0]} {key[1]} build was measured"})
            continue
        seen.add(key)
        runnable.append({"runtime": b["runtime"], "precision": b["precision"], "build": b})
    # Explicitly requested runtimes / precisions that have nothing to run.
    for rt in wanted_rt or []:
        if rt not in engines:
            skipped.append({"stage": stage, "runtime": rt, "precision": None,
                            "reason": f"unknown runtime {rt!r} (known: {', '.join(engines)})"})
            continue
        if not engines[rt]["available"]:
            continue  # reported once for all stages by run_bench
        for p in (precisions or []):
            if (rt, p) not in seen and not any(s["runtime"] == rt and s["precision"] == p
                                               for s in skipped):
                if p == "int8" and stage in ("detect", "keypoints"):
                    reason = "int8 builds are made for the recognizer only"
                else:
                    reason = (f"no {rt} {p} build in {model_dir}/builds; make one with "
                              f"`kpface build {model_dir} --runtime {rt} --precision {p}`")
                skipped.append({"stage": stage, "runtime": rt, "precision": p, "reason": reason})
        if not precisions and not any(r["runtime"] == rt for r in runnable) and rt != REFERENCE[0]:
            skipped.append({"stage": stage, "runtime": rt, "precision": None,
                            "reason": f"no {rt} build in {model_dir}/builds; make one with "
                                      f"`kpface build {model_dir} --runtime {rt}`"})
    return runnable, skipped


# =============================================================================================
# Inputs
# =============================================================================================

# Approximate face of skimage.data.astronaut() (512 x 512): a box and five points (x, y) in
# LANDMARK_ORDER, only to give the keypoint model a plausible face to refine.
_ASTRONAUT_BOX = (165.0, 55.0, 285.0, 190.0)
_ASTRONAUT_POINTS = ((202.5, 100.0), (247.5, 102.5), (222.5, 126.0), (205.5, 142.5),
                     (243.8, 142.5))


def _scene(width: int, height: int) -> dict[str, Any]:
    """A width x height BGR scene with one face (astronaut) and that face's box/landmarks."""
    import cv2
    try:
        from skimage import data
        face = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
        source = "skimage.data.astronaut() resized onto a grey canvas"
    except Exception:
        face = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        source = "random noise (scikit-image is not installed: no face in the scene)"
    side = min(width, height)
    s = side / face.shape[0]
    x0, y0 = (width - side) // 2, (height - side) // 2
    canvas = np.full((height, width, 3), 114, np.uint8)
    canvas[y0:y0 + side, x0:x0 + side] = cv2.resize(face, (side, side),
                                                     interpolation=cv2.INTER_AREA)
    box = np.array(_ASTRONAUT_BOX, np.float32) * s + np.array([x0, y0, x0, y0], np.float32)
    pts = np.array(_ASTRONAUT_POINTS, np.float32) * s + np.array([x0, y0], np.float32)
    return {"image": canvas, "box": box, "landmarks": pts, "source": source}


def _recognizer_inputs(manifest: dict, batch: int, seed: int = 0) -> dict[str, Any]:
    """[batch] aligned face crops (real faces when scikit-image is there, else noise)."""
    try:
        from kpface.runtimes.calibration import recognizer_data
        data = recognizer_data(manifest, n_calib=1, n_heldout=batch, seed=seed)
        held = data.heldout
        if len(held) >= batch:
            return {"image": np.ascontiguousarray(held.images[:batch], np.float32),
                    "keypoints": np.ascontiguousarray(held.keypoints[:batch], np.float32),
                    "source": "aligned face crops (kpface.runtimes.calibration, held-out)"}
    except Exception as e:  # no scikit-image, or calibration not available
        log.info("bench: using random recognizer inputs (%s)", e)
    pre = manifest.get("preprocess", {})
    w, h = (int(v) for v in pre.get("size", [112, 112]))
    rng = np.random.default_rng(seed)
    kp_count = int(manifest.get("keypoints", {}).get("count", 5))
    base = np.array(_ASTRONAUT_POINTS, np.float32)[:kp_count]
    base = (base - base.min(0)) / (base.max(0) - base.min(0)) * 0.35 + [0.32, 0.45]
    kps = base[None] + rng.uniform(-0.02, 0.02, (batch, kp_count, 2))
    return {"image": rng.uniform(-1, 1, (batch, 3, h, w)).astype(np.float32),
            "keypoints": kps.astype(np.float32), "source": "random images in [-1, 1]"}


# =============================================================================================
# The worker (runs in a fresh spawned process)
# =============================================================================================

def _peak_rss() -> tuple[int | None, str]:
    """(peak resident set size of this process in bytes, how it was read).

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own
    address space. ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used there: Linux carries it
    across fork + exec, so a fresh child starts with its parent's peak as its floor.
    Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on other systems), then psutil.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (int(rss) if sys.platform == "darwin" else int(rss) * 1024), "ru_maxrss"
    except ImportError:
        pass
    try:
        import psutil  # Windows
        mi = psutil.Process().memory_info()
        return int(getattr(mi, "peak_wset", 0) or mi.rss), "psutil"
    except Exception:
        return None, "unavailable"


def _limit_threads(threads: int) -> dict[str, Any]:
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return {"threadpoolctl": None}
    _limit_threads.keep = threadpool_limits(limits=threads)  # type: ignore[attr-defined]
    return {"threadpoolctl": [{k: p.get(k) for k in ("user_api", "internal_api", "version",
                                                     "num_threads", "architecture")}
                              for p in threadpool_info()]}


def _engine_module(runtime: str) -> str | None:
    if runtime == "torch":
        return "torch"
    try:
        from kpface.runtimes.engines import get_engine
        return get_engine(runtime).module
    except Exception:
        return _FALLBACK_ENGINES.get(runtime, (None,))[0]


def _open_call(cfg: dict, payload: dict) -> tuple[Callable[[], Any], dict[str, Any]]:
    kind, threads = cfg["kind"], cfg["threads"]
    rt, prec, model_dir = cfg["runtime"], cfg["precision"], cfg.get("model_dir")
    if kind == "session":
        from kpface.runtimes import open_session
        sess = open_session(model_dir, runtime=rt, precision=prec, graph=cfg.get("graph", "model"),
                            threads=threads)
        missing = [n for n in sess.input_names if n not in payload]
        if missing:
            raise _Skip(f"the bench has no input for {missing} of {model_dir}")
        feeds = {n: payload[n] for n in sess.input_names}
        return (lambda: sess.run(feeds)), {"provider": sess.provider}
    if kind == "detector":
        from kpface.detect import load_detector
        det = load_detector(model_dir, runtime=rt, precision=prec, threads=threads)
        image = payload["scene"]
        return (lambda: det.detect(image)), {"provider": _provider_of(det)}
    if kind == "keypoints":
        from kpface.detect import Detection, load_keypoints
        kp = load_keypoints(model_dir, runtime=rt, precision=prec, threads=threads)
        image = payload["scene"]
        det = Detection(payload["box"], 1.0, payload["landmarks"])
        return (lambda: kp.predict(image, det)), {"provider": _provider_of(kp)}
    if kind == "pipeline":
        from kpface.pipeline import FacePipeline
        pipe = FacePipeline.from_dir(cfg["models_dir"], runtime=rt, precision=prec,
                                     threads=threads,
                                     detector_precision=cfg.get("detector_precision", "fp32"))
        image = payload["scene"]
        faces = len(pipe.detect(image))
        if faces > MAX_E2E_FACES:
            raise _Skip(f"the detector finds {faces} faces in the one-face bench scene (random "
                        f"weights?): end-to-end time would be that of {faces} recognizer runs; "
                        "export the detector with real weights")
        return (lambda: pipe(image)), {"provider": getattr(pipe.recognizer, "provider", None),
                                       "faces": faces}
    if kind == "torch":
        import torch
        from kpface.export.onnx_export import build_model
        logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
        spec, model, _ = build_model(cfg["arch"])
        graph = spec.graphs[0]
        missing = [s.name for s in graph.inputs if s.name not in payload]
        if missing:
            raise _Skip(f"the bench has no input for {missing} of {cfg['arch']}")
        tensors = [torch.from_numpy(np.ascontiguousarray(payload[s.name])) for s in graph.inputs]
        module = graph.module(model).eval()

        def call():
            with torch.inference_mode():
                return module(*tensors)
        return call, {"provider": f"torch eager {torch.__version__} "
                                  f"({torch.get_num_threads()} threads)"}
    raise ValueError(f"unknown bench kind {kind!r}")


def _provider_of(obj) -> str | None:
    for attr in ("session", "pnet", "_session"):
        s = getattr(obj, attr, None)
        if s is not None and hasattr(s, "provider"):
            return s.provider
    return None


def _summarize(kind: str, out: Any) -> dict[str, np.ndarray]:
    """The part of a call's output that the accuracy comparison needs (small arrays)."""
    if kind == "session":
        return {k: np.asarray(v) for k, v in out.items()}
    if kind == "torch":
        t = out[0] if isinstance(out, (tuple, list)) else out
        return {"output": t.detach().float().numpy()}
    if kind == "detector":
        boxes = np.array([d.box for d in out], np.float32).reshape(-1, 4)
        return {"boxes": boxes, "scores": np.array([d.score for d in out], np.float32)}
    if kind == "keypoints":
        return {"landmarks": np.asarray(out, np.float32).reshape(-1, 2)}
    if kind == "pipeline":
        return {"faces": np.array([len(out)])}
    return {}


class _Prepared:
    """A configuration opened and warmed up inside a bench process, ready for timed calls."""

    def __init__(self, cfg: dict, payload: dict):
        threads = int(cfg["threads"])
        self.kind = cfg["kind"]
        self.threads_info = _limit_threads(threads)
        module = _engine_module(cfg["runtime"])
        if module:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise _Skip(f"{module} cannot be imported here: {e}") from None
        if cfg["runtime"] == "torch":
            import torch
            torch.set_num_threads(threads)
            with contextlib.suppress(RuntimeError):
                torch.set_num_interop_threads(1)
        self.rss0, self.rss_method = _peak_rss()
        t0 = time.perf_counter()
        self.call, self.meta = _open_call(cfg, payload)
        self.load_s = time.perf_counter() - t0
        self.out = None
        for _ in range(int(cfg["warmup"])):
            self.out = self.call()

    def run(self, n: int) -> list[float]:
        samples = []
        for _ in range(n):
            t = time.perf_counter_ns()
            self.out = self.call()
            samples.append((time.perf_counter_ns() - t) / 1e6)
        return samples

    def ready(self) -> dict[str, Any]:
        return {"load_s": self.load_s, "threads_info": self.threads_info, **self.meta}

    def finish(self) -> dict[str, Any]:
        rss1, _ = _peak_rss()
        return {"rss_baseline_bytes": self.rss0, "rss_peak_bytes": rss1,
                "rss_method": self.rss_method, "outputs": _summarize(self.kind, self.out)}


def _gemm(cfg: dict) -> dict[str, Any]:
    threads, n = int(cfg["threads"]), int(cfg["size"])
    info = _limit_threads(threads)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    for _ in range(int(cfg["warmup"])):
        np.matmul(a, b, out=c)
    times = []
    for _ in range(int(cfg["repeats"])):
        t = time.perf_counter_ns()
        np.matmul(a, b, out=c)
        times.append((time.perf_counter_ns() - t) / 1e9)
    return {"seconds": times, "threads_info": info}


def _export(cfg: dict) -> dict[str, Any]:
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    from kpface.export.onnx_export import export_model
    manifest = export_model(cfg["arch"], cfg["out"])
    return {"arch": manifest["arch"], "random_weights": manifest["source"].get("random_weights")}


def _failure(e: BaseException) -> tuple:
    if isinstance(e, (_Skip, EngineUnavailable)):
        return "skipped", str(e)
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return "error", f"{type(e).__name__}: {first}", traceback.format_exc()


def _child_main(fd: int) -> None:
    """Entry point of a bench process: one job, then ``run``/``finish`` commands.

    The parent sends ``{"cfg", "payload"}``. GEMM and export jobs answer ``("ok", result)``
    and end; a measurement opens and warms up its configuration, answers ``("ready", info)``,
    then answers each ``("run", n)`` with n latencies (ms) and ``("finish",)`` with its peak
    memory and last outputs. Failures answer ``("skipped", reason)`` or ``("error", ...)``.
    """
    from multiprocessing.connection import Connection
    conn = Connection(fd)
    try:
        job = conn.recv()
        cfg, payload = job["cfg"], job["payload"]
        try:
            if cfg["kind"] == "gemm":
                conn.send(("ok", _gemm(cfg)))
                return
            if cfg["kind"] == "export":
                conn.send(("ok", _export(cfg)))
                return
            state = _Prepared(cfg, payload)
        except BaseException as e:  # reported, never raised across the process boundary
            conn.send(_failure(e))
            return
        conn.send(("ready", state.ready()))
        while True:
            cmd = conn.recv()
            try:
                if cmd[0] == "run":
                    conn.send(("ok", state.run(int(cmd[1]))))
                else:
                    conn.send(("ok", state.finish()))
                    return
            except BaseException as e:
                conn.send(_failure(e))
                return
    except EOFError:  # the parent went away
        return
    finally:
        conn.close()


# The child takes the parent's sys.path first, so it imports the same kpface the parent runs.
_BOOT = ("import json, sys\n"
         "sys.path[:] = json.loads(sys.argv[3])\n"
         "import importlib\n"
         "importlib.import_module(sys.argv[2])._child_main(int(sys.argv[1]))\n")


class _WorkerFailed(Exception):
    pass


class _Worker:
    """One fresh Python process running one configuration (see :func:`_child_main`).

    A plain ``subprocess`` of this interpreter rather than ``multiprocessing`` 'spawn': the
    child is just as fresh (nothing inherited but the environment) and it never re-imports the
    caller's ``__main__``, so scripts without an ``if __name__ == "__main__"`` guard work.
    The thread count goes into the child's environment (OpenMP / OpenBLAS / MKL read it when
    they load) as well as into the engine calls.
    """

    def __init__(self, cfg: dict, payload: dict | None, timeout_s: float):
        import socket
        import subprocess
        import tempfile
        from multiprocessing.connection import Connection

        if os.name == "nt":
            raise KpfaceError("kpface bench runs on Linux and macOS only")
        self.cfg, self.timeout_s = cfg, timeout_s
        env = dict(os.environ)
        for k in _THREAD_ENV:
            env[k] = str(int(cfg.get("threads", 1)))
        ours, theirs = socket.socketpair()
        self._err = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(theirs.fileno()), __name__,
                 json.dumps(sys.path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err,
                env=env, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send({"cfg": cfg, "payload": payload or {}})

    def _recv(self, timeout_s: float | None = None) -> tuple:
        try:
            if not self.conn.poll(timeout_s or self.timeout_s):
                self.close(kill=True)
                raise _WorkerFailed(f"timed out after {timeout_s or self.timeout_s:.0f} s")
            msg = self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.wait(timeout=30)
            self._err.seek(0)
            tail = self._err.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
            self.close()
            raise _WorkerFailed(f"the bench process died (exit code {code})"
                                + (f": {tail[-1]}" if tail else "")) from None
        if msg[0] in ("skipped", "error"):
            if len(msg) > 2:
                log.debug("bench config %s failed:\n%s", self.cfg.get("id"), msg[2])
            self.close()
        return msg

    def start(self) -> tuple[str, Any]:
        """("ready", info) | ("ok", result) for one-shot jobs | ("skipped"|"error", reason)."""
        try:
            msg = self._recv()
        except _WorkerFailed as e:
            return "error", str(e)
        return msg[0], msg[1]

    def request(self, *cmd) -> tuple[str, Any]:
        try:
            self.conn.send(cmd)
            msg = self._recv()
        except _WorkerFailed as e:
            return "error", str(e)
        except (OSError, ValueError) as e:  # the connection is already closed
            return "error", f"the bench process is gone ({e})"
        return msg[0], msg[1]

    def close(self, kill: bool = False) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
        if self.proc.poll() is None:
            try:
                if kill:
                    raise TimeoutError
                self.proc.wait(timeout=10)  # it ends once its connection closes
            except Exception:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            self._err.close()


def _spawn(cfg: dict, payload: dict | None = None, timeout_s: float = 600.0
           ) -> tuple[str, Any]:
    """Run a one-shot job (GEMM, export) in a fresh process; ("ok"|"skipped"|"error", result)."""
    w = _Worker(cfg, payload, timeout_s)
    try:
        return w.start()
    finally:
        w.close()


# =============================================================================================
# Statistics and comparisons
# =============================================================================================

def latency_stats(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50 (median) / p90 / p99 / mean / min / max of latencies in ms."""
    x = np.asarray(samples_ms, np.float64)
    if x.size == 0:
        raise InputError("no latency samples: repeats must be >= 1")
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(x.mean()),
            "min": float(x.min()), "max": float(x.max()), "repeats": int(x.size)}


def compare_to_reference(kind: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]
                         ) -> dict[str, Any] | None:
    """Accuracy of one configuration's outputs against fp32 ONNX Runtime on the same inputs."""
    if kind == "session":
        out: dict[str, Any] = {"source": "computed: cosine vs onnxruntime fp32, bench inputs"}
        for name, r in ref.items():
            if name not in got or got[name].shape != r.shape:
                return None
            cos = row_cosines(r, got[name])
            out[f"{name}_cosine_mean"] = float(cos.mean())
            out[f"{name}_cosine_min"] = float(cos.min())
            if len(ref) == 1 or name == "embedding":
                out["cosine_mean"], out["cosine_min"] = float(cos.mean()), float(cos.min())
        return out
    if kind == "detector":
        rb, gb = ref["boxes"], got["boxes"]
        res = {"source": "computed: detections vs onnxruntime fp32 on the bench scene",
               "faces_fp32": int(len(rb)), "faces": int(len(gb))}
        if len(rb) and len(gb):
            res["box_iou_mean"] = float(np.mean([box_iou(box, gb).max() for box in rb]))
        return res
    if kind == "keypoints":
        d = np.linalg.norm(ref["landmarks"] - got["landmarks"], axis=1)
        return {"source": "computed: landmarks vs onnxruntime fp32 on the bench scene",
                "landmark_error_px_mean": float(d.mean()), "landmark_error_px_max": float(d.max())}
    return None


def _accuracy_headline(acc: dict[str, Any] | None) -> str:
    """One short cell for the table: cosine mean/min, box IoU or landmark error."""
    if not acc:
        return "-"
    if acc.get("source") == "reference":
        return "reference"
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if num(acc.get("mean")) and "cos" in str(acc.get("metric", "cosine")):
        # build.json of kpface.runtimes.build: {"metric": "embedding cosine", "mean", "min"}
        return f"cos {acc['mean']:.4f}" + (f"/{acc['min']:.4f}" if num(acc.get("min")) else "")
    flat: dict[str, Any] = {}

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v
    walk(acc)

    def find(*words: str):
        for k, v in flat.items():
            low = k.lower()
            if all(w in low for w in words) and isinstance(v, (int, float)) and \
                    not isinstance(v, bool):
                return float(v)
        return None
    cmean, cmin = find("cos", "mean"), find("cos", "min")
    if cmean is not None:
        return f"cos {cmean:.4f}" + (f"/{cmin:.4f}" if cmin is not None else "")
    iou = find("iou")
    if iou is not None:
        return f"IoU {iou:.3f}"
    err = find("landmark") or find("error")
    if err is not None:
        return f"lm err {err:.2f}"
    return "n/a"


# =============================================================================================
# run_bench
# =============================================================================================

def _torch_available() -> tuple[bool, str]:
    """Can this process's interpreter run torch eager? (checked without importing torch)."""
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed (pip install 'kpface[export]'); ort_vs_torch skipped"
    try:
        if importlib.util.find_spec("kpface.export") is None:
            return False, "kpface.export is not installed; ort_vs_torch skipped"
    except ModuleNotFoundError:
        return False, "kpface.export is not installed; ort_vs_torch skipped"
    return True, "torch " + (_version("torch") or "?")


def _export_available() -> tuple[bool, str]:
    ok, why = _torch_available()
    if not ok:
        return False, why.replace("; ort_vs_torch skipped", "")
    if importlib.util.find_spec("onnx") is None:
        return False, "onnx is not installed (pip install 'kpface[export]')"
    return True, ""


def _manifest_or_none(model_dir: Path, task: str | None = None) -> dict | None:
    if not (model_dir / MANIFEST_NAME).is_file():
        return None
    return load_manifest(model_dir, task=task)


def _same_vit(a: dict, b: dict) -> bool:
    ca, cb = dict(a.get("config", {})), dict(b.get("config", {}))
    ca.pop("kprpe", None)
    cb.pop("kprpe", None)
    return bool(ca) and ca == cb


class _Bench:
    def __init__(self, models_dir: Path, out_dir: Path, runtimes, precisions, batches, repeats,
                 warmup, threads, baseline_dir, progress, stages, gemm_size, gemm_repeats,
                 export_baselines, timeout_s):
        self.models_dir, self.out_dir = models_dir, out_dir
        self.runtimes = [r for r in (runtimes or [])] or None
        self.precisions = [p for p in (precisions or [])] or None
        self.batches = tuple(int(b) for b in batches)
        self.repeats, self.warmup, self.threads = int(repeats), int(warmup), int(threads)
        self.baseline_dir = Path(baseline_dir) if baseline_dir else None
        self.say = progress or (lambda m: log.info("%s", m))
        self.stages = tuple(stages) if stages else STAGES
        self.gemm_size, self.gemm_repeats = int(gemm_size), int(gemm_repeats)
        self.export_baselines, self.timeout_s = export_baselines, float(timeout_s)
        self.results: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.models: dict[str, Any] = {}

    # -- planning ----------------------------------------------------------------------------
    def _model_entry(self, label: str, model_dir: Path, manifest: dict) -> None:
        src = manifest.get("source", {})
        self.models[label] = {"dir": str(model_dir), "arch": manifest.get("arch"),
                              "task": manifest.get("task"),
                              "random_weights": bool(src.get("random_weights", False)),
                              "bytes": _model_bytes(model_dir, manifest),
                              "builds": [b["dir"].name for b in find_builds(model_dir)]}

    def _config(self, stage: str, label: str, model_dir: Path | None, manifest: dict | None,
                entry: dict, batch: int, kind: str, **extra) -> dict[str, Any]:
        rt, prec = entry["runtime"], entry["precision"]
        build = entry.get("build")
        cid = f"{stage}/{label}/{rt}-{prec}/b{batch}"
        if build is not None:
            size = _dir_bytes(build["dir"])
        elif manifest is not None and model_dir is not None and rt != "torch":
            size = _model_bytes(model_dir, manifest)
        else:
            size = None
        return {"id": cid, "stage": stage, "model": label,
                "arch": (manifest or {}).get("arch"),
                "model_dir": str(model_dir) if model_dir else None, "runtime": rt,
                "precision": prec, "batch": batch, "kind": kind, "threads": self.threads,
                "repeats": self.repeats, "warmup": self.warmup, "size_bytes": size,
                "build_dir": str(build["dir"]) if build else None,
                "build_accuracy": _accuracy_from_build(build["info"]) if build else None,
                **extra}

    def plan(self, engines: dict) -> tuple[list[tuple[dict, dict]], dict[str, Any]]:
        """[(config, payload)] in run order, plus context for the ratios."""
        root = self.models_dir
        plans: list[tuple[dict, dict]] = []
        ctx: dict[str, Any] = {}
        have_detect = importlib.util.find_spec("kpface.detect") is not None
        scene = _scene(*DETECTOR_SIZE)
        ctx["scene_source"] = scene["source"]
        scene_payload = {"scene": scene["image"], "box": scene["box"],
                         "landmarks": scene["landmarks"]}
        stage_plans: dict[str, list[dict]] = {}

        def stage_dir(name: str, task: str, required: bool, stage: str):
            d = root / name
            man = _manifest_or_none(d, task)
            if man is None:
                why = (f"no {name}/ model in {root}" + (f"; export one with `kpface export "
                                                        f"{name} --out {d}`" if required else
                                                        " (optional)"))
                self.skipped.append({"stage": stage, "runtime": None, "precision": None,
                                     "reason": why})
                return None, None
            self._model_entry(name, d, man)
            return d, man

        # --- detect --------------------------------------------------------------------------
        det_dir, det_man = (None, None)
        if "detect" in self.stages or "e2e" in self.stages:
            det_dir, det_man = stage_dir("detector", "detector", True, "detect")
        if det_dir is not None:
            runnable, skipped = _plan_runtimes(det_dir, engines, self.runtimes, self.precisions,
                                               "detect")
            stage_plans["detector"] = runnable
            if "detect" in self.stages:
                self.skipped += skipped
                for entry in runnable:
                    if have_detect:
                        plans.append((self._config("detect", "detector", det_dir, det_man, entry,
                                                   1, "detector"), scene_payload))
                    elif len(det_man.get("graphs", {})) == 1:
                        pre = det_man.get("preprocess", {})
                        blob = self._detector_blob(scene["image"], pre)
                        cfg = self._config("detect", "detector", det_dir, det_man, entry, 1,
                                           "session", note="graph only: kpface.detect is not "
                                           "available, pre/post-processing not timed")
                        plans.append((cfg, {"image": blob}))
                    else:
                        self.skipped.append({"stage": "detect", "runtime": entry["runtime"],
                                             "precision": entry["precision"],
                                             "reason": "kpface.detect is not available"})

        # --- keypoints -----------------------------------------------------------------------
        kp_dir = None
        if "keypoints" in self.stages or "e2e" in self.stages:
            d = root / "keypoints"
            man = _manifest_or_none(d, "keypoints")
            if man is None:
                if "keypoints" in self.stages:
                    self.skipped.append({"stage": "keypoints", "runtime": None, "precision": None,
                                         "reason": f"no keypoints/ model in {root} (optional: "
                                                   "the detector's landmarks are used)"})
            else:
                kp_dir = d
                self._model_entry("keypoints", d, man)
                runnable, skipped = _plan_runtimes(d, engines, self.runtimes, self.precisions,
                                                   "keypoints")
                stage_plans["keypoints"] = runnable
                if "keypoints" in self.stages:
                    self.skipped += skipped
                    for entry in runnable:
                        if not have_detect:
                            self.skipped.append({"stage": "keypoints", "runtime": entry["runtime"],
                                                 "precision": entry["precision"],
                                                 "reason": "kpface.detect is not available"})
                            continue
                        plans.append((self._config("keypoints", "keypoints", d, man, entry, 1,
                                                   "keypoints"), scene_payload))

        # --- embed -----------------------------------------------------------------------------
        rec_dir, rec_man = stage_dir("recognizer", "recognizer", True, "embed")
        ctx["recognizer"] = (rec_dir, rec_man)
        rec_inputs = None
        if rec_dir is not None:
            rec_inputs = _recognizer_inputs(rec_man, max(self.batches))
            ctx["recognizer_inputs"] = rec_inputs["source"]
            runnable, skipped = _plan_runtimes(rec_dir, engines, self.runtimes, self.precisions,
                                               "embed")
            stage_plans["recognizer"] = runnable
        pair = self._overhead_pair(rec_dir, rec_man) if "embed" in self.stages else None
        ctx["overhead_pair"] = pair
        if rec_dir is not None and "embed" in self.stages:
            self.skipped += skipped

            def payload(b: int) -> dict:
                return {k: rec_inputs[k][:b] for k in ("image", "keypoints")}
            ref_entry = runnable[0]
            extra_models = []
            if pair is not None:
                for label, d, man in pair["models"]:
                    if label != "recognizer":
                        extra_models.append((label, d, man))
            # Reference rows first, the overhead pair's baseline right after each.
            for b in self.batches:
                plans.append((self._config("embed", "recognizer", rec_dir, rec_man, ref_entry, b,
                                           "session"), payload(b)))
                for label, d, man in extra_models:
                    plans.append((self._config("embed", label, d, man, ref_entry, b, "session"),
                                  payload(b)))
            for entry in runnable[1:]:
                for b in self.batches:
                    plans.append((self._config("embed", "recognizer", rec_dir, rec_man, entry, b,
                                               "session"), payload(b)))
            ok, why = _torch_available()
            ctx["torch"] = (ok, why)
            if ok:
                entry = {"runtime": "torch", "precision": "fp32", "build": None}
                for b in self.batches:
                    cfg = self._config("embed", "recognizer", rec_dir, rec_man, entry, b, "torch")
                    cfg["size_bytes"] = None
                    plans.append((cfg, payload(b)))

        # --- end to end ------------------------------------------------------------------------
        if "e2e" in self.stages:
            if not have_detect:
                self.skipped.append({"stage": "e2e", "runtime": None, "precision": None,
                                     "reason": "kpface.detect is not available"})
            elif det_dir is None or rec_dir is None:
                self.skipped.append({"stage": "e2e", "runtime": None, "precision": None,
                                     "reason": "needs detector/ and recognizer/ models"})
            else:
                det_keys = {(e["runtime"], e["precision"]) for e in stage_plans.get("detector", [])}
                kp_keys = ({(e["runtime"], e["precision"]) for e in stage_plans.get("keypoints", [])}
                           if kp_dir is not None else None)
                for entry in stage_plans.get("recognizer", []):
                    rt, p = entry["runtime"], entry["precision"]
                    dp = p if (rt, p) in det_keys else ("fp32" if (rt, "fp32") in det_keys
                                                        else None)
                    if dp is not None and kp_keys is not None and (rt, dp) not in kp_keys:
                        dp = None
                    if dp is None:
                        self.skipped.append({"stage": "e2e", "runtime": rt, "precision": p,
                                             "reason": f"detector/keypoints have no {rt} build"})
                        continue
                    cfg = self._config("e2e", "pipeline", rec_dir, rec_man, entry, 1, "pipeline",
                                       models_dir=str(root), detector_precision=dp)
                    sizes = [cfg["size_bytes"] or 0]
                    for name in ("detector", "keypoints"):
                        for e in stage_plans.get(name, []):
                            if (e["runtime"], e["precision"]) == (rt, dp):
                                sizes.append(_dir_bytes(e["build"]["dir"]) if e["build"]
                                             else self.models[name]["bytes"])
                    cfg["size_bytes"] = sum(sizes)
                    plans.append((cfg, scene_payload))
        return plans, ctx

    @staticmethod
    def _detector_blob(image: np.ndarray, pre: dict) -> np.ndarray:
        x = image.astype(np.float32)
        if str(pre.get("color", "BGR")).upper() == "RGB":
            x = x[..., ::-1]
        x = (x - np.asarray(pre.get("mean", [0, 0, 0]), np.float32)) / \
            np.asarray(pre.get("std", [1, 1, 1]), np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    # -- KP-RPE overhead pair ----------------------------------------------------------------
    def _ensure(self, arch: str, d: Path) -> dict | None:
        man = _manifest_or_none(d, "recognizer")
        if man is not None:
            return man
        if not self.export_baselines:
            raise _Skip(f"{d} does not exist and exporting baselines is turned off")
        ok, why = _export_available()
        if not ok:
            raise _Skip(f"{d} does not exist and it cannot be exported here: {why}")
        self.say(f"bench: exporting {arch} to {d} (random weights: latency does not depend on "
                 "the weight values)")
        status, res = _spawn({"kind": "export", "arch": arch, "out": str(d), "threads":
                              self.threads}, timeout_s=self.timeout_s)
        if status != "ok":
            raise _Skip(f"exporting {arch} to {d} failed: {res}")
        self.notes.append(f"{d} was exported by this run with random weights (latency only).")
        return load_manifest(d, task="recognizer")

    def _overhead_pair(self, rec_dir: Path | None, rec_man: dict | None) -> dict | None:
        try:
            root = self.models_dir / "baselines"
            if self.baseline_dir is not None:
                plain_dir = self.baseline_dir
                plain_man = _manifest_or_none(plain_dir, "recognizer")
                if plain_man is None:
                    raise _Skip(f"baseline_dir {plain_dir} holds no recognizer model")
                kprpe_arch = str(plain_man.get("arch", "")).replace("vit_", "vit_kprpe_", 1)
            else:
                kprpe_arch, plain_arch = OVERHEAD_PAIR
                if rec_man is not None and rec_man.get("arch") == plain_arch:
                    plain_dir, plain_man = rec_dir, rec_man  # the recognizer is the baseline
                else:
                    plain_dir = root / plain_arch
                    plain_man = self._ensure(plain_arch, plain_dir)
            if plain_man.get("config", {}).get("kprpe"):
                raise _Skip(f"{plain_dir} is a KP-RPE model ({plain_man.get('arch')}), not a "
                            "plain ViT baseline")
            if rec_man is not None and rec_man.get("config", {}).get("kprpe") and \
                    _same_vit(rec_man, plain_man):
                kprpe = ("recognizer", rec_dir, rec_man)
            else:
                d = root / kprpe_arch
                man = self._ensure(kprpe_arch, d)
                if not _same_vit(man, plain_man):
                    raise _Skip(f"{d} and {plain_dir} differ in more than KP-RPE")
                kprpe = (f"baselines/{kprpe_arch}", d, man)
            plain_label = ("recognizer" if plain_dir == rec_dir
                           else f"baselines/{plain_man.get('arch')}")
            for label, d, man in (kprpe, (plain_label, plain_dir, plain_man)):
                if label not in self.models:
                    self._model_entry(label, d, man)
            return {"models": [kprpe, (plain_label, plain_dir, plain_man)],
                    "kprpe": kprpe[0], "plain": plain_label}
        except (_Skip, KpfaceError) as e:
            self.skipped.append({"stage": "embed", "runtime": "onnxruntime", "precision": "fp32",
                                 "reason": f"kprpe_overhead: {e}"})
            self._overhead_skip = str(e)
            return None

    # -- running -----------------------------------------------------------------------------
    def gemm_peak(self, when: str = "") -> dict[str, Any]:
        n = self.gemm_size
        self.say(f"bench: fp32 GEMM peak (numpy matmul {n}x{n}, {self.threads} threads{when})")
        status, res = _spawn({"kind": "gemm", "size": n, "threads": self.threads,
                              "warmup": 2, "repeats": self.gemm_repeats}, timeout_s=self.timeout_s)
        if status != "ok":
            return {"status": status, "reason": res}
        flops = 2.0 * n ** 3
        gf = [flops / s / 1e9 for s in res["seconds"]]
        out = {"status": "ok", "size": n, "threads": self.threads, "repeats": len(gf),
               "flops_per_matmul": flops, "gflops_median": float(np.median(gf)),
               "gflops_max": float(np.max(gf)), "seconds": res["seconds"],
               "blas": {"numpy": _numpy_blas(), **res["threads_info"]}}
        self.say(f"bench:   GEMM peak {out['gflops_median']:.1f} GFLOP/s (median of "
                 f"{len(gf)}; best {out['gflops_max']:.1f})")
        return out

    @staticmethod
    def _label(cfg: dict) -> str:
        return (f"{cfg['stage']} {cfg['model']} ({cfg['arch']}) {cfg['runtime']} "
                f"{cfg['precision']} b{cfg['batch']}")

    def _row(self, cfg: dict, status: str, reason: Any = None) -> dict[str, Any]:
        row = {k: v for k, v in cfg.items() if k not in ("kind", "build_accuracy")}
        row["status"] = status
        if status != "ok":
            row["reason"] = reason
            self.say(f"bench   {status}: {self._label(cfg)}: {reason}")
        return row

    def run_group(self, group: list[tuple[dict, dict]], first: int, total: int
                  ) -> list[dict[str, Any]]:
        """Measure configurations side by side: each in its own fresh process, opened and
        warmed up first, then timed in rounds (``repeats`` split into up to ``rounds`` chunks,
        the order rotating every round), so that a change in the machine's load hits every
        configuration of the group alike and their ratios stay fair."""
        rows: dict[str, dict[str, Any]] = {}
        live: list[tuple[dict, _Worker, dict]] = []
        try:
            for i, (cfg, payload) in enumerate(group):
                self.say(f"bench [{first + i}/{total}] {self._label(cfg)}: opening")
                w = _Worker(cfg, payload, self.timeout_s)
                status, info = w.start()
                if status != "ready":
                    w.close()
                    rows[cfg["id"]] = self._row(cfg, status, info)
                    continue
                live.append((cfg, w, info))
            samples: dict[str, list[float]] = {cfg["id"]: [] for cfg, _, _ in live}
            n_rounds = max(1, min(self.rounds, self.repeats))
            chunks = [len(c) for c in np.array_split(np.arange(self.repeats), n_rounds)]
            if len(live) > 1:
                self.say(f"bench   timing {len(live)} configurations side by side: "
                         f"{n_rounds} rounds of {chunks[0]} calls each")
            for r, chunk in enumerate(chunks):
                order = live[r % len(live):] + live[:r % len(live)] if live else []
                for cfg, w, _ in order:
                    if cfg["id"] in rows:
                        continue
                    status, res = w.request("run", chunk)
                    if status != "ok":
                        rows[cfg["id"]] = self._row(cfg, status, res)
                        continue
                    samples[cfg["id"]] += res
                    if len(live) > 1:
                        time.sleep(_TURN_PAUSE_S)  # let the last engine's spinning threads park
            for cfg, w, info in live:
                if cfg["id"] in rows:
                    continue
                status, res = w.request("finish")
                if status != "ok":
                    rows[cfg["id"]] = self._row(cfg, status, res)
                    continue
                rows[cfg["id"]] = self._measured(cfg, info, samples[cfg["id"]], res)
        finally:
            for _, w, _ in live:
                w.close()
        return [rows[cfg["id"]] for cfg, _ in group]

    def _measured(self, cfg: dict, info: dict, samples: list[float], res: dict) -> dict:
        row = self._row(cfg, "ok")
        stats = latency_stats(samples)
        items = cfg["batch"]
        base, peak = res["rss_baseline_bytes"], res["rss_peak_bytes"]
        row.update({
            "provider": info.get("provider"), "faces": info.get("faces"),
            "load_s": round(info["load_s"], 3), "latency_ms": stats, "samples_ms": samples,
            "throughput_items_s": items / (stats["p50"] / 1e3) if stats["p50"] > 0 else None,
            "memory": {"rss_baseline_mb": _mb(base), "rss_peak_mb": _mb(peak),
                       "peak_delta_mb": (_mb(peak - base) if peak is not None and
                                         base is not None else None),
                       "method": res.get("rss_method")},
            "threads_info": info.get("threads_info"),
            "accuracy": cfg.get("build_accuracy"),
        })
        row["_outputs"] = res["outputs"]
        row["_kind"] = cfg["kind"]
        self.say(f"bench   {self._label(cfg)}: p50 {stats['p50']:.2f} ms  p90 "
                 f"{stats['p90']:.2f}  p99 {stats['p99']:.2f}  "
                 f"({row['throughput_items_s']:.1f} items/s, +{row['memory']['peak_delta_mb']} MB)")
        return row


def _mb(b: int | None) -> float | None:
    return None if b is None else round(b / 2 ** 20, 1)


def _flops_for(model_dir: str, manifest: dict | None, batches: Iterable[int]
               ) -> dict[int, dict[str, Any]]:
    """FLOPs per batch: the ONNX graph when onnx is installed, else the ViT config."""
    out: dict[int, dict[str, Any]] = {}
    from . import flops
    path = Path(model_dir) / (manifest or {}).get("graphs", {}).get("model", {}).get(
        "file", "model.onnx")
    model = None
    if importlib.util.find_spec("onnx") is not None and path.is_file():
        try:
            import onnx
            model = onnx.load(str(path))
        except Exception as e:
            log.warning("bench: cannot load %s for FLOP counting (%s)", path, e)
    for b in batches:
        try:
            if model is not None:
                r = flops.onnx_flops(model, {"batch": b})
                out[b] = {"flops": r["flops"], "method": r["method"], "by_op": r["by_op"],
                          "unresolved_nodes": len(r["unknown"])}
                continue
        except Exception as e:
            log.warning("bench: ONNX FLOP count of %s failed (%s)", path, e)
        cfg = (manifest or {}).get("config")
        if cfg and "embed_dim" in cfg:
            out[b] = flops.vit_flops(cfg, b)
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _p50(rows: list[dict], **match) -> float | None:
    for r in rows:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items()):
            return r["latency_ms"]["p50"]
    return None


def _ratios(bench: _Bench, rows: list[dict], ctx: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    batches = bench.batches
    # kprpe_overhead
    pair = ctx.get("overhead_pair")
    if pair is None:
        reason = getattr(bench, "_overhead_skip", None) or "the embed stage was not run"
        out["kprpe_overhead"] = {"status": "skipped", "reason": reason}
    else:
        by_batch = {}
        for b in batches:
            by_batch[str(b)] = _ratio(
                _p50(rows, stage="embed", model=pair["kprpe"], runtime="onnxruntime",
                     precision="fp32", batch=b),
                _p50(rows, stage="embed", model=pair["plain"], runtime="onnxruntime",
                     precision="fp32", batch=b))
        ok = any(v is not None for v in by_batch.values())
        out["kprpe_overhead"] = {
            "status": "ok" if ok else "skipped", "by_batch": by_batch,
            "numerator": f"{pair['kprpe']} ({pair['models'][0][2].get('arch')})",
            "denominator": f"{pair['plain']} ({pair['models'][1][2].get('arch')})",
            "definition": "p50 latency of the KP-RPE ViT / p50 latency of the same ViT without "
                          "KP-RPE, ONNX Runtime fp32",
            **({} if ok else {"reason": "a latency of the pair is missing (see errors)"})}
    # int8_speedup_<runtime>
    big = 8 if 8 in batches else max(batches)
    found = False
    runtimes = sorted({r["runtime"] for r in rows if r.get("stage") == "embed"
                       and r.get("model") == "recognizer" and r.get("precision") == "int8"})
    for rt in runtimes:
        fp32 = _p50(rows, stage="embed", model="recognizer", runtime=rt, precision="fp32",
                    batch=big)
        int8 = _p50(rows, stage="embed", model="recognizer", runtime=rt, precision="int8",
                    batch=big)
        if fp32 is None or int8 is None:
            out[f"int8_speedup_{rt}"] = {"status": "skipped", "reason":
                                         f"needs both {rt} fp32 and int8 at batch {big}"}
            continue
        found = True
        out[f"int8_speedup_{rt}"] = {"status": "ok", "batch": big, "value": fp32 / int8,
                                     "definition": f"{rt} fp32 p50 / {rt} int8 p50"}
    if not runtimes:
        out["int8_speedup"] = {"status": "skipped",
                               "reason": "no int8 recognizer build was measured"}
    del found
    # ort_vs_torch
    torch_ok, why = ctx.get("torch", (False, "the embed stage was not run"))
    if not torch_ok:
        out["ort_vs_torch"] = {"status": "skipped", "reason": why}
    else:
        by_batch = {str(b): _ratio(
            _p50(rows, stage="embed", model="recognizer", runtime="onnxruntime",
                 precision="fp32", batch=b),
            _p50(rows, stage="embed", model="recognizer", runtime="torch", batch=b))
            for b in batches}
        ok = any(v is not None for v in by_batch.values())
        torch_rows = [r for r in rows if r.get("runtime") == "torch"]
        out["ort_vs_torch"] = {
            "status": "ok" if ok else "skipped", "by_batch": by_batch,
            "definition": f"ONNX Runtime fp32 p50 / torch eager p50 (torch.set_num_threads("
                          f"{bench.threads})); < 1 means ONNX Runtime is faster",
            **({} if ok else {"reason": "; ".join(str(r.get("reason")) for r in torch_rows)
                              or "no torch row"})}
    return out


def _groups(plans: list[tuple[dict, dict]], interleave: bool) -> list[list[tuple[dict, dict]]]:
    """Configurations timed side by side: same stage and batch (all engines, precisions and
    models of it), in plan order; one per group without ``interleave``."""
    if not interleave:
        return [[p] for p in plans]
    groups: dict[tuple, list] = {}
    for p in plans:
        groups.setdefault((p[0]["stage"], p[0]["batch"]), []).append(p)
    return list(groups.values())


def run_bench(models_dir: str | os.PathLike, out_dir: str | os.PathLike,
              runtimes: Sequence[str] | None = None, precisions: Sequence[str] | None = None,
              batches: Sequence[int] = (1, 8), repeats: int = 30, warmup: int = 5,
              threads: int = 2, baseline_dir: str | os.PathLike | None = None,
              progress: Progress | None = None, *, stages: Sequence[str] | None = None,
              gemm_size: int = 2048, gemm_repeats: int = 10, export_baselines: bool = True,
              interleave: bool = True, rounds: int = 6, timeout_s: float = 600.0
              ) -> dict[str, Any]:
    """Benchmark every stage of ``models_dir`` and write ``out_dir/report.{md,json}`` + chart.

    ``models_dir`` holds ``detector/``, ``keypoints/`` (optional) and ``recognizer/`` model
    directories; builds found under each ``builds/`` are measured next to ONNX Runtime fp32.
    ``runtimes`` / ``precisions`` restrict which builds run (ONNX Runtime fp32 always runs: it
    is the accuracy reference); a runtime asked for that cannot run is reported as skipped with
    the reason. ``batches`` apply to the recognizer; detectors run at batch 1 on a 640x480
    scene. ``baseline_dir`` is a plain-ViT model dir for ``kprpe_overhead``; without it
    ``models_dir/baselines/vit_small`` and ``vit_kprpe_small`` are used, exported there (random
    weights) when missing and ``export_baselines`` allows it. Returns the report dict.

    With ``interleave`` (default) the configurations of one stage and batch are opened side
    by side, each in its own process, and timed in ``rounds`` alternating chunks, so the
    ratios between them survive a machine whose load changes during the run; this holds all
    their models in memory at once. ``interleave=False`` runs one configuration at a time.
    ``stages`` picks a subset of :data:`STAGES`; ``gemm_size``/``gemm_repeats`` size the GEMM
    peak measurement; ``timeout_s`` bounds each request to a bench process.
    """
    models_dir = Path(models_dir).expanduser()
    out_dir = Path(out_dir).expanduser()
    if not models_dir.is_dir():
        raise ModelError(f"models directory {models_dir} does not exist; export models first "
                         "(`kpface demo` creates a default set)")
    if repeats < 1 or warmup < 0 or threads < 1:
        raise InputError(f"repeats must be >= 1, warmup >= 0 and threads >= 1 (got {repeats}, "
                         f"{warmup}, {threads})")
    batches = tuple(batches) or (1,)
    if any(int(b) < 1 for b in batches):
        raise InputError(f"batch sizes must be >= 1, got {list(batches)}")
    bad = [s for s in (stages or ()) if s not in STAGES]
    if bad:
        raise InputError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = _Bench(models_dir, out_dir, runtimes, precisions, batches, repeats, warmup, threads,
                   baseline_dir, progress, stages, gemm_size, gemm_repeats, export_baselines,
                   timeout_s)
    bench.rounds = int(rounds) if interleave else 1
    say = bench.say
    t_start = time.perf_counter()
    machine = machine_info()
    engines = _engine_table(bench.runtimes)
    for name, e in engines.items():
        if e["available"] is False and (bench.runtimes is None or name in bench.runtimes):
            if not any(s["runtime"] == name and s["stage"] == "*" for s in bench.skipped):
                bench.skipped.append({"stage": "*", "runtime": name, "precision": None,
                                      "reason": e["reason"]})
    plans, ctx = bench.plan(engines)
    gemm_start = bench.gemm_peak(", before the configurations")
    rows = []
    done = 0
    for group in _groups(plans, interleave):
        rows += bench.run_group(group, done + 1, len(plans))
        done += len(group)
    # Measured again after: the higher median is the machine's peak; a gap between the two
    # says the load changed during the run.
    gemm_end = bench.gemm_peak(", after the configurations") if plans else {"status": "skipped"}
    ok = [g for g in (gemm_start, gemm_end) if g.get("status") == "ok"]
    gemm = dict(max(ok, key=lambda g: g["gflops_median"]) if ok else gemm_start)
    gemm["runs"] = {"before": {k: gemm_start.get(k) for k in ("status", "gflops_median",
                                                               "gflops_max", "reason")},
                    "after": {k: gemm_end.get(k) for k in ("status", "gflops_median",
                                                            "gflops_max", "reason")}}

    # Accuracy computed against fp32 ONNX Runtime where no build.json gave figures.
    refs = {(r["stage"], r["model"], r["batch"]): r for r in rows
            if r["status"] == "ok" and (r["runtime"], r["precision"]) == REFERENCE}
    for r in rows:
        if r["status"] != "ok" or (r["runtime"], r["precision"]) == REFERENCE:
            continue
        if r.get("accuracy") is None and r["runtime"] != "torch":
            ref = refs.get((r["stage"], r["model"], r["batch"]))
            if ref is not None and ref.get("_kind") == r.get("_kind"):
                r["accuracy"] = compare_to_reference(r["_kind"], ref["_outputs"], r["_outputs"])
        if r["runtime"] == "torch" and r.get("accuracy") is None:
            r["accuracy"] = {"source": "not compared: the torch model has fresh random weights"}
    for r in rows:
        if r["status"] == "ok" and (r["runtime"], r["precision"]) == REFERENCE:
            r["accuracy"] = {"source": "reference", "cosine_mean": 1.0, "cosine_min": 1.0} \
                if r["stage"] == "embed" else {"source": "reference"}
        r.pop("_outputs", None)
        r.pop("_kind", None)

    # FLOPs and fraction of the GEMM peak, per recognizer configuration.
    peak = gemm.get("gflops_median") if gemm.get("status") == "ok" else None
    flop_cache: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["stage"] != "embed" or r["status"] != "ok":
            continue
        key = r["model_dir"]
        if key not in flop_cache:
            say(f"bench: counting FLOPs of {r['model']} ({r['arch']})")
            man = _manifest_or_none(Path(key))
            flop_cache[key] = _flops_for(key, man, bench.batches)
        f = flop_cache[key].get(r["batch"])
        if not f:
            continue
        r["flops"] = {"per_batch": f["flops"], "per_item": f["flops"] / r["batch"],
                      "method": f["method"]}
        achieved = f["flops"] / (r["latency_ms"]["p50"] / 1e3) / 1e9
        r["gflops_achieved"] = achieved
        r["fraction_of_peak"] = achieved / peak if peak else None

    ratios = _ratios(bench, rows, ctx)
    machine["load_average_end"] = ([round(x, 2) for x in os.getloadavg()]
                                   if hasattr(os, "getloadavg") else None)
    noisy = [r["id"] for r in rows if r["status"] == "ok" and r["latency_ms"]["repeats"] >= 10
             and r["latency_ms"]["p99"] > 2 * r["latency_ms"]["p50"]]
    if noisy:
        bench.notes.append(
            f"{len(noisy)} configuration(s) have p99 > 2 x p50 ({', '.join(noisy)}): other work "
            f"competed for the CPU (load average {machine.get('load_average_start')} at the "
            f"start, {machine.get('load_average_end')} at the end). Every ratio uses medians.")
    if any(m.get("random_weights") for m in bench.models.values()):
        bench.notes.append("Models marked random_weights have no trained weights: latency and "
                           "memory are representative, detections and accuracy figures are not.")
    report = {
        "schema": REPORT_SCHEMA, "kind": "kpface-bench",
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"threads": bench.threads, "repeats": bench.repeats, "warmup": bench.warmup,
                     "batches": list(bench.batches), "runtimes": bench.runtimes,
                     "interleave": bool(interleave), "rounds": bench.rounds,
                     "precisions": bench.precisions, "stages": list(bench.stages),
                     "detector_input": list(DETECTOR_SIZE), "models_dir": str(models_dir),
                     "baseline_dir": str(bench.baseline_dir) if bench.baseline_dir else None,
                     "scene": ctx.get("scene_source"),
                     "recognizer_inputs": ctx.get("recognizer_inputs")},
        "method": {
            "latency": "per call wall time (perf_counter) after warm-up; p50 = median, p90/p99 "
                       "by linear interpolation; throughput = batch / p50"
                       + ("; configurations of one stage and batch are timed side by side in "
                          f"{bench.rounds} alternating rounds" if interleave else ""),
            "memory": "each configuration runs in a fresh Python process; peak_delta_mb = "
                      "peak RSS after the timed runs - peak RSS after importing the engine "
                      "library (model, arenas, activations); peak RSS is VmHWM of "
                      "/proc/self/status on Linux (ru_maxrss is inherited across fork+exec "
                      "there), ru_maxrss elsewhere",
            "gemm": "numpy.matmul of two float32 square matrices at the same thread count, "
                    "median GFLOP/s of repeats, measured before and after the configurations; "
                    "the higher median is the peak",
            "flops": "multiply-adds x 2 of MatMul/Gemm/Conv, counted from the ONNX graph with "
                     "shape inference (kpface.flops); fraction_of_peak = achieved / GEMM median",
            "accuracy": "from build.json when it has figures, else cosine vs ONNX Runtime fp32 "
                        "outputs on the same inputs",
        },
        "engines": engines, "models": bench.models, "gemm": gemm, "results": rows,
        "ratios": ratios, "skipped": bench.skipped, "notes": bench.notes,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    report["files"] = _write_outputs(report, out_dir)
    say(f"bench: done in {report['seconds']:.0f} s; report in {out_dir / 'report.md'}")
    return report


# =============================================================================================
# Output
# =============================================================================================

def _fmt(v: Any, spec: str = ".2f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def _row_cells(r: dict) -> list[str]:
    lat = r.get("latency_ms") or {}
    mem = (r.get("memory") or {}).get("peak_delta_mb")
    size = r.get("size_bytes")
    frac = r.get("fraction_of_peak")
    return [r["stage"], f"{r['model']}" + (f" ({r['arch']})" if r.get("arch") else ""),
            r["runtime"], r["precision"], str(r["batch"]),
            _fmt(lat.get("p50")), _fmt(lat.get("p90")), _fmt(lat.get("p99")),
            _fmt(r.get("throughput_items_s"), ".1f"), _fmt(mem, ".0f"),
            _fmt(size / 2 ** 20 if size else None, ".1f"), _accuracy_headline(r.get("accuracy")),
            _fmt(r.get("gflops_achieved"), ".1f"),
            _fmt(frac * 100 if frac is not None else None, ".0f"), str(lat.get("repeats", "-"))]


_HEAD = ["stage", "model", "runtime", "prec", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s",
         "+RSS MB", "size MB", "accuracy vs fp32", "GFLOP/s", "% peak", "n"]


def _ratio_lines(report: dict) -> list[str]:
    lines = []
    for name, r in report.get("ratios", {}).items():
        if r.get("status") != "ok":
            lines.append(f"{name}: skipped ({r.get('reason')})")
        elif "by_batch" in r:
            vals = ", ".join(f"b{b} {_fmt(v, '.3f')}" for b, v in r["by_batch"].items())
            extra = f"  [{r['numerator']} / {r['denominator']}]" if "numerator" in r else ""
            lines.append(f"{name}: {vals}{extra}")
        else:
            lines.append(f"{name}: {_fmt(r.get('value'), '.3f')} (batch {r.get('batch')})")
    return lines


def format_table(report: dict) -> str:
    """The results as a plain-text table for a terminal, with the GEMM peak, ratios, skips."""
    rows = [r for r in report.get("results", []) if r.get("status") == "ok"]
    cells = [_row_cells(r) for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(_HEAD)]
    right = set(range(4, len(_HEAD)))

    def line(cs):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cs, widths))).rstrip()
    out = [line(_HEAD), line(["-" * w for w in widths])] + [line(c) for c in cells]
    gemm = report.get("gemm", {})
    settings = report.get("settings", {})
    out.append("")
    if gemm.get("status") == "ok":
        blas = gemm.get("blas", {}).get("numpy", {})
        out.append(f"fp32 GEMM peak: {gemm['gflops_median']:.1f} GFLOP/s (numpy matmul "
                   f"{gemm['size']}^2, {gemm['threads']} threads, median of {gemm['repeats']}; "
                   f"BLAS {blas.get('name', '?')} {blas.get('version', '')})".rstrip())
    else:
        out.append(f"fp32 GEMM peak: not measured ({gemm.get('reason')})")
    out += _ratio_lines(report)
    for r in report.get("results", []):
        if r.get("status") != "ok":
            out.append(f"{r['status']}: {r['id']}: {r.get('reason')}")
    for s in report.get("skipped", []):
        what = " ".join(str(x) for x in (s.get("stage"), s.get("runtime"), s.get("precision"))
                        if x)
        out.append(f"skipped: {what}: {s.get('reason')}")
    out.append(f"threads {settings.get('threads')}, {settings.get('repeats')} timed runs after "
               f"{settings.get('warmup')} warm-up per configuration; latencies are medians-based")
    return "\n".join(out)


def _markdown(report: dict, chart: str | None) -> str:
    m = report["machine"]
    s = report["settings"]
    v = m.get("versions", {})
    g = report.get("gemm", {})
    lines = ["# kpface bench", "",
             f"{report['date']} - {report['seconds']:.0f} s", "", "## Machine", "",
             "| | |", "|---|---|",
             f"| CPU | {m['cpu_model']} ({', '.join(m.get('cpu_flags') or []) or 'flags n/a'}) |",
             f"| cores | {m['logical_cores']} logical, {m.get('usable_cores')} usable by this "
             "process |",
             f"| memory | {_fmt(m.get('memory_mb'), '.0f')} MB |",
             f"| platform | {m['platform']} |",
             f"| load average (1/5/15 min) | start {m.get('load_average_start')}, end "
             f"{m.get('load_average_end')} |"]
    for k in ("python", "kpface", "numpy", "onnxruntime", "openvino", "torch", "onnx", "nncf"):
        if k in v:
            lines.append(f"| {k} | {v[k] or 'not installed'} |")
    blas = m.get("numpy_blas", {})
    if blas:
        lines.append(f"| numpy BLAS | {blas.get('name')} {blas.get('version')} |")
    lines += ["", "## Settings", "",
              f"threads {s['threads']} (ONNX Runtime intra-op, torch, OpenMP/BLAS), "
              f"{s['repeats']} timed runs after {s['warmup']} warm-up runs per configuration, "
              f"recognizer batches {s['batches']}, detectors batch 1 at "
              f"{s['detector_input'][0]}x{s['detector_input'][1]}.", "",
              f"Scene: {s.get('scene')}. Recognizer inputs: {s.get('recognizer_inputs')}.", ""]
    lines += ["## fp32 GEMM peak", ""]
    if g.get("status") == "ok":
        tp = g.get("blas", {}).get("threadpoolctl") or []
        tp_s = "; ".join(f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} "
                         f"{p.get('num_threads')} threads" for p in tp) or "threadpoolctl n/a"
        runs = g.get("runs", {})
        both = ", ".join(f"{k} {_fmt(v.get('gflops_median'), '.1f')}" for k, v in runs.items())
        lines.append(f"numpy matmul {g['size']}x{g['size']} float32, {g['threads']} threads: "
                     f"**{g['gflops_median']:.1f} GFLOP/s** (median of {g['repeats']}, best "
                     f"{g['gflops_max']:.1f}; medians {both or 'n/a'}); BLAS: {tp_s}.")
    else:
        lines.append(f"not measured: {g.get('reason')}")
    lines += ["", "## Results", "",
              "Latencies in ms (p50 = median); items/s = batch / p50; +RSS = peak RSS increase "
              "of a fresh process while opening and running the configuration; GFLOP/s from "
              "the analytic FLOP count and p50; % peak of the GEMM median (numpy's GEMM, not "
              "the CPU's theoretical peak: an engine's kernels may exceed 100%).", "",
              "| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    for r in report["results"]:
        if r.get("status") == "ok":
            lines.append("| " + " | ".join(c.replace("|", "/") for c in _row_cells(r)) + " |")
    bad = [r for r in report["results"] if r.get("status") != "ok"]
    if bad:
        lines += ["", "Not measured:", ""]
        lines += [f"- `{r['id']}`: {r['status']}: {r.get('reason')}" for r in bad]
    lines += ["", "## Ratios (same run)", ""]
    for name, r in report["ratios"].items():
        if r.get("status") != "ok":
            lines.append(f"- **{name}**: skipped - {r.get('reason')}")
        elif "by_batch" in r:
            vals = ", ".join(f"batch {b}: **{_fmt(x, '.3f')}**" for b, x in r["by_batch"].items())
            lines.append(f"- **{name}**: {vals} ({r.get('definition')}"
                         + (f"; {r['numerator']} / {r['denominator']}" if "numerator" in r
                            else "") + ")")
        else:
            lines.append(f"- **{name}**: **{_fmt(r.get('value'), '.3f')}** at batch "
                         f"{r.get('batch')} ({r.get('definition')})")
    if report["skipped"]:
        lines += ["", "## Skipped", ""]
        for sk in report["skipped"]:
            what = " ".join(str(x) for x in (sk.get("stage"), sk.get("runtime"),
                                             sk.get("precision")) if x)
            lines.append(f"- {what}: {sk.get('reason')}")
    lines += ["", "## Models", "", "| name | arch | random weights | size MB | builds |",
              "|---|---|---|---|---|"]
    for name, mm in report["models"].items():
        lines.append(f"| {name} | {mm.get('arch')} | {'yes' if mm.get('random_weights') else 'no'}"
                     f" | {mm['bytes'] / 2 ** 20:.1f} | {', '.join(mm.get('builds') or []) or '-'} |")
    lines += ["", "## Method", ""] + [f"- {k}: {t}" for k, t in report["method"].items()]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if chart:
        lines += ["", f"![latency per configuration]({chart})"]
    return "\n".join(lines) + "\n"


def _chart(report: dict) -> bytes | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no chart (pip install 'kpface[bench]')")
        return None
    rows = [r for r in report["results"] if r.get("status") == "ok"]
    if not rows:
        return None
    labels = [f"{r['stage']} {r.get('arch') or r['model']} {r['runtime']} {r['precision']} "
              f"b{r['batch']}" for r in rows]
    p50 = np.array([r["latency_ms"]["p50"] for r in rows])
    p90 = np.array([r["latency_ms"]["p90"] for r in rows])
    colours = {"detect": "tab:blue", "keypoints": "tab:green", "embed": "tab:orange",
               "e2e": "tab:red"}
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(rows) + 1.5))
    y = np.arange(len(rows))
    ax.barh(y, p50, xerr=[np.zeros_like(p50), np.maximum(p90 - p50, 0)],
            color=[colours.get(r["stage"], "grey") for r in rows], capsize=3)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    if p50.max() / max(p50.min(), 1e-9) > 30:
        ax.set_xscale("log")
    ax.set_xlabel("latency per call, ms (bar p50, whisker p90)")
    s = report["settings"]
    ax.set_title(f"kpface bench - {report['machine']['cpu_model']}, {s['threads']} threads",
                 fontsize=9)
    for yi, v, w in zip(y, p50, p90):
        ax.text(max(v, w), yi, f"  {v:.1f}", va="center", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return x


def _write_outputs(report: dict, out_dir: Path) -> dict[str, str | None]:
    png = _chart(report)
    chart = None
    if png is not None:
        atomic_write_bytes(out_dir / CHART_NAME, png)
        chart = CHART_NAME
    files = {"report_md": str(out_dir / "report.md"), "report_json": str(out_dir / "report.json"),
             "chart": str(out_dir / CHART_NAME) if chart else None}
    report["files"] = files
    write_json(out_dir / "report.json", _json_safe(report))
    atomic_write_text(out_dir / "report.md", _markdown(report, chart))
    return files
