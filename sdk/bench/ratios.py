"""Ratios between rows of the same run (medians only, so a noisy machine hurts them least).

:data:`RATIOS` lists them; each takes the measured rows, the plan and the settings and returns
``{ratio name: entry}``, an entry being ``{"status": "ok", ...}`` or ``{"status": "skipped",
"reason": ...}``. A new ratio is one more function in that list.
"""
from __future__ import annotations

from typing import Any, Callable

from .plan import Plan
from .settings import Settings

Entries = dict[str, dict[str, Any]]

# kprpe_overhead is measured on these engines (runtime -> ratio name), at fp32.
OVERHEAD_RUNTIMES = {"onnxruntime": "kprpe_overhead"}


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def p50(rows: list[dict], **match) -> float | None:
    """The p50 latency of the first measured row whose fields equal ``match``."""
    for r in rows:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items()):
            return r["latency_ms"]["p50"]
    return None


def kprpe_overhead(rows: list[dict], plan: Plan, s: Settings) -> Entries:
    """KP-RPE ViT p50 / the same ViT without KP-RPE, per batch, on each overhead runtime."""
    from kpface.runtimes.engines import get_engine
    pair = plan.overhead
    out: Entries = {}
    for runtime, name in OVERHEAD_RUNTIMES.items():
        if pair is None:
            out[name] = {"status": "skipped",
                         "reason": plan.overhead_skip or "the embed stage was not run"}
            continue
        by_batch = {str(b): _ratio(
            p50(rows, stage="embed", model=pair["kprpe"], runtime=runtime, precision="fp32",
                batch=b),
            p50(rows, stage="embed", model=pair["plain"], runtime=runtime, precision="fp32",
                batch=b)) for b in s.batches}
        ok = any(v is not None for v in by_batch.values())
        out[name] = {
            "status": "ok" if ok else "skipped", "by_batch": by_batch,
            "numerator": f"{pair['kprpe']} ({pair['models'][0][2].get('arch')})",
            "denominator": f"{pair['plain']} ({pair['models'][1][2].get('arch')})",
            "definition": "p50 latency of the KP-RPE ViT / p50 latency of the same ViT without "
                          f"KP-RPE, {get_engine(runtime).title} fp32",
            **({} if ok else {"reason": "a latency of the pair is missing (see errors)"})}
    return out


def int8_speedup(rows: list[dict], plan: Plan, s: Settings) -> Entries:
    """fp32 p50 / int8 p50 of each recognizer per runtime with an int8 build, at every batch;
    ``value`` is batch 8's (or the largest batch's). The pipeline's recognizer is
    ``int8_speedup_<runtime>``, another recognizer folder ``int8_speedup_<runtime>:<folder>``."""
    big = 8 if 8 in s.batches else max(s.batches)
    out: Entries = {}
    keys = sorted({(r["model"], r["runtime"]) for r in rows if r.get("stage") == "embed"
                   and r.get("precision") == "int8" and r.get("runtime") != "torch"},
                  key=lambda k: (k[0] != "recognizer", k))
    for model, rt in keys:
        name = f"int8_speedup_{rt}" + ("" if model == "recognizer" else f":{model}")
        by_batch = {str(b): _ratio(
            p50(rows, stage="embed", model=model, runtime=rt, precision="fp32", batch=b),
            p50(rows, stage="embed", model=model, runtime=rt, precision="int8", batch=b))
            for b in s.batches}
        if by_batch.get(str(big)) is None:
            out[name] = {"status": "skipped", "reason":
                         f"needs both {rt} fp32 and int8 of {model} at batch {big}"}
            continue
        out[name] = {"status": "ok", "batch": big, "value": by_batch[str(big)],
                     "by_batch": by_batch,
                     "definition": f"{rt} fp32 p50 / {rt} int8 p50 ({model})"}
    if not any(model == "recognizer" for model, _ in keys):
        out["int8_speedup"] = {"status": "skipped",
                               "reason": "no int8 build of recognizer/ was measured"}
    return out


def ort_vs_torch(rows: list[dict], plan: Plan, s: Settings) -> Entries:
    """ONNX Runtime fp32 p50 / torch eager p50 of the recognizer, per batch."""
    torch_ok, why = plan.torch or (False, "the embed stage was not run")
    if not torch_ok:
        return {"ort_vs_torch": {"status": "skipped", "reason": why}}
    by_batch = {str(b): _ratio(
        p50(rows, stage="embed", model="recognizer", runtime="onnxruntime", precision="fp32",
            batch=b),
        p50(rows, stage="embed", model="recognizer", runtime="torch", batch=b))
        for b in s.batches}
    ok = any(v is not None for v in by_batch.values())
    torch_rows = [r for r in rows if r.get("runtime") == "torch"]
    return {"ort_vs_torch": {
        "status": "ok" if ok else "skipped", "by_batch": by_batch,
        "definition": f"ONNX Runtime fp32 p50 / torch eager p50 (torch.set_num_threads("
                      f"{s.threads})); < 1 means ONNX Runtime is faster",
        **({} if ok else {"reason": "; ".join(str(r.get("reason")) for r in torch_rows)
                          or "no torch row"})}}


def other_recognizers(rows: list[dict], plan: Plan, s: Settings) -> Entries:
    """For each recognizer measured beside ``recognizer/`` (label L): ``latency_vs_recognizer:L``
    = L's p50 / recognizer's p50 (ONNX Runtime fp32, per batch). Its int8 speed-ups are
    :func:`int8_speedup`'s ``int8_speedup_RT:L``."""
    out: Entries = {}
    for label in plan.recognizers:
        by_batch = {str(b): _ratio(
            p50(rows, stage="embed", model=label, runtime="onnxruntime", precision="fp32",
                batch=b),
            p50(rows, stage="embed", model="recognizer", runtime="onnxruntime",
                precision="fp32", batch=b)) for b in s.batches}
        ok = any(v is not None for v in by_batch.values())
        out[f"latency_vs_recognizer:{label}"] = {
            "status": "ok" if ok else "skipped", "by_batch": by_batch,
            "numerator": label, "denominator": "recognizer",
            "definition": f"p50 of {label} / p50 of recognizer, ONNX Runtime fp32",
            **({} if ok else {"reason": "a latency of the pair is missing (see errors)"})}
    return out


RATIOS: tuple[Callable[[list[dict], Plan, Settings], Entries], ...] = (
    kprpe_overhead, int8_speedup, ort_vs_torch, other_recognizers)


def ratios(rows: list[dict], plan: Plan, s: Settings) -> Entries:
    out: Entries = {}
    for ratio in RATIOS:
        out.update(ratio(rows, plan, s))
    return out
