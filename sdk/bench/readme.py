"""The README's "Measured here" block, generated from a committed bench report.

    python -m kpface.bench.readme docs/measurements/bench-report.json README.md

writes the block between ``<!-- measured:begin -->`` and ``<!-- measured:end -->``; a test
keeps the README equal to :func:`measured_block` of the committed report, so every figure
there names the run it comes from and no figure is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .ratios import row

BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"
TARGETS = {"rss_over_file": {"fp32": 1.3, "int8": 1.5}, "kprpe_overhead": 1.03,
           "int8_speedup": 3.0, "e2e_ms": 100.0, "detect_ms": 40.0}


def _f(v: Any, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _label(runtime: str, precision: str, variant: str) -> str:
    name = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "torch": "torch eager"}.get(
        runtime, runtime)
    extra = {"attention=fused": "fused attention"}.get(variant, variant.replace("+", ", "))
    return f"{name} {precision}" + (f" ({extra})" if extra else "")


def _recognizer_table(report: dict) -> list[str]:
    rows = [r for r in report["results"] if r.get("status") == "ok" and r["stage"] == "embed"
            and r["model"] == "recognizer"]
    batches = report["settings"]["batches"]
    gemm = (report.get("gemm") or {}).get("gflops_median")
    head = ["recognizer (" + (rows[0].get("arch") or "?") + ")" if rows else "recognizer"]
    head += [f"batch {b} p50" for b in batches]
    head += ["+RSS b1 / file", "cosine vs fp32 (mean / min)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = []
    for r in rows:
        key = (r["runtime"], r["precision"], r.get("variant", ""))
        if key in seen:
            continue
        seen.append(key)
        cells = [_label(*key)]
        for b in batches:
            x = row(rows, runtime=key[0], precision=key[1], variant=key[2], batch=b)
            if x is None:
                cells.append("-")
                continue
            frac = x.get("fraction_of_peak") if key[1] == "fp32" else None  # fp32 FLOPs only
            cells.append(f"{_f(x['latency_ms']['p50'])} ms"
                         + (f" ({frac * 100:.0f}% of GEMM peak)" if frac and gemm else ""))
        one = row(rows, runtime=key[0], precision=key[1], variant=key[2], batch=batches[0])
        mem = (one or {}).get("memory") or {}
        cells.append(f"{_f(mem.get('peak_delta_mb'), '.0f')} MB / "
                     f"{_f((one or {}).get('size_bytes', 0) / 2 ** 20, '.0f')} MB = "
                     f"**{_f(mem.get('rss_over_file'), '.2f')}x**" if mem.get("rss_over_file")
                     else "-")
        acc = (one or {}).get("accuracy") or {}
        cells.append("reference" if acc.get("source") == "reference" else
                     f"{_f(acc.get('mean'), '.4f')} / {_f(acc.get('min'), '.4f')}"
                     if acc.get("mean") is not None else "-")
        out.append("| " + " | ".join(cells) + " |")
    return out


def _ratios(report: dict) -> list[str]:
    ratios, out = report.get("ratios", {}), []
    for name in sorted(k for k in ratios if k.startswith("kprpe_overhead")):
        r = ratios[name]
        if r.get("status") != "ok":
            out.append(f"- `{name}`: not measured ({r.get('reason')})")
            continue
        vals = ", ".join(f"batch {b}: **{_f(v, '.3f')}**" for b, v in r["by_batch"].items())
        paired = ", ".join(f"batch {b}: {_f(v, '.3f')}"
                           for b, v in (r.get("paired_by_batch") or {}).items())
        out.append(f"- `{name}` ({r['definition']}): {vals}"
                   + (f"; paired (median over the rounds of the ratio within a round): {paired}"
                      if paired else "") + f" (target <= {TARGETS['kprpe_overhead']})")
    for name in sorted(k for k in ratios if k.startswith("int8_speedup_")):
        r = ratios[name]
        if r.get("status") != "ok":
            out.append(f"- `{name}`: not measured ({r.get('reason')})")
            continue
        best = r.get("vs_fastest_fp32") or {}
        extra = (f"; over the fastest fp32 form ({best['fp32_variant']}): "
                 f"{_f(best.get('value'), '.2f')}x" if best.get("fp32_variant") else "")
        out.append(f"- `{name}` at batch {r['batch']}: **{_f(r['value'], '.2f')}x** "
                   f"({r['definition']}{extra}; target >= {TARGETS['int8_speedup']}x)")
    r = ratios.get("ort_vs_torch") or {}
    if r.get("status") == "ok":
        vals = ", ".join(f"batch {b}: {_f(v, '.2f')}" for b, v in r["by_batch"].items())
        out.append(f"- `ort_vs_torch` ({r['definition']}): {vals}")
    return out


def _pipeline(report: dict) -> list[str]:
    res = [r for r in report["results"] if r.get("status") == "ok"]
    out = []
    for r in res:
        if r["stage"] == "detect":
            out.append(f"- detector {r.get('arch')} on {_label(r['runtime'], r['precision'], '')}"
                       f", {report['settings']['detector_input'][0]}x"
                       f"{report['settings']['detector_input'][1]} scene with one face: "
                       f"**{_f(r['latency_ms']['p50'])} ms** p50 (target <= "
                       f"{TARGETS['detect_ms']:.0f} ms)")
    for r in res:
        if r["stage"] == "e2e":
            out.append(f"- whole pipeline, recognizer {_label(r['runtime'], r['precision'], r.get('variant', ''))}"
                       f" (detector {r.get('detector_precision')}): **{_f(r['latency_ms']['p50'])}"
                       f" ms** p50, p90 {_f(r['latency_ms']['p90'])} ms (target <= "
                       f"{TARGETS['e2e_ms']:.0f} ms with int8)")
    return out


def measured_block(report: dict, source: str) -> str:
    """The markdown between the markers, from ``report`` (a ``kpface bench`` report.json)
    stored at ``source`` (the path named in the text)."""
    m, s, g = report["machine"], report["settings"], report.get("gemm") or {}
    weights = sorted(k for k, v in report.get("models", {}).items() if v.get("random_weights"))
    lines = [
        f"Generated by `python -m kpface.bench.readme` from `{source}`: one `kpface bench` run "
        f"of {report['date']} ({report['seconds']:.0f} s) on {m['cpu_model']} "
        f"({m.get('usable_cores')} usable cores; {', '.join(m.get('cpu_flags') or [])}), "
        f"{s['threads']} threads, {s['repeats']} timed calls per configuration after "
        f"{s['warmup']} warm-up, configurations of one stage and batch timed side by side in "
        f"{s.get('rounds')} alternating rounds; medians. Load average (1/5/15 min) "
        f"{m.get('load_average_start')} at the start, {m.get('load_average_end')} at the end "
        f"(other work shared the machine). fp32 GEMM peak (numpy, same threads): "
        f"**{_f(g.get('gflops_median'))} GFLOP/s**."
        + (f" Random weights: {', '.join(weights)} (latency and memory do not depend on "
           "the values)." if weights else ""),
        "",
    ]
    lines += _recognizer_table(report)
    lines += ["", "+RSS: peak resident memory the session's fresh process added (open, warm-up,"
              " timed calls at batch 1) over the size of the model files it opened "
              f"(targets: <= {TARGETS['rss_over_file']['fp32']}x fp32, <= "
              f"{TARGETS['rss_over_file']['int8']}x int8).", ""]
    rof = (report.get("ratios", {}).get("rss_over_file") or {}).get("by_config") or {}
    if rof:
        lines.append("- `rss_over_file` by batch: " + "; ".join(
            f"{k} " + ", ".join(f"b{b} {_f(v, '.2f')}" for b, v in by.items())
            for k, by in rof.items()))
    lines += _ratios(report) + _pipeline(report)
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the markers replaced by ``block``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the README has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kpface.bench.readme",
                                description="write the README's measured block from a report")
    p.add_argument("report", help="a kpface bench report.json (committed)")
    p.add_argument("readme", help="the README to update in place")
    a = p.parse_args(argv)
    report = json.loads(Path(a.report).read_text(encoding="utf-8"))
    readme = Path(a.readme)
    try:
        source = Path(a.report).resolve().relative_to(readme.resolve().parent).as_posix()
    except ValueError:
        source = a.report
    readme.write_text(replace_block(readme.read_text(encoding="utf-8"),
                                    measured_block(report, source)), encoding="utf-8")
    print(f"wrote the measured block of {readme} from {a.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
