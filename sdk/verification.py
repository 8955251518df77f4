"""Face verification accuracy from pair similarities, the way LFW reports it. numpy only.

* :func:`kfold_accuracy`: 10-fold accuracy. For each fold the threshold is the one that is best
  on the other nine folds, and the fold's accuracy is measured at it; the figure is the mean
  and standard deviation of the ten (LFW's "unrestricted" protocol, InsightFace's
  ``verification.py``). Pairs whose similarity is missing (NaN: an image where no face was
  found) count as wrong when ``missing="wrong"`` (the LFW convention: every pair is scored)
  and are left out when ``"exclude"``.
* :func:`tar_at_far`: the share of genuine pairs accepted at the threshold that accepts at
  most ``far`` of the impostor pairs.
* :func:`roc_curve`: false and true accept rates at every threshold.

Similarities are cosines (larger = more alike): a pair is called "same" when its similarity is
``>=`` the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

MISSING = ("wrong", "exclude")


def best_threshold(sims: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) that classifies ``sims`` best (``>=`` threshold = same).

    Every distinct cut is tried: below all values, between each pair of neighbours (the
    midpoint) and above all values. Among equally good cuts the middle one is taken, so the
    choice does not lean on one side of a gap."""
    sims = np.asarray(sims, np.float64)
    same = np.asarray(same, bool)
    if sims.size == 0:
        raise InputError("no pairs to choose a threshold on")
    u = np.unique(sims)
    cuts = np.concatenate([[u[0] - 1e-6], (u[:-1] + u[1:]) / 2, [u[-1] + 1e-6]])
    order = np.argsort(sims)
    s_sorted, y_sorted = sims[order], same[order]
    # Pairs at or above a cut are called same: correct = genuine above + impostors below.
    below = np.searchsorted(s_sorted, cuts, side="left")
    genuine_below = np.concatenate([[0], np.cumsum(y_sorted)])[below]
    impostor_below = below - genuine_below
    correct = (same.sum() - genuine_below) + impostor_below
    best = np.flatnonzero(correct == correct.max())
    pick = best[len(best) // 2]
    return float(cuts[pick]), float(correct[pick] / sims.size)


def accuracy_at(sims: np.ndarray, same: np.ndarray, threshold: float,
                missing: np.ndarray | None = None) -> float:
    """Share of pairs decided right at ``threshold``; a ``missing`` pair is wrong."""
    sims = np.asarray(sims, np.float64)
    same = np.asarray(same, bool)
    missing = np.zeros(len(sims), bool) if missing is None else np.asarray(missing, bool)
    right = ((sims >= threshold) == same) & ~missing
    return float(right.sum() / max(1, len(sims)))


def fold_ids(n: int, folds: int = 10, given: np.ndarray | None = None) -> np.ndarray:
    """The fold of each of ``n`` pairs: ``given`` (a pairs file's own sets) or ``folds``
    contiguous blocks as equal as possible (InsightFace's ``KFold(shuffle=False)``)."""
    if given is not None:
        given = np.asarray(given, int)
        if len(given) != n:
            raise InputError(f"{len(given)} fold ids for {n} pairs")
        return given
    k = max(1, min(folds, n))
    return np.repeat(np.arange(k), [n // k + (i < n % k) for i in range(k)])


@dataclass
class Verification:
    """What :func:`kfold_accuracy` measured for one set of similarities."""

    accuracy: float            # mean over folds, 0..1
    std: float                 # standard deviation over folds
    threshold: float           # best on all (scored) pairs
    fold_thresholds: list[float]
    fold_accuracies: list[float]
    pairs: int                 # pairs scored
    genuine: int
    impostor: int
    missing: int               # pairs with no similarity (no face found)
    missing_policy: str
    tar_at_far: dict[str, Any] | None = None
    at_threshold: dict[str, float] = field(default_factory=dict)  # accuracy at given thresholds

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def kfold_accuracy(sims: np.ndarray, same: np.ndarray, folds: np.ndarray | None = None,
                   n_folds: int = 10, missing: str = "wrong",
                   thresholds: dict[str, float] | None = None, far: float = 1e-3,
                   min_impostors: int = 1000) -> Verification:
    """10-fold verification accuracy of pair similarities ``sims`` (NaN = no face found)
    against the truth ``same``. ``folds``: the fold of each pair (a pairs file's own sets);
    else ``n_folds`` contiguous blocks. ``thresholds``: named thresholds (the manifest's)
    to report the plain accuracy at. TAR at ``far`` is given with ``min_impostors`` impostor
    pairs or more."""
    if missing not in MISSING:
        raise InputError(f"missing={missing!r}: choose one of {', '.join(MISSING)}")
    sims = np.asarray(sims, np.float64)
    same = np.asarray(same, bool)
    if sims.shape != same.shape or sims.ndim != 1:
        raise InputError(f"similarities {sims.shape} and labels {same.shape} differ in shape")
    lost = np.isnan(sims)
    fold = fold_ids(len(sims), n_folds, folds)
    if missing == "exclude":
        sims, same, fold = sims[~lost], same[~lost], fold[~lost]
        lost = np.zeros(len(sims), bool)
    ok = ~lost
    if not same[ok].any() or same[ok].all():
        raise InputError("verification needs both same-person and different-person pairs "
                         "with faces found")
    accs, thrs = [], []
    for k in np.unique(fold):
        test, train = fold == k, (fold != k) & ok
        if not train.any():  # a single fold: no other folds to choose on
            train = ok
        thr, _ = best_threshold(sims[train], same[train])
        thrs.append(thr)
        accs.append(accuracy_at(sims[test], same[test], thr, lost[test]))
    thr_all, _ = best_threshold(sims[ok], same[ok])
    at = {name: accuracy_at(sims, same, t, lost) for name, t in (thresholds or {}).items()}
    imp = int((~same[ok]).sum())
    tar = tar_at_far(sims[ok], same[ok], far) if imp >= min_impostors else None
    return Verification(
        accuracy=float(np.mean(accs)), std=float(np.std(accs)), threshold=thr_all,
        fold_thresholds=thrs, fold_accuracies=accs, pairs=int(len(sims)),
        genuine=int(same.sum()), impostor=int((~same).sum()), missing=int(lost.sum()),
        missing_policy=missing, tar_at_far=tar, at_threshold=at)


def tar_at_far(sims: np.ndarray, same: np.ndarray, far: float = 1e-3) -> dict[str, Any]:
    """True accept rate at the smallest threshold whose false accept rate is ``<= far``."""
    sims = np.asarray(sims, np.float64)
    same = np.asarray(same, bool)
    imp = np.sort(sims[~same])[::-1]
    gen = sims[same]
    if not len(imp) or not len(gen):
        raise InputError("TAR at FAR needs genuine and impostor pairs")
    allowed = int(np.floor(far * len(imp)))  # impostors that may be accepted
    # Accept s >= thr: just above the (allowed+1)-th highest impostor score.
    thr = float(np.nextafter(imp[allowed], np.inf)) if allowed < len(imp) else float(imp[-1])
    return {"far": far, "tar": float((gen >= thr).mean()), "threshold": thr,
            "far_measured": float((imp >= thr).mean()), "impostors": int(len(imp))}


def roc_curve(sims: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false accept rates, true accept rates) at every distinct threshold, from accepting
    nothing to accepting everything (NaN similarities are left out)."""
    sims = np.asarray(sims, np.float64)
    same = np.asarray(same, bool)
    keep = ~np.isnan(sims)
    sims, same = sims[keep], same[keep]
    order = np.argsort(-sims, kind="stable")
    s, y = sims[order], same[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each run of ties
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    fpr = np.r_[0.0, fp / max(1, (~y).sum())]
    tpr = np.r_[0.0, tp / max(1, y.sum())]
    return fpr, tpr
