"""The gallery file: SQLite (standard library), the source of truth.

Tables::

    meta(key TEXT PRIMARY KEY, value TEXT)        JSON values: schema, uuid, dim, model,
                                                  threshold, calibration, generation, epoch
    faces(rowid INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, label TEXT,
          embedding BLOB)                         float32 little-endian, L2-normalised
    removed(rowid INTEGER PRIMARY KEY, generation INTEGER)
                                                  what was deleted since the last compact,
                                                  so a reader (another process) can drop it
                                                  from its index without reloading everything

``generation`` counts committed changes; ``epoch`` counts compactions (a reader that sees a new
epoch reloads). AUTOINCREMENT rowids are never reused, so a rowid names one embedding for the
life of the file and is what the search index stores. The file is opened in WAL mode: readers
in other processes go on searching while one writer adds or removes.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

SCHEMA = 1
APPLICATION_ID = 0x6B706667  # "kpfg": marks the file as a kpface gallery
BUSY_TIMEOUT_MS = 30_000
PAGE_SIZE = 16_384
MAX_VARS = 900  # SQLite's bound on ? parameters per statement (999 in old builds)

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS faces (rowid INTEGER PRIMARY KEY AUTOINCREMENT,
                                  id TEXT NOT NULL UNIQUE, label TEXT NOT NULL,
                                  embedding BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS removed (rowid INTEGER PRIMARY KEY, generation INTEGER NOT NULL);
"""


def chunks(seq: Sequence, size: int = MAX_VARS) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


class Store:
    """One connection to a gallery file, usable from several threads (one lock)."""

    def __init__(self, path: str | os.PathLike, create: bool = True, read_only: bool = False):
        self.path = Path(path)
        self.lock = threading.RLock()
        exists = self.path.exists()
        if not exists and (not create or read_only):
            raise InputError(f"{self.path}: no such gallery; create one with "
                             f"`kpface gallery enroll DIR --gallery {self.path}`")
        if exists and self.path.is_dir():
            raise InputError(f"{self.path} is a folder, not a gallery file")
        if not exists:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"file:{self.path.resolve().as_posix()}?mode={'ro' if read_only else 'rwc'}"
        try:
            self.db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1e3,
                                      check_same_thread=False, isolation_level=None)
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            app_id = self.db.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in self.db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path}: not a kpface gallery ({e})") from None
        if tables and (app_id != APPLICATION_ID or "faces" not in tables):
            self.db.close()
            raise InputError(f"{self.path}: not a kpface gallery (an SQLite file of something "
                             "else); give another --gallery path")
        if not tables:
            if read_only:
                raise InputError(f"{self.path}: an empty file, not a kpface gallery")
            self._create()
        elif not read_only:
            self.db.execute("PRAGMA journal_mode = WAL")
        schema = self.get("schema")
        if schema != SCHEMA:
            raise InputError(f"{self.path}: gallery schema {schema}, this kpface reads {SCHEMA}; "
                             "use the kpface that wrote it")

    def _create(self) -> None:
        with self.lock:
            # 16 KiB pages hold seven 2 KiB embedding rows; at SQLite's default 4 KiB one row
            # (2 KiB + its id) fills a page, doubling the file.
            self.db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.executescript(_DDL)
            with self.transaction():
                for key, value in (("schema", SCHEMA), ("uuid", uuid.uuid4().hex),
                                   ("created", time.time()), ("generation", 0), ("epoch", 0)):
                    self.set(key, value)
            log.info("created gallery %s", self.path)

    # -- plumbing --------------------------------------------------------------------------
    def transaction(self):
        store = self

        class _Tx:
            def __enter__(self):
                store.lock.acquire()
                store.db.execute("BEGIN IMMEDIATE")  # take the write lock now, not at COMMIT
                return store

            def __exit__(self, kind, exc, tb):
                try:
                    store.db.execute("ROLLBACK" if kind else "COMMIT")
                finally:
                    store.lock.release()
        return _Tx()

    def get(self, key: str, default: Any = None) -> Any:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set(self, key: str, value: Any) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                            (key, json.dumps(value)))

    def meta(self) -> dict[str, Any]:
        with self.lock:
            return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def data_version(self) -> int:
        """Changes when another connection commits (cheap: no read of the tables)."""
        with self.lock:
            return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # -- rows ------------------------------------------------------------------------------
    def count(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT count(*) FROM faces").fetchone()[0])

    def labels_count(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT count(DISTINCT label) FROM faces").fetchone()[0])

    def rowids_of(self, ids: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        with self.lock:
            for part in chunks(list(ids)):
                q = f"SELECT id, rowid FROM faces WHERE id IN ({','.join('?' * len(part))})"
                out.update(self.db.execute(q, list(part)).fetchall())
        return out

    def rowids_of_label(self, label: str) -> list[int]:
        with self.lock:
            return [r[0] for r in self.db.execute(
                "SELECT rowid FROM faces WHERE label = ? ORDER BY rowid", (label,))]

    def insert(self, ids: Sequence[str], labels: Sequence[str], emb: np.ndarray) -> list[int]:
        """Insert rows (inside a transaction); returns their rowids, in order."""
        emb = np.ascontiguousarray(emb, dtype="<f4")
        first = self.db.execute("SELECT coalesce(max(rowid), 0) FROM faces").fetchone()[0]
        seq = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'faces'").fetchone()
        start = max(first, seq[0] if seq else 0) + 1
        self.db.executemany("INSERT INTO faces (rowid, id, label, embedding) VALUES (?, ?, ?, ?)",
                            ((start + i, i_, l_, e.tobytes())
                             for i, (i_, l_, e) in enumerate(zip(ids, labels, emb))))
        return list(range(start, start + len(ids)))

    def delete(self, rowids: Sequence[int], generation: int) -> None:
        """Delete rows (inside a transaction) and log them in ``removed``."""
        for part in chunks(list(rowids)):
            marks = ",".join("?" * len(part))
            self.db.execute(f"DELETE FROM faces WHERE rowid IN ({marks})", list(part))
        self.db.executemany("INSERT OR REPLACE INTO removed (rowid, generation) VALUES (?, ?)",
                            ((int(r), generation) for r in rowids))

    def removed_since(self, generation: int) -> list[int]:
        with self.lock:
            return [r[0] for r in self.db.execute(
                "SELECT rowid FROM removed WHERE generation > ? ORDER BY rowid", (generation,))]

    def read(self, after_rowid: int = 0, batch: int = 8192
             ) -> Iterator[tuple[np.ndarray, list[str], list[str], np.ndarray]]:
        """(rowids, ids, labels, embeddings [n, dim]) of the rows with rowid > ``after_rowid``,
        in rowid order, ``batch`` rows at a time."""
        dim = self.get("dim")
        with self.lock:
            cur = self.db.execute("SELECT rowid, id, label, embedding FROM faces WHERE rowid > ? "
                                  "ORDER BY rowid", (after_rowid,))
            rows = cur.fetchmany(batch)
        while rows:
            rowids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            emb = np.frombuffer(b"".join(r[3] for r in rows), "<f4").reshape(len(rows), dim)
            yield rowids, [r[1] for r in rows], [r[2] for r in rows], emb.astype(np.float32)
            with self.lock:
                rows = cur.fetchmany(batch)

    def rows(self, rowids: Sequence[int]) -> dict[int, tuple[str, str]]:
        """rowid -> (id, label) of those rows that still exist."""
        out: dict[int, tuple[str, str]] = {}
        with self.lock:
            for part in chunks([int(r) for r in rowids]):
                marks = ",".join("?" * len(part))
                q = f"SELECT rowid, id, label FROM faces WHERE rowid IN ({marks})"
                out.update((r, (i, l)) for r, i, l in self.db.execute(q, part))
        return out

    def vacuum(self) -> None:
        """Rewrite the file without free pages (deleted rows' bytes go with them) and empty the
        write-ahead log."""
        with self.lock:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
