"""Galleries for 1:N identification: SQLite as the source of truth, a FAISS index as a cache.

    from kpface.gallery import Gallery
    g = Gallery.open("people.kpg", model="models/")
    g.add(ids, embeddings, labels)
    ids, scores = g.search(queries, k=5)
    match = g.identify(face)

See :mod:`kpface.gallery.gallery` (the class), :mod:`.store` (the file), :mod:`.index` (the
index kinds and how they are chosen), :mod:`.calibration` (FPIR / FNIR) and :mod:`.bench`.
"""
from .calibration import Calibration  # noqa: F401
from .gallery import Gallery, Match  # noqa: F401
from .search import as_queries  # noqa: F401
from .model import describe_model  # noqa: F401

__all__ = ["Gallery", "Match", "Calibration", "describe_model", "open_for_models"]


def open_for_models(path, models_dir, runtime: str = "onnxruntime", precision: str = "fp32",
                    **options) -> Gallery:
    """The gallery ``path`` for the recognizer in ``models_dir`` (``kpface serve --gallery``):
    an existing file only, refused if its embeddings come from another recognizer."""
    return Gallery.open(path, model=models_dir, runtime=runtime, precision=precision,
                        create=False, **options)
