""":func:`run_bench`: plan, measure, derive, report (each step in its own module)."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

from .accuracy import fill_accuracy
from .builds import engine_table
from .flops import add_flops
from .inputs import BenchInputs
from .machine import load_average, machine_info
from .measure import Measurer, groups
from .plan import make_plan
from .ratios import ratios
from .report import build_report, write_outputs
from .settings import Progress, Settings

log = logging.getLogger(__name__)

_GEMM_FIELDS = ("status", "gflops_median", "gflops_max", "reason")


def _skipped_engines(engines: dict[str, dict], s: Settings) -> list[dict[str, Any]]:
    """One entry per engine that was asked for (or not restricted) and cannot run here."""
    return [{"stage": "*", "runtime": name, "precision": None, "reason": e["reason"]}
            for name, e in engines.items()
            if e["available"] is False and (s.runtimes is None or name in s.runtimes)]


def _peak(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """The GEMM peak: the higher of the medians measured before and after the run."""
    ok = [g for g in (start, end) if g.get("status") == "ok"]
    gemm = dict(max(ok, key=lambda g: g["gflops_median"]) if ok else start)
    gemm["runs"] = {"before": {k: start.get(k) for k in _GEMM_FIELDS},
                    "after": {k: end.get(k) for k in _GEMM_FIELDS}}
    return gemm


def _notes(rows: list[dict], models: dict, machine: dict) -> list[str]:
    notes = []
    noisy = [r["id"] for r in rows if r["status"] == "ok" and r["latency_ms"]["repeats"] >= 10
             and r["latency_ms"]["p99"] > 2 * r["latency_ms"]["p50"]]
    if noisy:
        notes.append(
            f"{len(noisy)} configuration(s) have p99 > 2 x p50 ({', '.join(noisy)}): other work "
            f"competed for the CPU (load average {machine.get('load_average_start')} at the "
            f"start, {machine.get('load_average_end')} at the end). Every ratio uses medians.")
    if any(m.get("random_weights") or m.get("partial_weights") for m in models.values()):
        notes.append("Models marked random (or partial) weights have no (or not all) trained "
                     "weights: latency and memory are representative, detections and accuracy "
                     "figures are not.")
    return notes


def run_bench(models_dir: str | os.PathLike, out_dir: str | os.PathLike,
              runtimes: Sequence[str] | None = None, precisions: Sequence[str] | None = None,
              batches: Sequence[int] = (1, 8), repeats: int = 30, warmup: int = 5,
              threads: int = 2, baseline_dir: str | os.PathLike | None = None,
              progress: Progress | None = None, *, stages: Sequence[str] | None = None,
              gemm_size: int = 2048, gemm_repeats: int = 10, export_baselines: bool = True,
              interleave: bool = True, rounds: int = 6, timeout_s: float = 600.0,
              recognizers: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
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
    ``stages`` picks a subset of :data:`~kpface.bench.STAGES`; ``gemm_size``/``gemm_repeats``
    size the GEMM peak measurement; ``timeout_s`` bounds each request to a bench process.

    More recognizers are measured beside ``recognizer/`` (same batches, builds and interleaved
    groups, their own FLOPs, int8 speedups and latency relative to ``recognizer/``): every
    model directory under ``models_dir/recognizers/`` and each of ``recognizers`` (paths).
    """
    s = Settings.make(models_dir, out_dir, runtimes, precisions, batches, repeats, warmup,
                      threads, baseline_dir, stages, gemm_size, gemm_repeats, export_baselines,
                      interleave, rounds, timeout_s, recognizers)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda m: log.info("%s", m))
    t_start = time.perf_counter()
    machine = machine_info()
    engines = engine_table(s.runtimes)
    inputs = BenchInputs(max(s.batches))
    plan = make_plan(s, engines, inputs, say, skipped=_skipped_engines(engines, s))

    measurer = Measurer(s, inputs, say)
    gemm_start = measurer.gemm_peak(", before the configurations")
    rows: list[dict[str, Any]] = []
    for group in groups(plan.configs, s.interleave):
        rows += measurer.run_group(group, len(rows) + 1, len(plan.configs))
    # Measured again after: the higher median is the machine's peak; a gap between the two
    # says the load changed during the run.
    gemm_end = (measurer.gemm_peak(", after the configurations") if plan.configs
                else {"status": "skipped"})
    gemm = _peak(gemm_start, gemm_end)

    fill_accuracy(rows)
    add_flops(rows, gemm.get("gflops_median") if gemm.get("status") == "ok" else None,
              s.batches, say)
    ratio_entries = ratios(rows, plan, s)
    machine["load_average_end"] = load_average()
    plan.notes += _notes(rows, plan.models, machine)
    settings = s.as_report(inputs.source(plan.scene), inputs.source(plan.faces))
    report = build_report(s, machine, engines, plan, settings, gemm, rows, ratio_entries,
                          time.perf_counter() - t_start)
    report["files"] = write_outputs(report, s.out_dir)
    say(f"bench: done in {report['seconds']:.0f} s; report in {s.out_dir / 'report.md'}")
    return report
