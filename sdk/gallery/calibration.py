"""Open-set identification errors, as NIST's FRVT 1:N reports define them.

- **FPIR(N, T)**, false positive identification rate: the fraction of *non-mated* searches
  (by people not in the gallery of N) that return one or more candidates at or above the
  threshold T. With a candidate list sorted best first, that is: top score >= T.
- **FNIR(N, R, T)**, false negative identification rate: the fraction of *mated* searches (by
  people in the gallery) whose mate is not among the candidates of rank <= R with a score at or
  above T. kpface's identification answers with one candidate, so R = 1: the search misses when
  its best candidate is another identity, or the mate's score is below T.

:func:`threshold_for_fpir` picks the lowest threshold whose FPIR on the given non-mated
searches does not exceed the target; :func:`fnir` measures the mated searches at it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Calibration:
    """What :meth:`Gallery.calibrate` measured; ``threshold`` becomes the gallery's."""

    threshold: float
    target_fpir: float
    fpir: float  # measured on the non-mated searches at ``threshold``
    fnir: float | None  # rank 1, on the mated searches at ``threshold`` (None: none given)
    non_mated: int
    mated: int
    gallery_size: int
    rank1_miss: float | None = None  # mated searches whose best candidate is someone else

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        fnir = "FNIR not measured (no mated searches)" if self.fnir is None else (
            f"FNIR {self.fnir:.4f} on {self.mated} mated searches "
            f"(rank-1 misses alone {self.rank1_miss:.4f})")
        return (f"threshold {self.threshold:.4f}: FPIR {self.fpir:.4f} on {self.non_mated} "
                f"non-mated searches (target {self.target_fpir}), {fnir}; N = {self.gallery_size}")


def fpir(top_scores: np.ndarray, threshold: float) -> float:
    """Share of non-mated searches whose best candidate scores >= ``threshold``."""
    s = np.asarray(top_scores, np.float64)
    return float(np.mean(s >= threshold)) if s.size else 0.0


def threshold_for_fpir(top_scores: np.ndarray, target: float) -> float:
    """The lowest threshold T (float32) with FPIR(T) <= ``target`` on these non-mated top
    scores: at most floor(target * n) of them may reach it."""
    s = np.sort(np.asarray(top_scores, np.float32))[::-1]
    n = s.size
    if not 0 < target < 1:
        raise InputError(f"the target FPIR must be between 0 and 1, got {target}")
    if n == 0:
        raise InputError("calibration needs non-mated searches (faces of people not enrolled)")
    if n * target < 1:
        raise InputError(f"{n} non-mated searches cannot measure an FPIR of {target}: it needs "
                         f"at least {math.ceil(1 / target)}")
    allowed = int(math.floor(target * n + 1e-9))
    if allowed >= n:
        return -1.0
    # Just above the (allowed + 1)-th best non-mated score: that one and all below it fail.
    return float(np.nextafter(s[allowed], np.float32(np.inf)))


def fnir(top_labels: Sequence, top_scores: np.ndarray, mate_labels: Sequence,
         threshold: float) -> tuple[float, float]:
    """(FNIR at rank 1 and ``threshold``, share whose best candidate is not the mate)."""
    scores = np.asarray(top_scores, np.float64)
    wrong = np.array([a != b for a, b in zip(top_labels, mate_labels)], bool)
    miss = wrong | (scores < threshold)
    return float(np.mean(miss)), float(np.mean(wrong))


def calibrate(gallery, non_mated, mated: tuple | None, target_fpir: float) -> Calibration:
    """Measure ``gallery``'s own search (re-ranked, exact scores) on the searches given."""
    _, top = gallery._search(non_mated, 1)
    if top.shape[1] == 0:
        raise InputError("calibrate needs a gallery with rows")
    top = top[:, 0]
    threshold = threshold_for_fpir(top, target_fpir)
    rate = miss = None
    n_mated = 0
    if mated is not None:
        queries, mate_labels = mated
        mate_labels = [str(m) for m in mate_labels]
        unknown = set(mate_labels) - set(gallery.labels())
        if unknown:
            raise InputError(f"mated searches of identities not in the gallery: "
                             f"{', '.join(sorted(unknown)[:5])}")
        pos, scores = gallery._search(queries, 1)
        if len(pos) != len(mate_labels):
            raise InputError(f"{len(pos)} mated queries but {len(mate_labels)} labels")
        top_labels = [gallery._rows.labels[p] if p >= 0 else None for p in pos[:, 0]]
        rate, miss = fnir(top_labels, scores[:, 0], mate_labels, threshold)
        n_mated = len(mate_labels)
    return Calibration(threshold=threshold, target_fpir=float(target_fpir),
                       fpir=fpir(top, threshold), fnir=rate, non_mated=len(top), mated=n_mated,
                       gallery_size=len(gallery), rank1_miss=miss)
