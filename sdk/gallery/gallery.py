"""Gallery: 1:N search and open-set identification over an SQLite file.

    g = Gallery.open("people.kpg", model="models/")      # the recognizer that embeds
    g.add(["alice/1.jpg"], embeddings, labels=["alice"])
    ids, scores = g.search(queries, k=5)                   # exact cosine of the top k
    g.identify(face)                                       # Match(id, label, score, match)
    g.calibrate(non_mated, mated=(queries, labels), target_fpir=0.001)

The file (:mod:`.store`) holds everything; the search index (:mod:`.index`) is a cache beside
it (``<file>.index`` + ``.index.json``), rebuilt when missing or made for another model or
file. Candidates from any index are re-ranked with exact cosine on the stored float32
embeddings, so the scores (and every threshold decision) do not depend on the index.
Changes committed by another process are picked up before each search (``PRAGMA
data_version``), so any number of processes may search one gallery while one adds or removes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, ModelError, RandomWeightsError
from . import index as idx
from .cache import IndexCache
from .calibration import Calibration, calibrate
from .model import describe_model, model_problem, same_model
from .rows import Rows
from .search import as_queries, exact_topk, rerank
from .store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    """The best candidate of an identification and the verdict at the gallery's threshold."""

    id: str
    label: str
    score: float
    match: bool
    threshold: float


class Gallery:
    """Use :meth:`open`. Thread-safe; one instance per process and file is enough."""

    def __init__(self, store: Store, index: str = "auto", progress=None):
        if index != "auto" and index not in idx.KINDS:
            raise InputError(f"index must be auto or one of {', '.join(idx.KINDS)}, got {index!r}")
        self.store, self.path, self.want, self.progress = store, store.path, index, progress
        self.model: dict | None = store.get("model")
        self.cache = IndexCache(store.path)
        self._dim: int | None = None
        self._rows: Rows | None = None
        self._index: idx.FaissIndex | None = None
        self._indexed = 0  # rows [0, _indexed) of _rows are in _index
        self._dirty = False  # the index holds changes its cache file does not
        self._gen = self._epoch = self._version = -1

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, model: Any = None, *, runtime: str = "onnxruntime",
             precision: str = "fp32", threshold: float | None = None, create: bool = True,
             read_only: bool = False, index: str = "auto", progress=None) -> "Gallery":
        """Open (or create) the gallery file ``path``.

        ``model``: the recognizer whose embeddings the gallery holds or will hold (a model
        directory, a models directory, a Recognizer or a FacePipeline; with ``runtime`` /
        ``precision`` naming the build). A new gallery records it; an existing one refuses a
        different one (:class:`ModelError`). ``threshold`` replaces the stored one (a new
        gallery takes the recognizer manifest's). ``index``: ``auto`` (by size) or a kind of
        :mod:`kpface.gallery.index`. ``progress``: a callable for index build lines.
        """
        g = cls(Store(path, create=create, read_only=read_only), index=index, progress=progress)
        if model is not None:
            g._adopt(describe_model(model, runtime, precision), read_only)
        if threshold is not None:
            if read_only:
                raise InputError("cannot set a threshold on a gallery opened read-only")
            g.store.set("threshold", float(threshold))
            g.store.set("threshold_source", "given")
        return g

    def _adopt(self, record: dict, read_only: bool) -> None:
        stored = self.model
        if stored is None:
            if self.store.count():
                raise ModelError(f"{self.path} was filled without a recorded recognizer, so "
                                 "embeddings of this one cannot be told comparable; enrol into "
                                 "a new gallery")
            if read_only:
                raise ModelError(f"{self.path} records no recognizer (opened read-only)")
            dim = self.store.get("dim")
            if dim is not None and dim != record["embedding_size"]:
                raise ModelError(f"{self.path} holds {dim}-d embeddings; {record['arch']} makes "
                                 f"{record['embedding_size']}-d ones")
            with self.store.transaction():
                self.store.set("model", record)
                self.store.set("dim", int(record["embedding_size"]))
                if self.store.get("threshold") is None and record.get("threshold") is not None:
                    self.store.set("threshold", float(record["threshold"]))
                    self.store.set("threshold_source", "recognizer manifest")
            self.model = record
            return
        why = same_model(stored, record)
        if why:
            raise ModelError(f"{self.path}: {why}; search it with that model, or enrol into a "
                             "new gallery")

    # -- what it holds ---------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        if self._dim is None:  # set once, never changed: read from the file only until then
            self._dim = self.store.get("dim")
        return self._dim

    @property
    def threshold(self) -> float | None:
        return self.store.get("threshold")

    def __len__(self) -> int:
        with self.store.lock:
            if self._rows is None:
                return self.store.count()
            self._sync()
            return len(self._rows)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Write the index cache if it holds changes, and close the file."""
        with self.store.lock:
            if self._dirty and self._index is not None:
                self._save_cache()
            self.store.close()

    # -- changes -----------------------------------------------------------------------------
    def add(self, ids: Sequence, embeddings, labels: Sequence | None = None) -> int:
        """Add rows (an existing id is replaced); ``labels`` default to the ids. Embeddings are
        L2-normalised. Returns the number of rows written."""
        ids = [str(i) for i in ids]
        labels = ids if labels is None else [str(l_) for l_ in labels]
        if not ids:
            return 0
        if len(set(ids)) != len(ids):
            raise InputError("the same id appears twice in one add()")
        if any(not i for i in ids) or any(not l_ for l_ in labels):
            raise InputError("ids and labels must be non-empty")
        emb = as_queries(np.asarray(embeddings, np.float32), self.dim)
        if len(emb) != len(ids) or len(labels) != len(ids):
            raise InputError(f"{len(ids)} ids, {len(labels)} labels and {len(emb)} embeddings")
        with self.store.lock:
            with self.store.transaction():
                reload = self._catch_up()
                if self.dim is None:
                    self.store.set("dim", int(emb.shape[1]))
                old = list(self.store.rowids_of(ids).values())
                gen = self.store.get("generation") + 1
                if old:
                    self.store.delete(old, gen)
                rowids = self.store.insert(ids, labels, emb)
                self.store.set("generation", gen)
            if reload:
                self._load()
            elif self._rows is not None:
                if self._rows.dim != emb.shape[1]:  # loaded while empty, before any dim
                    self._rows = Rows(emb.shape[1])
                self._forget(np.asarray(old, np.int64))
                self._rows.append(np.asarray(rowids, np.int64), ids, labels, emb)
                self._gen = gen
        log.debug("%s: added %d row(s), replaced %d", self.path, len(ids), len(old))
        return len(ids)

    def remove(self, ids: Sequence) -> int:
        """Remove rows by id: gone from the index at once, from the file after :meth:`compact`."""
        ids = [str(i) for i in ([ids] if isinstance(ids, str) else ids)]
        with self.store.lock:
            found = self.store.rowids_of(ids)
            missing = [i for i in ids if i not in found]
            if missing:
                raise InputError(f"not in the gallery: {', '.join(missing[:5])}"
                                 + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
            return self._remove_rowids(list(found.values()))

    def remove_label(self, label: str) -> int:
        """Remove every row of one identity; returns how many."""
        with self.store.lock:
            rowids = self.store.rowids_of_label(str(label))
            if not rowids:
                raise InputError(f"no identity {label!r} in the gallery")
            return self._remove_rowids(rowids)

    def _remove_rowids(self, rowids: list[int]) -> int:
        with self.store.transaction():
            reload = self._catch_up()
            gen = self.store.get("generation") + 1
            self.store.delete(rowids, gen)
            self.store.set("generation", gen)
        if reload:
            self._load()
        if self._rows is not None:
            self._forget(np.asarray(rowids, np.int64))
            self._gen = gen
        if self._index is not None:
            self._save_cache()  # the cache file must not keep them either
        else:
            self.cache.purge(rowids, self.dim)
        return len(rowids)

    def _forget(self, rowids: np.ndarray) -> None:
        if len(rowids) and self._rows is not None:
            gone = self._rows.drop(rowids)
            if self._index is not None and len(gone):
                self._index.remove(gone)
                self._dirty = True

    def compact(self) -> None:
        """Rewrite the file without removed rows (their bytes included) and rebuild the index."""
        with self.store.lock:
            with self.store.transaction():
                self.store.db.execute("DELETE FROM removed")
                self.store.set("epoch", self.store.get("epoch") + 1)
                self.store.set("generation", self.store.get("generation") + 1)
            self.store.vacuum()
            self.cache.drop()
            self._rows = self._index = None
            self._load()
            self._ensure_index()

    # -- search ------------------------------------------------------------------------------
    def search(self, queries, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query: (ids [Q, k'] object, cosine [Q, k'] float32), best first,
        k' = min(k, rows); exact cosine whatever the index."""
        pos, scores = self._search(queries, k)
        with self.store.lock:
            ids = np.array([[self._rows.ids[p] if p >= 0 else None for p in row] for row in pos],
                           dtype=object).reshape(pos.shape)
        return ids, scores

    def identify(self, face_or_embedding, allow_random: bool = False) -> Match | None:
        """The best candidate and whether it reaches the threshold (None: empty gallery).

        Refuses (:class:`RandomWeightsError`) when the gallery's recognizer has random or
        partial weights, unless ``allow_random``; :meth:`search` still gives the scores."""
        problem = model_problem(self.model)
        if problem and not allow_random:
            raise RandomWeightsError(f"no identity verdict: {problem}; search() still gives the "
                                     "scores (allow_random=True / --allow-random to override)")
        threshold = self.threshold
        if threshold is None:
            raise InputError(f"{self.path} has no threshold: open it with its recognizer, pass "
                             "threshold=, or calibrate() it")
        pos, scores = self._search(face_or_embedding, 1)
        if pos.shape[1] == 0 or pos[0, 0] < 0:
            return None
        p, s = int(pos[0, 0]), float(scores[0, 0])
        return Match(id=self._rows.ids[p], label=self._rows.labels[p], score=s,
                     match=s >= threshold, threshold=float(threshold))

    def _search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        with self.store.lock:
            q = as_queries(queries, self.dim)
            self._sync()
            rows = self._rows
            k = min(int(k), len(rows))
            if k == 0 or self.dim is None:
                return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
            self._ensure_index()
            if self._index is None:
                return exact_topk(q, rows, k)
            out_p, out_s = [], []
            for i in range(0, len(q), 256):
                rowids = self._index.search(q[i:i + 256], idx.candidates(self._index.kind, k))
                pos = rows.positions(rowids.ravel()).reshape(rowids.shape)
                p, s = rerank(q[i:i + 256], rows.vecs, pos, k)
                out_p.append(p)
                out_s.append(s)
            return np.concatenate(out_p), np.concatenate(out_s)

    # -- in-memory rows and the index cache ------------------------------------------------
    def _load(self) -> None:
        """Read every row of the file (one snapshot) into memory."""
        rows = Rows(self.dim or 0)
        with self.store.lock:
            self.store.db.execute("BEGIN")
            try:
                self._version = self.store.data_version()
                meta = self.store.meta()
                rows.reserve(self.store.count())
                for rowids, ids, labels, emb in self.store.read():
                    rows.append(rowids, ids, labels, emb)
            finally:
                self.store.db.execute("COMMIT")
        self._rows, self._index, self._indexed = rows, None, 0
        self._gen, self._epoch = meta["generation"], meta["epoch"]
        self.model = meta.get("model")

    def _sync(self) -> None:
        """Pick up what other connections committed since the last look."""
        if self._rows is None:
            self._load()
            return
        if self.store.data_version() == self._version:
            return
        self.store.db.execute("BEGIN")
        try:
            reload = self._catch_up()
        finally:
            self.store.db.execute("COMMIT")
        if reload:
            self._load()

    def _catch_up(self) -> bool:
        """Inside a transaction (a read snapshot, or the write lock of :meth:`add` /
        :meth:`remove`, so that nothing can commit in between): take in other connections'
        removals and rows. True when the file was compacted meanwhile (reload it)."""
        if self._rows is None:
            return False
        self._version = self.store.data_version()
        epoch, gen = self.store.get("epoch"), self.store.get("generation")
        if epoch != self._epoch:
            log.info("%s was compacted by another connection; reloading", self.path)
            return True
        if gen != self._gen:
            self._forget(np.asarray(self.store.removed_since(self._gen), np.int64))
            for rowids, ids, labels, emb in self.store.read(self._rows.max_rowid):
                self._rows.append(rowids, ids, labels, emb)
            self._gen = gen
        return False

    def _kind(self) -> str:
        return idx.choose(len(self._rows)) if self.want == "auto" else self.want

    def _ensure_index(self) -> None:
        """Bring the index up to date: load or build it, add rows it lacks."""
        rows, kind = self._rows, self._kind()
        if kind == "exact":
            self._index = None
            return
        current = self._index
        if current is not None and self.want == "auto" and (
                idx.KINDS.index(kind) > idx.KINDS.index(current.kind)
                or (kind == "ivf" and len(rows) > 4 * current.params.get("built_rows", len(rows)))):
            self._say(f"index: {len(rows):,} rows outgrew the {current.kind} index of "
                      f"{current.params.get('built_rows', current.ntotal):,}; rebuilding as {kind}")
            self._index = None
        if self._index is None:
            self._index = self._load_cache(kind)
            if self._index is None:
                live_ids, live_vecs = rows.live()
                self._index = idx.build(kind, rows.dim, live_ids, live_vecs, self.progress)
                self._indexed = rows.n
                self._save_cache()
        if self._indexed < rows.n:
            new = slice(self._indexed, rows.n)
            keep = rows.alive[new]
            self._index.add(rows.rowids[new][keep], rows.vecs[new][keep], self.progress)
            self._indexed, self._dirty = rows.n, True

    def build_index(self) -> str:
        """Build (or bring up to date) the index now and write its cache; returns its kind."""
        with self.store.lock:
            self._sync()
            self._ensure_index()
            if self._dirty:
                self._save_cache()
            return "exact" if self._index is None else self._index.kind

    def _cache_key(self) -> dict:
        return {"uuid": self.store.get("uuid"), "epoch": self._epoch, "dim": self.dim,
                "fingerprint": (self.model or {}).get("fingerprint")}

    def _save_cache(self) -> None:
        self.cache.save(self._index, self._cache_key(), self._gen, self._rows.max_rowid)
        self._dirty = False

    def _load_cache(self, kind: str) -> idx.FaissIndex | None:
        found = self.cache.load(kind, self._cache_key(), self._say)
        if found is None:
            return None
        index, info = found
        gone = self.store.removed_since(int(info["generation"]))
        if gone:
            index.remove(np.asarray(gone, np.int64))
        self._indexed = int(np.searchsorted(self._rows.rowids[:self._rows.n], info["max_rowid"],
                                            side="right"))
        self._dirty = info["generation"] != self._gen
        log.info("%s: index cache loaded (%s, %d vectors)", self.path, kind, index.ntotal)
        self._index = index
        if gone:
            self._save_cache()  # the removed rows must not stay in the file either
        return index

    def _say(self, msg: str) -> None:
        log.info("%s", msg)
        if self.progress:
            self.progress(msg)

    # -- calibration and description -------------------------------------------------------
    def calibrate(self, non_mated, mated: tuple | None = None,
                  target_fpir: float = 0.01) -> Calibration:
        """Set the threshold for ``target_fpir`` from non-mated searches (faces of people not
        in the gallery) and measure FNIR at it on ``mated`` = (queries, their labels); see
        :mod:`kpface.gallery.calibration`."""
        cal = calibrate(self, non_mated, mated, target_fpir)
        with self.store.transaction():
            self.store.set("threshold", cal.threshold)
            self.store.set("threshold_source", "calibrated")
            self.store.set("calibration", cal.to_dict())
        log.info("%s: %s", self.path, cal.line())
        return cal

    def get(self, ids: Sequence) -> tuple[np.ndarray, list[str]]:
        """The stored (L2-normalised float32) embeddings [n, D] and labels of rows, by id."""
        ids = [str(i) for i in ids]
        found = self.store.rowids_of(ids)
        missing = [i for i in ids if i not in found]
        if missing:
            raise InputError(f"not in the gallery: {', '.join(missing[:5])}")
        by_rowid = {}
        with self.store.lock:
            for part in range(0, len(ids), 900):
                want = [found[i] for i in ids[part:part + 900]]
                q = (f"SELECT rowid, label, embedding FROM faces WHERE rowid IN "
                     f"({','.join('?' * len(want))})")
                by_rowid.update((r, (l_, e)) for r, l_, e in self.store.db.execute(q, want))
        rows = [by_rowid[found[i]] for i in ids]
        emb = np.frombuffer(b"".join(e for _, e in rows), "<f4").reshape(len(ids), self.dim)
        return emb.astype(np.float32), [l_ for l_, _ in rows]

    def labels(self) -> list[str]:
        with self.store.lock:
            return [r[0] for r in self.store.db.execute(
                "SELECT DISTINCT label FROM faces ORDER BY label")]

    def info(self) -> dict[str, Any]:
        """What ``kpface gallery info`` shows (rows, recognizer, threshold, index, bytes)."""
        from .describe import describe
        return describe(self)
