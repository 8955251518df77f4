"""Queries, exact search and re-ranking on the full-precision embeddings (:class:`~.rows.Rows`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError

EXACT_BLOCK = 1 << 24  # floats of one [queries, rows] score block


def as_queries(x: Any, dim: int | None = None) -> np.ndarray:
    """Faces, embeddings [D] or [Q, D] -> L2-normalised float32 [Q, D]."""
    if hasattr(x, "embedding"):
        x = [x]
    if isinstance(x, (list, tuple)) and x and hasattr(x[0], "embedding"):
        if any(f.embedding is None for f in x):
            raise InputError("a face has no embedding; run the full pipeline, not detect()")
        x = [f.embedding for f in x]
    q = np.atleast_2d(np.asarray(x, np.float32))
    if q.ndim != 2 or (dim is not None and q.shape[1] != dim):
        raise InputError(f"queries must be [N, {dim or 'D'}] embeddings, got shape {q.shape}")
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    if not np.all(np.isfinite(q)) or np.any(norms == 0):
        raise InputError("an embedding is zero or not finite")
    return q / norms


def exact_topk(q: np.ndarray, rows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` alive rows per query by a matrix product: (positions, cosines), best first."""
    out_p = np.zeros((len(q), k), np.int64)
    out_s = np.zeros((len(q), k), np.float32)
    step = max(1, EXACT_BLOCK // max(rows.n, 1))
    for i in range(0, len(q), step):
        s = q[i:i + step] @ rows.vecs[:rows.n].T
        if rows.dead:
            s[:, ~rows.alive[:rows.n]] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < rows.n else \
            np.broadcast_to(np.arange(rows.n), s.shape)
        ts = np.take_along_axis(s, top, 1)
        order = np.argsort(-ts, axis=1, kind="stable")
        out_p[i:i + step] = np.take_along_axis(top, order, 1)
        out_s[i:i + step] = np.take_along_axis(ts, order, 1)
    return out_p, out_s


def rerank(q: np.ndarray, vecs: np.ndarray, pos: np.ndarray, k: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine of each candidate position (-1: none) on the float32 embeddings; the best
    ``k`` kept, best first (-1 and -inf where there were fewer)."""
    # One small gather and matrix-vector product per query: no [Q, C, D] temporary (a
    # 256-query batch would allocate 33 MB), and BLAS rather than einsum's generic loop.
    s = np.empty(pos.shape, np.float32)
    safe = np.maximum(pos, 0)
    for i in range(len(q)):
        s[i] = vecs[safe[i]] @ q[i]
    s[pos < 0] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    s, pos = np.take_along_axis(s, order, 1), np.take_along_axis(pos, order, 1)
    pos[~np.isfinite(s)] = -1
    return pos, s
