"""The model pair behind the ``kprpe_overhead`` ratio: a KP-RPE ViT and the same ViT without
KP-RPE, taken from the models directory, ``baseline_dir`` or ``models_dir/baselines/`` (exported
there with random weights when missing: latency does not depend on the weight values)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kpface.manifest import load_manifest

from .builds import Entry, find_builds, manifest_or_none, variant_of
from .machine import export_available
from .settings import OVERHEAD_FORMS, OVERHEAD_PAIR, Settings, Skip
from .worker import spawn

Model = tuple[str, Path, dict]  # (report label, model dir, manifest)


def same_vit(a: dict, b: dict) -> bool:
    """Do two ViT manifests differ in nothing but KP-RPE?"""
    ca, cb = dict(a.get("config", {})), dict(b.get("config", {}))
    ca.pop("kprpe", None)
    cb.pop("kprpe", None)
    return bool(ca) and ca == cb


def _ensure(s: Settings, arch: str, d: Path, say: Callable[[str], None],
            notes: list[str]) -> dict:
    """The manifest of ``d``, exported (random weights) when it is missing and allowed."""
    man = manifest_or_none(d, "recognizer")
    if man is not None:
        return man
    if not s.export_baselines:
        raise Skip(f"{d} does not exist and exporting baselines is turned off")
    ok, why = export_available()
    if not ok:
        raise Skip(f"{d} does not exist and it cannot be exported here: {why}")
    say(f"bench: exporting {arch} to {d} (random weights: latency does not depend on "
        "the weight values)")
    status, res = spawn({"kind": "export", "arch": arch, "out": str(d), "threads": s.threads},
                        timeout_s=s.timeout_s)
    if status != "ok":
        raise Skip(f"exporting {arch} to {d} failed: {res}")
    notes.append(f"{d} was exported by this run with random weights (latency only).")
    return load_manifest(d, task="recognizer")


def overhead_pair(s: Settings, rec_dir: Path | None, rec_man: dict | None,
                  say: Callable[[str], None], notes: list[str], label: str = "recognizer"
                  ) -> dict[str, Any]:
    """``{"models": [kprpe, plain], "kprpe": label, "plain": label}`` (each model a
    ``(label, dir, manifest)``); raises :class:`Skip` or a ``KpfaceError`` saying why there is
    no pair. The models directory's recognizer (``rec_dir``, reported as ``label``) is used for
    either side when it fits."""
    root = s.models_dir / "baselines"
    if s.baseline_dir is not None:
        plain_dir = s.baseline_dir
        plain_man = manifest_or_none(plain_dir, "recognizer")
        if plain_man is None:
            raise Skip(f"baseline_dir {plain_dir} holds no recognizer model")
        kprpe_arch = str(plain_man.get("arch", "")).replace("vit_", "vit_kprpe_", 1)
    else:
        kprpe_arch, plain_arch = OVERHEAD_PAIR
        if rec_man is not None and rec_man.get("arch") == plain_arch:
            plain_dir, plain_man = rec_dir, rec_man  # the recognizer is the baseline
        else:
            plain_dir = root / plain_arch
            plain_man = _ensure(s, plain_arch, plain_dir, say, notes)
    if plain_man.get("config", {}).get("kprpe"):
        raise Skip(f"{plain_dir} is a KP-RPE model ({plain_man.get('arch')}), not a plain "
                   "ViT baseline")
    kprpe: Model
    if rec_man is not None and rec_man.get("config", {}).get("kprpe") and \
            same_vit(rec_man, plain_man):
        kprpe = (label, rec_dir, rec_man)
    else:
        d = root / kprpe_arch
        man = _ensure(s, kprpe_arch, d, say, notes)
        if not same_vit(man, plain_man):
            raise Skip(f"{d} and {plain_dir} differ in more than KP-RPE")
        kprpe = (f"baselines/{kprpe_arch}", d, man)
    plain_label = label if plain_dir == rec_dir else f"baselines/{plain_man.get('arch')}"
    plain: Model = (plain_label, plain_dir, plain_man)
    return {"models": [kprpe, plain], "kprpe": kprpe[0], "plain": plain_label}



def fp32_build(model_dir: Path, runtime: str, options: dict) -> Entry | None:
    """The fp32 ``runtime`` build of ``model_dir`` made with exactly ``options``, if any."""
    want = variant_of({"options": options})
    for b in find_builds(model_dir):
        if b["runtime"] == runtime and b["precision"] == "fp32" and variant_of(b["info"]) == want \
                and b["has_build_json"]:
            return Entry(runtime, "fp32", b)
    return None


def overhead_forms(s: Settings, pair: dict[str, Any], engines: dict[str, dict],
                   say: Callable[[str], None], notes: list[str]) -> dict[str, Any]:
    """The forms of :data:`OVERHEAD_FORMS` after the first: ``{name: {"runtime", "variant",
    "entries": {label: Entry}}}`` or ``{name: {"skip": reason}}``.

    The recognizer's own build must exist (it is the user's); a bench-owned baseline
    (``baselines/...``) lacking it gets it built here, in a fresh process, when
    ``export_baselines`` allows.
    """
    out: dict[str, Any] = {}
    for name, runtime, options in OVERHEAD_FORMS[1:]:
        eng = engines.get(runtime) or {}
        if s.runtimes is not None and runtime not in s.runtimes:
            out[name] = {"skip": f"{runtime} was not asked for"}
            continue
        if not eng.get("available"):
            out[name] = {"skip": eng.get("reason") or f"{runtime} cannot run here"}
            continue
        entries, missing = {}, None
        for label, d, _ in pair["models"]:
            entry = fp32_build(d, runtime, options)
            if entry is None and label.startswith("baselines/"):
                if not s.export_baselines:
                    missing = f"{d} has no {runtime} fp32 build and building baselines is off"
                    break
                opts = ", ".join(f"{k}={v}" for k, v in options.items())
                say(f"bench: building {d.name} for {runtime} fp32"
                    + (f" ({opts})" if opts else ""))
                status, res = spawn({"kind": "build", "model_dir": str(d), "runtime": runtime,
                                     "precision": "fp32", "options": options,
                                     "threads": s.threads}, timeout_s=s.timeout_s)
                if status != "ok":
                    missing = f"building {d} for {runtime} fp32 failed: {res}"
                    break
                notes.append(f"{d} got a {runtime} fp32 build from this run"
                             + (f" ({opts})" if opts else "") + ".")
                entry = fp32_build(d, runtime, options)
            if entry is None:
                opts = "".join(f" --option {k}={v}" for k, v in options.items())
                missing = (f"{d} has no {runtime} fp32 build" + (f" with {opts.strip()}" if opts
                                                                else "")
                           + f"; make one with `kpface build {d} --runtime {runtime} "
                             f"--precision fp32{opts}`")
                break
            entries[label] = entry
        out[name] = {"skip": missing} if missing else {
            "runtime": runtime, "variant": variant_of({"options": options}), "entries": entries}
    return out
