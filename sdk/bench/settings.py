"""What one bench run is asked to do (:class:`Settings`), the constants its report names, and
:class:`Skip`, the one way a planned measurement says it cannot run here."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from kpface.errors import InputError, ModelError

STAGES = ("detect", "keypoints", "embed", "e2e")
REFERENCE = ("onnxruntime", "fp32")        # always measured: the accuracy reference
DETECTOR_SIZE = (640, 480)                 # width, height of the bench scene image
OVERHEAD_PAIR = ("vit_kprpe_small", "vit_small")
# The forms kprpe_overhead is measured in: (ratio name, runtime, fp32 build options); None is
# the exported model.onnx on ONNX Runtime. A form other than the first needs that build of the
# recognizer (the bench builds the baselines' own when they lack it).
OVERHEAD_FORMS = (("kprpe_overhead", "onnxruntime", None),
                  ("kprpe_overhead_openvino", "openvino", {}),
                  ("kprpe_overhead_onnxruntime_fused", "onnxruntime", {"attention": "fused"}))
MAX_E2E_FACES = 16                          # more faces than this: a random-weight detector
REPORT_SCHEMA = 1
CHART_NAME = "latency.png"

Progress = Callable[[str], None]


class Skip(Exception):
    """A configuration that cannot run here; the message is the reason."""


@dataclass(frozen=True)
class Settings:
    """The arguments of :func:`kpface.bench.run_bench`, checked (see :meth:`make`)."""

    models_dir: Path
    out_dir: Path
    runtimes: tuple[str, ...] | None       # None: every runtime with a build
    precisions: tuple[str, ...] | None     # None: every precision built
    batches: tuple[int, ...]               # recognizer batches; other stages run at batch 1
    repeats: int
    warmup: int
    threads: int
    baseline_dir: Path | None
    stages: tuple[str, ...]
    gemm_size: int
    gemm_repeats: int
    export_baselines: bool
    interleave: bool
    rounds: int                            # 1 without interleave
    timeout_s: float
    recognizers: tuple[Path, ...] = ()     # more recognizer dirs, measured beside recognizer/

    @classmethod
    def make(cls, models_dir: str | os.PathLike, out_dir: str | os.PathLike,
             runtimes: Sequence[str] | None, precisions: Sequence[str] | None,
             batches: Sequence[int], repeats: int, warmup: int, threads: int,
             baseline_dir: str | os.PathLike | None, stages: Sequence[str] | None,
             gemm_size: int, gemm_repeats: int, export_baselines: bool, interleave: bool,
             rounds: int, timeout_s: float, recognizers: Sequence[str | os.PathLike] = ()
             ) -> "Settings":
        """Validated settings; bad values raise :class:`ModelError` / :class:`InputError`."""
        models_dir = Path(models_dir).expanduser()
        if not models_dir.is_dir():
            raise ModelError(f"models directory {models_dir} does not exist; export models "
                             "first (`kpface demo` creates a default set)")
        if repeats < 1 or warmup < 0 or threads < 1:
            raise InputError(f"repeats must be >= 1, warmup >= 0 and threads >= 1 (got "
                             f"{repeats}, {warmup}, {threads})")
        batches = tuple(batches) or (1,)
        if any(int(b) < 1 for b in batches):
            raise InputError(f"batch sizes must be >= 1, got {list(batches)}")
        bad = [s for s in (stages or ()) if s not in STAGES]
        if bad:
            raise InputError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
        extra = tuple(Path(r).expanduser() for r in recognizers)
        for r in extra:
            if not (r / "manifest.json").is_file():
                raise ModelError(f"--recognizer {r} is not a model directory (no manifest.json); "
                                 "export one with `kpface export recognizer --out DIR`")
        return cls(models_dir=models_dir, out_dir=Path(out_dir).expanduser(),
                   runtimes=tuple(runtimes or ()) or None,
                   precisions=tuple(precisions or ()) or None,
                   batches=tuple(int(b) for b in batches), repeats=int(repeats),
                   warmup=int(warmup), threads=int(threads),
                   baseline_dir=Path(baseline_dir) if baseline_dir else None,
                   stages=tuple(stages) if stages else STAGES, gemm_size=int(gemm_size),
                   gemm_repeats=int(gemm_repeats), export_baselines=bool(export_baselines),
                   interleave=bool(interleave), rounds=int(rounds) if interleave else 1,
                   timeout_s=float(timeout_s), recognizers=extra)

    def as_report(self, scene: str | None, recognizer_inputs: str | None) -> dict:
        """The report's ``settings`` block."""
        return {"threads": self.threads, "repeats": self.repeats, "warmup": self.warmup,
                "batches": list(self.batches),
                "runtimes": list(self.runtimes) if self.runtimes else None,
                "interleave": self.interleave, "rounds": self.rounds,
                "precisions": list(self.precisions) if self.precisions else None,
                "stages": list(self.stages), "detector_input": list(DETECTOR_SIZE),
                "models_dir": str(self.models_dir),
                "baseline_dir": str(self.baseline_dir) if self.baseline_dir else None,
                "scene": scene, "recognizer_inputs": recognizer_inputs,
                "recognizers": [str(r) for r in self.recognizers]}
