"""patchcsra.metrics against scikit-learn: AP (ties, ignored entries, classes without positives,
weights, (R, N) bootstrap weights), CP/CR/OP/OR at a threshold and top-k, top-k accuracy, errors.

Values are compared on the 0-1 scale within 1e-6 (ours / 100). Predictions for the sklearn side are
built here independently (sigmoid >= threshold, stable argsort for top-k).
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, top_k_accuracy_score

from patchcsra.errors import PatchCSRAError
from patchcsra.metrics import (METRIC_NAMES, average_precision, bootstrap_weights, mean_average_precision,
                               multilabel_metrics, multilabel_prf, topk_accuracy)

TOL = 1e-6


# ------------------------------------------------------------------------------------ helpers
def _data(seed, n, c, *, ties=None, p_pos=0.2, p_ign=0.1):
    """Random (N, C) scores and {-1, 0, 1} targets; ties='decimal' rounds to 0.1, 'int' to {0..3}."""
    rng = np.random.default_rng(seed)
    t = (rng.random((n, c)) < p_pos).astype(np.int64)
    s = rng.normal(size=(n, c)) + 1.5 * t
    if ties == "decimal":
        s = np.round(s, 1)
    elif ties == "int":
        s = np.clip(np.round(s), 0, 3)
    t[rng.random((n, c)) < p_ign] = -1
    return s, t


def _sk_ap(s, t, w=None):
    """sklearn AP per class on the non-ignored rows; NaN where no positive has weight."""
    out = np.full(s.shape[1], np.nan)
    for c in range(s.shape[1]):
        keep = t[:, c] >= 0
        y, sw = t[keep, c], (None if w is None else w[keep])
        pos_weight = (y == 1).sum() if sw is None else sw[y == 1].sum()
        if pos_weight > 0:
            out[c] = average_precision_score(y, s[keep, c], sample_weight=sw)
    return out


def _close(ours_percent, ref_unit):
    ours = np.asarray(ours_percent, dtype=float) / 100
    ref = np.asarray(ref_unit, dtype=float)
    assert np.array_equal(np.isnan(ours), np.isnan(ref)), (ours, ref)
    np.testing.assert_allclose(ours[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=0, atol=TOL)


def _sk_pred(s, threshold, k=None):
    """Binarised predictions: sigmoid >= threshold, and among the k first of sklearn's ranking."""
    pred = 1.0 / (1.0 + np.exp(-s)) >= threshold
    if k is not None:
        top = np.argsort(s, axis=1, kind="mergesort")[:, ::-1][:, :k]
        in_top = np.zeros_like(pred)
        np.put_along_axis(in_top, top, True, axis=1)
        pred &= in_top
    return pred.astype(int)


def _sk_prf(t, pred, w=None):
    """CP, CR, CF1, OP, OR, OF1 on the 0-1 scale with sklearn, ignored entries dropped."""
    cp, cr = [], []
    for c in range(t.shape[1]):
        keep = t[:, c] >= 0
        if not keep.any():
            cp.append(0.0), cr.append(0.0)
            continue
        p, r, _, _ = precision_recall_fscore_support(
            t[keep, c], pred[keep, c], labels=[1], average=None, zero_division=0,
            sample_weight=None if w is None else w[keep])
        cp.append(p[0]), cr.append(r[0])
    keep = t >= 0
    ww = None if w is None else np.broadcast_to(w[:, None], t.shape)[keep]
    op, orr, _, _ = precision_recall_fscore_support(t[keep], pred[keep], average="binary", zero_division=0,
                                                    sample_weight=ww)
    cp, cr = float(np.mean(cp)), float(np.mean(cr))
    f1 = lambda a, b: 0.0 if a + b == 0 else 2 * a * b / (a + b)  # noqa: E731
    return {"CP": cp, "CR": cr, "CF1": f1(cp, cr), "OP": op, "OR": orr, "OF1": f1(op, orr)}


def _prf_close(ours, ref):
    assert set(ours) == set(ref)
    for key in ref:
        assert abs(ours[key] / 100 - ref[key]) <= TOL, (key, ours[key], ref[key])


# ------------------------------------------------------------------------------------ AP
def test_ap_hand_computed_example():
    # class 0: ranking 0.9(+) 0.8(-) 0.7(+): precision at the positives 1/1 and 2/3 -> AP = (1 + 2/3)/2
    # class 1: 0.8(-) and 0.8(+) tie: the group ends at 2 entries, 1 positive -> 1/2; then 0.3(+) -> 2/3
    #          -> AP = (1/2 + 2/3)/2 = 7/12. The 4th image (score 0.95) is ignored for class 1 (-1).
    # class 2: no positive -> NaN, listed as missing; mAP is the mean over classes 0 and 1.
    scores = np.array([[0.9, 0.8, 0.1], [0.8, 0.8, 0.2], [0.7, 0.3, 0.3], [0.1, 0.95, 0.4]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, -1, -1]])
    ap = average_precision(scores, targets)
    np.testing.assert_allclose(ap[:2], [100 * 5 / 6, 100 * 7 / 12], atol=1e-12)
    assert math.isnan(ap[2])
    m, per_class, missing = mean_average_precision(scores, targets)
    assert missing == [2]
    assert m == pytest.approx(100 * (5 / 6 + 7 / 12) / 2, abs=1e-12)
    np.testing.assert_array_equal(per_class, ap)
    _close(ap, _sk_ap(scores, targets))


@pytest.mark.parametrize("ties", [None, "decimal", "int"])
def test_ap_matches_sklearn(ties):
    for seed, (n, c) in enumerate([(1, 3), (2, 2), (7, 3), (50, 5), (300, 8), (2000, 4)]):
        s, t = _data(seed, n, c, ties=ties)
        _close(average_precision(s, t), _sk_ap(s, t))
        # float32 / torch / half inputs rank the same values
        _close(average_precision(torch.from_numpy(s), torch.from_numpy(t)), _sk_ap(s, t))
    s, t = _data(99, 500, 6, ties=ties)
    s32 = s.astype(np.float32)
    _close(average_precision(s32, t), _sk_ap(s32.astype(np.float64), t))
    h = torch.from_numpy(s).to(torch.bfloat16)
    _close(average_precision(h, t), _sk_ap(h.float().numpy().astype(np.float64), t))


def test_ap_all_ties_and_extremes():
    n = 40
    t = np.zeros((n, 4), dtype=int)
    s = np.zeros((n, 4))                       # everything tied: AP = positive rate of the kept rows
    t[:, 0] = np.arange(n) % 3 == 0
    t[:, 1] = 1                                # only positives -> 100
    t[:, 2] = -1                               # all ignored -> NaN
    t[:, 3] = np.arange(n) % 2                 # perfect ranking below
    s[:, 3] = t[:, 3]
    ap = average_precision(s, t)
    assert ap[0] == pytest.approx(100 * np.mean(t[:, 0]))
    assert ap[1] == 100 and math.isnan(ap[2]) and ap[3] == 100
    _close(ap, _sk_ap(s, t))


def test_ap_classes_without_positives():
    s, t = _data(3, 200, 6)
    t[:, 1] = 0                                # no positives
    t[:, 3] = np.where(t[:, 3] == 1, -1, t[:, 3])  # positives all ignored
    t[:, 5] = -1                               # all ignored
    m, ap, missing = mean_average_precision(s, t)
    assert missing == [1, 3, 5]
    assert np.isnan(ap[missing]).all() and not np.isnan(ap[[0, 2, 4]]).any()
    assert m == pytest.approx(np.mean(ap[[0, 2, 4]]))
    _close(ap, _sk_ap(s, t))
    m0, ap0, missing0 = mean_average_precision(s, np.zeros_like(t))
    assert math.isnan(m0) and missing0 == list(range(6))


@pytest.mark.parametrize("ties", [None, "int"])
def test_ap_integer_weights_vs_sklearn_and_repeated_rows(ties):
    for seed, (n, c) in enumerate([(5, 2), (60, 4), (400, 5)]):
        s, t = _data(seed, n, c, ties=ties)
        w = np.random.default_rng(seed).integers(0, 4, size=n)
        ours = average_precision(s, t, w)
        _close(ours, _sk_ap(s, t, w.astype(float)))
        rep_s, rep_t = np.repeat(s, w, axis=0), np.repeat(t, w, axis=0)
        if len(rep_s):
            _close(ours, _sk_ap(rep_s, rep_t))
            _close(ours, average_precision(rep_s, rep_t) / 100)


def test_ap_float_weights_vs_sklearn():
    s, t = _data(11, 300, 5, ties="decimal")
    w = np.random.default_rng(1).random(300) * 3
    w[:20] = 0
    _close(average_precision(s, t, w), _sk_ap(s, t, w))
    _close(average_precision(s, t, np.ones(300)), _sk_ap(s, t))


def test_batched_weights_equal_separate_calls():
    s, t = _data(5, 500, 7, ties="decimal")
    t[:, 6] = 0
    t[:3, 6] = 1                               # a rare class: some bootstrap rows miss it
    w = bootstrap_weights(500, 40, seed=2)
    w[0] = 0
    w[0, :5] = 1                               # a replicate with few images
    ap = average_precision(s, t, w)
    assert ap.shape == (40, 7)
    for r in range(40):
        np.testing.assert_allclose(ap[r], average_precision(s, t, w[r]), rtol=0, atol=1e-9, equal_nan=True)
    _close(ap[7], _sk_ap(s, t, w[7].astype(float)))
    m, ap2, missing = mean_average_precision(s, t, w)
    assert m.shape == (40,)
    np.testing.assert_array_equal(ap2, ap)
    assert missing == sorted(set(np.flatnonzero(np.isnan(ap).any(axis=0))))
    for r in range(40):
        assert m[r] == pytest.approx(mean_average_precision(s, t, w[r])[0], abs=1e-9)
    float_w = w[:3].astype(np.float64) * 0.5   # float weights take the float64 path: same AP
    np.testing.assert_allclose(average_precision(s, t, float_w), ap[:3], atol=1e-9, equal_nan=True)


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 25).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.integers(0, 3), min_size=3, max_size=3), min_size=n, max_size=n),
    st.lists(st.lists(st.integers(-1, 1), min_size=3, max_size=3), min_size=n, max_size=n),
    st.lists(st.integers(0, 3), min_size=n, max_size=n))))
def test_ap_property_small_integer_scores(data):
    s, t, w = (np.array(x) for x in data)
    _close(average_precision(s, t), _sk_ap(s.astype(float), t))
    _close(average_precision(s, t, w), _sk_ap(s.astype(float), t, w.astype(float)))


# ------------------------------------------------------------------------------------ PRF
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.75, 0.0, 1.0])
@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_prf_matches_sklearn(threshold, top_k):
    for seed, ties in [(0, None), (1, "decimal"), (2, "int")]:
        s, t = _data(seed, 300, 6, ties=ties, p_pos=0.3)
        t[:, 5] = -1                           # a class that is entirely ignored counts as 0 in CP/CR
        pred = _sk_pred(s, threshold, top_k)
        _prf_close(multilabel_prf(s, t, threshold=threshold, top_k=top_k), _sk_prf(t, pred))
        w = np.random.default_rng(seed).integers(0, 3, size=300)
        _prf_close(multilabel_prf(s, t, threshold=threshold, top_k=top_k, sample_weight=w), _sk_prf(t, pred, w))


def test_prf_without_ignored_is_sklearn_macro_and_micro():
    s, t = _data(8, 400, 7, p_ign=0.0)
    t[:, 2] = 0                                # no positives: recall 0 by zero_division
    for k in (None, 3):
        pred = _sk_pred(s, 0.5, k)
        ours = multilabel_prf(s, t, top_k=k)
        cp, cr, _, _ = precision_recall_fscore_support(t, pred, average="macro", zero_division=0)
        op, orr, of1, _ = precision_recall_fscore_support(t, pred, average="micro", zero_division=0)
        for key, ref in {"CP": cp, "CR": cr, "OP": op, "OR": orr, "OF1": of1,
                         "CF1": 2 * cp * cr / (cp + cr)}.items():
            assert abs(ours[key] / 100 - ref) <= TOL, key


def test_prf_batched_weights_and_dtypes():
    s, t = _data(4, 300, 5, ties="decimal")
    w = bootstrap_weights(300, 6, seed=1)
    out = multilabel_prf(s, t, top_k=2, sample_weight=w)
    assert all(v.shape == (6,) for v in out.values())
    for r in range(6):
        single = multilabel_prf(s, t, top_k=2, sample_weight=w[r])
        for key in out:
            assert out[key][r] == pytest.approx(single[key], abs=1e-9)
    # float32 scores are compared with the float64 logit: same predictions as float64 scores
    s32 = (np.random.default_rng(0).normal(size=(200, 4)) * 0.01).astype(np.float32)
    t32 = np.random.default_rng(1).integers(0, 2, size=(200, 4))
    a = multilabel_prf(s32, t32, threshold=0.5011)
    b = multilabel_prf(s32.astype(np.float64), t32, threshold=0.5011)
    assert a == b


def test_multilabel_metrics_keys_and_values():
    s, t = _data(6, 300, 5)
    out = multilabel_metrics(s, t)
    assert tuple(out) == METRIC_NAMES
    assert all(isinstance(v, float) for v in out.values())
    assert out["mAP"] == mean_average_precision(s, t)[0]
    plain, top3 = multilabel_prf(s, t), multilabel_prf(s, t, top_k=3)
    for key in plain:
        assert out[key] == plain[key] and out[key + "_top3"] == top3[key]
    assert set(multilabel_metrics(s, t, top_k=None)) == {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"}
    assert "OF1_top5" in multilabel_metrics(s, t, top_k=5)
    w = bootstrap_weights(300, 4, seed=0)
    batched = multilabel_metrics(s, t, sample_weight=w)
    assert tuple(batched) == METRIC_NAMES and all(v.shape == (4,) for v in batched.values())
    for key, v in multilabel_metrics(s, t, sample_weight=w[2]).items():
        assert batched[key][2] == pytest.approx(v, abs=1e-9)


# ------------------------------------------------------------------------------------ top-k accuracy
@pytest.mark.parametrize("ties", [None, "int"])
def test_topk_accuracy_matches_sklearn(ties):
    rng = np.random.default_rng(0)
    n, c = 500, 10
    s = rng.normal(size=(n, c))
    if ties == "int":
        s = np.round(s)
    y = rng.integers(0, c, size=n)
    w = rng.integers(0, 3, size=n)
    ours = topk_accuracy(s, y, ks=(1, 3, 5))
    ours_w = topk_accuracy(s, y, ks=(1, 3, 5), sample_weight=w)
    for k in (1, 3, 5):
        ref = top_k_accuracy_score(y, s, k=k, labels=range(c))
        assert abs(ours[f"top{k}"] / 100 - ref) <= TOL
        ref_w = top_k_accuracy_score(y, s, k=k, labels=range(c), sample_weight=w)
        assert abs(ours_w[f"top{k}"] / 100 - ref_w) <= TOL
    assert topk_accuracy(s, y, ks=(10, 50)) == {"top10": 100.0, "top50": 100.0}
    wb = bootstrap_weights(n, 3, seed=5)
    batched = topk_accuracy(torch.from_numpy(s), torch.from_numpy(y), sample_weight=wb)
    for r in range(3):
        assert batched["top5"][r] == pytest.approx(topk_accuracy(s, y, sample_weight=wb[r])["top5"])


def test_topk_accuracy_many_classes_in_row_chunks():
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=(5000, 1000)), 1)   # 2 row chunks inside, many ties
    y = rng.integers(0, 1000, size=5000)
    ours = topk_accuracy(s.astype(np.float32), y, ks=(1, 5))
    for k in (1, 5):
        assert abs(ours[f"top{k}"] / 100 - top_k_accuracy_score(y, s, k=k, labels=range(1000))) <= TOL


def test_bootstrap_weights():
    w = bootstrap_weights(1000, 50, seed=3)
    assert w.shape == (50, 1000) and w.dtype == np.int32
    assert (w.sum(axis=1) == 1000).all() and (w >= 0).all()
    np.testing.assert_array_equal(w, bootstrap_weights(1000, 50, seed=3))
    assert not np.array_equal(w, bootstrap_weights(1000, 50, seed=4))
    assert 0.3 < np.mean(w == 0) < 0.44        # about 1/e of the images are left out of a resample


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("call, match", [
    (lambda s, t: average_precision(np.where(np.eye(4, 3) > 0, np.nan, s), t), "3 non-finite"),
    (lambda s, t: average_precision(np.full((4, 3), np.inf), t), "12 non-finite"),
    (lambda s, t: average_precision(s, t[:3]), "targets has shape"),
    (lambda s, t: average_precision(s[:, 0], t), "scores has shape"),
    (lambda s, t: average_precision(s, t + 1), r"targets has values in \[0, 2\]"),
    (lambda s, t: average_precision(s, t * 0.5), "non-integer"),
    (lambda s, t: average_precision(s, t.astype(str)), "targets has dtype"),
    (lambda s, t: average_precision(s, t, np.ones(5)), "sample_weight has shape"),
    (lambda s, t: average_precision(s, t, -np.ones(4)), "negative"),
    (lambda s, t: average_precision(s, t, np.array([1, np.nan, 1, 1])), "non-finite"),
    (lambda s, t: multilabel_prf(s, t, threshold=1.5), "threshold"),
    (lambda s, t: multilabel_prf(s, t, top_k=0), "top_k"),
    (lambda s, t: multilabel_metrics(s, t, top_k=2.5), "top_k"),
    (lambda s, t: topk_accuracy(s, np.array([0, 1, 2, 3])), "labels must be"),
    (lambda s, t: topk_accuracy(s, np.array([0, 1, 2])), "labels has shape"),
    (lambda s, t: topk_accuracy(s, np.array([0, 1, 2, 0]), ks=(0,)), "ks"),
    (lambda s, t: bootstrap_weights(0, 10), "n=0"),
])
def test_errors(call, match):
    s = np.random.default_rng(0).normal(size=(4, 3))
    t = np.array([[1, 0, -1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    with pytest.raises(PatchCSRAError, match=match):
        call(s, t)
    assert issubclass(PatchCSRAError, ValueError)
