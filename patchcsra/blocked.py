"""Metrics in blocks of classes: peak memory ``O(N x block)`` instead of ``O(N x C)``, same values.

Every metric of :mod:`patchcsra.metrics` decomposes over classes: AP is per class (then averaged under the
protocol's empty-class policy), P/R/F1 are per-class counts (then averaged or summed). What needs a whole row --
the top-k predictions of CP_top3 ... and single-label top-1 / top-5 -- is a running top-k per image, merged block
after block under the same total order as :func:`patchcsra.metrics._topk_mask` (score, then the higher or the
lower class index), so the chosen set is the same as on the whole row. The values are those of the in-memory
path (:func:`patchcsra.grid.evaluate_grid` on small stats): the same float32 score arithmetic (torch), the same
per-class functions, the same final averages (tests/test_store.py compares them for every protocol).

* :func:`reader` -- ``(cb, N)`` blocks of a :class:`~patchcsra.stats.Stats` (from its store with plain reads, or
  from its tensors in RAM).
* :class:`Scores` -- a lazy ``(N, C)`` score matrix (a grid point or a comparator), computed one block at a time.
* :func:`blocked_metrics` -- the metrics of one :class:`Scores` (optionally with bootstrap weights).
* :func:`sparse_metrics` -- AP and threshold P/R/F1 of :class:`~patchcsra.store.SparseStats` (labelled entries).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from . import metrics as M
from .errors import PatchCSRAError

__all__ = ["reader", "block_size", "Scores", "blocked_metrics", "sparse_metrics", "BLOCK_ENTRIES",
           "use_blocked", "BLOCKED_MIN_ENTRIES"]

#: entries (N x classes) of one block: 64 MB of float32
BLOCK_ENTRIES = 2 ** 24
#: in-RAM stats with more (image, class) entries than this are evaluated in blocks too (1 GB per float32 array)
BLOCKED_MIN_ENTRIES = 2 ** 28


def block_size(n: int, entries: int = 0) -> int:
    """Classes per block for ``n`` images."""
    return max(1, (entries or BLOCK_ENTRIES) // max(1, int(n)))


def use_blocked(stats: Any) -> bool:
    """Whether ``stats`` is evaluated in blocks: store-backed, or more than :data:`BLOCKED_MIN_ENTRIES` entries."""
    if getattr(stats, "store", None) is not None:
        return True
    return int(stats.base.shape[0]) * int(stats.base.shape[1]) > BLOCKED_MIN_ENTRIES


# ----------------------------------------------------------------------------- block readers
class _MemReader:
    """``(cb, N)`` copies of blocks of in-RAM tensors."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self.n, self.c = int(stats.base.shape[0]), int(stats.base.shape[1])
        self.temperatures = tuple(stats.temperatures)

    def has(self, name: str) -> bool:
        return getattr(self.stats, name, None) is not None

    def read(self, name: str, c0: int, c1: int, temperature: Optional[float] = None) -> np.ndarray:
        st = self.stats
        x = st.att_for(temperature) if name == "att" else getattr(st, name)
        x = x[:, c0:c1]
        if x.dtype != torch.float32:
            x = x.float()
        return np.ascontiguousarray(x.numpy().T)

    def targets(self, c0: int, c1: int) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self.stats.targets[:, c0:c1]).T).astype(np.int8, copy=False)


def reader(stats: Any) -> Any:
    """The block reader of ``stats``: its :class:`~patchcsra.store.DenseStore` or one over its tensors."""
    store = getattr(stats, "store", None)
    return store if store is not None else _MemReader(stats)


# ----------------------------------------------------------------------------- lazy scores
@dataclass(frozen=True)
class Scores:
    """A lazy ``(N, C)`` score matrix: ``kind`` ``lam`` (``base + lam * att(T)``, as :meth:`Stats.scores`),
    ``ttp`` (``0.5 * (base + max)``), ``multihead`` (``H * base + lam * sum_h att(T_h)``) or ``avgmax``."""

    kind: str
    lam: float = 0.0
    temperature: float = math.inf
    temps: tuple[float, ...] = ()

    def block(self, rd: Any, c0: int, c1: int) -> np.ndarray:
        """``(c1 - c0, N)`` float32, computed with the same torch float32 operations as the in-memory tensors."""
        t = torch.from_numpy
        if self.kind == "lam":
            base = rd.read("base", c0, c1)
            if self.lam == 0:
                return base
            return (t(base) + float(self.lam) * t(rd.read("att", c0, c1, self.temperature))).numpy()
        if self.kind == "ttp":
            return (0.5 * (t(rd.read("base", c0, c1)) + t(rd.read("max", c0, c1)))).numpy()
        if self.kind == "multihead":
            att = sum(t(rd.read("att", c0, c1, x)) for x in self.temps)
            return (len(self.temps) * t(rd.read("base", c0, c1)) + float(self.lam) * att).numpy()
        if self.kind == "avgmax":
            return rd.read("avgmax", c0, c1)
        raise PatchCSRAError(f"unknown score kind {self.kind!r}")


class _TopK:
    """The ``k`` highest scores of every row so far, under (score, then higher / lower class index); with the
    class index and target of each (columns kept in class order)."""

    def __init__(self, k: int, lower_index: bool) -> None:
        self.k, self.lower = int(k), lower_index
        self.vals: Optional[np.ndarray] = None
        self.idx: Optional[np.ndarray] = None
        self.tg: Optional[np.ndarray] = None

    def add(self, vals: np.ndarray, c0: int, tg: Optional[np.ndarray]) -> None:
        """``vals`` ``(n, cb)`` scores of classes ``c0 .. c0 + cb`` (``tg`` their targets)."""
        n, cb = vals.shape
        idx = np.broadcast_to(np.arange(c0, c0 + cb, dtype=np.int32), (n, cb))
        if self.vals is None:
            cv, ci, ct = vals, idx, tg
        else:
            cv = np.concatenate([self.vals, vals], axis=1)
            ci = np.concatenate([self.idx, idx], axis=1)
            ct = None if tg is None else np.concatenate([self.tg, tg], axis=1)
        m = cv.shape[1]
        if m <= self.k:
            self.vals, self.idx, self.tg = np.ascontiguousarray(cv), np.ascontiguousarray(ci), \
                None if ct is None else np.ascontiguousarray(ct)
            return
        mask = M._topk_mask(cv[:, ::-1], self.k)[:, ::-1] if self.lower else M._topk_mask(cv, self.k)
        self.vals = cv[mask].reshape(n, self.k)
        self.idx = ci[mask].reshape(n, self.k)
        self.tg = None if ct is None else ct[mask].reshape(n, self.k)


def _labels(rd: Any, cache: dict) -> np.ndarray:
    """``(N,)`` ``targets.argmax(axis=1)`` from blocks of targets (first maximum, as numpy)."""
    if "labels" in cache:
        return cache["labels"]
    best = np.full(rd.n, -2, np.int8)
    lab = np.zeros(rd.n, np.int64)
    step = block_size(rd.n) * 4
    for c0 in range(0, rd.c, step):
        tg = rd.targets(c0, min(rd.c, c0 + step))
        bm, ba = tg.max(axis=0), tg.argmax(axis=0)
        up = bm > best
        best[up], lab[up] = bm[up], ba[up] + c0
    cache["labels"] = lab
    return lab


def _weighted_topk_counts(idx: np.ndarray, sel: np.ndarray, w: np.ndarray, c: int) -> np.ndarray:
    """``(R, C)`` weight totals of the selected ``(n, k)`` entries by class: ``W @ S`` with a sparse ``S``."""
    import scipy.sparse as sp

    n = idx.shape[0]
    r_i = np.broadcast_to(np.arange(n)[:, None], idx.shape)[sel]
    dtype = np.float32 if M._exact_in_float32(w) else np.float64
    s = sp.csr_matrix((np.ones(len(r_i), dtype), (r_i, idx[sel])), shape=(n, c))
    return np.asarray((s.T @ np.ascontiguousarray(w.T, dtype=dtype)).T, dtype=np.float64)


def blocked_metrics(stats: Any, scores: Scores, rows: np.ndarray, proto: Any, score_kind: str = "logit",
                    top_k: Optional[int] = 3, sample_weight: Optional[np.ndarray] = None, only: Optional[str] = None,
                    block: int = 0, cache: Optional[dict] = None) -> dict[str, Any]:
    """The metrics of ``grid._metrics`` (same keys, same values) for lazy ``scores`` on the images ``rows``
    (bool ``(N,)``), one block of classes at a time. ``only``: ``mAP``, ``top1`` or ``top5`` computes that alone.
    ``sample_weight``: ``(R, n)`` bootstrap counts over the selected rows (every value becomes ``(R,)``)."""
    from .protocols import get_protocol

    p = get_protocol(proto)
    rd = reader(stats)
    cache = {} if cache is None else cache
    n_all, c = rd.n, rd.c
    rows = np.asarray(rows, bool)
    sel = None if rows.all() else np.flatnonzero(rows)
    n = n_all if sel is None else len(sel)
    if n == 0:
        raise PatchCSRAError("no images to score")
    w, batched = M._check_weights(sample_weight, n)
    single = bool(stats.single_label)
    want_ap = only in (None, "mAP")
    if single:
        ks = (1, 5) if only is None else ((int(only[3:]),) if only in ("top1", "top5") else ())
    else:
        ks = () if (only is not None or top_k is None) else (M._check_k(top_k, "top_k"),)
    want_prf = only is None and not single
    cut = M._cut(p.threshold, score_kind) if want_prf else None
    lower = (not single) and p.top_k_ties == "lower_index"
    tops = {k: _TopK(k, lower) for k in ks}
    aps, counts = [], []
    step = block or block_size(n_all)
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        s = scores.block(rd, c0, c1)
        tg = rd.targets(c0, c1) if (want_ap or want_prf or (ks and not single)) else None
        if sel is not None:
            s = s[:, sel]
            tg = None if tg is None else tg[:, sel]
        s_nc = s.T
        tg_nc = None if tg is None else tg.T
        if want_ap:
            s_ap = np.ascontiguousarray(s_nc) if getattr(p, "rank", "score") == "sigmoid32" else s_nc
            aps.append(M._protocol_ap(s_ap, tg_nc, w, p))
        if want_prf:
            t_prf = np.where(tg_nc < 0, 0, tg_nc).astype(np.int8) if p.ignored == "negative" else tg_nc
            counts.append(M._counts(s_nc >= cut, t_prf, w))
        for tk in tops.values():
            tk.add(s_nc, c0, None if single else tg_nc)
    out: dict[str, Any] = {}
    if single:
        lab = _labels(rd, cache)
        lab = lab if sel is None else lab[sel]
        for k, tk in tops.items():
            hit = (tk.idx == lab[:, None]).any(axis=1).astype(np.float64)
            if w is None:
                out[f"top{k}"] = 100.0 * float(hit.mean())
            else:
                out[f"top{k}"] = M._out(100.0 * M._safe_div(w @ hit, w.sum(axis=1, dtype=np.float64), np.nan),
                                        batched)
    if want_ap:
        ap = np.concatenate(aps, axis=1)
        m = {"mAP": M._out(M._empty_mean(ap, ~np.isnan(ap), p.empty_classes), batched)}
        out = {**m, **out} if not single else {**out, **m}
    if want_prf:
        tp, npred, npos = (np.concatenate([x[i] for x in counts], axis=1) for i in range(3))
        out.update({key: M._out(v, batched) for key, v in M._prf_from_counts(tp, npred, npos, p).items()})
        for k, tk in tops.items():
            t_k = np.where(tk.tg < 0, 0, tk.tg) if p.ignored == "negative" else tk.tg
            pred = np.ones(tk.vals.shape, bool) if p.top_k_rule == "exact" else (tk.vals >= cut)
            hit_tp, hit_pred = pred & (t_k == 1), pred & (t_k >= 0)
            if w is None:
                ktp = np.bincount(tk.idx[hit_tp], minlength=c)[None].astype(np.float64)
                kpred = np.bincount(tk.idx[hit_pred], minlength=c)[None].astype(np.float64)
            else:
                ktp = _weighted_topk_counts(tk.idx, hit_tp, w, c)
                kpred = _weighted_topk_counts(tk.idx, hit_pred, w, c)
            vals = M._prf_from_counts(ktp, kpred, npos, p)
            out.update({f"{key}_top{k}": M._out(v, batched) for key, v in vals.items()})
    return out


def per_class_ap(stats: Any, scores: Scores, rows: np.ndarray, proto: Any) -> np.ndarray:
    """``(C,)`` per-class AP in percent (``metrics.protocol_average_precision``) in blocks of classes."""
    from .protocols import get_protocol

    p = get_protocol(proto)
    rd = reader(stats)
    sel = None if rows.all() else np.flatnonzero(rows)
    out = []
    step = block_size(rd.n)
    for c0 in range(0, rd.c, step):
        c1 = min(rd.c, c0 + step)
        s, tg = scores.block(rd, c0, c1), rd.targets(c0, c1)
        if sel is not None:
            s, tg = s[:, sel], tg[:, sel]
        s_nc = np.ascontiguousarray(s.T) if getattr(p, "rank", "score") == "sigmoid32" else s.T
        out.append(100.0 * M._ap_protocol_rows(s_nc, tg.T, p))
    return np.concatenate(out)


def target_counts(stats: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(C,)`` positives and ignored entries per class on ``rows``."""
    rd = reader(stats)
    sel = None if rows.all() else np.flatnonzero(rows)
    pos, ign = [], []
    step = block_size(rd.n) * 4
    for c0 in range(0, rd.c, step):
        tg = rd.targets(c0, min(rd.c, c0 + step))
        if sel is not None:
            tg = tg[:, sel]
        pos.append((tg == 1).sum(axis=1))
        ign.append((tg == -1).sum(axis=1))
    return np.concatenate(pos), np.concatenate(ign)


def scan(stats: Any, rows: np.ndarray, cuts: Sequence[float] = (), finite: bool = False) -> dict[str, Any]:
    """One pass over blocks. Over ``base`` on ``rows``: ``min``, ``max``, ``size`` and ``above`` (entries >= each
    of ``cuts``); with ``finite``, ``finite`` ``(N,)``: ``base`` and ``att`` at every temperature finite on the row."""
    rd = reader(stats)
    sel = np.flatnonzero(rows)
    ok = np.ones(rd.n, bool)
    lo, hi, above = math.inf, -math.inf, [0] * len(cuts)
    step = block_size(rd.n)
    for c0 in range(0, rd.c, step):
        c1 = min(rd.c, c0 + step)
        b = rd.read("base", c0, c1)
        if finite:
            ok &= np.isfinite(b).all(axis=0)
            for t in stats.temperatures:
                ok &= np.isfinite(rd.read("att", c0, c1, t)).all(axis=0)
        bs = b[:, sel]
        if bs.size:
            lo, hi = min(lo, float(bs.min())), max(hi, float(bs.max()))
            for i, cut in enumerate(cuts):
                above[i] += int(np.count_nonzero(bs >= cut))
    return {"finite": ok, "min": lo, "max": hi, "size": int(len(sel)) * rd.c, "above": above}


def avgmax_finite(stats: Any, rows: np.ndarray) -> bool:
    """Whether ``avgmax`` was collected and is finite on every row of ``rows``."""
    rd = reader(stats)
    if not rd.has("avgmax"):
        return False
    sel = np.flatnonzero(rows)
    step = block_size(rd.n)
    return all(bool(np.isfinite(rd.read("avgmax", c0, min(rd.c, c0 + step))[:, sel]).all())
               for c0 in range(0, rd.c, step))


# ----------------------------------------------------------------------------- sparse labels
def _ap_aware_one(x: np.ndarray, y: np.ndarray) -> float:
    """Tie-aware non-interpolated AP in [0, 1] of one class's labelled entries (``metrics._ap_unweighted``'s
    arithmetic on the labelled entries alone: its ignored entries sit below every score, so the counts agree)."""
    npos = int(np.count_nonzero(y))
    if npos == 0:
        return math.nan
    srt = np.sort(x)
    u, cnt = np.unique(x[y], return_counts=True)
    at_or_above = len(x) - np.searchsorted(srt, u, side="left")
    tp = np.cumsum(cnt[::-1])[::-1]
    return np.dot(cnt, tp / at_or_above) / np.int64(npos)


def sparse_metrics(sp: Any, lam: float, temperature: float, rows: np.ndarray, proto: Any,
                   score_kind: str = "logit") -> dict[str, Any]:
    """mAP and CP, CR, CF1, OP, OR, OF1 of :class:`~patchcsra.store.SparseStats` at ``(lam, T)`` on ``rows``:
    equal to the dense metrics with every unlabelled entry ignored (-1). Top-k metrics are not available."""
    from .protocols import get_protocol

    p = get_protocol(proto)
    if p.ignored != "remove" or p.ap_ignored != "remove":
        raise PatchCSRAError(f"protocol {p.name!r} counts ignored entries as negatives, but sparse statistics keep "
                             "only the labelled entries; use a protocol that removes them (patchcsra, csra, "
                             "mmpretrain, voc07, voc2010, coco)")
    s = sp.scores(lam, temperature)
    tg = sp.targets
    cls = sp.entry_classes()
    keep = np.asarray(rows, bool)[sp.rows]
    indptr = sp.indptr
    if not keep.all():
        s, tg, cls = s[keep], tg[keep], cls[keep]
        indptr = np.concatenate(([0], np.cumsum(np.bincount(cls, minlength=sp.c)))).astype(np.int64)
    if getattr(p, "rank", "score") == "sigmoid32":
        s_ap = (1.0 / (1.0 + np.exp(-np.asarray(s, dtype=np.float32)))).astype(np.float32).astype(np.float64)
    else:
        s_ap = s
    ap = np.full(sp.c, np.nan)
    aware = p.ap == "noninterp" and p.ties == "aware"
    pos = tg == 1
    for k in np.flatnonzero(np.bincount(cls[pos], minlength=sp.c)):
        a, b = indptr[k], indptr[k + 1]
        ap[k] = _ap_aware_one(s_ap[a:b], pos[a:b]) if aware else \
            M._ap_one(s_ap[a:b].astype(np.float64), pos[a:b], p.ap, p.ties)
    ap = 100.0 * ap[None]
    out: dict[str, Any] = {"mAP": M._out(M._empty_mean(ap, ~np.isnan(ap), p.empty_classes), False)}
    if sp.single_label:
        return out
    pred = s >= M._cut(p.threshold, score_kind)
    tp = np.bincount(cls[pred & pos], minlength=sp.c)[None].astype(np.float64)
    npred = np.bincount(cls[pred], minlength=sp.c)[None].astype(np.float64)
    npos = np.bincount(cls[pos], minlength=sp.c)[None].astype(np.float64)
    out.update({key: M._out(v, False) for key, v in M._prf_from_counts(tp, npred, npos, p).items()})
    return out
