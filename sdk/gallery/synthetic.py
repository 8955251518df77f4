"""Synthetic face embeddings for the gallery benchmark and tests (seeded, 512-d).

Each identity is a cluster: a centre ``c`` and samples ``normalize(c + s * n / sqrt(d))`` with
isotropic noise ``n``; ``s`` per identity makes the cosine between two samples of it (mated
cosine, about ``1 / (1 + s^2)``) uniform in [0.5, 0.7]. Centres are drawn from a Gaussian with
a power-law spectrum (variance of the j-th of ``d`` random orthogonal directions proportional
to ``j ** -alpha``) and normalised: ``alpha = 1`` gives impostor cosines of mean 0 and 99th
percentile about 0.4, as face embeddings have; ``alpha = 0`` (isotropic centres) is the worst
case for any index that partitions space (README, "Galleries").

Everything is generated in chunks from ``(seed, chunk)`` so a million rows never need to be
held twice, and the same seed always gives the same rows.
"""
from __future__ import annotations

import numpy as np

DIM = 512
CHUNK = 65_536


class Synthetic:
    def __init__(self, dim: int = DIM, alpha: float = 1.0, seed: int = 0,
                 mated: tuple[float, float] = (0.5, 0.7)):
        self.dim, self.alpha, self.seed, self.mated = dim, alpha, seed, mated
        rng = np.random.default_rng([seed, 0])
        lam = np.arange(1, dim + 1, dtype=np.float64) ** (-alpha)
        self.scale = np.sqrt(lam / lam.sum() * dim).astype(np.float32)
        self.rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)

    def _identities(self, first: int, count: int, stream: int):
        """Centres and noise scales of identities first .. first + count - 1 of a stream
        (stream 1: enrolled, stream 2: never enrolled)."""
        chunks = []
        for c in range(first // CHUNK, (first + count - 1) // CHUNK + 1):
            rng = np.random.default_rng([self.seed, stream, c])
            z = rng.standard_normal((CHUNK, self.dim), dtype=np.float32)
            lo, hi = self.mated
            m = rng.uniform(lo, hi, CHUNK).astype(np.float32)
            chunks.append((c * CHUNK, z, m))
        z = np.concatenate([ch[1] for ch in chunks])
        m = np.concatenate([ch[2] for ch in chunks])
        off = first - chunks[0][0]
        z, m = z[off:off + count], m[off:off + count]
        centres = (z * self.scale) @ self.rotation.T
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        return centres, np.sqrt(1.0 / m - 1.0)

    def _sample(self, centres, s, rng) -> np.ndarray:
        noise = rng.standard_normal(centres.shape, dtype=np.float32) / np.sqrt(self.dim)
        x = centres + s[:, None].astype(np.float32) * noise
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def gallery(self, first: int, count: int) -> np.ndarray:
        """Enrolled samples of identities first .. first + count - 1 (one row each)."""
        c, s = self._identities(first, count, 1)
        return self._sample(c, s, np.random.default_rng([self.seed, 3, first, count]))

    def mated_queries(self, identities: np.ndarray) -> np.ndarray:
        """Fresh (held-out) samples of enrolled identities (one per entry, in order)."""
        identities = np.asarray(identities, np.int64)
        out = np.zeros((len(identities), self.dim), np.float32)
        for c in np.unique(identities // CHUNK):
            sel = np.flatnonzero(identities // CHUNK == c)
            centres, s = self._identities(int(c) * CHUNK, CHUNK, 1)
            local = identities[sel] - int(c) * CHUNK
            rng = np.random.default_rng([self.seed, 4, int(c)])
            out[sel] = self._sample(centres[local], s[local], rng)
        return out

    def non_mated_queries(self, count: int) -> np.ndarray:
        """Samples of identities that are never enrolled."""
        c, s = self._identities(0, count, 2)
        return self._sample(c, s, np.random.default_rng([self.seed, 5, count]))


def exact_top1(queries: np.ndarray, gallery_chunks) -> tuple[np.ndarray, np.ndarray]:
    """The obvious computation: best row (global index) and cosine of each query over every
    gallery chunk, by matrix product."""
    best_s = np.full(len(queries), -np.inf, np.float32)
    best_i = np.full(len(queries), -1, np.int64)
    offset = 0
    for chunk in gallery_chunks:
        s = queries @ chunk.T
        i = s.argmax(1)
        v = s[np.arange(len(queries)), i]
        better = v > best_s
        best_s[better], best_i[better] = v[better], i[better] + offset
        offset += len(chunk)
    return best_i, best_s
