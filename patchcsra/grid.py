"""λ / T grid evaluation on collected :class:`~patchcsra.stats.Stats`, and honest λ selection.

* :func:`evaluate_grid` -- one row of metrics per ``(lam, temperature)``; no backbone work.
* :func:`sweep` -- the paper's Table 1 for one (model, dataset): the baseline, the best grid point
  (the *oracle*: chosen on the very images it is scored on, labelled so), the fixed λ (0.02 for
  ResNets, 0.2 otherwise), and λ chosen by k-fold cross-validation (each image scored with the
  λ/T picked on the other folds), each with a paired bootstrap 95% interval for its Δ.
* :data:`DEFAULT_LAMS` -- 21 λ values from 0 to 1 covering every value the paper reports.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from . import blocked as B
from . import metrics as M
from .errors import PatchCSRAError
from .options import DEFAULT_LAMS, SweepOptions, split_options
from .patcher import temperature_json
from .stats import Stats
from .store import SparseStats

__all__ = ["DEFAULT_LAMS", "Choice", "SweepResult", "evaluate_grid", "sweep", "primary_metric", "check_finite",
           "comparator_scores", "MULTI_HEAD_TEMPERATURES"]

#: the paper's H = 8 temperature set (Sec. 3.4; the official code writes inf as 99), all collected by default
MULTI_HEAD_TEMPERATURES: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, math.inf)

_logger = logging.getLogger(__name__)

SINGLE_LABEL_METRICS = ("top1", "top5", "mAP")  # mAP: one-vs-rest over the one-hot targets


@dataclass(frozen=True)
class Choice:
    """One way of picking λ, and what it scores.

    ``delta`` is ``score - baseline``; ``ci`` its paired bootstrap 95% interval (same images resampled).
    """

    name: str
    lam: float
    temperature: float
    score: float
    delta: float
    ci: tuple[float, float]
    note: str = ""
    per_fold: tuple[tuple[float, float], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["temperature"] = temperature_json(self.temperature)
        d["ci"] = list(self.ci)
        d["per_fold"] = [[lam, temperature_json(t)] for lam, t in self.per_fold]
        return d


@dataclass
class SweepResult:
    """Everything one sweep produced; :func:`patchcsra.report.write_run` renders it."""

    frame: pd.DataFrame
    metric: str
    baseline: dict[str, float]
    choices: dict[str, Choice]
    stats: Stats
    per_class: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    #: rows beside the λ choices from the same stats (:func:`comparator_scores`): ``ttp``, ``multihead``
    comparators: dict[str, Choice] = field(default_factory=dict)
    #: bootstrap 95% band of the metric along λ (:func:`_band`): ``{"resamples", "curves": [{temperature,
    #: lams, low, high}]}``; empty without a bootstrap
    band: dict[str, Any] = field(default_factory=dict)


def primary_metric(stats: Stats) -> str:
    """``mAP`` for multi-label data, ``top1`` for single-label data."""
    return "top1" if stats.single_label else "mAP"


def check_finite(stats: Stats, model: Optional[str] = None) -> None:
    """Refuse NaN/inf logits on readable images, naming the model (when given), how many and which."""
    rows = stats.ok
    if B.use_blocked(stats):
        bad = ~B.scan(stats, rows, finite=True)["finite"] & rows
    else:
        att = stats.att.numpy()
        bad = ~(np.isfinite(stats.base.numpy()).all(1) & np.isfinite(att.reshape(att.shape[0], -1)).all(1)) & rows
    if bad.any():
        ids = [stats.ids[i] for i in np.flatnonzero(bad)[:5]]
        who = "the model" if model is None else f"the model {model}"
        raise PatchCSRAError(f"{who} produced NaN/inf logits on {int(bad.sum())} image(s) (e.g. {', '.join(ids)}); "
                             "check the weights, input normalisation and --amp (try --amp none)")


def _metrics(stats: Stats, scores: torch.Tensor, rows: np.ndarray, top_k: int,
             weight: Optional[np.ndarray] = None, proto: Any = None, score_kind: str = "logit") -> dict[str, Any]:
    """Every metric of ``scores`` on ``rows`` under protocol ``proto`` (:mod:`patchcsra.protocols`)."""
    s = scores.numpy()[rows]
    if stats.single_label:
        out = M.topk_accuracy(s, stats.labels()[rows], ks=(1, 5), sample_weight=weight)
        out["mAP"] = M.protocol_metrics(s, stats.targets[rows], proto, sample_weight=weight, only="mAP")["mAP"]
        return out
    return M.protocol_metrics(s, stats.targets[rows], proto, top_k=top_k, score_kind=score_kind, sample_weight=weight)


def _primary(stats: Stats, metric: str, top_k: int, proto: Any = None,
             score_kind: str = "logit") -> Callable[[torch.Tensor, np.ndarray, Optional[np.ndarray]], Any]:
    """A fast ``f(scores, rows, weight) -> value`` for the selection metric only (``scores`` a tensor, or a lazy
    :class:`patchcsra.blocked.Scores` for stats evaluated in blocks)."""
    if B.use_blocked(stats):
        only = "mAP" if metric == "mAP" else (metric if metric in ("top1", "top5") and stats.single_label else None)
        cache: dict = {}
        return lambda s, rows, w=None: B.blocked_metrics(stats, s, rows, proto, score_kind, top_k, w, only,
                                                         cache=cache)[metric]
    if metric == "mAP":
        return lambda s, rows, w=None: M.protocol_metrics(s.numpy()[rows], stats.targets[rows], proto,
                                                          sample_weight=w, only="mAP")["mAP"]
    if metric in ("top1", "top5") and stats.single_label:
        k = int(metric[3:])
        f = lambda s, rows, w=None: M.topk_accuracy(s.numpy()[rows], stats.labels()[rows], ks=(k,),  # noqa: E731
                                                    sample_weight=w)[metric]
        # a mean over images: (per image values of all N, their mean on rows) -- what f gives, bit for bit
        f.per_image = (lambda s: M.topk_hits(s.numpy(), stats.labels(), k),
                       lambda v, rows, w=None: M.hit_rate(v[rows], *M._check_weights(w, int(rows.sum()))))
        return f
    return lambda s, rows, w=None: _metrics(stats, s, rows, top_k, w, proto, score_kind)[metric]


def _grid(lams: Sequence[float], temperatures: Sequence[float]) -> list[tuple[float, float]]:
    """Every ``(λ, T)`` of checked values: λ ascending within each T, T ascending with ``inf`` last."""
    ts = sorted(set(temperatures), key=lambda t: (math.isinf(t), t))
    return [(lam, t) for t in ts for lam in sorted(set(lams))]


def evaluate_grid(stats: Stats, lams: Sequence[float] = DEFAULT_LAMS, temperatures: Sequence[float] = (math.inf,),
                  *, top_k: int = 3, rows: Optional[np.ndarray] = None, protocol: Any = None,
                  scores: str = "logit") -> pd.DataFrame:
    """Every metric at every grid point: a frame with columns ``lam, temperature, <metrics>``.

    Args:
        stats: collected scores; rows with ``ok == False`` are never scored.
        lams, temperatures: the grid (each T must have been collected).
        top_k: k of the CP/CR/.../OF1 top-k columns (multi-label data).
        rows: optional ``(N,)`` bool mask of images to score (default: all readable images).
        protocol: a metric protocol name (:data:`patchcsra.protocols.PROTOCOLS`, default ``patchcsra``).
        scores: ``logit`` or ``prob`` (thresholds on the sigmoid, or on the scores themselves).

    Store-backed stats (:func:`patchcsra.store.open_stats`) and stats of more than
    :data:`patchcsra.blocked.BLOCKED_MIN_ENTRIES` entries are evaluated in blocks of classes (the same values, peak
    memory ``O(N x block)``); :class:`~patchcsra.store.SparseStats` gives mAP and the threshold P/R/F1 over the
    labelled entries only (no top-k columns: a row's ranking needs every class).
    """
    opts = SweepOptions(lams=tuple(lams), temperatures=tuple(temperatures))  # checked here, once
    proto, kind = _resolve_protocol(stats, protocol, scores)[:2]
    return _evaluate(stats, _grid(opts.lams, opts.temperatures), top_k, rows, proto, kind)


def _evaluate(stats: Stats, grid: Sequence[tuple[float, float]], top_k: int,
              rows: Optional[np.ndarray], proto: Any = None, score_kind: str = "logit") -> pd.DataFrame:
    mask = stats.ok if rows is None else (rows & stats.ok)
    if isinstance(stats, SparseStats):
        return pd.DataFrame([{"lam": lam, "temperature": t, **B.sparse_metrics(stats, lam, t, mask, proto, score_kind)}
                             for lam, t in grid])
    if B.use_blocked(stats):
        cache: dict = {}
        return pd.DataFrame([{"lam": lam, "temperature": t,
                              **B.blocked_metrics(stats, B.Scores("lam", lam, t), mask, proto, score_kind, top_k,
                                                  cache=cache)} for lam, t in grid])
    out = [{"lam": lam, "temperature": t, **_metrics(stats, stats.scores(lam, t), mask, top_k, None, proto,
                                                     score_kind)} for lam, t in grid]
    return pd.DataFrame(out)


def _argbest(values: Sequence[float], grid: Sequence[tuple[float, float]]) -> int:
    """Best value; ties go to the smaller λ (closer to the model), then to T = inf."""
    v = np.asarray(values, dtype=np.float64)
    best = np.nanmax(v)
    cands = [i for i in range(len(v)) if v[i] >= best - 1e-12]
    return min(cands, key=lambda i: (grid[i][0], not math.isinf(grid[i][1]), grid[i][1]))


def _folds(rows: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    idx = np.flatnonzero(rows)
    perm = np.random.default_rng(seed).permutation(idx)
    return [np.sort(f) for f in np.array_split(perm, k)]


def sweep(stats: Stats, *, options: Optional[SweepOptions] = None, top_k: int = 3, model: Optional[str] = None,
          exact_linear: Optional[bool] = None, protocol: Any = None, scores: str = "auto",
          **option_kwargs: Any) -> SweepResult:
    """Table 1 for one (model, dataset), from collected stats: no forward passes.

    Args:
        stats: from :func:`patchcsra.stats.collect`.
        options: a :class:`~patchcsra.options.SweepOptions`, or its fields as keywords: ``lams``,
            ``temperatures`` (the grid; ``fixed_lam`` at T = inf, the paper's 4 lines, is added to it),
            ``fixed_lam`` (the paper's fixed λ, :func:`patchcsra.patcher.default_lam` of the model; 0.2 when
            not given), ``metric`` (selection metric, default ``mAP``, or ``top1`` for single-label data),
            ``folds`` (k of the cross-validated λ choice; 0 or 1 disables it), ``bootstrap`` (paired
            bootstrap resamples for the Δ intervals; 0 disables them), ``seed`` (the folds and resamples).
        top_k: k of the top-k precision/recall columns.
        model: the model's name, for the message when its logits are NaN/inf.
        protocol: metric conventions by name (:data:`patchcsra.protocols.PROTOCOLS`: ``patchcsra`` (default),
            ``csra``, ``mlgcn``, ``asl``, ``mmpretrain``, ``voc07``, ``voc2010``, ``coco``).
        scores: ``auto`` (default: probabilities when every baseline score is in [0, 1], with a warning),
            ``logit`` or ``prob``: whether thresholds apply to ``sigmoid(score)`` or to the score itself.
        exact_linear: whether the model's logit is exactly ``mean_k s_k`` (``HeadInfo.exact_linear``); it
            decides how the test-time-pooling comparator is labelled (:func:`comparator_scores`).
    """
    opts = split_options(option_kwargs, sweep=options, allowed=(SweepOptions,))[2]
    if isinstance(stats, SparseStats):
        raise PatchCSRAError("sweep needs dense statistics (CV, bootstrap and comparators read whole rows); "
                             "evaluate sparse statistics with patchcsra.grid.evaluate_grid")
    check_finite(stats, model)
    rows = stats.ok.copy()
    if not rows.any():
        raise PatchCSRAError("no readable images to score")
    metric = opts.metric or primary_metric(stats)
    fixed_lam = 0.2 if opts.fixed_lam is None else opts.fixed_lam
    folds, bootstrap, seed = opts.folds, opts.bootstrap, opts.seed
    resampling_note = ""
    if _too_large_to_resample(stats) and ((folds and folds > 1) or (bootstrap and bootstrap > 0)):
        resampling_note = (f"bootstrap intervals, the curve band and λ by CV were not computed: "
                           f"{len(stats):,} images x {stats.base.shape[1]:,} classes is above "
                           f"{RESAMPLE_MAX_ENTRIES:,} entries (each resample is a pass over the statistics)")
        _logger.warning("%s", resampling_note)
        folds, bootstrap = 0, 0
    lam_set = sorted(set(opts.lams) | {0.0, fixed_lam})
    temps = sorted(set(opts.temperatures) | {math.inf}, key=lambda t: (math.isinf(t), t))
    proto, kind, scores_info = _resolve_protocol(stats, protocol, scores, rows)
    frame = _evaluate(stats, _grid(lam_set, temps), top_k, rows, proto, kind)
    if metric not in frame.columns:
        raise PatchCSRAError(f"metric={metric!r} is not computed here; choose one of "
                             f"{', '.join(c for c in frame.columns if c not in ('lam', 'temperature'))}")
    grid = list(zip(frame["lam"].tolist(), frame["temperature"].tolist()))
    base_row = frame[(frame["lam"] == 0.0) & np.isinf(frame["temperature"])].iloc[0]
    baseline = {k: float(v) for k, v in base_row.items() if k not in ("lam", "temperature")}
    i_best = _argbest(frame[metric].tolist(), grid)
    oracle = (grid[i_best][0], grid[i_best][1], float(frame[metric].iloc[i_best]))
    fixed_row = frame[(frame["lam"] == fixed_lam) & np.isinf(frame["temperature"])].iloc[0]
    fixed = (fixed_lam, math.inf, float(fixed_row[metric]))
    # one draw of the resamples serves the choices, the comparators and (its first rows) the band
    weights = M.bootstrap_weights(int(rows.sum()), int(bootstrap), seed) if bootstrap and bootstrap > 0 else None
    choices = _choices(stats, rows, grid, baseline[metric], oracle, fixed, _primary(stats, metric, top_k, proto, kind),
                       folds, bootstrap, seed, weights)
    per_class = _per_class(stats, rows, oracle[0], oracle[1], fixed_lam, proto)
    settings = {"lams": lam_set, "temperatures": [temperature_json(t) for t in temps], "fixed_lam": fixed_lam,
                "metric": metric, "folds": int(folds), "bootstrap": int(bootstrap), "seed": int(seed),
                "top_k": int(top_k), "threshold": proto.threshold, **scores_info}
    if resampling_note:
        settings["resampling_note"] = resampling_note
    if B.use_blocked(stats):
        settings["evaluated_in_blocks"] = True
    comps = _comparators(stats, rows, baseline[metric], fixed_lam, _primary(stats, metric, top_k, proto, kind),
                         exact_linear, weights)
    band = _band(stats, rows, grid, oracle[1], _primary(stats, metric, top_k, proto, kind), weights)
    return SweepResult(frame=frame, metric=metric, baseline=baseline, choices=choices, stats=stats,
                       per_class=per_class, settings=settings, comparators=comps, band=band)


#: (image, class) entries above which a sweep skips its bootstrap intervals, curve band and CV (one warning,
#: recorded in ``settings.resampling_note`` and under the table): each resample or fold is a pass over the stats,
#: and ``(R, N)`` bootstrap weights alone outgrow memory (1,000 x 1.28M int32 = 5 GB)
RESAMPLE_MAX_ENTRIES = B.BLOCKED_MIN_ENTRIES


def _too_large_to_resample(stats: Stats) -> bool:
    return B.use_blocked(stats) and len(stats) * int(stats.base.shape[1]) > RESAMPLE_MAX_ENTRIES


def _sc(stats: Stats, lam: float, t: float = math.inf) -> Any:
    """``stats.scores(lam, t)``, or its lazy :class:`patchcsra.blocked.Scores` for stats evaluated in blocks."""
    return B.Scores("lam", float(lam), float(t)) if B.use_blocked(stats) else stats.scores(lam, t)


#: most grid points that get a bootstrap band on the curve (else: the oracle's T only)
BAND_MAX_POINTS = 64
#: most resamples of the band (fewer than the Δ intervals: it is drawn, not reported)
BAND_RESAMPLES = 200
#: resampled (image, class) entries the band may cost in all (points x resamples x N x C), and the fewest
#: resamples worth drawing; VOC07 test gets 200 resamples on up to 64 points, COCO val ~60 on one T
BAND_BUDGET = 2 ** 32
BAND_MIN_RESAMPLES = 50


def _band(stats: Stats, rows: np.ndarray, grid: list[tuple[float, float]], best_t: float, primary,
          weights: Optional[np.ndarray]) -> dict[str, Any]:
    """Percentile 95% band of the selection metric at each λ of every T (or of the oracle's T alone when the grid
    has more than :data:`BAND_MAX_POINTS` points or would cost more than :data:`BAND_BUDGET`), from
    ``min(R, BAND_RESAMPLES)`` paired resamples, fewer where the budget asks (none below
    :data:`BAND_MIN_RESAMPLES`: ``{}``). ``weights``: the sweep's ``(R, N)`` ``bootstrap_weights`` (None: off), whose
    first rows are the band's resamples (each row is drawn after the ones before it)."""
    reps = min(0 if weights is None else len(weights), BAND_RESAMPLES)
    if reps <= 0:
        return {}
    ts = sorted({t for _, t in grid}, key=lambda t: (math.isinf(t), t))
    size = int(rows.sum()) * max(1, stats.base.shape[1])
    if len(grid) > BAND_MAX_POINTS or len(grid) * reps * size > BAND_BUDGET:
        ts = [best_t]
    points = sum(1 for _, t in grid if t in ts)
    reps = min(reps, BAND_BUDGET // max(1, points * size))  # fewer resamples on a large set (COCO: ~60)
    if reps < BAND_MIN_RESAMPLES:
        return {}
    w = weights[:reps]  # type: ignore[index]
    curves = []
    for t in ts:
        lams = sorted({lam for lam, tt in grid if tt == t})
        lo, hi = [], []
        for lam in lams:
            v = np.asarray(primary(_sc(stats, lam, t), rows, w), dtype=np.float64)
            a, b = np.nanpercentile(v, [2.5, 97.5])
            lo.append(float(a))
            hi.append(float(b))
        curves.append({"temperature": temperature_json(t), "lams": lams, "low": lo, "high": hi})
    return {"resamples": reps, "curves": curves}


def comparator_scores(stats: Stats, fixed_lam: float) -> dict[str, torch.Tensor]:
    """``(N, C)`` scores of the comparators that the one-pass stats hold, by name.

    * ``ttp`` -- timm's test-time pooling of the class maps, ``0.5 * (avg_k s_k + max_k s_k)``
      (``timm.layers.TestTimePoolHead`` with a 1x1 pool window, i.e. ``adaptive_avgmax_pool2d`` of the class
      maps). ``avg_k s_k`` is taken as the model's own logit ``base``: equal to it exactly for a linear head
      after global average pooling (``HeadInfo.exact_linear``), otherwise this row is ``0.5 * (base + max)``.
    * ``multihead`` -- the paper's multi-head CSRA (Sec. 3.4, Eq. 13) with ``H = 8`` heads at
      :data:`MULTI_HEAD_TEMPERATURES`, one shared λ (``fixed_lam``): ``sum_h (base + λ * att(T_h))``; only
      when every one of those temperatures was collected.
    * ``avgmax`` -- feature-level avg+max pooling before the head (timm's ``SelectAdaptivePool2d(pool_type=
      'avgmax')``, then the classifier): ``head(0.5 * (mean_k x_k + max_k x_k))``, collected in the same pass
      (:attr:`Stats.avgmax`); only when it was collected and is finite on every readable image (it is NaN for
      splits whose locations are not one feature map).
    """
    base = stats.base.numpy()  # numpy on the tensors' memory: the same float32 arithmetic as torch, bit for bit
    out = {"ttp": torch.from_numpy(np.float32(0.5) * (base + stats.max.numpy()))}
    have = set(stats.temperatures) | {math.inf}
    if all(t in have for t in MULTI_HEAD_TEMPERATURES):
        att = sum(stats.att_for(t).numpy() for t in MULTI_HEAD_TEMPERATURES)
        out["multihead"] = torch.from_numpy(np.float32(len(MULTI_HEAD_TEMPERATURES)) * base
                                            + np.float32(fixed_lam) * att)
    am = getattr(stats, "avgmax", None)
    if am is not None and bool(np.isfinite(am.numpy()[np.asarray(stats.ok, dtype=bool)]).all()):
        out["avgmax"] = am
    return out


def _comparator_specs(stats: Stats, fixed_lam: float) -> dict[str, B.Scores]:
    """:func:`comparator_scores` as lazy :class:`patchcsra.blocked.Scores` (same names, order and arithmetic)."""
    out = {"ttp": B.Scores("ttp")}
    have = set(stats.temperatures) | {math.inf}
    if all(t in have for t in MULTI_HEAD_TEMPERATURES):
        out["multihead"] = B.Scores("multihead", float(fixed_lam), temps=MULTI_HEAD_TEMPERATURES)
    if B.avgmax_finite(stats, stats.ok):
        out["avgmax"] = B.Scores("avgmax")
    return out


def _comparators(stats: Stats, rows: np.ndarray, b0: float, fixed_lam: float, primary, exact_linear: Optional[bool],
                 w: Optional[np.ndarray]) -> dict[str, Choice]:
    """:func:`comparator_scores` as :class:`Choice` rows, each Δ with the same paired bootstrap resamples ``w``
    ``(R, N)`` as the λ choices (None: no intervals)."""
    base_boot = np.asarray(primary(_sc(stats, 0.0), rows, w)) if w is not None else None
    exact = {True: "exact: the head is linear, so avg_k s_k is the model's own logit",
             False: "approximate: the head is not linear, the model's logit stands in for avg_k s_k",
             None: "exact only for a linear head (HeadInfo.exact_linear; not given here)"}[
        None if exact_linear is None else bool(exact_linear)]
    notes = {"ttp": f"timm test-time pooling 0.5*(avg_k s_k + max_k s_k) of the class maps = 0.5*(base + max); {exact}",
             "multihead": "paper's multi-head CSRA, H=8, T in (1..7, inf), shared fixed λ: sum_h (base + λ·att(T_h))",
             "avgmax": "feature avg+max pooling, then the model's head: head(0.5*(mean_k x_k + max_k x_k)) "
                       "(timm SelectAdaptivePool2d(pool_type='avgmax') before the classifier)"}
    out = {}
    comps = _comparator_specs(stats, fixed_lam) if B.use_blocked(stats) else comparator_scores(stats, fixed_lam)
    for name, s in comps.items():
        score = float(primary(s, rows, None))
        ci = (math.nan, math.nan)
        if w is not None:
            lo, hi = np.nanpercentile(np.asarray(primary(s, rows, w)) - base_boot, [2.5, 97.5])
            ci = (float(lo), float(hi))
        lam = float(fixed_lam) if name == "multihead" else math.nan
        out[name] = Choice(name, lam, math.inf, score, score - b0, ci, note=notes[name])
    return out


def _resolve_protocol(stats: Stats, protocol: Any, scores: str, rows: Optional[np.ndarray] = None):
    """``(Protocol, 'logit' | 'prob', settings)``: the protocol by name, the score kind (``auto`` resolved
    on the baseline scores, one warning line when they look like probabilities) and what goes to
    ``summary.json``: ``protocol``, ``conventions``, ``conventions_text``, ``scores``, ``scores_note``,
    ``threshold_metrics`` (``meaningful: false`` when > 50% of (image, class) pairs pass the threshold)."""
    from .protocols import SCORE_KINDS, conventions_text, get_protocol

    proto = get_protocol(protocol, "protocol")
    if scores not in SCORE_KINDS:
        raise PatchCSRAError(f"scores={scores!r}; choose one of {', '.join(SCORE_KINDS)}")
    mask = stats.ok if rows is None else rows
    f = _baseline_facts(stats, mask, (M._cut(proto.threshold, "logit"), M._cut(proto.threshold, "prob")))
    probs = bool(f["size"] and f["min"] >= 0.0 and f["max"] <= 1.0 and f["min"] < f["max"])  # looks_like_probabilities
    kind = ("prob" if probs else "logit") if scores == "auto" else scores
    note = ""
    if probs:
        note = ("every baseline score is in [0, 1]: probabilities, not logits; "
                + ("thresholds are applied to them directly" if kind == "prob"
                   else "thresholds are applied to their sigmoid as asked (scores=logit): threshold metrics are off"))
        _logger.warning("scores look like probabilities (all in [0, 1]); %s", note.split("; ", 1)[1])
    rate = f["above"][0 if kind == "logit" else 1] / max(1, f["size"])  # positive_rate at the kind's cut
    th = M.threshold_note(rate, proto.threshold, kind) if f["size"] and not stats.single_label \
        else {"meaningful": True, "positive_rate": math.nan, "note": ""}
    if th["note"]:
        _logger.warning("%s", th["note"])
    return proto, kind, {"protocol": proto.name, "conventions": proto.conventions(),
                         "conventions_text": conventions_text(proto, kind), "scores": kind, "scores_requested": scores,
                         "scores_look_like_probabilities": probs, "scores_note": note, "threshold_metrics": th}


def _baseline_facts(stats: Any, mask: np.ndarray, cuts: Sequence[float]) -> dict[str, Any]:
    """``size``, ``min``, ``max`` of the baseline scores on ``mask`` and how many are ``>=`` each of ``cuts``: from
    memory, from one pass over blocks of a store, or over the labelled entries of sparse stats."""
    if isinstance(stats, SparseStats):
        b = stats.base[np.asarray(mask, bool)[stats.rows]]
    elif B.use_blocked(stats):
        return B.scan(stats, mask, cuts)
    else:
        b = stats.base.numpy()[mask]
    return {"size": b.size, "min": float(b.min()) if b.size else 0.0, "max": float(b.max()) if b.size else 0.0,
            "above": [int(np.count_nonzero(b >= c)) for c in cuts]}


def _choices(stats: Stats, rows: np.ndarray, grid: list[tuple[float, float]], b0: float,
             oracle: tuple[float, float, float], fixed: tuple[float, float, float], primary, folds: int,
             bootstrap: int, seed: int, w: Optional[np.ndarray]) -> dict[str, Choice]:
    """The oracle, fixed and (``folds > 1``) cross-validated choices, each with its paired bootstrap CI from the
    resamples ``w`` ``(R, N)`` (None: no intervals); the CV draws its own per fold."""
    cv = None
    if folds and folds > 1:
        k = min(int(folds), int(rows.sum()))
        if k >= 2:
            cv = _cross_validate(stats, grid, rows, k, seed, primary, int(bootstrap))
    base_boot = primary(_sc(stats, 0.0), rows, w) if w is not None else None

    def ci(scores: torch.Tensor) -> tuple[float, float]:
        if w is None:
            return (math.nan, math.nan)
        d = np.asarray(primary(scores, rows, w)) - np.asarray(base_boot)
        lo, hi = np.nanpercentile(d, [2.5, 97.5])
        return (float(lo), float(hi))

    choices = {
        "oracle": Choice("oracle", oracle[0], oracle[1], oracle[2], oracle[2] - b0,
                         ci(_sc(stats, oracle[0], oracle[1])),
                         note="best grid point on the evaluation images themselves (optimistic)"),
        "fixed": Choice("fixed", fixed[0], fixed[1], fixed[2], fixed[2] - b0, ci(_sc(stats, fixed[0], math.inf)),
                        note="paper's fixed λ at T=inf: 0.02 for ResNets, 0.2 otherwise"),
    }
    if cv is not None:
        lam_cv, t_cv, d_cv, per_fold, ci_cv = cv
        choices["cv"] = Choice("cv", lam_cv, t_cv, b0 + d_cv, d_cv, ci_cv,
                               note=f"{len(per_fold)}-fold cross-validation: each fold scored with the λ/T "
                                    "chosen on the other folds; Δ is the mean per-fold Δ, score = baseline + Δ; "
                                    "lam/temperature are the per-fold median / most chosen. " + M.CV_NOTE,
                               per_fold=per_fold)
    return choices


def _cross_validate(stats: Stats, grid: list[tuple[float, float]], rows: np.ndarray, k: int, seed: int,
                    primary, reps: int) -> tuple[float, float, float, tuple, tuple[float, float]]:
    """k-fold choice of λ/T: each fold is scored with the grid point that is best on the other folds.

    Returns ``(median λ, most chosen T, Δ, per-fold choices, Δ 95% CI)`` where Δ is the mean over folds of
    ``metric_fold(chosen) - metric_fold(baseline)``, and the interval resamples the images of each fold.
    """
    per_fold, deltas, boots = [], [], []
    split = getattr(primary, "per_image", None)
    if split is not None:  # a mean over images: one ranking per grid point serves every fold
        per_image, value = split
        points = [per_image(_sc(stats, lam, t)) for lam, t in grid]
        base = per_image(_sc(stats, 0.0))
    else:
        value, points, base = primary, [None] * len(grid), _sc(stats, 0.0)
    for f, fold in enumerate(_folds(rows, k, seed)):
        train = rows.copy()
        train[fold] = False
        vals = [value(p if split else _sc(stats, lam, t), train, None) for p, (lam, t) in zip(points, grid)]
        g = _argbest(vals, grid)
        lam, t = grid[g]
        per_fold.append((lam, t))
        test = np.zeros_like(rows)
        test[fold] = True
        chosen = points[g] if split else _sc(stats, lam, t)
        deltas.append(float(value(chosen, test, None)) - float(value(base, test, None)))
        if reps > 0:
            w = M.bootstrap_weights(len(fold), reps, seed + 1 + f)
            boots.append(np.asarray(value(chosen, test, w)) - np.asarray(value(base, test, w)))
    ci = (math.nan, math.nan)
    if boots:
        lo, hi = np.nanpercentile(np.mean(boots, axis=0), [2.5, 97.5])
        ci = (float(lo), float(hi))
    lam_med = float(np.median([p[0] for p in per_fold]))
    ts = [p[1] for p in per_fold]
    t_mode = max(set(ts), key=ts.count)
    return lam_med, t_mode, float(np.nanmean(deltas)), tuple(per_fold), ci


def _per_class(stats: Stats, rows: np.ndarray, lam: float, t: float, fixed_lam: float,
               proto: Any = None) -> pd.DataFrame:
    """Per-class AP (multi-label, under protocol ``proto``) of the baseline, the oracle and the fixed λ; positives
    per class."""
    if stats.single_label:
        return pd.DataFrame({"class": list(stats.classes)})
    if B.use_blocked(stats):
        pos, ign = B.target_counts(stats, rows)
        cols = {"class": list(stats.classes), "positives": pos, "ignored": ign}
        for name, spec in (("AP_baseline", B.Scores("lam")), ("AP_oracle", B.Scores("lam", float(lam), float(t))),
                           ("AP_fixed", B.Scores("lam", float(fixed_lam)))):
            cols[name] = B.per_class_ap(stats, spec, rows, proto)
        return pd.DataFrame(cols)
    tg = stats.targets[rows]
    cols = {"class": list(stats.classes), "positives": (tg == 1).sum(0), "ignored": (tg == -1).sum(0)}
    for name, s in (("AP_baseline", stats.base), ("AP_oracle", stats.scores(lam, t)),
                    ("AP_fixed", stats.scores(fixed_lam, math.inf))):
        cols[name] = M.protocol_average_precision(s.numpy()[rows], tg, proto)
    return pd.DataFrame(cols)


