"""The report: its dict (:func:`build_report`, the shape of ``report.json``), the latency chart,
and the files written to the output folder (:func:`write_outputs`)."""
from __future__ import annotations

import datetime as _dt
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from kpface.manifest import atomic_write_bytes, atomic_write_text, write_json

from .plan import Plan
from .render import markdown
from .settings import CHART_NAME, REPORT_SCHEMA, Settings

log = logging.getLogger(__name__)


def _method(s: Settings) -> dict[str, str]:
    """How each figure was measured, in words (the report's ``method`` block)."""
    return {
        "latency": "per call wall time (perf_counter) after warm-up; p50 = median, p90/p99 "
                   "by linear interpolation; throughput = batch / p50"
                   + ("; configurations of one stage and batch are timed side by side in "
                      f"{s.rounds} alternating rounds" if s.interleave else ""),
        "memory": "each configuration runs in a fresh Python process; peak_delta_mb = "
                  "peak RSS after the timed runs - peak RSS after importing the engine "
                  "library (model, arenas, activations); peak RSS is VmHWM of "
                  "/proc/self/status on Linux (ru_maxrss is inherited across fork+exec "
                  "there), ru_maxrss elsewhere",
        "gemm": "numpy.matmul of two float32 square matrices at the same thread count, "
                "median GFLOP/s of repeats, measured before and after the configurations; "
                "the higher median is the peak",
        "flops": "multiply-adds x 2 of MatMul/Gemm/Conv, counted from the ONNX graph with "
                 "shape inference (kpface.bench.flops); fraction_of_peak = achieved / GEMM "
                 "median",
        "accuracy": "from build.json when it has figures, else cosine vs ONNX Runtime fp32 "
                    "outputs on the same inputs",
    }


def build_report(s: Settings, machine: dict[str, Any], engines: dict[str, Any], plan: Plan,
                 settings: dict[str, Any], gemm: dict[str, Any], rows: list[dict[str, Any]],
                 ratios: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The report dict (``files`` is added by :func:`write_outputs`)."""
    return {
        "schema": REPORT_SCHEMA, "kind": "kpface-bench",
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": machine, "settings": settings, "method": _method(s),
        "engines": engines, "models": plan.models, "gemm": gemm, "results": rows,
        "ratios": ratios, "skipped": plan.skipped, "notes": plan.notes,
        "seconds": round(seconds, 1),
    }


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


def write_outputs(report: dict, out_dir: Path) -> dict[str, str | None]:
    png = _chart(report)
    chart = None
    if png is not None:
        atomic_write_bytes(out_dir / CHART_NAME, png)
        chart = CHART_NAME
    files = {"report_md": str(out_dir / "report.md"), "report_json": str(out_dir / "report.json"),
             "chart": str(out_dir / CHART_NAME) if chart else None}
    report["files"] = files
    write_json(out_dir / "report.json", _json_safe(report))
    atomic_write_text(out_dir / "report.md", markdown(report, chart))
    return files
