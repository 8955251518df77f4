"""The report as text: :func:`format_table` for a terminal and :func:`markdown` for
``report.md``. Both read only the report dict (see :mod:`kpface.bench.report`)."""
from __future__ import annotations

import math
from typing import Any


def accuracy_headline(acc: dict[str, Any] | None) -> str:
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
            r["runtime"] + (f" [{r['variant']}]" if r.get("variant") else ""), r["precision"],
            str(r["batch"]),
            _fmt(lat.get("p50")), _fmt(lat.get("p90")), _fmt(lat.get("p99")),
            _fmt(r.get("throughput_items_s"), ".1f"), _fmt(mem, ".0f"),
            _fmt(size / 2 ** 20 if size else None, ".1f"), accuracy_headline(r.get("accuracy")),
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
            paired = ", ".join(f"b{b} {_fmt(v, '.3f')}"
                               for b, v in (r.get("paired_by_batch") or {}).items())
            lines.append(f"{name}: {vals}" + (f" (paired by round: {paired})" if paired else "")
                         + extra)
        elif "by_config" in r:
            vals = "; ".join(f"{c} " + ", ".join(f"b{b} {_fmt(v, '.2f')}" for b, v in by.items())
                             for c, by in r["by_config"].items())
            lines.append(f"{name}: {vals}")
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


def markdown(report: dict, chart: str | None) -> str:
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
        elif "by_config" in r:
            vals = "; ".join(f"{c} " + ", ".join(f"batch {b}: **{_fmt(x, '.2f')}**"
                                                 for b, x in by.items())
                             for c, by in r["by_config"].items())
            lines.append(f"- **{name}**: {vals} ({r.get('definition')})")
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
        random = "yes" if mm.get("random_weights") else "PARTIAL" if mm.get("partial_weights") \
            else "no"
        builds = ", ".join(mm.get("builds") or []) or "-"
        lines.append(f"| {name} | {mm.get('arch')} | {random} | {mm['bytes'] / 2 ** 20:.1f} | "
                     f"{builds} |")
    lines += ["", "## Method", ""] + [f"- {k}: {t}" for k, t in report["method"].items()]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if chart:
        lines += ["", f"![latency per configuration]({chart})"]
    return "\n".join(lines) + "\n"
