"""kpface.verification against slow, obviously-correct computations written from the LFW
protocol: every threshold tried by brute force, folds handled one by one."""
import numpy as np
import pytest

from kpface.errors import InputError
from kpface.verification import (accuracy_at, best_threshold, fold_ids, kfold_accuracy,
                                 roc_curve, tar_at_far)


def _data(n=400, seed=0, sep=1.5):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    sims = np.where(same, rng.normal(0.6, 0.15, n), rng.normal(0.6 - 0.15 * sep, 0.15, n))
    return np.round(sims, 3), same  # rounding makes ties, which the code must handle


def _slow_best(sims, same):
    """Best accuracy over every threshold at and between the values (brute force)."""
    cands = sorted(set(sims.tolist()))
    cands = [cands[0] - 1] + cands + [(a + b) / 2 for a, b in zip(cands, cands[1:])] + [cands[-1] + 1]
    return max(np.mean((sims >= t) == same) for t in cands)


def test_best_threshold_is_as_good_as_brute_force():
    for seed in range(5):
        sims, same = _data(150, seed)
        thr, acc = best_threshold(sims, same)
        assert acc == pytest.approx(_slow_best(sims, same))
        assert acc == pytest.approx(np.mean((sims >= thr) == same))


def test_best_threshold_takes_the_middle_of_a_gap():
    thr, acc = best_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool))
    assert acc == 1.0 and thr == pytest.approx(0.5)


def test_kfold_matches_a_fold_by_fold_computation():
    sims, same = _data(600, 3)
    v = kfold_accuracy(sims, same)
    folds = np.array_split(np.arange(600), 10)
    accs = []
    for k, test in enumerate(folds):
        train = np.setdiff1d(np.arange(600), test)
        t, _ = best_threshold(sims[train], same[train])
        accs.append(np.mean((sims[test] >= t) == same[test]))
        assert v.fold_thresholds[k] == pytest.approx(t)
    assert v.accuracy == pytest.approx(np.mean(accs)) and v.std == pytest.approx(np.std(accs))
    assert 0.6 < v.accuracy < 1.0 and v.pairs == 600 and v.missing == 0
    assert v.tar_at_far is None  # fewer than 1000 impostors


def test_given_folds_are_used():
    sims, same = _data(200, 4)
    given = np.arange(200) % 4  # interleaved, unlike contiguous blocks
    v = kfold_accuracy(sims, same, folds=given)
    assert len(v.fold_accuracies) == 4
    assert list(fold_ids(23, 10)) == sorted(fold_ids(23, 10).tolist())
    assert np.bincount(fold_ids(23, 10)).tolist() == [3, 3, 3] + [2] * 7


def test_missing_pairs_count_as_wrong_or_are_excluded():
    sims, same = _data(300, 5, sep=6)  # well separated: all right when scored
    base = kfold_accuracy(sims, same)
    assert base.accuracy == 1.0
    lost = sims.copy()
    lost[:30] = np.nan
    wrong = kfold_accuracy(lost, same)
    assert wrong.missing == 30 and wrong.accuracy == pytest.approx(0.9)  # 30 of 300 wrong
    excl = kfold_accuracy(lost, same, missing="exclude")
    assert excl.pairs == 270 and excl.accuracy == 1.0
    assert accuracy_at(lost, same, base.threshold, np.isnan(lost)) == pytest.approx(0.9)
    with pytest.raises(InputError):
        kfold_accuracy(sims, same, missing="ignore")


def test_tar_at_far_by_brute_force():
    rng = np.random.default_rng(6)
    imp, gen = rng.normal(0.2, 0.1, 5000), rng.normal(0.7, 0.15, 1000)
    sims = np.concatenate([imp, gen])
    same = np.r_[np.zeros(5000, bool), np.ones(1000, bool)]
    r = tar_at_far(sims, same, 1e-3)
    # slow: the lowest threshold (a data value or just above) with FAR <= 1e-3
    best = None
    for t in np.sort(sims):
        if np.mean(imp >= t) <= 1e-3:
            best = t
            break
    assert r["far_measured"] <= 1e-3 and r["tar"] == pytest.approx(np.mean(gen >= best))
    v = kfold_accuracy(sims, same)
    assert v.tar_at_far is not None and v.tar_at_far["impostors"] == 5000


def test_roc_curve_runs_from_nothing_to_everything():
    sims, same = _data(300, 7)
    fpr, tpr = roc_curve(sims, same)
    assert (fpr[0], tpr[0]) == (0, 0) and fpr[-1] == pytest.approx(1) and tpr[-1] == pytest.approx(1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # Each point is the rates at one threshold (checked at a few).
    u = np.unique(sims)[::-1]
    for k in (0, 10, 50):
        t = u[k]
        assert fpr[k + 1] == pytest.approx(np.mean(sims[~same] >= t))
        assert tpr[k + 1] == pytest.approx(np.mean(sims[same] >= t))


def test_needs_both_kinds_of_pair():
    with pytest.raises(InputError, match="both"):
        kfold_accuracy(np.array([0.5, 0.6]), np.array([True, True]))
