"""Atomic writes of files and whole directories.

A file is written to a temporary sibling and renamed over its target. A directory (a model
directory, a build) is written into a uniquely named staging sibling,
``.<name>.partial-<pid>-<random>``, and switched in with one rename:

* the first install is ``renameat2(RENAME_NOREPLACE)`` (a plain rename elsewhere);
* a replacement *exchanges* the two directories in one step (Linux ``renameat2`` with
  ``RENAME_EXCHANGE``, macOS ``renamex_np`` with ``RENAME_SWAP``), so at every moment the
  target path holds either the complete old directory or the complete new one; the old one,
  now under the staging name, is then deleted.

Where the exchange is not available (another OS, or a file system that refuses it, such as
some network file systems) the old directory is first renamed aside and the new one renamed
in: two renames, with a moment of a few microseconds without a directory at the target. That
fallback is logged at debug level.

A run that is killed leaves its staging directory behind. Its name carries the writer's
process id, so the next write to the same target removes the staging directories of processes
that no longer exist (:func:`clean_leftovers`); nothing ever reads them, whatever their state.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2          # Linux renameat2 flags
_RENAME_SWAP, _RENAME_EXCL = 0x2, 0x4               # macOS renamex_np flags
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
                errno.EXDEV}
# Staging directories of an older kpface carry no process id: removed once this old.
_OLD_LEFTOVER_S = 24 * 3600


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic with other threads)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename it over ``path`` (with the mode a
    plain ``open`` would give it, not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --- one-step renames --------------------------------------------------------------------

def _libc():
    if not hasattr(_libc, "lib"):
        try:
            _libc.lib = ctypes.CDLL(None, use_errno=True)  # type: ignore[attr-defined]
        except OSError:
            _libc.lib = None  # type: ignore[attr-defined]
    return _libc.lib  # type: ignore[attr-defined]


def _rename_flags(src: Path, dst: Path, linux_flag: int, mac_flag: int) -> bool:
    """One rename with a flag; False where the system or file system cannot do it."""
    lib = _libc()
    a, b = os.fsencode(src), os.fsencode(dst)
    if sys.platform.startswith("linux") and lib is not None and hasattr(lib, "renameat2"):
        rc = lib.renameat2(_AT_FDCWD, a, _AT_FDCWD, b, ctypes.c_uint(linux_flag))
    elif sys.platform == "darwin" and lib is not None and hasattr(lib, "renamex_np"):
        rc = lib.renamex_np(a, b, ctypes.c_uint(mac_flag))
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(dst))


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one step; False where this system cannot."""
    return _rename_flags(Path(a), Path(b), _RENAME_EXCHANGE, _RENAME_SWAP)


def switch_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put directory ``new`` at ``final`` (which may exist) in one rename; the old directory
    is deleted afterwards."""
    new, final = Path(new), Path(final)
    try:
        if _rename_flags(new, final, _RENAME_NOREPLACE, _RENAME_EXCL):
            return
        if not final.exists() and not final.is_symlink():
            os.rename(new, final)
            return
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now names the old directory
        return
    log.debug("%s: no one-step exchange on this system; replacing in two renames", final)
    aside = final.with_name(f"{partial_prefix(final)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(final, aside)
    os.rename(new, final)
    shutil.rmtree(aside, ignore_errors=True)


# --- staging directories -----------------------------------------------------------------

def partial_prefix(final: str | os.PathLike) -> str:
    return f".{Path(final).name}.partial-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True
    return True


def clean_leftovers(final: str | os.PathLike) -> list[Path]:
    """Remove the staging directories beside ``final`` whose writer process is gone (and
    pid-less ones of an older kpface after a day); return what was removed."""
    final = Path(final)
    prefix = partial_prefix(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        m = re.match(r"(\d+)-", p.name[len(prefix):])
        if m:
            stale = not _alive(int(m.group(1)))
        else:
            try:
                stale = time.time() - p.stat().st_mtime > _OLD_LEFTOVER_S
            except OSError:
                stale = False
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info("removed %d staging director%s left by killed runs beside %s", len(removed),
                 "y" if len(removed) == 1 else "ies", final)
    return removed


def _fsync_path(path: str) -> None:
    """Flush one file or directory to disk; a path that cannot be opened is skipped."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file of ``root`` (and the directories) to disk before it is switched in."""
    for d, _, names in os.walk(root):
        for name in names:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                _fsync_path(p)
        _fsync_path(d)


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty, uniquely named sibling directory of ``final``; when the block ends
    without an exception it replaces ``final`` in one step (:func:`switch_dir`). On an
    exception nothing changes at ``final`` and the staging directory is removed."""
    final = Path(final)
    if final.is_symlink():  # a linked model directory is replaced where it really is
        final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{partial_prefix(final)}{os.getpid()}-",
                                dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # the mode of a plain mkdir, not mkdtemp's 0700
    try:
        yield tmp
        fsync_tree(tmp)
        switch_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
