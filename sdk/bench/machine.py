"""The machine a bench runs on: CPU, cores, memory, library versions, numpy's BLAS, load, and
which optional parts (torch eager, ONNX export) this interpreter can run."""
from __future__ import annotations

import importlib.util
import os
import platform
from importlib import metadata
from typing import Any

import numpy as np

# The CPU features the report lists (in this order) when the CPU has them.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
                  "amx_int8", "amx_bf16", "neon", "asimd")
# Distributions whose versions the report lists; the first three also when not installed.
REPORTED_DISTS = ("onnxruntime", "onnxruntime-gpu", "openvino", "torch", "onnx", "nncf",
                  "opencv-python-headless", "threadpoolctl", "matplotlib")
ALWAYS_REPORTED = ("onnxruntime", "openvino", "torch")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _mem_total_mb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _versions() -> dict[str, str | None]:
    import kpface
    out = {"kpface": kpface.__version__, "python": platform.python_version(),
           "numpy": np.__version__}
    for dist in REPORTED_DISTS:
        v = version(dist)
        if v is not None or dist in ALWAYS_REPORTED:
            out[dist] = v
    return out


def numpy_blas() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 1.25
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        info = {"name": blas.get("name"), "version": blas.get("version"),
                "config": blas.get("openblas configuration")}
    except Exception:  # older numpy: no dict mode
        pass
    return {k: v for k, v in info.items() if v}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    from kpface.runtimes.engines import cpu_flags  # lazy: kpface.runtimes loads session code
    have = cpu_flags()
    return {"cpu_model": _cpu_model(), "cpu_flags": [f for f in REPORTED_FLAGS if f in have],
            "logical_cores": os.cpu_count(), "usable_cores": affinity,
            "memory_mb": _mem_total_mb(), "platform": platform.platform(),
            "machine": platform.machine(), "versions": _versions(), "numpy_blas": numpy_blas(),
            "load_average_start": load_average()}


def torch_available() -> tuple[bool, str]:
    """Can this interpreter run torch eager? (checked without importing torch)."""
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed (pip install 'kpface[export]'); ort_vs_torch skipped"
    return True, "torch " + (version("torch") or "?")


def export_available() -> tuple[bool, str]:
    """Can this interpreter export a model to ONNX (torch and onnx installed)?"""
    ok, why = torch_available()
    if not ok:
        return False, why.replace("; ort_vs_torch skipped", "")
    if importlib.util.find_spec("onnx") is None:
        return False, "onnx is not installed (pip install 'kpface[export]')"
    return True, ""
