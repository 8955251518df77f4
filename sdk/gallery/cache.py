"""The index cache beside a gallery file: ``<file>.index`` (FAISS) + ``<file>.index.json``.

The JSON names what the index was built from: the gallery's uuid and epoch (compactions), the
embedding size, the recognizer's fingerprint, the index kind and parameters, and how far into
the file it reaches (generation, largest rowid). An index whose key differs from the gallery's
(another file, another model, a compacted file) is never used: it is rebuilt, and the rebuild
is said. One that is only behind is caught up: rows removed since are taken out of it, rows
added since are added.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..manifest import write_json
from . import index as idx

log = logging.getLogger(__name__)

KEY = ("uuid", "epoch", "dim", "fingerprint")


class IndexCache:
    def __init__(self, gallery_path: Path):
        self.data = gallery_path.with_name(gallery_path.name + ".index")
        self.meta = gallery_path.with_name(gallery_path.name + ".index.json")

    def read(self) -> dict | None:
        if not (self.data.is_file() and self.meta.is_file()):
            return None
        try:
            return json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return None

    def save(self, index: "idx.FaissIndex", key: dict, generation: int, max_rowid: int) -> None:
        index.save(self.data)
        write_json(self.meta, {**key, "kind": index.kind, "params": index.params,
                               "generation": generation, "max_rowid": max_rowid,
                               "dead": sorted(index.dead)})

    def load(self, kind: str, key: dict, say) -> tuple["idx.FaissIndex", dict] | None:
        """The cached index if it was built for ``key`` as ``kind``; None (said) if not."""
        info = self.read()
        if info is None:
            return None
        differs = [k for k in KEY if info.get(k) != key.get(k)]
        if differs or info.get("kind") != kind:
            what = "another recognizer" if "fingerprint" in differs else \
                f"another {', '.join(differs)}" if differs else f"a {info.get('kind')} index"
            say(f"index: the cache {self.data.name} was built for {what}; rebuilding it")
            return None
        try:
            index = idx.FaissIndex.load(self.data, kind, key["dim"], info["params"],
                                        info.get("dead", ()))
        except Exception as e:  # a truncated or foreign file: rebuild it
            say(f"index: cannot read the cache {self.data.name} ({type(e).__name__}: {e}); "
                "rebuilding it")
            return None
        return index, info

    def purge(self, rowids: list[int], dim: int) -> None:
        """Take rows out of the cache file without loading the gallery (``kpface gallery
        remove``); a cache that cannot be read is deleted."""
        info = self.read()
        if info is None:
            return
        try:
            index = idx.FaissIndex.load(self.data, info["kind"], dim, info["params"],
                                        info.get("dead", ()))
            index.remove(np.asarray(rowids, np.int64))
            index.save(self.data)
            write_json(self.meta, {**info, "dead": sorted(index.dead)})
        except Exception as e:
            log.warning("index cache %s unreadable (%s); deleting it", self.data, e)
            self.drop()

    def drop(self) -> None:
        for f in (self.data, self.meta):
            f.unlink(missing_ok=True)
