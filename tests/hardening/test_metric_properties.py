"""Promise 4: metrics cannot drift from scikit-learn.

Hypothesis draws label/score matrices: continuous scores and heavily tied ones, classes with no
positives, classes that are all positive, ignored (-1) entries, integer sample weights. Every value of
mAP (per class AP), CP/CR/CF1/OP/OR/OF1 at thresholds and top-k, and top-k accuracy must match
scikit-learn within 1e-6 (on the 0-1 scale); the count of mismatches is asserted to be zero.
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import top_k_accuracy_score

from patchcsra.metrics import average_precision, mean_average_precision, multilabel_prf, topk_accuracy
from test_metrics import _sk_ap, _sk_pred, _sk_prf

TOL = 1e-6
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, max_n=40, max_c=6):
    """(scores (N, C) float64, targets (N, C) in {-1, 0, 1}, weights (N,) in 1..3) with the hard cases forced in."""
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ties = draw(st.sampled_from(["none", "decimal", "int", "all-equal"]))
    t = (rng.random((n, c)) < draw(st.floats(0.0, 1.0))).astype(np.int64)
    s = rng.normal(size=(n, c)) + draw(st.floats(0, 3)) * t
    if ties == "decimal":
        s = np.round(s, 1)
    elif ties == "int":
        s = np.clip(np.round(s), -1, 2)
    elif ties == "all-equal":
        s = np.zeros_like(s)
    special = draw(st.lists(st.sampled_from(["all-neg", "all-pos", "all-ignored", "plain"]), min_size=c, max_size=c))
    for j, kind in enumerate(special):
        if kind == "all-neg":
            t[:, j] = 0
        elif kind == "all-pos":
            t[:, j] = 1
        elif kind == "all-ignored":
            t[:, j] = -1
    t[rng.random((n, c)) < draw(st.sampled_from([0.0, 0.1, 0.4]))] = -1
    w = rng.integers(1, 4, size=n)  # zero weights are covered in test_metrics; sklearn refuses all-zero ones
    return s, t, w


def _ref_prf(t, pred, w=None):
    """sklearn's CP..OF1 (``test_metrics._sk_prf``); with every entry ignored there is nothing to count and
    the stated policy (zero_division=0) gives 0 for all six."""
    if not (t >= 0).any():
        return dict.fromkeys(("CP", "CR", "CF1", "OP", "OR", "OF1"), 0.0)
    return _sk_prf(t, pred, w)


def _mismatches(ours_percent, ref_unit) -> int:
    ours = np.asarray(ours_percent, dtype=float) / 100
    ref = np.asarray(ref_unit, dtype=float)
    nan_diff = int((np.isnan(ours) != np.isnan(ref)).sum())
    both = ~np.isnan(ours) & ~np.isnan(ref)
    return nan_diff + int((np.abs(ours[both] - ref[both]) > TOL).sum())


@SETTINGS
@given(problems())
def test_average_precision_and_map(p):
    s, t, w = p
    assert _mismatches(average_precision(s, t), _sk_ap(s, t)) == 0
    assert _mismatches(average_precision(s, t, w), _sk_ap(s, t, w.astype(float))) == 0
    ref = _sk_ap(s, t)
    m, _ = mean_average_precision(s, t)[:2]
    if np.isnan(ref).all():
        assert np.isnan(m)
    else:
        assert abs(m / 100 - np.nanmean(ref)) <= TOL


@SETTINGS
@given(problems(max_c=3), st.booleans())
def test_inputs_are_never_modified(p, fortran):
    """Found by this file: with one class (or Fortran-ordered scores) AP wrote -inf into the caller's array."""
    s, t, w = p
    if fortran:
        s, t = np.asfortranarray(s), np.asfortranarray(t)
    s0, t0, w0 = s.copy(), t.copy(), w.copy()
    average_precision(s, t)
    average_precision(s, t, w)
    multilabel_prf(s, t, top_k=2, sample_weight=w)
    assert np.array_equal(s, s0) and np.array_equal(t, t0) and np.array_equal(w, w0)


@SETTINGS
@given(problems(), st.sampled_from([0.0, 0.25, 0.5, 0.6, 1.0]), st.sampled_from([None, 1, 2, 3, 10]))
def test_f1_family(p, threshold, top_k):
    s, t, w = p
    pred = _sk_pred(s, threshold, top_k)
    for ours, ref in ((multilabel_prf(s, t, threshold=threshold, top_k=top_k), _ref_prf(t, pred)),
                      (multilabel_prf(s, t, threshold=threshold, top_k=top_k, sample_weight=w), _ref_prf(t, pred, w))):
        bad = [k for k in ref if abs(ours[k] / 100 - ref[k]) > TOL]
        assert bad == [], {k: (ours[k], ref[k]) for k in bad}


@SETTINGS
@given(st.integers(1, 60), st.integers(3, 12),  # sklearn reads 2 columns as a binary problem
       st.integers(0, 2**32 - 1), st.booleans())
def test_topk_accuracy(n, c, seed, tied):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, c))
    if tied:
        s = np.round(s)
    y = rng.integers(0, c, size=n)
    w = rng.integers(0, 4, size=n)
    ks = tuple(k for k in (1, 2, 5) if k < c)
    if not ks:
        return
    ours, ours_w = topk_accuracy(s, y, ks=ks), topk_accuracy(s, y, ks=ks, sample_weight=w)
    for k in ks:
        assert abs(ours[f"top{k}"] / 100 - top_k_accuracy_score(y, s, k=k, labels=range(c))) <= TOL
        if w.sum() > 0:
            ref = top_k_accuracy_score(y, s, k=k, labels=range(c), sample_weight=w)
            assert abs(ours_w[f"top{k}"] / 100 - ref) <= TOL
