"""Search indexes over a gallery's embeddings: a cache, rebuilt from the SQLite file.

Chosen by size (:func:`choose`):

=========  ==============================  =====================================================
kind       rows                            what
=========  ==============================  =====================================================
``exact``  up to ``EXACT_MAX`` (10,000)    numpy matrix product over the embeddings; no FAISS
``flat``   up to ``FLAT_MAX`` (50,000)     FAISS ``IndexFlatIP``: exact, SIMD, blocked batches
``ivf``    above                           FAISS ``PCA{d/4},IVF{nlist},SQ8``: a PCA to a quarter
                                           of the dimensions, k-means cells, 8-bit codes (1/16
                                           of float32); ``nprobe`` cells searched
``hnsw``   on request (``index="hnsw"``)   FAISS ``HNSW32`` graph over float32 vectors
=========  ==============================  =====================================================

Every kind only proposes candidates (FAISS ids are the gallery's rowids); the gallery re-ranks
them with exact cosine on its full-precision embeddings before it reports a score. HNSW is not
an automatic tier: on the synthetic benchmark (:mod:`kpface.gallery.bench`) it built 20x slower
than IVF at 1e5 rows and recalled less at the same latency (README, "Galleries").

FAISS is imported only when a FAISS kind is built (extra ``gallery``: ``faiss-cpu``).
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EngineUnavailable, InputError

log = logging.getLogger(__name__)

EXACT_MAX = 10_000
FLAT_MAX = 50_000
KINDS = ("exact", "flat", "ivf", "hnsw")
ADD_CHUNK = 65_536
Progress = Callable[[str], None]


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise EngineUnavailable("galleries above 10,000 rows search with FAISS, which is not "
                                "installed: pip install 'kpface[gallery]'") from None
    return faiss


def choose(n: int) -> str:
    """The index kind for a gallery of ``n`` rows."""
    return "exact" if n <= EXACT_MAX else "flat" if n <= FLAT_MAX else "ivf"


def ivf_params(n: int, dim: int) -> dict[str, int]:
    """nlist: a power of two near 2 sqrt(n) (about 500 rows per cell at 1e6); nprobe: 1/32 of
    the cells, at least 32; PCA to dim / 4 (>= 64 dimensions left); training on up to 64 rows
    per cell. Measured in the README ("Galleries")."""
    nlist = 2 ** max(4, round(math.log2(2 * math.sqrt(max(n, 1)))))
    nlist = min(nlist, 2 ** int(math.log2(max(n // 39, 1))))  # FAISS wants >= 39 rows per cell
    pca = dim // 4 if dim >= 256 else 0
    return {"nlist": nlist, "nprobe": max(32, nlist // 32), "pca": pca, "train": min(n, 64 * nlist)}


def candidates(kind: str, k: int) -> int:
    """How many candidates an index proposes for a top-``k`` answer (re-ranked exactly)."""
    return k if kind in ("exact", "flat") else max(4 * k, 64)


class FaissIndex:
    """A FAISS index whose ids are gallery rowids, with the parameters it was built with."""

    def __init__(self, kind: str, dim: int, params: dict | None = None, index=None):
        if kind not in KINDS or kind == "exact":
            raise InputError(f"unknown FAISS index kind {kind!r}; use flat, ivf or hnsw")
        self.faiss = import_faiss()
        self.kind, self.dim, self.params = kind, dim, dict(params or {})
        self.index = index if index is not None else self._make()
        self.dead: set[int] = set()  # HNSW cannot delete: rowids masked at search time
        self._apply_search_params()

    def _make(self):
        f, d = self.faiss, self.dim
        if self.kind == "flat":
            return f.IndexIDMap2(f.IndexFlatIP(d))
        if self.kind == "hnsw":
            m = int(self.params.setdefault("M", 32))
            inner = f.IndexHNSWFlat(d, m, f.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = int(self.params.setdefault("efConstruction", 80))
            return f.IndexIDMap2(inner)
        return f.index_factory(d, _ivf_spec(self.params), f.METRIC_INNER_PRODUCT)

    def _apply_search_params(self):
        f = self.faiss
        if self.kind == "ivf":
            f.extract_index_ivf(self.index).nprobe = int(self.params["nprobe"])
        elif self.kind == "hnsw":
            ef = int(self.params.setdefault("efSearch", 128))
            f.downcast_index(self.index.index).hnsw.efSearch = ef

    @property
    def trained(self) -> bool:
        return bool(self.index.is_trained)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def train(self, vectors: np.ndarray, progress: Progress | None = None) -> None:
        if self.trained:
            return
        t = time.perf_counter()
        _say(progress, f"index: training {_ivf_spec(self.params)} on "
             f"{len(vectors):,} vectors")
        self.index.train(np.ascontiguousarray(vectors, np.float32))
        _say(progress, f"index: trained in {time.perf_counter() - t:.1f} s")

    def add(self, rowids: np.ndarray, vectors: np.ndarray, progress: Progress | None = None,
            total: int | None = None) -> None:
        start, n = time.perf_counter(), len(rowids)
        for i in range(0, n, ADD_CHUNK):
            j = min(n, i + ADD_CHUNK)
            self.index.add_with_ids(np.ascontiguousarray(vectors[i:j], np.float32),
                                    np.ascontiguousarray(rowids[i:j], np.int64))
            if progress and n > ADD_CHUNK:
                spent = time.perf_counter() - start
                left = spent / j * (n - j)
                _say(progress, f"index: {j:,}/{total or n:,} vectors added ({spent:.0f} s, "
                     f"~{left:.0f} s left)")

    def remove(self, rowids: np.ndarray) -> None:
        rowids = np.asarray(rowids, np.int64)
        if self.kind == "hnsw":
            self._blank_hnsw(rowids)
            self.dead.update(int(r) for r in rowids)
            return
        self.index.remove_ids(self.faiss.IDSelectorBatch(rowids))

    def _blank_hnsw(self, rowids: np.ndarray) -> None:
        """Overwrite the removed rows' vectors inside the HNSW storage with zeros: the graph
        keeps their nodes (HNSW cannot delete), but not their embeddings."""
        f = self.faiss
        ids = f.vector_to_array(self.index.id_map)
        storage = f.downcast_index(f.downcast_index(self.index.index).storage)
        xb = f.rev_swig_ptr(storage.get_xb(), storage.ntotal * self.dim)
        for pos in np.flatnonzero(np.isin(ids, rowids)):
            xb[pos * self.dim:(pos + 1) * self.dim] = 0.0

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Candidate rowids [Q, k] (-1 where fewer)."""
        extra = min(len(self.dead), 4 * k)  # masked HNSW nodes still take result slots
        _, ids = self.index.search(np.ascontiguousarray(queries, np.float32), k + extra)
        if self.dead:
            ids = np.where(np.isin(ids, np.fromiter(self.dead, np.int64)), -1, ids)
        return ids

    # -- the cache file ----------------------------------------------------------------------
    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.faiss.write_index(self.index, str(tmp))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(cls, path: Path, kind: str, dim: int, params: dict, dead=()) -> "FaissIndex":
        faiss = import_faiss()
        index = faiss.read_index(str(path))
        if index.d != dim:
            raise ValueError(f"dimension {index.d} != {dim}")
        out = cls(kind, dim, params, index=index)
        out.dead = set(int(r) for r in dead)
        return out


def build(kind: str, dim: int, rowids: np.ndarray, vectors: np.ndarray,
          progress: Progress | None = None, params: dict | None = None,
          seed: int = 1234) -> FaissIndex:
    """A FAISS index of ``kind`` over (rowids, vectors), with progress lines."""
    n = len(rowids)
    if kind == "ivf":
        params = {**ivf_params(n, dim), **(params or {})}
    idx = FaissIndex(kind, dim, params)
    t = time.perf_counter()
    _say(progress, f"index: building {kind} over {n:,} vectors ({_describe(idx)})")
    if kind == "ivf":
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, size=min(n, int(idx.params["train"])), replace=False))
        idx.train(vectors[take], progress)
    idx.add(rowids, vectors, progress)
    idx.params["built_rows"] = n
    idx.params["build_seconds"] = round(time.perf_counter() - t, 2)
    _say(progress, f"index: {kind} built in {time.perf_counter() - t:.1f} s")
    return idx


def _describe(idx: FaissIndex) -> str:
    p = idx.params
    if idx.kind == "ivf":
        return f"{_ivf_spec(p)}, nprobe {p['nprobe']}"
    if idx.kind == "hnsw":
        return f"HNSW{p['M']}, efConstruction {p['efConstruction']}"
    return "IndexFlatIP"


def _ivf_spec(p: dict) -> str:
    pca = int(p.get("pca") or 0)
    return (f"PCA{pca}," if pca else "") + f"IVF{int(p['nlist'])},SQ8"


def _say(progress: Progress | None, msg: str) -> None:
    log.info("%s", msg)
    if progress:
        progress(msg)
