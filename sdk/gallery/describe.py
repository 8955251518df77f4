"""What ``kpface gallery info`` shows about a gallery file, as a dict."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import index as idx
from .model import model_line, model_problem


def describe(gallery) -> dict[str, Any]:
    meta = gallery.store.meta()
    rows = gallery.store.count()
    cache = gallery.cache.read()
    files = [gallery.path, Path(f"{gallery.path}-wal")]
    current = bool(cache) and cache.get("generation") == meta["generation"]
    kind = idx.choose(rows) if gallery.want == "auto" else gallery.want
    return {"path": str(gallery.path), "rows": rows,
            "identities": gallery.store.labels_count(), "dim": meta.get("dim"),
            "model": model_line(meta.get("model")),
            "verdicts": model_problem(meta.get("model")) or "yes",
            "threshold": meta.get("threshold"), "threshold_source": meta.get("threshold_source"),
            "calibration": meta.get("calibration"),
            "index": {"kind": kind,
                      "cache": None if cache is None else {
                          k: cache.get(k) for k in ("kind", "params", "generation")},
                      "cache_current": current},
            "generation": meta["generation"],
            "bytes": sum(f.stat().st_size for f in files if f.exists())}
