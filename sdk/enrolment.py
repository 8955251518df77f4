"""Enrolling a folder of photos: which images, under which label and id, one embedding each.

The local path and the Ray path (:mod:`kpface.cluster`) share everything here, so both put the
same rows into a gallery; they differ only in where :func:`embed_item` runs.

Folder convention (``kpface gallery enroll DIR``)::

    DIR/alice/1.jpg, DIR/alice/trip/2.png   -> label "alice" (the first folder below DIR)
    DIR/bob.jpg                             -> label "bob"   (an image directly in DIR: its stem)

The id of a row is the image's path relative to DIR with ``/`` separators (``alice/trip/2.png``),
so enrolling the same folder twice gives the same ids. Each image gives at most one row: its
largest face (several faces are counted and logged; a photo without a face, or a file that is
not a readable image, is reported and skipped, never fatal).

:func:`add_to_gallery` is the one place that writes into a gallery: any object with
``add(ids, embeddings, labels=None)`` (``kpface.gallery.Gallery``, or a stand-in in tests).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import InputError, KpfaceError
from .image import list_images, load_image

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EnrolItem:
    """One image to enrol: its path, the identity label and the row id."""

    path: str
    label: str
    id: str


@dataclass
class EnrolResult:
    """What embedding one image gave: ``embedding`` (L2-normalised, float32) or ``error``."""

    id: str
    label: str
    path: str
    embedding: np.ndarray | None = None
    faces: int = 0
    error: str | None = None
    worker: str = ""  # where it ran ("local", or a Ray node id prefix and pid)
    seconds: float = 0.0  # time spent on this image (load, detect, embed)
    finished: float = 0.0  # time.time() when it was done, on the worker's clock

    @property
    def ok(self) -> bool:
        return self.error is None and self.embedding is not None


@dataclass
class EnrolSummary:
    """The outcome of enrolling a folder."""

    images: int = 0
    added: int = 0
    failed: list[EnrolResult] = field(default_factory=list)
    several_faces: int = 0  # images where more than one face was found (largest one kept)
    seconds: float = 0.0
    workers: set[str] = field(default_factory=set)

    def line(self) -> str:
        extra = f", {self.several_faces} with several faces (largest kept)" if self.several_faces else ""
        return (f"enrolled {self.added} of {self.images} image(s) in {self.seconds:.1f} s; "
                f"{len(self.failed)} skipped{extra}")


def list_enrolment(folder: str | os.PathLike) -> list[EnrolItem]:
    """The images of ``folder`` with their labels and ids (see the module docstring)."""
    root = Path(folder)
    items = []
    for path in list_images(root):  # sorted; raises InputError for a missing or empty folder
        rel = path.relative_to(root)
        label = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        items.append(EnrolItem(path=str(path), label=label, id=rel.as_posix()))
    return items


def choose_face(faces: Sequence) -> object:
    """The face to enrol from one photo: the largest box (ties: the higher score)."""
    def key(f):
        x1, y1, x2, y2 = (float(v) for v in f.box)
        return (max(0.0, x2 - x1) * max(0.0, y2 - y1), float(f.score))
    return max(faces, key=key)


def embed_item(pipe, item: EnrolItem, worker: str = "local") -> EnrolResult:
    """Load, detect and embed one image with ``pipe`` (a :class:`kpface.FacePipeline`).

    A bad image or a photo without a face becomes a result with ``error`` set; other errors
    (a broken model, a bug) propagate.
    """
    start = time.perf_counter()
    result = EnrolResult(id=item.id, label=item.label, path=item.path, worker=worker)
    try:
        faces = pipe(load_image(item.path))
    except InputError as e:
        result.error = str(e)
        faces = []
    result.faces = len(faces)
    if not faces and result.error is None:
        result.error = f"{item.path}: no face found"
    if len(faces) > 1:
        log.info("%s: %d faces, enrolling the largest", item.path, len(faces))
    if faces:
        result.embedding = np.asarray(choose_face(faces).embedding, np.float32)
    result.seconds, result.finished = time.perf_counter() - start, time.time()
    return result


def embed_local(items: Iterable[EnrolItem], pipe) -> Iterator[EnrolResult]:
    """The local path: every item through one pipeline, in this process, in order."""
    for item in items:
        yield embed_item(pipe, item)


def add_to_gallery(gallery, results: Sequence[EnrolResult]) -> int:
    """Add the successful ``results`` to ``gallery`` in one ``add`` call; returns how many."""
    rows = [r for r in results if r.ok]
    if not rows:
        return 0
    gallery.add([r.id for r in rows], np.stack([r.embedding for r in rows]).astype(np.float32),
                labels=[r.label for r in rows])
    return len(rows)


def enroll(results: Iterable[EnrolResult], gallery, total: int | None = None,
           chunk: int = 256, progress: Progress | None = None,
           every_s: float = 5.0) -> EnrolSummary:
    """Consume a stream of results (local or from Ray), adding them to ``gallery`` in chunks
    of ``chunk`` rows as they arrive, so the driver holds at most one chunk.

    Raises :class:`InputError` if not a single image could be enrolled.
    """
    if chunk < 1:
        raise InputError(f"chunk must be >= 1, got {chunk}")
    summary = EnrolSummary()
    start = last = time.perf_counter()
    pending: list[EnrolResult] = []
    for r in results:
        summary.images += 1
        summary.workers.add(r.worker)
        summary.several_faces += r.faces > 1
        if r.ok:
            pending.append(r)
        else:
            summary.failed.append(r)
            log.warning("skipped %s", r.error)
        if len(pending) >= chunk:
            summary.added += add_to_gallery(gallery, pending)
            pending = []
        now = time.perf_counter()
        if progress and now - last >= every_s:
            of = f"/{total}" if total else ""
            progress(f"  {summary.images}{of} images, {summary.added + len(pending)} embedded, "
                     f"{len(summary.failed)} skipped ({summary.images / (now - start):.1f} images/s)")
            last = now
    summary.added += add_to_gallery(gallery, pending)
    summary.seconds = time.perf_counter() - start
    if summary.images and not summary.added:
        first = summary.failed[0].error if summary.failed else "no result"
        raise InputError(f"none of the {summary.images} image(s) could be enrolled "
                         f"(first: {first})")
    return summary


def check_gallery(gallery) -> None:
    """Refuse early (before any image is embedded) an object that cannot take rows."""
    if not callable(getattr(gallery, "add", None)):
        raise KpfaceError(f"{type(gallery).__name__} has no add(ids, embeddings, labels=None); "
                          "pass a kpface.gallery.Gallery")
