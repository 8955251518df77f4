"""``kpface bench``: latency, throughput, memory, size and accuracy per stage, engine, precision
and batch, plus the machine's GEMM peak and a few ratios, all measured in one run.

    report = run_bench("~/.cache/kpface/models", "bench-out", threads=2)
    print(format_table(report))          # bench-out/report.md, report.json, latency.png

How it measures
---------------
* Every configuration (stage x runtime x precision x batch) runs in a fresh Python process
  (a subprocess of the same interpreter, like ``multiprocessing`` 'spawn' but without
  re-importing the caller's ``__main__``): it imports the engine library, notes its peak RSS
  (``VmHWM`` on Linux, else ``ru_maxrss``; see :func:`kpface.bench.child.peak_rss`), opens the
  session, runs ``warmup`` untimed calls and ``repeats`` timed ones, and notes the peak again.
  The difference is the config's peak memory (model, arenas, activations), free of anything
  an earlier configuration left behind.
* Latency is reported as p50 / p90 / p99 over the timed calls (p50 is the median, and every
  figure derived from latency uses it); throughput is ``batch / p50``.
* The thread count is applied to every engine: ONNX Runtime ``intra_op_num_threads`` (through
  ``open_session(threads=...)``), ``torch.set_num_threads``, and OpenMP / OpenBLAS / MKL through
  the environment of the spawned process and ``threadpoolctl`` when it is installed.
* The fp32 GEMM peak is numpy's ``matmul`` of two square float32 matrices at the same thread
  count (median of repeats); each recognizer configuration's FLOPs are counted analytically
  (:mod:`kpface.bench.flops`), so achieved GFLOP/s and the fraction of that peak follow.
* Accuracy against fp32 is read from each build's ``build.json`` when it holds figures, else
  computed here: cosine between the build's and ONNX Runtime fp32's outputs on the same inputs.

Library code logs and reports progress through ``progress(message)``; it never prints.

Modules, in the order a run uses them: ``settings`` (arguments, constants), ``machine`` (CPU,
versions), ``builds`` (engines here, builds of a model dir), ``plan`` (the configurations, as
data), ``baselines`` (the KP-RPE overhead pair), ``inputs`` (scene and face crops), ``measure``
(timing, parent side), ``worker`` (the bench-process protocol), ``child`` and ``calls`` (what a
bench process runs), ``accuracy``, ``flops``, ``ratios``, ``report`` and ``render`` (output).
"""
from .accuracy import compare_to_reference
from .builds import find_builds
from .machine import machine_info
from .measure import latency_stats
from .plan import BenchConfig, ModelSpec
from .render import format_table
from .run import run_bench
from .settings import CHART_NAME, DETECTOR_SIZE, REFERENCE, REPORT_SCHEMA, STAGES, Settings

__all__ = ["run_bench", "format_table", "latency_stats", "compare_to_reference",
           "machine_info", "find_builds", "BenchConfig", "ModelSpec", "Settings", "STAGES",
           "REFERENCE", "DETECTOR_SIZE", "REPORT_SCHEMA", "CHART_NAME"]
