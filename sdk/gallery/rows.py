"""The gallery's rows in memory: full-precision embeddings for exact search and re-ranking.

Rows are kept in rowid order (new rows have larger rowids, so appending keeps the order) in
buffers that grow by doubling, so adding a chunk costs its own size, not the gallery's. A
removed row stays as a dead slot, its embedding overwritten with zeros, until the gallery is
reloaded (``compact``).
"""
from __future__ import annotations

import numpy as np


class Rows:
    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self.rowids = np.zeros(0, np.int64)
        self.vecs = np.zeros((0, dim), np.float32)
        self.alive = np.zeros(0, bool)
        self.ids: list[str] = []
        self.labels: list[str] = []
        self.dead = 0

    def __len__(self) -> int:
        return self.n - self.dead

    @property
    def max_rowid(self) -> int:
        return int(self.rowids[self.n - 1]) if self.n else 0

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` rows without a copy (a load knows how many are coming)."""
        self._grow(rows, exact=True)

    def _grow(self, need: int, exact: bool = False) -> None:
        cap = len(self.rowids)
        if need <= cap:
            return
        cap = need if exact else max(need, 2 * cap, 1024)
        for name in ("rowids", "alive"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[:self.n] = old[:self.n]
            setattr(self, name, new)
        vecs = np.zeros((cap, self.dim), np.float32)
        vecs[:self.n] = self.vecs[:self.n]
        self.vecs = vecs

    def append(self, rowids: np.ndarray, ids: list[str], labels: list[str],
               vecs: np.ndarray) -> None:
        m = len(rowids)
        if not m:
            return
        if self.n and int(rowids[0]) <= self.max_rowid:
            raise ValueError("rows must be appended in rowid order")
        self._grow(self.n + m)
        self.rowids[self.n:self.n + m] = rowids
        self.vecs[self.n:self.n + m] = vecs
        self.alive[self.n:self.n + m] = True
        self.ids.extend(ids)
        self.labels.extend(labels)
        self.n += m

    def positions(self, rowids: np.ndarray) -> np.ndarray:
        """Position of each rowid, -1 where it is not (or no longer) here."""
        rowids = np.asarray(rowids, np.int64)
        have = self.rowids[:self.n]
        pos = np.searchsorted(have, rowids)
        pos = np.minimum(pos, max(self.n - 1, 0))
        ok = (self.n > 0) & (rowids >= 0)
        if self.n:
            ok = ok & (have[pos] == rowids) & self.alive[pos]
        return np.where(ok, pos, -1)

    def drop(self, rowids: np.ndarray) -> np.ndarray:
        """Mark rows dead and zero their embeddings; returns the rowids that were alive."""
        pos = self.positions(rowids)
        pos = pos[pos >= 0]
        self.alive[pos] = False
        self.vecs[pos] = 0.0
        self.dead += len(pos)
        return self.rowids[pos]

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """(rowids, embeddings) of the rows alive, in rowid order (a copy when some are dead)."""
        if not self.dead:
            return self.rowids[:self.n], self.vecs[:self.n]
        keep = np.flatnonzero(self.alive[:self.n])
        return self.rowids[keep], self.vecs[keep]
