"""Checkpoint loading: CVLface ``model.pt`` (``net.*``), Hugging Face ``model.safetensors``
(``model.net.*``) and kpface's own safetensors files (bare keys + ``arch`` metadata).

Loading is strict by default: a mismatch raises :class:`CheckpointError` naming the missing and
unexpected keys (the reference loader is non-strict and silently keeps random weights).
Pickles are read with ``weights_only=True``, so a pickle that carries code is refused.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from kpface.errors import CheckpointError
from kpface.manifest import sha256_file

log = logging.getLogger(__name__)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (tensors, metadata) from a .safetensors file or a torch pickle of tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a "
                              "model.pt or model.safetensors file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" or (len(head) == 8 and head[:2] != b"PK" and head[0] != 0x80):
        return _read_safetensors(path)
    try:
        # Training checkpoints often keep their argparse options beside the weights; a
        # Namespace is a plain attribute bag, so weights_only loading may rebuild it.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} was refused: it is not a plain dict of tensors "
                              f"(weights_only load failed: {first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} could not be read as a torch checkpoint "
                              f"({type(e).__name__}: {str(e)[:160]}); is it truncated?") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    obj = _nested_state_dicts(obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return dict(obj), {}


def _nested_state_dicts(obj):
    """A training checkpoint ({"teacher": {...}, "student": {...}, "epoch": 3, ...}) -> its
    tensors, those of nested dicts of tensors under their entry's name ("teacher.<key>"); other
    entries (counters, options, optimizer state) are left out. An architecture's remap decides
    what to do with the prefixes. Anything else is returned unchanged."""
    if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    nested = {name: sd for name, sd in obj.items() if isinstance(sd, dict) and sd
              and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())}
    if not nested:
        return obj
    out = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    left_out = [str(k) for k, v in obj.items() if k not in nested and k not in out]
    log.info("checkpoint holds several entries: kept the tensor dicts %s, left out %s",
             ", ".join(nested), ", ".join(left_out) or "nothing")
    out.update({f"{name}.{k}": v for name, sd in nested.items() for k, v in sd.items()})
    return out


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError("reading .safetensors needs the safetensors package: "
                              "pip install 'kpface[export]'") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file "
                              f"({type(e).__name__}: {str(e)[:160]})") from None
    return tensors, meta


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights(model: nn.Module, path: str | os.PathLike, remap=None,
                 strict: bool = True, arch: str | None = None) -> dict:
    """Load ``path`` into ``model``; returns a description for the manifest."""
    # A module may read its own foreign format (dlib_resnet_v1: dlib's .dat); None = not mine.
    foreign = getattr(model, "read_foreign_checkpoint", None)
    got = foreign(path) if foreign is not None else None
    state, meta = got if got is not None else read_state_dict(path)
    if arch and meta.get("arch") and meta["arch"] != arch:
        raise CheckpointError(f"{path} holds weights for {meta['arch']!r}, not {arch!r}; "
                              f"pass --arch {meta['arch']}")
    if remap is not None:
        state = remap(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        raise CheckpointError(f"{path} does not match {arch or type(model).__name__}: "
                              + "; ".join(parts))
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
           for k in own if k in state and state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path} has tensors of the wrong shape for "
                              f"{arch or type(model).__name__}: {_describe(bad, 4)}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict)
    log.info("loaded %d tensors from %s", len(state), path)
    return {"path": str(path), "sha256": sha256_file(path), "tensors": len(state),
            "missing": missing, "unexpected": unexpected}


def save_weights(model: nn.Module, path: str | os.PathLike, arch: str) -> None:
    """kpface's own format: safetensors with bare module keys and ``arch`` metadata."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"arch": arch, "format": "kpface"})
    os.replace(tmp, path)
