"""What a bench run measures, as data: one :class:`BenchConfig` per stage x model x runtime x
precision x batch, in run order, plus what was skipped and why.

The models are rows of a table (:data:`DETECTOR`, :data:`KEYPOINTS`, :data:`RECOGNIZERS`): a
folder of the models directory, the stage its rows belong to, how a bench process calls it
(:data:`kpface.bench.calls.KINDS`) and which inputs feed it (:mod:`kpface.bench.inputs`).
Another recognizer is one more :class:`ModelSpec` in :data:`RECOGNIZERS`; the recognizers of a
run beside ``recognizer/`` come from :func:`extra_recognizers`: every other folder of the models
directory that holds a recognizer (``kpface demo`` puts the KP-RPE ViT in ``vit_kprpe_small/``
when ``recognizer/`` is dlib_resnet_v1), ``models_dir/recognizers/*`` and ``--recognizer DIR``.
The KP-RPE overhead pair is taken from the first recognizer that is a KP-RPE ViT.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from kpface.errors import KpfaceError

from . import machine
from .baselines import overhead_forms, overhead_pair
from .builds import (Entry, accuracy_from_build, dir_bytes, find_builds, manifest_or_none,
                     model_bytes, runnable)
from .inputs import BenchInputs
from .settings import REFERENCE, Settings, Skip


@dataclass(frozen=True)
class ModelSpec:
    """One model folder of the models directory and how the bench measures it."""

    folder: str           # under models_dir; also the model's name in the report
    task: str             # the manifest's task
    stage: str            # the stage (kpface.bench.STAGES) its rows belong to
    kind: str             # how a bench process calls it (kpface.bench.calls.KINDS)
    inputs: str           # "scene" (one-face scene) or "faces" (aligned crops + keypoints)
    batched: bool = False  # measured at every recognizer batch, else at batch 1
    optional: str = ""    # why a missing folder is fine; "" means it is needed
    pipeline: bool = True  # part of the end-to-end pipeline (looked at for stage e2e too)
    path: str | None = None  # the model directory when it is not models_dir/folder


DETECTOR = ModelSpec("detector", "detector", "detect", "detector", "scene")
KEYPOINTS = ModelSpec("keypoints", "keypoints", "keypoints", "keypoints", "scene",
                      optional="the detector's landmarks are used")
RECOGNIZER = ModelSpec("recognizer", "recognizer", "embed", "session", "faces", batched=True)
# The first is the pipeline's recognizer (reference of the ratios); others get plain rows.
RECOGNIZERS: tuple[ModelSpec, ...] = (RECOGNIZER,)
NOT_MODELS = ("baselines", "builds", "recognizers")  # folders that hold no model itself


def other_recognizers(models_dir: Path) -> tuple[ModelSpec, ...]:
    """A ModelSpec per folder of ``models_dir`` (beside the table's) holding a recognizer."""
    known = {spec.folder for spec in (DETECTOR, KEYPOINTS) + RECOGNIZERS}
    out = []
    for d in sorted(models_dir.iterdir()) if models_dir.is_dir() else []:
        if d.name in known or d.name in NOT_MODELS or not d.is_dir():
            continue
        try:
            man = manifest_or_none(d)
        except KpfaceError:
            continue
        if man is not None and man.get("task") == "recognizer":
            out.append(ModelSpec(d.name, "recognizer", "embed", "session", "faces",
                                 batched=True, optional="another recognizer", pipeline=False))
    return tuple(out)


EXTRA_DIR = "recognizers"  # models_dir/recognizers/<name>/: more recognizers to measure


def extra_recognizers(s: Settings) -> tuple[ModelSpec, ...]:
    """The recognizers measured beside ``recognizer/``: the other recognizer folders of the
    models directory (:func:`other_recognizers`, label: the folder), every model directory
    under ``models_dir/recognizers/`` (label ``recognizers/<name>``), then ``s.recognizers``
    (label: the manifest's arch, made unique), each once and never ``recognizer/`` itself."""
    found: list[tuple[str, Path]] = [(spec.folder, s.models_dir / spec.folder)
                                     for spec in other_recognizers(s.models_dir)]
    sub = s.models_dir / EXTRA_DIR
    if sub.is_dir():
        found += [(f"{EXTRA_DIR}/{d.name}", d) for d in sorted(sub.iterdir())
                  if manifest_or_none(d) is not None]
    for d in s.recognizers:
        arch = str((manifest_or_none(d, "recognizer") or {}).get("arch") or d.name)
        label, i = arch, 2
        while label in {lb for lb, _ in found} | {RECOGNIZER.folder}:
            label, i = f"{arch}-{i}", i + 1
        found.append((label, d))
    seen = {(s.models_dir / RECOGNIZER.folder).resolve()}
    specs = []
    for label, d in found:
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        specs.append(ModelSpec(label, "recognizer", "embed", "session", "faces", batched=True,
                               pipeline=False, path=str(d)))
    return tuple(specs)


@dataclass(frozen=True)
class BenchConfig:
    """One measurement: a model at one runtime, precision and batch."""

    id: str
    stage: str
    model: str                      # report label: a ModelSpec folder or baselines/<arch>
    arch: str | None
    model_dir: str | None
    runtime: str
    precision: str
    batch: int
    kind: str                       # kpface.bench.calls.KINDS
    threads: int
    repeats: int
    warmup: int
    size_bytes: int | None
    build_dir: str | None
    build_accuracy: dict[str, Any] | None
    inputs: str = ""                # key of kpface.bench.inputs.BenchInputs
    models_dir: str | None = None   # e2e: the models directory of the pipeline
    detector_precision: str | None = None  # e2e: the detector's precision
    variant: str = ""               # the build's options (kpface.bench.builds.variant_of)

    def job(self) -> dict[str, Any]:
        """What a bench process needs (a plain dict: see kpface.bench.worker)."""
        return asdict(self)

    def row(self) -> dict[str, Any]:
        """The start of this configuration's row in the report."""
        row = {k: v for k, v in asdict(self).items()
               if k not in ("kind", "build_accuracy", "inputs", "models_dir",
                            "detector_precision")}
        if self.stage == "e2e":
            row.update(models_dir=self.models_dir, detector_precision=self.detector_precision)
        return row


@dataclass
class Found:
    """A model folder that is there, and which of its (runtime, precision) can run."""

    spec: ModelSpec
    dir: Path
    manifest: dict
    entries: list[Entry]
    skipped: list[dict[str, Any]]


@dataclass
class Plan:
    configs: list[BenchConfig] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    overhead: dict[str, Any] | None = None   # the kprpe_overhead pair (kpface.bench.baselines)
    overhead_skip: str | None = None         # why there is none
    # The pair's other forms (OpenVINO, fused ONNX Runtime): kpface.bench.baselines.
    overhead_forms: dict[str, Any] = field(default_factory=dict)
    torch: tuple[bool, str] | None = None    # can torch eager run here (embed stage only)
    scene: str | None = None                 # input keys (kpface.bench.inputs)
    faces: str | None = None
    recognizers: list[str] = field(default_factory=list)  # labels of extra recognizers


class _Planner:
    def __init__(self, s: Settings, engines: dict, inputs: BenchInputs,
                 say: Callable[[str], None], plan: Plan):
        self.s, self.engines, self.inputs, self.say, self.plan = s, engines, inputs, say, plan
        self.found: dict[str, Found] = {}

    def skip(self, stage: str, reason: str, runtime: str | None = None,
             precision: str | None = None) -> None:
        self.plan.skipped.append({"stage": stage, "runtime": runtime, "precision": precision,
                                  "reason": reason})

    def add_model(self, label: str, model_dir: Path, manifest: dict) -> None:
        from ..weights import describe, is_partial, is_random
        self.plan.models[label] = {"dir": str(model_dir), "arch": manifest.get("arch"),
                                   "task": manifest.get("task"),
                                   "random_weights": is_random(manifest),
                                   "partial_weights": is_partial(manifest),
                                   "weights": describe(manifest),
                                   "bytes": model_bytes(model_dir, manifest),
                                   "builds": [b["dir"].name for b in find_builds(model_dir)]}

    def wanted(self, spec: ModelSpec) -> bool:
        return spec.stage in self.s.stages

    def look(self, spec: ModelSpec) -> Found | None:
        """The model folder of ``spec`` if the run needs it and it is there."""
        if not (self.wanted(spec) or (spec.pipeline and "e2e" in self.s.stages)):
            return None
        root = self.s.models_dir
        d = Path(spec.path) if spec.path else root / spec.folder
        man = manifest_or_none(d, spec.task)
        if man is None:
            if not spec.optional:
                self.skip(spec.stage, f"no {spec.folder}/ model in {root}; export one with "
                                      f"`kpface export {spec.folder} --out {d}`")
            elif self.wanted(spec):
                self.skip(spec.stage, f"no {spec.folder}/ model in {root} (optional: "
                                      f"{spec.optional})")
            return None
        self.add_model(spec.folder, d, man)
        entries, skipped = runnable(d, self.engines, self.s.runtimes, self.s.precisions,
                                    spec.stage)
        self.found[spec.folder] = f = Found(spec, d, man, entries, skipped)
        return f

    def config(self, stage: str, label: str, model_dir: Path | None, manifest: dict | None,
               entry: Entry, batch: int, kind: str, inputs: str, **extra) -> BenchConfig:
        rt, prec, build = entry
        if build is not None:
            size = dir_bytes(build["dir"])
        elif manifest is not None and model_dir is not None and rt != "torch":
            size = model_bytes(model_dir, manifest)
        else:
            size = None
        variant = entry.variant
        return BenchConfig(
            id=f"{stage}/{label}/{rt}-{prec}{f'[{variant}]' if variant else ''}/b{batch}",
            stage=stage, model=label, variant=variant,
            arch=(manifest or {}).get("arch"), model_dir=str(model_dir) if model_dir else None,
            runtime=rt, precision=prec, batch=batch, kind=kind, threads=self.s.threads,
            repeats=self.s.repeats, warmup=self.s.warmup, size_bytes=size,
            build_dir=str(build["dir"]) if build else None,
            build_accuracy=accuracy_from_build(build["info"]) if build else None,
            inputs=inputs, **extra)

    def input_key(self, spec: ModelSpec, manifest: dict) -> str:
        return self.inputs.add_scene() if spec.inputs == "scene" else \
            self.inputs.add_faces(manifest)

    def rows(self, f: Found, entries: list[Entry]) -> None:
        """Rows of one model: every entry at every batch the model is measured at."""
        key = self.input_key(f.spec, f.manifest)
        for entry in entries:
            for b in (self.s.batches if f.spec.batched else (1,)):
                self.plan.configs.append(self.config(f.spec.stage, f.spec.folder, f.dir,
                                                     f.manifest, entry, b, f.spec.kind, key))

    # -- stages ----------------------------------------------------------------------------
    def single(self, spec: ModelSpec) -> None:
        """A stage of one model: its rows, after its skipped entries."""
        f = self.look(spec)
        if f is not None and self.wanted(spec):
            self.plan.skipped += f.skipped
            self.rows(f, f.entries)

    def embed(self) -> None:
        """The recognizer: the reference rows with the kprpe_overhead baselines beside them,
        then its builds, then torch eager; then any further recognizers."""
        s, plan = self.s, self.plan
        rec = self.look(RECOGNIZER)
        others = RECOGNIZERS[1:] + extra_recognizers(s)
        found = [f for f in [rec] + [self.look(spec) for spec in others] if f is not None]
        if rec is not None:
            plan.faces = self.inputs.add_faces(rec.manifest)
        # The KP-RPE overhead is measured on the first recognizer that is a KP-RPE ViT.
        kp = next((f for f in found if f.manifest.get("config", {}).get("kprpe")), rec)
        if self.wanted(RECOGNIZER):
            try:
                plan.overhead = overhead_pair(s, kp.dir if kp else None,
                                              kp.manifest if kp else None, self.say,
                                              plan.notes, label=kp.spec.folder if kp else
                                              RECOGNIZER.folder)
                for label, d, man in plan.overhead["models"]:
                    if label not in plan.models:
                        self.add_model(label, d, man)
                plan.overhead_forms = overhead_forms(s, plan.overhead, self.engines, self.say,
                                                     plan.notes)
            except (Skip, KpfaceError) as e:
                self.skip("embed", f"kprpe_overhead: {e}", *REFERENCE)
                plan.overhead_skip = str(e)
        if rec is not None and self.wanted(RECOGNIZER):
            plan.skipped += rec.skipped
            ref = rec.entries[0]
            folders = {f.spec.folder for f in found}
            extra = [m for m in (plan.overhead or {}).get("models", []) if m[0] not in folders]
            for b in s.batches:
                plan.configs.append(self.config("embed", "recognizer", rec.dir, rec.manifest,
                                                ref, b, "session", plan.faces))
                for label, d, man in extra:
                    plan.configs.append(self.config("embed", label, d, man, ref, b, "session",
                                                    self.inputs.add_faces(man)))
                    for form in plan.overhead_forms.values():  # the baselines' other forms
                        entry = form.get("entries", {}).get(label)
                        if entry is not None:
                            plan.configs.append(self.config(
                                "embed", label, d, man, entry, b, "session",
                                self.inputs.add_faces(man)))
            self.rows(rec, rec.entries[1:])
            plan.torch = machine.torch_available()
            if plan.torch[0]:
                for b in s.batches:
                    plan.configs.append(self.config("embed", "recognizer", rec.dir,
                                                    rec.manifest, Entry("torch", "fp32"), b,
                                                    "torch", plan.faces))
        for spec in others:
            self.single(spec)
            if spec.folder in self.found:
                plan.recognizers.append(spec.folder)

    def e2e(self) -> None:
        """FacePipeline on the scene, per recognizer build, with the detector (and keypoint
        model) at the same runtime: same precision if built, else fp32."""
        det, kp = self.found.get(DETECTOR.folder), self.found.get(KEYPOINTS.folder)
        rec = self.found.get(RECOGNIZER.folder)
        if det is None or rec is None:
            self.skip("e2e", "needs detector/ and recognizer/ models")
            return
        det_keys = {(e.runtime, e.precision) for e in det.entries}
        kp_keys = {(e.runtime, e.precision) for e in kp.entries} if kp is not None else None
        built = {(e.runtime, e.precision) for e in rec.entries if e.build is not None}
        for entry in rec.entries:
            rt, p = entry.runtime, entry.precision
            if entry.build is None and (rt, p) in built:
                continue  # the pipeline opens that build, not model.onnx: its row is the build's
            dp = p if (rt, p) in det_keys else ("fp32" if (rt, "fp32") in det_keys else None)
            if dp is not None and kp_keys is not None and (rt, dp) not in kp_keys:
                dp = None
            if dp is None:
                self.skip("e2e", f"detector/keypoints have no {rt} build", rt, p)
                continue
            cfg = self.config("e2e", "pipeline", rec.dir, rec.manifest, entry, 1, "pipeline",
                              self.inputs.add_scene(), models_dir=str(self.s.models_dir),
                              detector_precision=dp)
            sizes = [cfg.size_bytes or 0]
            for f in (det, kp):
                for e in (f.entries if f is not None else []):
                    if (e.runtime, e.precision) == (rt, dp):
                        sizes.append(dir_bytes(e.build["dir"]) if e.build
                                     else self.plan.models[f.spec.folder]["bytes"])
            self.plan.configs.append(replace(cfg, size_bytes=sum(sizes)))


def make_plan(s: Settings, engines: dict, inputs: BenchInputs, say: Callable[[str], None],
              skipped: list[dict[str, Any]] | None = None) -> Plan:
    """Every configuration of the run in order, after ``skipped`` (engines that cannot run)."""
    plan = Plan(skipped=list(skipped or []))
    p = _Planner(s, engines, inputs, say, plan)
    plan.scene = inputs.add_scene()
    p.single(DETECTOR)
    p.single(KEYPOINTS)
    p.embed()
    if "e2e" in s.stages:
        p.e2e()
    return plan
