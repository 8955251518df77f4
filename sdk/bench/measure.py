"""Timing, parent side: configurations of one stage and batch are opened side by side, each in
its own bench process, and timed in alternating rounds; latency percentiles, throughput and
peak memory make each configuration's report row. Also the fp32 GEMM peak."""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from kpface.errors import InputError

from .inputs import BenchInputs
from .machine import numpy_blas
from .plan import BenchConfig
from .settings import Settings, Skip
from .worker import Worker, spawn

_TURN_PAUSE_S = 0.05                        # between two processes' turns in a round


def latency_stats(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50 (median) / p90 / p99 / mean / min / max of latencies in ms."""
    x = np.asarray(samples_ms, np.float64)
    if x.size == 0:
        raise InputError("no latency samples: repeats must be >= 1")
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(x.mean()),
            "min": float(x.min()), "max": float(x.max()), "repeats": int(x.size)}


def groups(configs: list[BenchConfig], interleave: bool) -> list[list[BenchConfig]]:
    """Configurations timed side by side: same stage and batch (all engines, precisions and
    models of it), in plan order; one per group without ``interleave``."""
    if not interleave:
        return [[c] for c in configs]
    out: dict[tuple, list[BenchConfig]] = {}
    for c in configs:
        out.setdefault((c.stage, c.batch), []).append(c)
    return list(out.values())


def _mb(b: int | None) -> float | None:
    return None if b is None else round(b / 2 ** 20, 1)


def _memory(base: int | None, peak: int | None, end: int | None, size: int | None,
            method: str | None) -> dict[str, Any]:
    """A row's memory block: peak and end-of-run RSS over the baseline, and the peak added
    over the size of the model files the configuration opened (``rss_over_file``)."""
    delta = peak - base if peak is not None and base is not None else None
    end_delta = end - base if end is not None and base is not None else None
    return {"rss_baseline_mb": _mb(base), "rss_peak_mb": _mb(peak),
            "peak_delta_mb": _mb(delta), "end_delta_mb": _mb(end_delta),
            "rss_over_file": (round(delta / size, 3) if delta is not None and size else None),
            "method": method}


def _label(cfg: BenchConfig) -> str:
    return (f"{cfg.stage} {cfg.model} ({cfg.arch}) {cfg.runtime} {cfg.precision} "
            f"b{cfg.batch}")


class Measurer:
    def __init__(self, settings: Settings, inputs: BenchInputs, say: Callable[[str], None]):
        self.s, self.inputs, self.say = settings, inputs, say

    def gemm_peak(self, when: str = "") -> dict[str, Any]:
        """numpy float32 matmul GFLOP/s at the run's thread count, in a fresh process."""
        n, threads = self.s.gemm_size, self.s.threads
        self.say(f"bench: fp32 GEMM peak (numpy matmul {n}x{n}, {threads} threads{when})")
        status, res = spawn({"kind": "gemm", "size": n, "threads": threads, "warmup": 2,
                             "repeats": self.s.gemm_repeats}, timeout_s=self.s.timeout_s)
        if status != "ok":
            return {"status": status, "reason": res}
        flops = 2.0 * n ** 3
        gf = [flops / s / 1e9 for s in res["seconds"]]
        out = {"status": "ok", "size": n, "threads": threads, "repeats": len(gf),
               "flops_per_matmul": flops, "gflops_median": float(np.median(gf)),
               "gflops_max": float(np.max(gf)), "seconds": res["seconds"],
               "blas": {"numpy": numpy_blas(), **res["threads_info"]}}
        self.say(f"bench:   GEMM peak {out['gflops_median']:.1f} GFLOP/s (median of "
                 f"{len(gf)}; best {out['gflops_max']:.1f})")
        return out

    def _row(self, cfg: BenchConfig, status: str, reason: Any = None) -> dict[str, Any]:
        row = cfg.row()
        row["status"] = status
        if status != "ok":
            row["reason"] = reason
            self.say(f"bench   {status}: {_label(cfg)}: {reason}")
        return row

    def run_group(self, group: list[BenchConfig], first: int, total: int
                  ) -> list[dict[str, Any]]:
        """Measure configurations side by side: each in its own fresh process, opened and
        warmed up first, then timed in rounds (``repeats`` split into up to ``rounds`` chunks,
        the order rotating every round), so that a change in the machine's load hits every
        configuration of the group alike and their ratios stay fair."""
        repeats = self.s.repeats
        rows: dict[str, dict[str, Any]] = {}
        live: list[tuple[BenchConfig, Worker, dict]] = []
        try:
            for i, cfg in enumerate(group):
                self.say(f"bench [{first + i}/{total}] {_label(cfg)}: opening")
                try:
                    payload = self.inputs.payload(cfg.inputs, cfg.batch)
                except Skip as e:  # its inputs could not be made: not measured, and why
                    rows[cfg.id] = self._row(cfg, "skipped", str(e))
                    continue
                w = Worker(cfg.job(), payload, self.s.timeout_s)
                status, info = w.start()
                if status != "ready":
                    w.close()
                    rows[cfg.id] = self._row(cfg, status, info)
                    continue
                live.append((cfg, w, info))
            samples: dict[str, list[float]] = {cfg.id: [] for cfg, _, _ in live}
            n_rounds = max(1, min(self.s.rounds, repeats))
            chunks = [len(c) for c in np.array_split(np.arange(repeats), n_rounds)]
            if len(live) > 1:
                self.say(f"bench   timing {len(live)} configurations side by side: "
                         f"{n_rounds} rounds of {chunks[0]} calls each")
            for r, chunk in enumerate(chunks):
                order = live[r % len(live):] + live[:r % len(live)] if live else []
                for cfg, w, _ in order:
                    if cfg.id in rows:
                        continue
                    status, res = w.request("run", chunk)
                    if status != "ok":
                        rows[cfg.id] = self._row(cfg, status, res)
                        continue
                    samples[cfg.id] += res
                    if len(live) > 1:
                        time.sleep(_TURN_PAUSE_S)  # let the last engine's spinning threads park
            for cfg, w, info in live:
                if cfg.id in rows:
                    continue
                status, res = w.request("finish")
                if status != "ok":
                    rows[cfg.id] = self._row(cfg, status, res)
                    continue
                rows[cfg.id] = self._measured(cfg, info, samples[cfg.id], res)
        finally:
            for _, w, _ in live:
                w.close()
        return [rows[cfg.id] for cfg in group]

    def _measured(self, cfg: BenchConfig, info: dict, samples: list[float], res: dict) -> dict:
        row = self._row(cfg, "ok")
        stats = latency_stats(samples)
        base, peak = res["rss_baseline_bytes"], res["rss_peak_bytes"]
        row.update({
            "provider": info.get("provider"), "faces": info.get("faces"),
            "load_s": round(info["load_s"], 3), "latency_ms": stats, "samples_ms": samples,
            "throughput_items_s": (cfg.batch / (stats["p50"] / 1e3) if stats["p50"] > 0
                                   else None),
            "memory": _memory(base, peak, res.get("rss_end_bytes"), cfg.size_bytes,
                              res.get("rss_method")),
            "threads_info": info.get("threads_info"),
            "accuracy": cfg.build_accuracy,
        })
        row["_outputs"] = res["outputs"]
        row["_kind"] = cfg.kind
        self.say(f"bench   {_label(cfg)}: p50 {stats['p50']:.2f} ms  p90 "
                 f"{stats['p90']:.2f}  p99 {stats['p99']:.2f}  "
                 f"({row['throughput_items_s']:.1f} items/s, +{row['memory']['peak_delta_mb']} MB)")
        return row
