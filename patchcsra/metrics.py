"""Classification metrics, vectorised over classes and bootstrap replicates, equal to scikit-learn.

Conventions shared by every function:

* ``scores`` -- ``(N, C)`` real-valued logits, a numpy array or a torch tensor (any float dtype,
  any device; it is copied to the CPU). Non-finite scores are refused.
* ``targets`` -- ``(N, C)`` integers: ``1`` present, ``0`` absent, ``-1`` ignored (VOC "difficult
  only", WIDER-Attribute "unknown"). An ignored ``(image, class)`` entry is removed from everything
  for that class: it is neither a positive nor a negative, it is not ranked for AP and it is not
  counted in any precision or recall.
* ``sample_weight`` -- ``None``, ``(N,)`` or ``(R, N)`` non-negative weights (bootstrap counts:
  weight ``k`` means the image appears ``k`` times). With ``(R, N)`` every result gains a leading
  ``R`` axis: the paired bootstrap of :func:`bootstrap_weights` in one call.
* Every metric value is in **percent** (0-100), as papers report it.

Functions:

* :func:`average_precision` -- per-class non-interpolated AP, ``(C,)`` or ``(R, C)``; equal to
  ``sklearn.metrics.average_precision_score`` on the non-ignored rows of each class (tie-aware).
* :func:`mean_average_precision` -- ``(mAP, per-class AP, classes without positives)``.
* :func:`multilabel_prf` -- CP, CR, CF1, OP, OR, OF1 at a sigmoid threshold, optionally top-k.
* :func:`multilabel_metrics` -- mAP plus the PRF metrics at the threshold and at top-k in one call.
* :func:`topk_accuracy` -- single-label top-k accuracy, equal to ``top_k_accuracy_score``.
* :func:`bootstrap_weights` -- ``(R, N)`` multinomial resampling counts from a seed.
* :data:`METRIC_NAMES` -- the keys of :func:`multilabel_metrics` with its default ``top_k=3``.
* :func:`protocol_metrics` -- the same keys under a named protocol of :mod:`patchcsra.protocols` (AP kind,
  tie handling, CF1 kind, threshold, top-k rule, ignored entries, classes without positives), on logits or
  probabilities; :func:`protocol_average_precision` its per-class AP.
* Guards: :func:`looks_like_probabilities`, :func:`positive_rate` / :func:`threshold_note` (threshold metrics
  not meaningful when more than half of all (image, class) pairs pass the threshold), :data:`CV_NOTE`, and
  :func:`protocol_caption`, the line under every table (read by :func:`patchcsra.report.protocol_caption`).

How AP is computed. Precision at a score ``u`` is ``TP(>= u) / ALL(>= u)`` over the non-ignored
entries of the class; AP is ``sum over positives of weight * precision(own score) / total positive
weight``. Every member of a group of equal scores gets the precision at the end of the group,
which is exactly what ``precision_recall_curve`` does. Without weights each class is sorted once
(values only) and ``ALL(>= u)`` is read with a binary search. With weights every entry is put in
the bin of the distinct positive score just at or below it; the ``(R, K)`` bin totals for all
classes at once are one sparse-by-dense product ``W @ S`` (exact in float32 for integer counts),
done in chunks of R to bound memory, followed by cumulative sums per class.
"""
from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence, Union

import numpy as np

from .errors import PatchCSRAError

__all__ = [
    "average_precision", "mean_average_precision", "multilabel_prf", "multilabel_metrics", "topk_accuracy",
    "bootstrap_weights", "METRIC_NAMES", "protocol_metrics", "protocol_predictions", "looks_like_probabilities",
    "positive_rate", "threshold_note", "table_footer", "protocol_caption", "protocol_average_precision",
    "CV_NOTE",
]

ArrayLike = Any  # numpy array, torch tensor, or nested sequence
Metric = Union[float, np.ndarray]

METRIC_NAMES: tuple[str, ...] = (
    "mAP", "CP", "CR", "CF1", "OP", "OR", "OF1",
    "CP_top3", "CR_top3", "CF1_top3", "OP_top3", "OR_top3", "OF1_top3",
)
_PRF_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")
_CHUNK_BYTES = 256 * 2 ** 20  # memory budget for one chunk of bootstrap rows
_MAX_CHUNK_ROWS = 32          # measured fastest for the sparse product (cache-bound)
_F32_EXACT = 2 ** 24          # integer sums below this are exact in float32
_THREADED_SORT_MIN = 2 ** 20  # entries from which sorting is split over threads (numpy sort drops the GIL)


# ----------------------------------------------------------------------------- input checking
def _to_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view or copy of ``x``; torch tensors are detached and moved to the CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def _check_scores(scores: ArrayLike) -> np.ndarray:
    """``(N, C)`` finite float32 or float64 scores (float32 is kept: only comparisons use them)."""
    s = _to_numpy(scores)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise PatchCSRAError(f"scores has shape {tuple(s.shape)}; give a non-empty (N, C) array of logits")
    if s.dtype == np.float16:
        s = s.astype(np.float32)
    elif s.dtype not in (np.float32, np.float64):
        try:
            s = s.astype(np.float64)
        except (TypeError, ValueError):
            raise PatchCSRAError(f"scores has dtype {s.dtype}; give real-valued logits") from None
    finite = np.isfinite(s)
    if not finite.all():
        bad = s.size - int(np.count_nonzero(finite))
        raise PatchCSRAError(f"scores has {bad} non-finite (NaN or inf) entries; fix the model outputs first")
    return s


def _check_targets(targets: ArrayLike, shape: tuple[int, int]) -> np.ndarray:
    """``(N, C)`` int8 targets with values in {-1, 0, 1}."""
    t = _to_numpy(targets)
    if t.shape != shape:
        raise PatchCSRAError(f"targets has shape {tuple(t.shape)} but scores has {shape}; give one target per score")
    if t.dtype == np.bool_:
        return t.astype(np.int8)
    if t.dtype.kind not in "iuf":
        raise PatchCSRAError(f"targets has dtype {t.dtype}; give integers 1 (present), 0 (absent), -1 (ignore)")
    lo, hi = t.min(), t.max()
    if not (lo >= -1 and hi <= 1):
        raise PatchCSRAError(f"targets has values in [{lo}, {hi}]; use 1 (present), 0 (absent), -1 (ignore)")
    t8 = t.astype(np.int8)
    if t.dtype.kind == "f" and not np.array_equal(t8, t):
        raise PatchCSRAError("targets has non-integer values; use 1 (present), 0 (absent), -1 (ignore)")
    return t8


def _check_weights(sample_weight: Optional[ArrayLike], n: int) -> tuple[Optional[np.ndarray], bool]:
    """``(w, batched)``: ``None`` or ``(R, N)`` non-negative finite weights (a ``(N,)`` vector becomes
    ``(1, N)``; no copy), and whether the caller gave ``(R, N)``."""
    if sample_weight is None:
        return None, False
    w = _to_numpy(sample_weight)
    if w.ndim not in (1, 2) or w.shape[-1] != n or w.size == 0:
        raise PatchCSRAError(f"sample_weight has shape {tuple(w.shape)}; give ({n},) or (R, {n}) weights, "
                             "one per image")
    if w.dtype.kind not in "iuf" and w.dtype != np.bool_:
        raise PatchCSRAError(f"sample_weight has dtype {w.dtype}; give non-negative numbers")
    if w.dtype.kind == "f" and not np.isfinite(w).all():
        raise PatchCSRAError("sample_weight has non-finite entries; give finite non-negative weights")
    if w.min() < 0:
        raise PatchCSRAError("sample_weight has negative entries; give non-negative weights (e.g. bootstrap counts)")
    return (w.reshape(1, n), False) if w.ndim == 1 else (w, True)


def _check_threshold(threshold: float) -> np.float64:
    """``logit(threshold)`` as float64 (``-inf``/``inf`` for 0/1)."""
    try:
        p = float(threshold)
    except (TypeError, ValueError):
        raise PatchCSRAError(f"threshold={threshold!r} is not a number; give a probability in [0, 1]") from None
    if not 0.0 <= p <= 1.0:
        raise PatchCSRAError(f"threshold={threshold!r} is outside [0, 1]; give a sigmoid probability, e.g. 0.5")
    with np.errstate(divide="ignore"):
        return np.float64(np.log(p) - np.log1p(-p))


def _check_k(k: Any, name: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise PatchCSRAError(f"{name}={k!r} is invalid; give a positive integer, e.g. 3")
    return int(k)


# ----------------------------------------------------------------------------- small helpers
def _chunks(total: int, width: int, most: int) -> list[slice]:
    """Row slices of at most ``most`` rows and about ``_CHUNK_BYTES`` (``width`` = bytes per row)."""
    step = max(1, min(most, _CHUNK_BYTES // max(1, width)))
    return [slice(a, min(total, a + step)) for a in range(0, total, step)]


def _exact_in_float32(w: np.ndarray) -> bool:
    """True when every partial sum of a weight row is an integer below 2**24 (bootstrap counts)."""
    if w.dtype.kind not in "iub":
        return False
    return int(w.sum(axis=1, dtype=np.int64).max()) < _F32_EXACT


def _safe_div(num: np.ndarray, den: np.ndarray, fill: float) -> np.ndarray:
    """``num / den`` with ``fill`` where ``den == 0``."""
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    return np.divide(num, den, out=np.full(num.shape, fill), where=den != 0)


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``2pr / (p + r)``, 0 where both are 0."""
    return _safe_div(2.0 * p * r, p + r, 0.0)


def _out(x: np.ndarray, batched: bool) -> Metric:
    """An (R,) array when weights were (R, N), else a Python float."""
    return x if batched else float(x.reshape(-1)[0])


# ----------------------------------------------------------------------------- average precision
def _sort_rows(x: np.ndarray) -> None:
    """Sort each row of the C-contiguous ``(C, N)`` array in place, blocks of rows on several threads."""
    workers = min(os.cpu_count() or 1, 8, x.shape[0])
    if workers < 2 or x.size < _THREADED_SORT_MIN:
        x.sort(axis=1)
        return
    bounds = np.linspace(0, x.shape[0], workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda ab: x[ab[0]:ab[1]].sort(axis=1), zip(bounds[:-1], bounds[1:])))


def _ap_unweighted(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``(C,)`` AP in [0, 1] without weights: sort each class's scores once, binary-search the positives.

    ``s``: ``(N, C)`` scores, ``t``: ``(N, C)`` int8 targets.
    """
    n, c = s.shape
    x = np.array(s.T, order="C")        # (C, N) copy, always (s.T is already contiguous when C == 1 or s is
                                         # Fortran-ordered, and x is written and sorted in place below)
    tt = np.ascontiguousarray(t.T)
    ignored = tt < 0
    if ignored.any():
        x[ignored] = -np.inf             # never >= a finite threshold
    is_pos = tt == 1
    pos_scores = x[is_pos]               # class-major
    npos = np.count_nonzero(is_pos, axis=1)
    starts = np.concatenate(([0], np.cumsum(npos)))
    _sort_rows(x)
    ap = np.full(c, np.nan)
    for k in np.flatnonzero(npos):
        u, cnt = np.unique(pos_scores[starts[k]:starts[k + 1]], return_counts=True)  # ascending
        at_or_above = n - np.searchsorted(x[k], u, side="left")   # non-ignored entries >= u
        tp = np.cumsum(cnt[::-1])[::-1]                            # positives >= u
        ap[k] = np.dot(cnt, tp / at_or_above) / npos[k]
    return ap


def _bin_matrix(s: np.ndarray, t: np.ndarray) -> tuple[Any, list[tuple[int, int, int]]]:
    """The sparse ``(2L, N)`` level matrix of all classes, and where each class's levels are.

    For class ``c`` with distinct positive scores ``u_0 > u_1 > ... > u_{G-1}``, a non-ignored
    entry with ``u_d <= score < u_{d-1}`` sits at level ``d``; entries below ``u_{G-1}`` are never
    counted. Row ``offset_c + d`` collects every such entry, row ``L + offset_c + d`` only the
    positives (``L`` = sum of ``G``). Returns ``(S, levels)`` with ``levels`` a list of
    ``(class, offset, G)`` for the classes that have a positive entry (``S`` is None if none has).
    """
    import scipy.sparse as sp

    n, c = s.shape
    sT, tT = np.ascontiguousarray(s.T), np.ascontiguousarray(t.T)
    images = np.arange(n)
    rows_all, cols_all, rows_pos, cols_pos, levels = [], [], [], [], []
    offset = 0
    for k in range(c):
        sc, tc = sT[k], tT[k]
        pos = tc == 1
        u = np.unique(sc[pos])
        g = len(u)
        if g == 0:
            continue
        level = offset + g - np.searchsorted(u, sc, side="right")   # = offset + g for entries below u[0]
        keep = (level < offset + g) & (tc >= 0)
        rows_all.append(level[keep])
        cols_all.append(images[keep])
        rows_pos.append(level[pos])
        cols_pos.append(images[pos])
        levels.append((k, offset, g))
        offset += g
    if not levels:
        return None, levels
    rows = np.concatenate(rows_all + [offset + r for r in rows_pos])
    cols = np.concatenate(cols_all + cols_pos)
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(2 * offset, n)), levels


def _ap_weighted(s: np.ndarray, t: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(R, C)`` AP in [0, 1] for ``(R, N)`` weights: one sparse product ``S @ W.T`` per chunk of rows,
    then per class ``TP`` and ``ALL`` as cumulative sums over its levels (NaN without positive weight)."""
    ap = np.full((w.shape[0], s.shape[1]), np.nan)
    mat, levels = _bin_matrix(s, t)
    if mat is None:
        return ap
    half = mat.shape[0] // 2
    dtype = np.float32 if _exact_in_float32(w) else np.float64
    mat = mat.astype(dtype)
    width = mat.shape[0] * 8 * 2 + w.shape[1] * 8   # bytes per bootstrap row of the temporaries
    for rows in _chunks(w.shape[0], width, _MAX_CHUNK_ROWS):
        hist = mat @ np.ascontiguousarray(w[rows].T, dtype=dtype)            # (2L, Rc)
        for k, a, g in levels:
            at_or_above = np.cumsum(hist[a:a + g], axis=0, dtype=np.float64)
            pos = hist[half + a:half + a + g].astype(np.float64)
            tp = np.cumsum(pos, axis=0)
            num = (pos * _safe_div(tp, at_or_above, 0.0)).sum(axis=0)
            ap[rows, k] = _safe_div(num, tp[-1], np.nan)
    return ap


def average_precision(scores: ArrayLike, targets: ArrayLike, sample_weight: Optional[ArrayLike] = None) -> np.ndarray:
    """Per-class non-interpolated average precision, in percent.

    ``scores``: ``(N, C)`` logits; ``targets``: ``(N, C)`` in {1, 0, -1 (ignore)};
    ``sample_weight``: ``None``, ``(N,)`` or ``(R, N)``.
    Returns ``(C,)`` (or ``(R, C)``) float64: ``100 * sklearn.metrics.average_precision_score`` on the
    non-ignored rows of each class (ties: every member of a group of equal scores gets the precision
    at the end of the group). NaN for a class with no positive weight.
    """
    s = _check_scores(scores)
    t = _check_targets(targets, s.shape)
    w, batched = _check_weights(sample_weight, s.shape[0])
    return _average_precision(s, t, w, batched)


def _average_precision(s: np.ndarray, t: np.ndarray, w: Optional[np.ndarray], batched: bool) -> np.ndarray:
    if w is None:
        return 100.0 * _ap_unweighted(s, t)
    ap = 100.0 * _ap_weighted(s, t, w)
    return ap if batched else ap[0]


def _nanmean_rows(ap: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN (without a warning) where a row is all NaN."""
    ok = ~np.isnan(ap)
    return _safe_div(np.where(ok, ap, 0.0).sum(axis=-1), ok.sum(axis=-1), np.nan)


def mean_average_precision(scores: ArrayLike, targets: ArrayLike, sample_weight: Optional[ArrayLike] = None
                           ) -> tuple[Metric, np.ndarray, list[int]]:
    """mAP over the classes that have positives, in percent.

    Shapes as in :func:`average_precision`. Returns ``(mAP, ap, missing)``: ``mAP`` a float (``(R,)``
    array with ``(R, N)`` weights: NaN-mean per row), ``ap`` the ``(C,)`` or ``(R, C)`` per-class AP,
    ``missing`` the indices of classes without positives (with ``(R, N)`` weights: in any row).
    NaN mAP if no class has a positive.
    """
    ap = average_precision(scores, targets, sample_weight)
    return _map_from_ap(ap)


def _map_from_ap(ap: np.ndarray) -> tuple[Metric, np.ndarray, list[int]]:
    missing = np.isnan(ap).reshape(-1, ap.shape[-1]).any(axis=0)
    m = _nanmean_rows(ap)
    return (m if ap.ndim == 2 else float(m)), ap, [int(i) for i in np.flatnonzero(missing)]


# ----------------------------------------------------------------------------- precision / recall
def _topk_mask(s: np.ndarray, k: int) -> np.ndarray:
    """``(N, C)`` bool: the ``k`` highest scores of each row (ties: the higher class index wins,
    as in ``sklearn.metrics.top_k_accuracy_score``)."""
    n, c = s.shape
    if k >= c:
        return np.ones(s.shape, dtype=bool)
    kth = np.partition(s, c - k, axis=1)[:, c - k:c - k + 1]      # k-th largest per row
    mask = s > kth
    eq = s == kth
    need = k - np.count_nonzero(mask, axis=1)                     # >= 1 ties to take
    tied = np.flatnonzero(np.count_nonzero(eq, axis=1) > need)
    if len(tied):
        e = eq[tied]
        from_right = np.cumsum(e[:, ::-1], axis=1)[:, ::-1]
        eq[tied] = e & (from_right <= need[tied, None])
    return mask | eq


def _counts(pred: np.ndarray, t: np.ndarray, w: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class ``(tp, predicted, positive)`` weight totals over non-ignored entries, each ``(R, C)``.

    ``pred``: ``(N, C)`` bool; ``t``: ``(N, C)`` int8; ``w``: ``None`` (R = 1) or ``(R, N)``.
    """
    pos = t == 1
    tp = pred & pos
    npred = pred & (t >= 0)
    if w is None:
        return tuple(np.count_nonzero(m, axis=0)[None].astype(np.float64) for m in (tp, npred, pos))
    c = t.shape[1]
    dtype = np.float32 if _exact_in_float32(w) else np.float64
    mats = np.concatenate([tp, npred, pos], axis=1).astype(dtype)          # (N, 3C)
    out = np.empty((w.shape[0], 3 * c))
    for rows in _chunks(w.shape[0], w.shape[1] * 8, w.shape[0]):
        out[rows] = w[rows].astype(dtype) @ mats
    return out[:, :c], out[:, c:2 * c], out[:, 2 * c:]


def _prf(pred: np.ndarray, t: np.ndarray, w: Optional[np.ndarray], batched: bool) -> dict[str, Metric]:
    """CP, CR, CF1, OP, OR, OF1 in percent from ``(N, C)`` bool predictions."""
    tp, npred, npos = _counts(pred, t, w)
    cp = 100.0 * _safe_div(tp, npred, 0.0).mean(axis=1)
    cr = 100.0 * _safe_div(tp, npos, 0.0).mean(axis=1)
    op = 100.0 * _safe_div(tp.sum(axis=1), npred.sum(axis=1), 0.0)
    orr = 100.0 * _safe_div(tp.sum(axis=1), npos.sum(axis=1), 0.0)
    vals = (cp, cr, _f1(cp, cr), op, orr, _f1(op, orr))
    return {k: _out(v, batched) for k, v in zip(_PRF_KEYS, vals)}


def _predict(s: np.ndarray, logit: np.float64, top_k: Optional[int]) -> np.ndarray:
    """``(N, C)`` bool: ``score >= logit(threshold)``, and among the row's top ``k`` if given."""
    pred = s >= logit                       # float64 comparison (np.float64 is not demoted)
    if top_k is not None:
        pred &= _topk_mask(s, top_k)
    return pred


def multilabel_prf(scores: ArrayLike, targets: ArrayLike, *, threshold: float = 0.5, top_k: Optional[int] = None,
                   sample_weight: Optional[ArrayLike] = None) -> dict[str, Metric]:
    """Per-class (C*) and overall (O*) precision, recall and F1 in percent.

    ``scores``, ``targets``: ``(N, C)``; ``sample_weight``: ``None``, ``(N,)`` or ``(R, N)``.
    Predicted positive iff ``sigmoid(score) >= threshold`` (computed as ``score >= logit(threshold)``)
    and, with ``top_k=k``, the score is among the image's ``k`` highest (ties: higher class index wins).
    Predictions use the scores only; ignored entries are then dropped from every count.
    CP/CR: mean over all C classes of per-class precision/recall (0 where undefined), i.e.
    ``precision_recall_fscore_support(average='macro', zero_division=0)``; CF1 = 2 CP CR / (CP + CR);
    OP/OR/OF1: the micro averages. Values are floats, or ``(R,)`` arrays with ``(R, N)`` weights.
    """
    s = _check_scores(scores)
    t = _check_targets(targets, s.shape)
    w, batched = _check_weights(sample_weight, s.shape[0])
    logit = _check_threshold(threshold)
    k = None if top_k is None else _check_k(top_k, "top_k")
    return _prf(_predict(s, logit, k), t, w, batched)


def multilabel_metrics(scores: ArrayLike, targets: ArrayLike, *, threshold: float = 0.5, top_k: Optional[int] = 3,
                       sample_weight: Optional[ArrayLike] = None) -> dict[str, Metric]:
    """mAP and the :func:`multilabel_prf` metrics at ``threshold``, and again at ``top_k``, in one call.

    ``scores``, ``targets``: ``(N, C)``; ``sample_weight``: ``None``, ``(N,)`` or ``(R, N)``.
    Keys: ``mAP, CP, CR, CF1, OP, OR, OF1`` and ``CP_top{k} ... OF1_top{k}`` (left out when
    ``top_k`` is None); with the default ``top_k=3`` exactly :data:`METRIC_NAMES`.
    """
    s = _check_scores(scores)
    t = _check_targets(targets, s.shape)
    w, batched = _check_weights(sample_weight, s.shape[0])
    logit = _check_threshold(threshold)
    k = None if top_k is None else _check_k(top_k, "top_k")
    m, _, _ = _map_from_ap(_average_precision(s, t, w, batched))
    out: dict[str, Metric] = {"mAP": m}
    out.update(_prf(_predict(s, logit, None), t, w, batched))
    if k is not None:
        out.update({f"{key}_top{k}": v for key, v in _prf(_predict(s, logit, k), t, w, batched).items()})
    return out


# ----------------------------------------------------------------------------- single-label
def _label_rank(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(N,)`` number of classes ranked above each row's label in ``(N, C)`` scores (equal scores:
    the higher class index ranks first, as sklearn's reversed stable argsort does). Rows in chunks."""
    n, c = s.shape
    classes = np.arange(c)
    rank = np.empty(n, dtype=np.int64)
    step = max(1, 2 ** 22 // c)
    for a in range(0, n, step):
        sb, yb = s[a:a + step], y[a:a + step, None]
        own = np.take_along_axis(sb, yb, axis=1)
        rank[a:a + step] = np.count_nonzero((sb > own) | ((sb == own) & (classes > yb)), axis=1)
    return rank


def topk_accuracy(scores: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5),
                  sample_weight: Optional[ArrayLike] = None) -> dict[str, Metric]:
    """Top-k accuracy in percent for single-label classification.

    ``scores``: ``(N, C)``; ``labels``: ``(N,)`` class indices in ``[0, C)``; ``sample_weight``:
    ``None``, ``(N,)`` or ``(R, N)``. Keys ``f"top{k}"`` for each ``k`` in ``ks`` (``k`` is capped at C).
    A label is a hit when fewer than ``k`` classes rank above it; among equal scores the higher class
    index ranks first, so the values equal ``100 * top_k_accuracy_score(labels, scores, k=k,
    labels=range(C))`` (for C >= 3), ties included.
    """
    s = _check_scores(scores)
    n, c = s.shape
    y = _to_numpy(labels)
    if y.shape != (n,):
        raise PatchCSRAError(f"labels has shape {tuple(y.shape)}; give ({n},) class indices, one per row of scores")
    if y.dtype.kind not in "iu":
        raise PatchCSRAError(f"labels must be integer class indices in [0, {c}); got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= c:
        raise PatchCSRAError(f"labels must be integer class indices in [0, {c}); got range [{y.min()}, {y.max()}]")
    kk = [_check_k(k, "ks") for k in ks]
    w, batched = _check_weights(sample_weight, n)
    rank = _label_rank(s, y)
    return {f"top{k}": hit_rate((rank < min(k, c)).astype(np.float64), w, batched) for k in kk}


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``(N,)`` float64, 1.0 where the label of a row of ``scores`` ``(N, C)`` is within its top ``k`` (ties as in
    :func:`topk_accuracy`). Top-k accuracy is a mean over images, so any subset's value is
    ``hit_rate(hits[rows])``: cross-validation scores every fold from one ranking per grid point."""
    return (_label_rank(scores, labels) < min(int(k), scores.shape[1])).astype(np.float64)


def hit_rate(hit: np.ndarray, w: Optional[np.ndarray] = None, batched: bool = False) -> Metric:
    """``100 * mean(hit)`` (``w`` ``None``), else the weighted mean per row of ``w`` ``(R, N)``: an ``(R,)``
    array when ``batched``, else a float. NaN where a row's weights sum to 0."""
    if w is None:
        return 100.0 * float(hit.mean())
    if w.dtype.kind in "iub" and hit.size and ((hit == 0) | (hit == 1)).all():
        # integer counts (bootstrap) and 0/1 hits: the sums are exact integers either way, and summing the
        # columns of the misses (or hits) is ~5x faster than casting (R, N) to float64 for w @ hit
        total = w.sum(axis=1, dtype=np.int64)
        miss = hit == 0
        if 2 * int(miss.sum()) <= hit.size:
            num = total - w[:, miss].sum(axis=1, dtype=np.int64)
        else:
            num = w[:, ~miss].sum(axis=1, dtype=np.int64)
        return _out(100.0 * _safe_div(num.astype(np.float64), total.astype(np.float64), np.nan), batched)
    return _out(100.0 * _safe_div(w @ hit, w.sum(axis=1, dtype=np.float64), np.nan), batched)


# ----------------------------------------------------------------------------- bootstrap
def bootstrap_weights(n: int, reps: int, seed: int = 0) -> np.ndarray:
    """``(reps, n)`` int32 counts of ``n`` images drawn with replacement, reproducible from ``seed``.

    Each row is one multinomial resample (``numpy.random.default_rng(seed)``); pass it as
    ``sample_weight`` to get ``reps`` paired bootstrap replicates of every metric in one call.
    """
    n = _check_k(n, "n")
    reps = _check_k(reps, "reps")
    rng = np.random.default_rng(seed)
    out = np.empty((reps, n), dtype=np.int32)
    for r in range(reps):
        out[r] = np.bincount(rng.integers(0, n, size=n), minlength=n)
    return out


# ----------------------------------------------------------------------------- named protocols
def _check_score_kind(score_kind: str) -> str:
    if score_kind not in ("logit", "prob"):
        raise PatchCSRAError(f"scores={score_kind!r}; choose logit or prob (auto is resolved by the caller)")
    return score_kind


def _cut(threshold: float, score_kind: str) -> np.float64:
    """The score at which a prediction becomes positive: ``logit(threshold)`` or ``threshold`` itself."""
    logit = _check_threshold(threshold)
    return np.float64(threshold) if score_kind == "prob" else logit


def _rank_order(x: np.ndarray, ties: str) -> np.ndarray:
    """Indices of the ``(n,)`` scores ``x`` from high to low; equal scores in image order (``'first'``,
    also used for ``'aware'``: groups are merged afterwards) or reverse image order (``'last'``)."""
    if ties == "last":
        return np.argsort(x, kind="stable")[::-1]
    return np.argsort(-x, kind="stable")


def _ap_one(x: np.ndarray, y: np.ndarray, kind: str, ties: str) -> float:
    """AP in [0, 1] of one class: ``x`` ``(n,)`` scores, ``y`` ``(n,)`` bool positives (NaN without one)."""
    npos = int(np.count_nonzero(y))
    if npos == 0:
        return math.nan
    order = _rank_order(x, ties)
    ys = y[order]
    tp = np.cumsum(ys)
    prec = tp / np.arange(1, len(ys) + 1)
    if ties == "aware":   # curve points only at the end of each group of equal scores
        xs = x[order]
        ends = np.flatnonzero(np.append(xs[1:] != xs[:-1], True))
        gain = np.diff(np.concatenate(([0], tp[ends])))
        tp, prec = tp[ends], prec[ends]
    else:
        gain = ys.astype(np.int64)
    rec = tp / npos
    if kind == "noninterp":
        return float(np.dot(gain, prec) / npos)
    if kind == "voc07":
        return float(np.mean([prec[rec >= t].max() if (rec >= t).any() else 0.0
                              for t in np.arange(11) / 10]))   # k/10 correctly rounded (not 3 * 0.1)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def _ap_protocol_rows(s: np.ndarray, t: np.ndarray, p: Any) -> np.ndarray:
    """``(C,)`` AP in [0, 1] under protocol ``p`` without weights (NaN for a class without positives)."""
    if p.ap == "noninterp" and p.ties == "aware" and p.ap_ignored == "remove":
        return _ap_unweighted(s, t)
    out = np.full(s.shape[1], np.nan)
    for k in range(s.shape[1]):
        keep = t[:, k] >= 0 if p.ap_ignored == "remove" else np.ones(len(t), bool)
        out[k] = _ap_one(s[keep, k].astype(np.float64), t[keep, k] == 1, p.ap, p.ties)
    return out


def _ap_sorted_weighted(s: np.ndarray, t: np.ndarray, w: np.ndarray, p: Any) -> np.ndarray:
    """``(R, C)`` AP in [0, 1] for sort-ranked ties (``'first'``/``'last'``) and ``(R, N)`` integer counts, without
    repeating rows: the ``w_i`` copies of an image are adjacent in the ranking, so with ``a``/``b`` the positive /
    all weight ranked before it, a positive contributes ``sum_j (a+j)/(b+j) = w - (b-a) (psi(b+w+1) - psi(b+1))``
    (non-interpolated); the VOC curves need only the end of each positive's copies (the copies' precision rises
    with ``j``, a negative's copies never raise the envelope)."""
    from scipy.special import digamma

    r, c = w.shape[0], s.shape[1]
    out = np.full((r, c), np.nan)
    for k in range(c):
        keep = t[:, k] >= 0 if p.ap_ignored == "remove" else np.ones(len(t), bool)
        x, y = s[keep, k].astype(np.float64), t[keep, k] == 1
        if not y.any():
            continue
        order = _rank_order(x, p.ties)
        ys = y[order]
        idx = np.flatnonzero(keep)[order]
        for rows in _chunks(r, len(idx) * 8 * 6, r):
            wk = w[rows][:, idx].astype(np.float64)                      # (r, n) in rank order
            pos_w = wk * ys
            all_end, tp_end = np.cumsum(wk, axis=1), np.cumsum(pos_w, axis=1)
            npos = tp_end[:, -1]
            if p.ap == "noninterp":
                b, a = all_end - wk, tp_end - pos_w
                part = np.where(pos_w > 0, wk - (b - a) * (digamma(b + wk + 1) - digamma(b + 1)), 0.0)
                num = part.sum(axis=1)
            else:
                rec = _safe_div(tp_end, npos[:, None], 0.0)
                prec = np.where(pos_w > 0, _safe_div(tp_end, all_end, 0.0), 0.0)   # positive ends only
                if p.ap == "voc07":
                    num = npos * np.mean([np.where(rec >= th, prec, 0.0).max(axis=1) for th in np.arange(11) / 10],
                                         axis=0)
                else:
                    env = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
                    num = (pos_w * env).sum(axis=1)
            out[rows, k] = _safe_div(num, npos, np.nan)
    return out


def _protocol_ap(s: np.ndarray, t: np.ndarray, w: Optional[np.ndarray], p: Any) -> np.ndarray:
    """``(R, C)`` AP in percent; weights are integer counts (an image of weight k is k adjacent copies)."""
    if getattr(p, "rank", "score") == "sigmoid32":  # what the official code ranks: float32 sigmoids, ties included
        s = (1.0 / (1.0 + np.exp(-np.asarray(s, dtype=np.float32)))).astype(np.float32).astype(np.float64)
    if w is None:
        return 100.0 * _ap_protocol_rows(s, t, p)[None]
    if p.ap == "noninterp" and p.ties == "aware" and p.ap_ignored == "remove":
        return 100.0 * _ap_weighted(s, t, w)
    if w.dtype.kind == "f" and not np.array_equal(w, np.round(w)):
        raise PatchCSRAError(f"protocol {p.name!r} needs integer sample_weight (bootstrap counts)")
    if p.ties != "aware":
        return 100.0 * _ap_sorted_weighted(s, t, w, p)
    reps = w.astype(np.int64)
    return np.stack([100.0 * _ap_protocol_rows(np.repeat(s, r, axis=0), np.repeat(t, r, axis=0), p)
                     for r in reps])


def _empty_mean(per_class: np.ndarray, has_pos: np.ndarray, policy: str) -> np.ndarray:
    """Mean over classes of ``(R, C)`` values under the empty-class policy (``has_pos`` ``(R, C)`` bool)."""
    if policy == "skip":
        return _safe_div(np.where(has_pos, per_class, 0.0).sum(axis=-1), has_pos.sum(axis=-1), np.nan)
    if policy == "nan":
        return np.where(has_pos.all(axis=-1), np.nan_to_num(per_class).mean(axis=-1), np.nan)
    return np.nan_to_num(per_class).mean(axis=-1)


def _protocol_prf(pred: np.ndarray, t: np.ndarray, w: Optional[np.ndarray], p: Any) -> dict[str, np.ndarray]:
    """CP, CR, CF1, OP, OR, OF1 ``(R,)`` in percent from ``(N, C)`` bool predictions under protocol ``p``."""
    if p.ignored == "negative":
        t = np.where(t < 0, 0, t).astype(np.int8)
    return _prf_from_counts(*_counts(pred, t, w), p)


def _prf_from_counts(tp: np.ndarray, npred: np.ndarray, npos: np.ndarray, p: Any) -> dict[str, np.ndarray]:
    """CP, CR, CF1, OP, OR, OF1 ``(R,)`` in percent from per-class ``(R, C)`` weight totals (:func:`_counts`): the
    class blocks of :mod:`patchcsra.blocked` meet here, so a blocked evaluation equals the in-memory one."""
    has_pos = npos > 0
    prec, rec = _safe_div(tp, npred, 0.0), _safe_div(tp, npos, 0.0)
    cp = 100.0 * _empty_mean(prec, has_pos, p.empty_classes)
    cr = 100.0 * _empty_mean(rec, has_pos, p.empty_classes)
    cf1 = _f1(cp, cr) if p.cf1 == "harmonic" else 100.0 * _empty_mean(_f1(prec, rec), has_pos, p.empty_classes)
    if p.cf1 == "harmonic":
        cf1 = np.where(np.isnan(cp) | np.isnan(cr), np.nan, cf1)
    op = 100.0 * _safe_div(tp.sum(axis=1), npred.sum(axis=1), 0.0)
    orr = 100.0 * _safe_div(tp.sum(axis=1), npos.sum(axis=1), 0.0)
    return dict(zip(_PRF_KEYS, (cp, cr, cf1, op, orr, _f1(op, orr))))


def _protocol_topk(s: np.ndarray, k: int, ties: str) -> np.ndarray:
    """``(N, C)`` bool top-k mask; ``ties='lower_index'`` lets the lower class index win the cut."""
    return _topk_mask(s[:, ::-1], k)[:, ::-1] if ties == "lower_index" else _topk_mask(s, k)


def protocol_predictions(scores: np.ndarray, p: Any, *, top_k: Optional[int] = None,
                         score_kind: str = "logit") -> np.ndarray:
    """``(N, C)`` bool predictions of ``(N, C)`` scores under protocol ``p`` (top-k rule when ``top_k``)."""
    s = np.asarray(scores)
    above = s >= _cut(p.threshold, score_kind)
    if top_k is None:
        return above
    mask = _protocol_topk(s, top_k, p.top_k_ties)
    return mask if p.top_k_rule == "exact" else (mask & above)


def protocol_metrics(scores: ArrayLike, targets: ArrayLike, protocol: Any = None, *, top_k: Optional[int] = 3,
                     score_kind: str = "logit", sample_weight: Optional[ArrayLike] = None,
                     only: Optional[str] = None) -> dict[str, Metric]:
    """:func:`multilabel_metrics` under a named protocol (:mod:`patchcsra.protocols`).

    ``scores``, ``targets``: ``(N, C)``; ``protocol``: a name or :class:`~patchcsra.protocols.Protocol`
    (default ``patchcsra``); ``score_kind``: ``'logit'`` (threshold on the sigmoid) or ``'prob'`` (threshold
    on the scores themselves); ``sample_weight``: ``None``, ``(N,)`` or ``(R, N)``; ``only='mAP'`` computes
    the mAP alone. Same keys as :func:`multilabel_metrics`. mAP follows ``protocol.empty_classes``
    (``skip``: NaN-mean, ``zero``: a class without positives counts 0, ``nan``: NaN if there is one).
    """
    from .protocols import get_protocol

    p = get_protocol(protocol)
    s = _check_scores(scores)
    t = _check_targets(targets, s.shape)
    w, batched = _check_weights(sample_weight, s.shape[0])
    _check_score_kind(score_kind)
    k = None if top_k is None else _check_k(top_k, "top_k")
    ap = _protocol_ap(s, t, w, p)
    out: dict[str, Metric] = {"mAP": _out(_empty_mean(ap, ~np.isnan(ap), p.empty_classes), batched)}
    if only == "mAP":
        return out
    out.update({key: _out(v, batched) for key, v in _protocol_prf(protocol_predictions(s, p, score_kind=score_kind),
                                                                  t, w, p).items()})
    if k is not None:
        pred = protocol_predictions(s, p, top_k=k, score_kind=score_kind)
        out.update({f"{key}_top{k}": _out(v, batched) for key, v in _protocol_prf(pred, t, w, p).items()})
    return out


def looks_like_probabilities(scores: ArrayLike) -> bool:
    """True when every ``(N, C)`` score is in [0, 1] and not all are equal (probabilities, not logits)."""
    s = _to_numpy(scores)
    return bool(s.size and s.min() >= 0.0 and s.max() <= 1.0 and s.min() < s.max())


def positive_rate(scores: ArrayLike, threshold: float, score_kind: str = "logit") -> float:
    """Fraction of ``(N, C)`` (image, class) pairs predicted positive at ``threshold``."""
    s = _to_numpy(scores)
    return float(np.count_nonzero(s >= _cut(threshold, score_kind)) / max(1, s.size))


CV_NOTE = ("λ by CV is baseline + the mean per-fold Δ, each fold scored with the λ/T chosen on the other folds: an "
           "estimate of the out-of-sample score, not a grid point; mAP is not a mean over images, so this per-fold "
           "estimate can land above the oracle's whole-set best by fold noise, which does not make it a better λ")
MEANINGFUL_MAX_RATE = 0.5  # above this share of (image, class) pairs predicted positive, threshold metrics are off


def threshold_note(rate: float, threshold: float, score_kind: str = "logit") -> dict[str, Any]:
    """``{'meaningful', 'positive_rate', 'note'}`` for threshold metrics whose baseline predicts ``rate`` of all
    (image, class) pairs positive: not meaningful above :data:`MEANINGFUL_MAX_RATE` (a softmax/single-label
    head scored on multi-label data, or probabilities passed as logits)."""
    ok = rate <= MEANINGFUL_MAX_RATE
    on = "probability" if score_kind == "prob" else "sigmoid"
    why = ("a softmax/single-label-trained head, or probabilities given as logits: try --scores prob"
           if score_kind == "logit" else "a softmax/single-label-trained head")
    note = "" if ok else (f"threshold metrics not meaningful: {100 * rate:.0f}% of (image, class) pairs have {on} >= "
                          f"{threshold:g} at λ=0 ({why}); compare mAP only")
    return {"meaningful": ok, "positive_rate": rate, "note": note}


def table_footer(summary: dict) -> list[str]:
    """Footer lines for a run's table (protocol conventions, score kind, threshold and CV notes); [] for
    summaries written before protocols existed."""
    st = summary.get("settings") or {}
    lines = []
    if st.get("conventions_text"):
        lines.append(st["conventions_text"])
    if st.get("scores_note"):
        lines.append(st["scores_note"])
    th = st.get("threshold_metrics") or {}
    if th.get("note"):
        lines.append(th["note"])
    if st.get("resampling_note"):
        lines.append(st["resampling_note"])
    if "cv" in (summary.get("choices") or {}):
        lines.append(CV_NOTE)
    cap = [line[:1].upper() + line[1:] if line[:1].isascii() else line for line in lines]   # not λ -> Λ
    return [line if line.endswith(".") else line + "." for line in cap]


def protocol_caption(summaries: Sequence[dict]) -> str:
    """The caption line of a table of ``summaries`` (read by :func:`patchcsra.report.protocol_caption`): every
    distinct :func:`table_footer` line of the runs, in order, joined by spaces ("" for older summaries)."""
    seen: list[str] = []
    for s in summaries:
        for line in table_footer(s):
            if line not in seen:
                seen.append(line)
    return " ".join(seen)


def protocol_average_precision(scores: ArrayLike, targets: ArrayLike, protocol: Any = None) -> np.ndarray:
    """``(C,)`` per-class AP in percent of ``(N, C)`` scores under a protocol (NaN for a class without positives,
    whatever the protocol's mAP does with it)."""
    from .protocols import get_protocol

    s = _check_scores(scores)
    return 100.0 * _ap_protocol_rows(s, _check_targets(targets, s.shape), get_protocol(protocol))
