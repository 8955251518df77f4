"""Bulk enrolment on Ray: detection and embedding of a photo folder with Ray Data.

    with ray_session("auto"):                       # or None: a local Ray instance
        summary = enroll_with_ray("photos/", gallery, models_dir="models/", workers=4)

The folder's images (:func:`kpface.enrolment.list_enrolment`: label = first sub-folder) become a
Ray Dataset of paths; ``map_batches`` runs :class:`EmbedWorker`, a callable class, on a fixed
pool of actors, so each worker opens ONE :class:`~kpface.pipeline.FacePipeline` (one engine
session per stage) and reuses it for every batch. Results stream back to the driver as they are
ready and are added to the gallery in chunks (:func:`kpface.enrolment.enroll`); images that
cannot be read or show no face are reported, never fatal.

On a real cluster every node reads the images and the models directory by the paths the driver
gives, so both must be on storage all nodes see at the same path (NFS, a shared volume), and
every node needs the same kpface (``pip install 'kpface[cluster]'``).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .enrolment import (EnrolItem, EnrolResult, EnrolSummary, Progress, check_gallery, embed_item,
                        enroll, list_enrolment)
from .errors import EngineUnavailable, InputError, KpfaceError, ModelError
from .manifest import load_manifest

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOCAL = "local"  # the address meaning "start a Ray instance on this machine"
ACTOR_START_TIMEOUT_S = 600
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data needs pyarrow, part of the extra)
    except ImportError as e:
        raise EngineUnavailable(f"the cluster path needs Ray ({e.name} is missing): "
                                "pip install 'kpface[cluster]'") from None
    return ray


@contextlib.contextmanager
def _loopback_only(active: bool):
    """Make the Ray instance started meanwhile use 127.0.0.1 only, not the host's address.

    Ray picks every node, driver and worker address with ``get_node_ip_address``, and rewrites
    a given 127.0.0.1 (``_node_ip_address`` too) to the host's routable address, unless its
    single-machine mode is on: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at import
    into ``ray_constants.ENABLE_RAY_CLUSTER``. So both are set while ``ray.init`` runs: the
    variable for the processes it starts (GCS, raylet, and the workers the raylet spawns
    inherit it), the constant for this process (Ray is pinned, see setup.cfg).
    """
    if not active:
        yield
        return
    from ray._private import ray_constants
    saved_env, saved_const = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                object_store_mb: int | None = None, progress: Progress | None = None):
    """Connect to Ray for the duration of the block.

    ``address`` None or ``"local"``: start a Ray instance on this machine (loopback only, no
    dashboard) and stop it on exit. Any other address (``"auto"``, ``HOST:PORT``,
    ``ray://HOST:PORT``) connects to that cluster and only disconnects on exit. If Ray is
    already initialised in this process, that session is used and left running.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    local = address in (None, "", LOCAL)
    kwargs: dict = {"include_dashboard": False, "configure_logging": False,
                    "log_to_driver": log.isEnabledFor(logging.DEBUG)}
    if local:
        kwargs.update(address=LOCAL, num_cpus=num_cpus, _node_ip_address=LOOPBACK)
        if object_store_mb:
            kwargs["object_store_memory"] = int(object_store_mb) << 20
    else:
        _probe(address)
        kwargs["address"] = address
    if progress:
        progress("starting a local Ray instance" if local else f"connecting to Ray at {address}")
    try:
        with _loopback_only(local):
            ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = "start a local Ray instance" if local else f"connect to Ray at {address}"
        hint = "" if local else " (check the address, or start one with `ray start --head`)"
        raise KpfaceError(f"could not {where}: {str(e).splitlines()[0][:200]}{hint}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at a ``HOST:PORT`` (or ``ray://HOST:PORT``) address:
    ``ray.init`` would keep retrying for minutes. ``auto`` is left to Ray."""
    import socket
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        if address != "auto":
            raise InputError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise KpfaceError(f"nothing answers at {address} ({e.strerror or e}); check the address, "
                          "or start a cluster with `ray start --head`") from None


class EmbedWorker:
    """Ray Data callable class: one FacePipeline per actor, opened once, used for every batch.

    A batch is a dict of numpy columns ``path``, ``label``, ``id``; the output adds
    ``embedding`` [N, D] float32 (zeros where ``error`` is non-empty), ``error``, ``faces``,
    ``times`` [N, 2] (seconds spent, time.time() when done) and ``worker``.
    """

    def __init__(self, models_dir: str, threads: int = 1, runtime: str = "onnxruntime",
                 precision: str = "fp32", use_keypoints: bool = True):
        from .pipeline import FacePipeline
        self.pipe = FacePipeline.from_dir(models_dir, runtime=runtime, precision=precision,
                                          threads=threads, use_keypoints=use_keypoints)
        self.size = int(self.pipe.manifest.get("embedding_size", 512))
        self.worker = _worker_name()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        emb = np.zeros((n, self.size), np.float32)
        errors, faces, times = [], np.zeros(n, np.int32), np.zeros((n, 2), np.float64)
        for i, (path, label, id_) in enumerate(zip(batch["path"], batch["label"], batch["id"])):
            r = embed_item(self.pipe, EnrolItem(str(path), str(label), str(id_)), self.worker)
            faces[i], times[i] = r.faces, (r.seconds, r.finished)
            errors.append(r.error or "")
            if r.ok:
                emb[i] = r.embedding
        return {"path": batch["path"], "label": batch["label"], "id": batch["id"],
                "embedding": emb, "faces": faces, "error": np.array(errors, dtype=object),
                "times": times, "worker": np.array([self.worker] * n, dtype=object)}


def _worker_name() -> str:
    try:
        import ray
        node = ray.get_runtime_context().get_node_id()[:8]
    except Exception:  # not inside Ray (a direct call in a test)
        node = "local"
    return f"{node}/{os.getpid()}"


def _check_models(models_dir) -> str:
    if models_dir is None:
        from .pipeline import default_models_dir
        models_dir = default_models_dir()
    root = Path(models_dir).expanduser().resolve()
    for stage in ("detector", "keypoints", "recognizer"):
        if stage != "keypoints" and not (root / stage).is_dir():
            raise ModelError(f"{root} has no {stage}/ model; export one with "
                             f"`kpface export {stage} --out {root / stage}`")
        if (root / stage).is_dir():  # hashes checked here, before any worker starts
            load_manifest(root / stage, task=stage)
    return str(root)


def embed_ray(items: Sequence[EnrolItem], models_dir: str | os.PathLike | None = None,
              workers: int | None = None, threads: int = 1, batch_size: int = 4,
              runtime: str = "onnxruntime", precision: str = "fp32",
              use_keypoints: bool = True) -> Iterator[EnrolResult]:
    """Embed ``items`` on the connected Ray cluster; yields results as they are ready (in no
    particular order). Needs an open :func:`ray_session`.

    ``workers`` actors (default: as many as the cluster's CPUs allow at ``threads`` each) each
    reserve ``threads`` CPUs and run their engines with that many threads.
    """
    ray = import_ray()
    if not ray.is_initialized():
        raise KpfaceError("embed_ray needs a Ray session: use `with ray_session(...):`")
    if threads < 1 or batch_size < 1:
        raise InputError(f"threads and batch_size must be >= 1, got {threads} and {batch_size}")
    if not items:
        return
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if workers is None:
        workers = max(1, min(len(items), cpus // threads))
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    if workers * threads > cpus:
        raise InputError(f"{workers} worker(s) x {threads} thread(s) need {workers * threads} "
                         f"CPUs; the cluster has {cpus}: lower --workers or --threads")
    import ray.data as rd
    blocks = max(1, min(math.ceil(len(items) / batch_size), 100_000))
    ds = rd.from_items([asdict(i) for i in items], override_num_blocks=blocks)
    ds = ds.map_batches(
        EmbedWorker, batch_size=batch_size, batch_format="numpy", num_cpus=threads,
        compute=rd.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"models_dir": _check_models(models_dir), "threads": threads,
                               "runtime": runtime, "precision": precision,
                               "use_keypoints": use_keypoints})
    ctx = ds.context  # this dataset's own copy of the DataContext
    ctx.enable_progress_bars = False  # progress goes through kpface's own callback
    ctx.print_on_execution_start = log.isEnabledFor(logging.DEBUG)
    # Start every worker (each opens its pipeline) before handing out batches, so the work is
    # spread over all of them from the first batch on.
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    log.info("ray: %d image(s) in %d block(s) on %d worker(s) x %d thread(s)", len(items),
             blocks, workers, threads)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["id"])):
                err = str(batch["error"][i])
                yield EnrolResult(id=str(batch["id"][i]), label=str(batch["label"][i]),
                                  path=str(batch["path"][i]), faces=int(batch["faces"][i]),
                                  embedding=None if err else np.array(batch["embedding"][i]),
                                  error=err or None, worker=str(batch["worker"][i]),
                                  seconds=float(batch["times"][i][0]),
                                  finished=float(batch["times"][i][1]))
    except Exception as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, KpfaceError):  # e.g. a ModelError raised by a worker
            raise type(cause)(str(cause)) from None
        if isinstance(e, KpfaceError):
            raise
        raise KpfaceError(f"the Ray enrolment failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from e


def enroll_with_ray(folder: str | os.PathLike, gallery, models_dir: str | os.PathLike | None = None,
                    address: str | None = None, workers: int | None = None, threads: int = 1,
                    batch_size: int = 4, chunk: int = 256, progress: Progress | None = None,
                    **pipeline_options) -> EnrolSummary:
    """``kpface gallery enroll DIR --ray [ADDRESS]``: embed ``folder`` on Ray and add the rows
    to ``gallery`` (anything with ``add(ids, embeddings, labels=None)``) on the driver."""
    check_gallery(gallery)
    items = list_enrolment(folder)
    models = _check_models(models_dir)
    if progress:
        progress(f"enrolling {len(items)} image(s) from {folder} with Ray")
    with ray_session(address, progress=progress):
        start = time.perf_counter()
        summary = enroll(embed_ray(items, models, workers=workers, threads=threads,
                                   batch_size=batch_size, **pipeline_options),
                         gallery, total=len(items), chunk=chunk, progress=progress)
        summary.seconds = time.perf_counter() - start
    return summary
