"""The jobs a bench process runs (see :mod:`kpface.bench.worker` for the protocol): a
measurement (:class:`Prepared`: open, warm up, timed calls, peak memory), the GEMM peak, and
the export of a missing baseline model."""
from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import time
from typing import Any

import numpy as np

from .calls import engine_module, open_call, summarize
from .settings import Skip


def current_rss() -> int | None:
    """Resident set size of this process now, in bytes (Linux ``VmRSS``; else None)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> tuple[int | None, str]:
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


_thread_limits: list[Any] = []  # threadpoolctl limits in force for this process's lifetime


def limit_threads(threads: int) -> dict[str, Any]:
    """Cap OpenMP / BLAS pools at ``threads`` through threadpoolctl, when it is installed."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return {"threadpoolctl": None}
    _thread_limits.append(threadpool_limits(limits=threads))
    return {"threadpoolctl": [{k: p.get(k) for k in ("user_api", "internal_api", "version",
                                                     "num_threads", "architecture")}
                              for p in threadpool_info()]}


class Prepared:
    """A configuration opened and warmed up inside a bench process, ready for timed calls."""

    def __init__(self, cfg: dict, payload: dict):
        threads = int(cfg["threads"])
        self.kind = cfg["kind"]
        self.threads_info = limit_threads(threads)
        module = engine_module(cfg["runtime"])
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise Skip(f"{module} cannot be imported here: {e}") from None
        if cfg["runtime"] == "torch":
            import torch
            torch.set_num_threads(threads)
            with contextlib.suppress(RuntimeError):
                torch.set_num_interop_threads(1)
        self.rss0, self.rss_method = peak_rss()
        t0 = time.perf_counter()
        self.call, self.meta = open_call(cfg, payload)
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
        rss1, _ = peak_rss()
        return {"rss_baseline_bytes": self.rss0, "rss_peak_bytes": rss1,
                "rss_end_bytes": current_rss(), "rss_method": self.rss_method,
                "outputs": summarize(self.kind, self.out)}


def gemm(cfg: dict) -> dict[str, Any]:
    """Seconds of ``repeats`` float32 square matmuls of ``size`` at ``threads`` threads."""
    threads, n = int(cfg["threads"]), int(cfg["size"])
    info = limit_threads(threads)
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


def export(cfg: dict) -> dict[str, Any]:
    """Export ``arch`` (random weights) to ``out``."""
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    from kpface.export.onnx_export import export_model
    manifest = export_model(cfg["arch"], cfg["out"])
    from kpface.weights import is_random
    return {"arch": manifest["arch"], "random_weights": is_random(manifest)}


def build(cfg: dict) -> dict[str, Any]:
    """An fp32 build of a baseline model (no calibration; a short held-out gate)."""
    from kpface.runtimes.build import build as make
    rec = make(cfg["model_dir"], cfg["runtime"], cfg["precision"], threads=int(cfg["threads"]),
               options=cfg.get("options") or None, n_heldout=int(cfg.get("heldout", 16)))
    return {"dir": rec["dir"]}


ONE_SHOT = {"gemm": gemm, "export": export, "build": build}  # jobs that answer once and end
