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

from . import metrics as M
from .errors import PatchCSRAError
from .options import DEFAULT_LAMS, SweepOptions, split_options
from .patcher import temperature_json
from .stats import Stats

__all__ = ["DEFAULT_LAMS", "Choice", "SweepResult", "evaluate_grid", "sweep", "primary_metric", "check_finite"]

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


def primary_metric(stats: Stats) -> str:
    """``mAP`` for multi-label data, ``top1`` for single-label data."""
    return "top1" if stats.single_label else "mAP"


def check_finite(stats: Stats, model: Optional[str] = None) -> None:
    """Refuse NaN/inf logits on readable images, naming the model (when given), how many and which."""
    rows = stats.ok
    bad = ~(torch.isfinite(stats.base).all(1) & torch.isfinite(stats.att).all(-1).all(-1)).numpy() & rows
    if bad.any():
        ids = [stats.ids[i] for i in np.flatnonzero(bad)[:5]]
        who = "the model" if model is None else f"the model {model}"
        raise PatchCSRAError(f"{who} produced NaN/inf logits on {int(bad.sum())} image(s) (e.g. {', '.join(ids)}); "
                             "check the weights, input normalisation and --amp (try --amp none)")


def _metrics(stats: Stats, scores: torch.Tensor, rows: np.ndarray, top_k: int,
             weight: Optional[np.ndarray] = None) -> dict[str, Any]:
    s = scores.numpy()[rows]
    if stats.single_label:
        out = M.topk_accuracy(s, stats.labels()[rows], ks=(1, 5), sample_weight=weight)
        out["mAP"] = M.mean_average_precision(s, stats.targets[rows], sample_weight=weight)[0]
        return out
    return M.multilabel_metrics(s, stats.targets[rows], top_k=top_k, sample_weight=weight)


def _primary(stats: Stats, metric: str, top_k: int) -> Callable[[torch.Tensor, np.ndarray, Optional[np.ndarray]], Any]:
    """A fast ``f(scores, rows, weight) -> value`` for the selection metric only."""
    if metric == "mAP":
        return lambda s, rows, w=None: M.mean_average_precision(s.numpy()[rows], stats.targets[rows],
                                                                sample_weight=w)[0]
    if metric in ("top1", "top5") and stats.single_label:
        k = int(metric[3:])
        return lambda s, rows, w=None: M.topk_accuracy(s.numpy()[rows], stats.labels()[rows], ks=(k,),
                                                       sample_weight=w)[metric]
    return lambda s, rows, w=None: _metrics(stats, s, rows, top_k, w)[metric]


def _grid(lams: Sequence[float], temperatures: Sequence[float]) -> list[tuple[float, float]]:
    """Every ``(λ, T)`` of checked values: λ ascending within each T, T ascending with ``inf`` last."""
    ts = sorted(set(temperatures), key=lambda t: (math.isinf(t), t))
    return [(lam, t) for t in ts for lam in sorted(set(lams))]


def evaluate_grid(stats: Stats, lams: Sequence[float] = DEFAULT_LAMS, temperatures: Sequence[float] = (math.inf,),
                  *, top_k: int = 3, rows: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Every metric at every grid point: a frame with columns ``lam, temperature, <metrics>``.

    Args:
        stats: collected scores; rows with ``ok == False`` are never scored.
        lams, temperatures: the grid (each T must have been collected).
        top_k: k of the CP/CR/.../OF1 top-k columns (multi-label data).
        rows: optional ``(N,)`` bool mask of images to score (default: all readable images).
    """
    opts = SweepOptions(lams=tuple(lams), temperatures=tuple(temperatures))  # checked here, once
    return _evaluate(stats, _grid(opts.lams, opts.temperatures), top_k, rows)


def _evaluate(stats: Stats, grid: Sequence[tuple[float, float]], top_k: int,
              rows: Optional[np.ndarray]) -> pd.DataFrame:
    mask = stats.ok if rows is None else (rows & stats.ok)
    out = [{"lam": lam, "temperature": t, **_metrics(stats, stats.scores(lam, t), mask, top_k)} for lam, t in grid]
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
    """
    opts = split_options(option_kwargs, sweep=options, allowed=(SweepOptions,))[2]
    check_finite(stats, model)
    rows = stats.ok.copy()
    if not rows.any():
        raise PatchCSRAError("no readable images to score")
    metric = opts.metric or primary_metric(stats)
    fixed_lam = 0.2 if opts.fixed_lam is None else opts.fixed_lam
    folds, bootstrap, seed = opts.folds, opts.bootstrap, opts.seed
    lam_set = sorted(set(opts.lams) | {0.0, fixed_lam})
    temps = sorted(set(opts.temperatures) | {math.inf}, key=lambda t: (math.isinf(t), t))
    frame = _evaluate(stats, _grid(lam_set, temps), top_k, rows)
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
    choices = _choices(stats, rows, grid, baseline[metric], oracle, fixed, _primary(stats, metric, top_k),
                       folds, bootstrap, seed)
    per_class = _per_class(stats, rows, oracle[0], oracle[1], fixed_lam)
    settings = {"lams": lam_set, "temperatures": [temperature_json(t) for t in temps], "fixed_lam": fixed_lam,
                "metric": metric, "folds": int(folds), "bootstrap": int(bootstrap), "seed": int(seed),
                "top_k": int(top_k), "threshold": 0.5}
    return SweepResult(frame=frame, metric=metric, baseline=baseline, choices=choices, stats=stats,
                       per_class=per_class, settings=settings)


def _choices(stats: Stats, rows: np.ndarray, grid: list[tuple[float, float]], b0: float,
             oracle: tuple[float, float, float], fixed: tuple[float, float, float], primary, folds: int,
             bootstrap: int, seed: int) -> dict[str, Choice]:
    """The oracle, fixed and (``folds > 1``) cross-validated choices, each with its paired bootstrap CI."""
    cv = None
    if folds and folds > 1:
        k = min(int(folds), int(rows.sum()))
        if k >= 2:
            cv = _cross_validate(stats, grid, rows, k, seed, primary, int(bootstrap))
    w = M.bootstrap_weights(int(rows.sum()), int(bootstrap), seed) if bootstrap and bootstrap > 0 else None
    base_boot = primary(stats.base, rows, w) if w is not None else None

    def ci(scores: torch.Tensor) -> tuple[float, float]:
        if w is None:
            return (math.nan, math.nan)
        d = np.asarray(primary(scores, rows, w)) - np.asarray(base_boot)
        lo, hi = np.nanpercentile(d, [2.5, 97.5])
        return (float(lo), float(hi))

    choices = {
        "oracle": Choice("oracle", oracle[0], oracle[1], oracle[2], oracle[2] - b0,
                         ci(stats.scores(oracle[0], oracle[1])),
                         note="best grid point on the evaluation images themselves (optimistic)"),
        "fixed": Choice("fixed", fixed[0], fixed[1], fixed[2], fixed[2] - b0, ci(stats.scores(fixed[0], math.inf)),
                        note="paper's fixed λ at T=inf: 0.02 for ResNets, 0.2 otherwise"),
    }
    if cv is not None:
        lam_cv, t_cv, d_cv, per_fold, ci_cv = cv
        choices["cv"] = Choice("cv", lam_cv, t_cv, b0 + d_cv, d_cv, ci_cv,
                               note=f"{len(per_fold)}-fold cross-validation: each fold scored with the λ/T "
                                    "chosen on the other folds; Δ is the mean per-fold Δ, score = baseline + Δ; "
                                    "lam/temperature are the per-fold median / most chosen",
                               per_fold=per_fold)
    return choices


def _cross_validate(stats: Stats, grid: list[tuple[float, float]], rows: np.ndarray, k: int, seed: int,
                    primary, reps: int) -> tuple[float, float, float, tuple, tuple[float, float]]:
    """k-fold choice of λ/T: each fold is scored with the grid point that is best on the other folds.

    Returns ``(median λ, most chosen T, Δ, per-fold choices, Δ 95% CI)`` where Δ is the mean over folds of
    ``metric_fold(chosen) - metric_fold(baseline)``, and the interval resamples the images of each fold.
    """
    per_fold, deltas, boots = [], [], []
    for f, fold in enumerate(_folds(rows, k, seed)):
        train = rows.copy()
        train[fold] = False
        vals = [primary(stats.scores(lam, t), train, None) for lam, t in grid]
        lam, t = grid[_argbest(vals, grid)]
        per_fold.append((lam, t))
        test = np.zeros_like(rows)
        test[fold] = True
        chosen = stats.scores(lam, t)
        deltas.append(float(primary(chosen, test, None)) - float(primary(stats.base, test, None)))
        if reps > 0:
            w = M.bootstrap_weights(len(fold), reps, seed + 1 + f)
            boots.append(np.asarray(primary(chosen, test, w)) - np.asarray(primary(stats.base, test, w)))
    ci = (math.nan, math.nan)
    if boots:
        lo, hi = np.nanpercentile(np.mean(boots, axis=0), [2.5, 97.5])
        ci = (float(lo), float(hi))
    lam_med = float(np.median([p[0] for p in per_fold]))
    ts = [p[1] for p in per_fold]
    t_mode = max(set(ts), key=ts.count)
    return lam_med, t_mode, float(np.nanmean(deltas)), tuple(per_fold), ci


def _per_class(stats: Stats, rows: np.ndarray, lam: float, t: float, fixed_lam: float) -> pd.DataFrame:
    """Per-class AP (multi-label) of the baseline, the oracle and the fixed λ; positives per class."""
    if stats.single_label:
        return pd.DataFrame({"class": list(stats.classes)})
    tg = stats.targets[rows]
    cols = {"class": list(stats.classes), "positives": (tg == 1).sum(0), "ignored": (tg == -1).sum(0)}
    for name, s in (("AP_baseline", stats.base), ("AP_oracle", stats.scores(lam, t)),
                    ("AP_fixed", stats.scores(fixed_lam, math.inf))):
        cols[name] = M.average_precision(s.numpy()[rows], tg)
    return pd.DataFrame(cols)


