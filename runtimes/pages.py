"""Give back the resident pages of a memory-mapped weight file that an engine has consumed.

OpenVINO maps an IR's ``.bin`` file and, while it compiles, copies every weight it repacks
for its kernels; the mapping stays open (the compiled model keeps the original constants), so
the file's pages stay resident beside the repacked copies: twice the model in memory, at the
peak and after. The pages of a read-only file mapping can be dropped from this process with
``madvise(MADV_DONTNEED)`` at any time: the data is unchanged, the page cache keeps it, and a
later read maps it back (a minor fault). :class:`PageDropper` does that while a compile runs
and once after it, so only the pages the engine still reads stay resident.

Linux only (elsewhere it does nothing); only mappings without write permission are touched,
so no modified page can ever be discarded.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

MADV_DONTNEED = 4
_libc = None


def supported() -> bool:
    return sys.platform.startswith("linux")


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def read_only_mappings(paths: Iterable[str | os.PathLike]) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of ``paths`` that have no write permission."""
    wanted = {os.path.realpath(p) for p in paths}
    out = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() in wanted and "w" not in parts[1]:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    out.append((start, end))
    except OSError:
        return []
    return out


def drop(paths: Iterable[str | os.PathLike]) -> int:
    """Drop the resident pages of the read-only mappings of ``paths``; bytes advised."""
    if not supported():
        return 0
    madvise, done = _madvise(), 0
    for start, end in read_only_mappings(paths):
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            done += end - start
    return done


class PageDropper:
    """``with PageDropper([bin_path]): compile...``: drops the file's pages every ``period_s``
    while the block runs (the engine must release the GIL, as OpenVINO's compile does) and
    once at the end. ``bytes_mapped`` is the size of the mappings found at the end."""

    def __init__(self, paths: Iterable[str | os.PathLike], period_s: float = 0.005):
        self.paths = [Path(p) for p in paths]
        self.period_s = period_s
        self.bytes_mapped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            drop(self.paths)

    def __enter__(self) -> "PageDropper":
        if supported():
            self._thread = threading.Thread(target=self._loop, name="kpface-page-dropper",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bytes_mapped = drop(self.paths)
        log.debug("dropped the resident pages of %s (%d MB mapped)",
                  ", ".join(p.name for p in self.paths), self.bytes_mapped >> 20)
