"""The bench process protocol: every configuration runs in a fresh Python process.

The parent (:class:`Worker`) starts ``python -c BOOT`` with one end of a socket pair and sends
one job ``{"cfg": dict, "payload": {name: array}}``. The child (:func:`child_main`):

* a one-shot job (``cfg["kind"]`` in :data:`~kpface.bench.child.ONE_SHOT`: GEMM, export)
  answers ``("ok", result)`` and ends;
* a measurement opens and warms up its configuration and answers ``("ready", info)``, then
  answers each ``("run", n)`` with ``("ok", [n latencies in ms])`` and ``("finish",)`` with
  ``("ok", {peak memory, last outputs})`` and ends;
* any failure answers ``("skipped", reason)`` (it cannot run here) or
  ``("error", reason, traceback)`` and ends. Nothing is raised across the process boundary.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from typing import Any

from kpface.errors import EngineUnavailable, KpfaceError

from .child import ONE_SHOT, Prepared
from .settings import Skip

log = logging.getLogger(__name__)

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

# The child takes the parent's sys.path first, so it imports the same kpface the parent runs.
_BOOT = ("import json, sys\n"
         "sys.path[:] = json.loads(sys.argv[3])\n"
         "import importlib\n"
         "importlib.import_module(sys.argv[2]).child_main(int(sys.argv[1]))\n")


def _failure(e: BaseException) -> tuple:
    if isinstance(e, (Skip, EngineUnavailable)):
        return "skipped", str(e)
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return "error", f"{type(e).__name__}: {first}", traceback.format_exc()


def child_main(fd: int) -> None:
    """Entry point of a bench process: one job, then ``run``/``finish`` commands."""
    from multiprocessing.connection import Connection
    conn = Connection(fd)
    try:
        job = conn.recv()
        cfg, payload = job["cfg"], job["payload"]
        try:
            if cfg["kind"] in ONE_SHOT:
                conn.send(("ok", ONE_SHOT[cfg["kind"]](cfg)))
                return
            state = Prepared(cfg, payload)
        except BaseException as e:  # reported, never raised across the process boundary
            conn.send(_failure(e))
            return
        conn.send(("ready", state.ready()))
        while True:
            cmd = conn.recv()
            try:
                if cmd[0] == "run":
                    conn.send(("ok", state.run(int(cmd[1]))))
                else:
                    conn.send(("ok", state.finish()))
                    return
            except BaseException as e:
                conn.send(_failure(e))
                return
    except EOFError:  # the parent went away
        return
    finally:
        conn.close()


class _WorkerFailed(Exception):
    pass


class Worker:
    """One fresh Python process running one configuration (see :func:`child_main`).

    A plain ``subprocess`` of this interpreter rather than ``multiprocessing`` 'spawn': the
    child is just as fresh (nothing inherited but the environment) and it never re-imports the
    caller's ``__main__``, so scripts without an ``if __name__ == "__main__"`` guard work.
    The thread count goes into the child's environment (OpenMP / OpenBLAS / MKL read it when
    they load) as well as into the engine calls.
    """

    def __init__(self, cfg: dict, payload: dict | None, timeout_s: float):
        import socket
        import subprocess
        import tempfile
        from multiprocessing.connection import Connection

        if os.name == "nt":
            raise KpfaceError("kpface bench runs on Linux and macOS only")
        self.cfg, self.timeout_s = cfg, timeout_s
        env = dict(os.environ)
        for k in _THREAD_ENV:
            env[k] = str(int(cfg.get("threads", 1)))
        ours, theirs = socket.socketpair()
        self._err = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(theirs.fileno()), __name__,
                 json.dumps(sys.path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err,
                env=env, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send({"cfg": cfg, "payload": payload or {}})

    def _recv(self, timeout_s: float | None = None) -> tuple:
        try:
            if not self.conn.poll(timeout_s or self.timeout_s):
                self.close(kill=True)
                raise _WorkerFailed(f"timed out after {timeout_s or self.timeout_s:.0f} s")
            msg = self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.wait(timeout=30)
            self._err.seek(0)
            tail = self._err.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
            self.close()
            raise _WorkerFailed(f"the bench process died (exit code {code})"
                                + (f": {tail[-1]}" if tail else "")) from None
        if msg[0] in ("skipped", "error"):
            if len(msg) > 2:
                log.debug("bench config %s failed:\n%s", self.cfg.get("id"), msg[2])
            self.close()
        return msg

    def start(self) -> tuple[str, Any]:
        """("ready", info) | ("ok", result) for one-shot jobs | ("skipped"|"error", reason)."""
        try:
            msg = self._recv()
        except _WorkerFailed as e:
            return "error", str(e)
        return msg[0], msg[1]

    def request(self, *cmd) -> tuple[str, Any]:
        try:
            self.conn.send(cmd)
            msg = self._recv()
        except _WorkerFailed as e:
            return "error", str(e)
        except (OSError, ValueError) as e:  # the connection is already closed
            return "error", f"the bench process is gone ({e})"
        return msg[0], msg[1]

    def close(self, kill: bool = False) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
        if self.proc.poll() is None:
            try:
                if kill:
                    raise TimeoutError
                self.proc.wait(timeout=10)  # it ends once its connection closes
            except Exception:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            self._err.close()


def spawn(cfg: dict, payload: dict | None = None, timeout_s: float = 600.0) -> tuple[str, Any]:
    """Run a one-shot job (GEMM, export) in a fresh process; ("ok"|"skipped"|"error", result)."""
    w = Worker(cfg, payload, timeout_s)
    try:
        return w.start()
    finally:
        w.close()
