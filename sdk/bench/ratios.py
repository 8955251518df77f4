"""Ratios between rows of the same run (medians only, so a noisy machine hurts them least).

:data:`RATIOS` lists them; each takes the measured rows, the plan and the settings and returns
``{ratio name: entry}``, an entry being ``{"status": "ok", ...}`` or ``{"status": "skipped",
"reason": ...}``. A new ratio is one more function in that list.
"""
from __future__ import annotations

from typing import Any, Callable

from .plan import Plan
from .settings import OVERHEAD_FORMS, Settings

Entries = dict[str, dict[str, Any]]


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def row(rows: list[dict], **match) -> dict | None:
    """The first measured row whose fields equal ``match`` (a row without a ``variant`` field
    has variant "")."""
    for r in rows:
        if r.get("status") == "ok" and all(r.get(k, "" if k == "variant" else None) == v
                                           for k, v in match.items()):
            return r
    return None


def p50(rows: list[dict], **match) -> float | None:
    """The p50 latency of :func:`row`'s row."""
    r = row(rows, **match)
    return None if r is None else r["latency_ms"]["p50"]


def paired_ratio(num: dict | None, den: dict | None, rounds: int) -> float | None:
    """Median over the interleaved rounds of (numerator's median / denominator's median in
    that round): the two rows were timed back to back in every round, so a load change
    between rounds cancels out, where a ratio of whole-run medians keeps it."""
    import numpy as np
    if not num or not den:
        return None
    a, b = np.asarray(num.get("samples_ms") or []), np.asarray(den.get("samples_ms") or [])
    if not a.size or a.size != b.size:
        return None
    n = max(1, min(rounds, a.size))
    per = [np.median(x) / np.median(y) for x, y in zip(np.array_split(a, n),
                                                       np.array_split(b, n)) if np.median(y) > 0]
    return float(np.median(per)) if per else None


def kprpe_overhead(rows: list[dict], plan: Plan, s: Settings) -> Entries:
    """KP-RPE ViT p50 / the same ViT without KP-RPE, per batch, in every form of
    :data:`~kpface.bench.settings.OVERHEAD_FORMS` (model.onnx on ONNX Runtime, the OpenVINO
    fp32 builds, the fused-attention ONNX Runtime fp32 builds)."""
    from kpface.runtimes.engines import get_engine
    pair = plan.overhead
    out: Entries = {}
    for name, runtime, options in OVERHEAD_FORMS:
        form = None if options is None else plan.overhead_forms.get(name, {})
        if pair is None or (form is not None and "skip" in form) or form == {}:
            reason = (plan.overhead_skip or "the embed stage was not run") if pair is None \
                else (form or {}).get("skip", "not planned")
            out[name] = {"status": "skipped", "reason": reason}
            continue
        variant = "" if form is None else form["variant"]
        what = "model.onnx" if form is None else (
            "fp32 builds" + (f" with {variant.replace('+', ', ')}" if variant else ""))
        by_batch = {str(b): _ratio(
            p50(rows, stage="embed", model=pair["kprpe"], runtime=runtime, precision="fp32",
                batch=b, variant=variant),
            p50(rows, stage="embed", model=pair["plain"], runtime=runtime, precision="fp32",
                batch=b, variant=variant)) for b in s.batches}
        paired = {str(b): paired_ratio(
            row(rows, stage="embed", model=pair["kprpe"], runtime=runtime, precision="fp32",
                 batch=b, variant=variant),
            row(rows, stage="embed", model=pair["plain"], runtime=runtime, precision="fp32",
                 batch=b, variant=variant), s.rounds) for b in s.batches}
        ok = any(v is not None for v in by_batch.values())
        out[name] = {
            "status": "ok" if ok else "skipped", "by_batch": by_batch,
            "paired_by_batch": paired,
            "runtime": runtime, "variant": variant,
            "numerator": f"{pair['kprpe']} ({pair['models'][0][2].get('arch')})",
            "denominator": f"{pair['plain']} ({pair['models'][1][2].get('arch')})",
            "definition": "p50 latency of the KP-RPE ViT / p50 latency of the same ViT without "
                          f"KP-RPE, {get_engine(runtime).title} fp32 ({what})",
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
        # Every fp32 form of this model on this runtime (model.onnx, builds with options): the
        # fastest too.
        forms = {r.get("variant", ""): r["latency_ms"]["p50"] for r in rows
                 if r.get("status") == "ok" and r.get("stage") == "embed"
                 and r.get("model") == model and r.get("runtime") == rt
                 and r.get("precision") == "fp32" and r.get("batch") == big}
        int8 = p50(rows, stage="embed", model=model, runtime=rt, precision="int8", batch=big)
        best = min(forms, key=forms.get)
        out[name] = {"status": "ok", "batch": big, "value": by_batch[str(big)],
                     "by_batch": by_batch,
                     "definition": f"{rt} fp32 p50 / {rt} int8 p50 ({model})",
                     "vs_fastest_fp32": {"value": forms[best] / int8, "fp32_variant": best}}
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
            batch=b, variant=""),
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


def rss_over_file(rows: list[dict], plan: Plan, s: Settings) -> Entries:
    """Peak resident memory a recognizer session adds / its model files, per runtime,
    precision (and build options) and batch."""
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        v = (r.get("memory") or {}).get("rss_over_file")
        if r.get("status") != "ok" or r.get("stage") != "embed" or \
                r.get("model") != "recognizer" or v is None:
            continue
        key = f"{r['runtime']}-{r['precision']}" + (f"[{r['variant']}]" if r.get("variant")
                                                     else "")
        table.setdefault(key, {})[str(r["batch"])] = v
    if not table:
        return {"rss_over_file": {"status": "skipped",
                                  "reason": "no recognizer row with memory and size figures"}}
    return {"rss_over_file": {
        "status": "ok", "by_config": table,
        "definition": "peak RSS of the bench process over its RSS after importing the engine "
                      "(opening the session, warm-up and timed calls at that batch) / bytes of "
                      "the model files it opened"}}


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
    kprpe_overhead, int8_speedup, ort_vs_torch, other_recognizers, rss_over_file)


def ratios(rows: list[dict], plan: Plan, s: Settings) -> Entries:
    out: Entries = {}
    for ratio in RATIOS:
        out.update(ratio(rows, plan, s))
    return out
