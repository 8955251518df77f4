"""Which engines run here, which builds a model directory holds, and which of them the bench
can measure on this machine (with the reason for every one it cannot)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from kpface.manifest import BUILD_MANIFEST_NAME, MANIFEST_NAME, load_manifest

from .settings import REFERENCE


class Entry(NamedTuple):
    """One (runtime, precision) of a model that can be measured; ``build`` is a
    :func:`find_builds` item, or None for the exported ``model.onnx`` (and torch eager)."""

    runtime: str
    precision: str
    build: dict[str, Any] | None = None

    @property
    def variant(self) -> str:
        """The build options it was made with ("" for none, or for model.onnx itself)."""
        return variant_of(self.build["info"]) if self.build is not None else ""


def variant_of(info: dict[str, Any]) -> str:
    """``key=value`` of a build.json's build options, joined by ``+`` ("" without options)."""
    opts = info.get("options") or {}
    return "+".join(f"{k}={v}" for k, v in sorted(opts.items())) if isinstance(opts, dict) \
        else ""


def engine_table(only: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{runtime: {available, reason, module, device_key}}`` for every engine of
    :data:`kpface.runtimes.engines.ENGINES`.

    With ``only``, engines outside it (and outside the reference, ONNX Runtime) are listed
    without asking their adapters, which may import heavy libraries.
    """
    from kpface.runtimes.engines import ENGINES
    out: dict[str, dict[str, Any]] = {}
    for e in ENGINES:
        if only is not None and e.name not in only and e.name != REFERENCE[0]:
            out[e.name] = {"available": None, "reason": "not requested", "module": e.module,
                           "device_key": None}
            continue
        try:
            ok, why = e.available()
        except Exception as exc:  # an adapter that fails to answer must not stop the bench
            ok, why = False, f"{e.name} availability check failed: {type(exc).__name__}: {exc}"
        key = None
        if ok:
            try:
                key = e.load_adapter().device_key()
            except Exception:
                key = None
        out[e.name] = {"available": bool(ok), "reason": str(why), "module": e.module,
                       "device_key": key}
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def find_builds(model_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Builds under ``model_dir/builds/<runtime>-<precision>-<device key>/``."""
    root = Path(model_dir) / "builds"
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        info = _read_json(d / BUILD_MANIFEST_NAME)
        parts = d.name.split("-", 2)
        runtime = info.get("runtime") or parts[0]
        precision = info.get("precision") or (parts[1] if len(parts) > 1 else "?")
        device_key = info.get("device_key") or (parts[2] if len(parts) > 2 else None)
        out.append({"dir": d, "runtime": str(runtime), "precision": str(precision),
                    "device_key": device_key, "info": info,
                    "has_build_json": (d / BUILD_MANIFEST_NAME).is_file()})
    return out


def dir_bytes(path: Path, exclude: Iterable[str] = (BUILD_MANIFEST_NAME,)) -> int:
    skip = set(exclude)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name not in skip)


def model_bytes(model_dir: Path, manifest: dict) -> int:
    files = manifest.get("files") or {}
    names = [n for n in files if n != MANIFEST_NAME] or \
        [g["file"] for g in manifest.get("graphs", {}).values()]
    return sum((model_dir / n).stat().st_size for n in names if (model_dir / n).is_file())


def accuracy_from_build(info: dict) -> dict[str, Any] | None:
    acc = info.get("accuracy")
    if isinstance(acc, dict) and acc:
        return {"source": "build.json", **acc}
    return None


def manifest_or_none(model_dir: Path, task: str | None = None) -> dict | None:
    if not (model_dir / MANIFEST_NAME).is_file():
        return None
    return load_manifest(model_dir, task=task)


def runnable(model_dir: Path, engines: dict[str, dict], runtimes: Sequence[str] | None,
             precisions: Sequence[str] | None, stage: str
             ) -> tuple[list[Entry], list[dict[str, Any]]]:
    """(entries that can be measured, skipped entries with reasons) for one model directory.

    ONNX Runtime fp32 (the exported model.onnx) is always first: it is the reference.
    """
    entries = [Entry(*REFERENCE)]
    skipped: list[dict[str, Any]] = []

    def skip(runtime: str, precision: str | None, reason: str) -> None:
        skipped.append({"stage": stage, "runtime": runtime, "precision": precision,
                        "reason": reason})

    wanted_rt = list(runtimes) if runtimes else None
    seen = {(*REFERENCE, "")}
    for b in find_builds(model_dir):
        key = (b["runtime"], b["precision"])
        if wanted_rt is not None and b["runtime"] not in wanted_rt:
            continue
        if precisions and b["precision"] not in precisions:
            continue
        if key == REFERENCE and not variant_of(b["info"]):
            continue  # a copy of model.onnx: the reference row measures it
        eng = engines.get(b["runtime"])
        where = f"{model_dir.name}/builds/{b['dir'].name}"
        if eng is None:
            skip(*key, f"{where}: unknown runtime {b['runtime']!r}")
        elif not eng["available"]:
            skip(*key, f"{where}: {eng['reason']}")
        elif eng.get("device_key") and b["device_key"] and b["device_key"] != eng["device_key"]:
            skip(*key, f"{where} was built for device {b['device_key']!r}; this machine is "
                       f"{eng['device_key']!r}")
        elif (*key, variant_of(b["info"])) in seen:
            skip(*key, f"{where}: another {key[0]} {key[1]} build was measured")
        else:
            seen.add((*key, variant_of(b["info"])))
            entries.append(Entry(b["runtime"], b["precision"], b))
    # Explicitly requested runtimes / precisions that have nothing to run.
    for rt in wanted_rt or []:
        if rt not in engines:
            skip(rt, None, f"unknown runtime {rt!r} (known: {', '.join(engines)})")
            continue
        if not engines[rt]["available"]:
            continue  # reported once for all stages by run_bench
        for p in (precisions or []):
            if not any(k[:2] == (rt, p) for k in seen) and not any(
                    s["runtime"] == rt and s["precision"] == p for s in skipped):
                if p == "int8" and stage in ("detect", "keypoints"):
                    reason = "int8 builds are made for the recognizer only"
                else:
                    reason = (f"no {rt} {p} build in {model_dir}/builds; make one with "
                              f"`kpface build {model_dir} --runtime {rt} --precision {p}`")
                skip(rt, p, reason)
        if not precisions and not any(e.runtime == rt for e in entries) and rt != REFERENCE[0]:
            skip(rt, None, f"no {rt} build in {model_dir}/builds; make one with "
                           f"`kpface build {model_dir} --runtime {rt}`")
    return entries, skipped
