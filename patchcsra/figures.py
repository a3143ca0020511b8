"""The figures of a run: metric vs λ, one line per temperature with its bootstrap band (paper Fig. 5).

* :func:`plot_curve` -- one run (``curve.png``); :func:`plot_curves` -- several runs in one figure (``report``).
* :func:`figure_paths` -- a figure path with each requested suffix (:data:`FIGURE_FORMATS`).

Imports neither torch nor the rest of patchcsra, so that :mod:`patchcsra.plot_worker` can draw in a process of
its own while the main one is still importing torch.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence, Union

import pandas as pd

from .errors import PatchCSRAError

__all__ = ["FIGURE_FORMATS", "figure_paths", "plot_curve", "plot_curves"]

FIGURE_FORMATS = ("png", "pdf", "svg")


def _t_label(t: Any) -> str:
    """A temperature as the figures write it: ``∞`` or ``f"{t:g}"`` (``patcher.temperature_text`` with ∞)."""
    try:
        t = float(t)
    except (TypeError, ValueError):
        return str(t)
    return "∞" if math.isinf(t) else f"{t:g}"


def _draw_run(ax, frame: pd.DataFrame, summary: dict, *, prefix: str = "", marks: bool = True,
              color_offset: int = 0) -> list[tuple[float, float, str, str]]:
    """One run's curves on ``ax``: a line per T (labelled with its T at its last marker), its bootstrap band
    (``summary["curve_band"]``), and with ``marks`` the baseline, fixed, oracle and CV choices. Returns the end
    labels ``(x, y, text, colour)`` for :func:`_place_labels`."""
    import matplotlib as mpl

    metric = summary["metric"]
    colors = mpl.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    bands = {str(c["temperature"]): c for c in (summary.get("curve_band") or {}).get("curves", [])}
    temps = sorted(frame["temperature"].unique(), key=lambda t: (math.isinf(float(t)), float(t)))
    ends = []
    for i, t in enumerate(temps):
        g = frame[frame["temperature"] == t].sort_values("lam")
        color = colors[(i + color_offset) % len(colors)]
        label = f"{prefix}T={_t_label(t)}"
        ax.plot(g["lam"], g[metric], marker="o", ms=3, lw=1.4, color=color, label=label)
        ends.append((float(g["lam"].iloc[-1]), float(g[metric].iloc[-1]), f"{prefix}T={_t_label(t)}", color))
        b = bands.get(str("inf" if math.isinf(float(t)) else float(t)))
        if b:
            ax.fill_between(b["lams"], b["low"], b["high"], color=color, alpha=0.15, lw=0)
    if not marks:
        return ends
    ax.axhline(summary["baseline"][metric], color="grey", ls="--", lw=1, label="baseline (λ=0)")
    ch = summary.get("choices") or {}
    for key, style, color in (("fixed", "s", "black"), ("oracle", "*", "red")):
        c = ch.get(key)
        if c:
            ax.plot([c["lam"]], [c["score"]], style, ms=9, color=color, mfc="none" if key == "fixed" else color,
                    label=f"{key} λ={c['lam']:g}, T={_t_label(c['temperature'])}")
    c = ch.get("cv")
    if c:
        ax.axvline(c["lam"], color="green", ls=":", lw=1.2,
                   label=f"CV λ={c['lam']:g}, T={_t_label(c['temperature'])} (held-out {c['score']:.2f})")
        g = frame[(frame["temperature"].astype(float) == float(c["temperature"] if c["temperature"] != "inf"
                                                               else math.inf)) & (frame["lam"] == c["lam"])]
        if len(g):
            ax.plot([c["lam"]], [float(g[metric].iloc[0])], "D", ms=6, color="green")
    return ends


def _place_labels(ax, ends: Sequence[tuple[float, float, str, str]]) -> None:
    """Each curve's T written just right of its last point, pushed apart vertically so that none overlap."""
    if not ends:
        return
    lo, hi = ax.get_ylim()
    gap = 0.045 * (hi - lo)
    x0, x1 = ax.get_xlim()
    dx = 0.012 * (x1 - x0)
    order = sorted(range(len(ends)), key=lambda i: ends[i][1])
    ys = [ends[i][1] for i in order]
    for j in range(1, len(ys)):
        ys[j] = max(ys[j], ys[j - 1] + gap)
    shift = max(0.0, ys[-1] - (hi - gap / 2)) if ys else 0.0
    for j, i in enumerate(order):
        x, y, text, color = ends[i]
        ax.annotate(text, (x, y), xytext=(x + dx, ys[j] - shift), textcoords="data", fontsize=7, color=color,
                    va="center", ha="left", annotation_clip=False,
                    arrowprops=None if abs(ys[j] - shift - y) < gap / 3 else dict(
                        arrowstyle="-", lw=0.5, color=color, relpos=(0.0, 0.5), patchA=None, shrinkA=1, shrinkB=0))
    ax.margins(x=0.12)


def _finish(fig, ax, metric: str, title: str, paths: Sequence[Union[str, Path]],
            ends: Sequence[tuple[float, float, str, str]] = ()) -> None:
    ax.margins(x=0.12)
    _place_labels(ax, ends)
    ax.set_xlabel("λ")
    ax.set_ylabel(metric + " (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, metadata=_figure_metadata(str(p)))


def _figure_metadata(path: str) -> dict:
    """No creation date in the file (the same run draws the same bytes where the backend allows)."""
    if path.endswith(".pdf"):
        return {"CreationDate": None, "ModDate": None}
    if path.endswith(".svg"):
        return {"Date": None}
    return {}


def _title(summary: dict) -> str:
    name = f"{(summary.get('model') or {}).get('name', '')} on {(summary.get('dataset') or {}).get('name', '')}"
    n = (summary.get("images") or {}).get("scored")
    band = summary.get("curve_band") or {}
    extra = f"N = {n} images" if n is not None else ""
    if band.get("resamples"):
        curves = band.get("curves") or []
        where = f" around T={_t_label(curves[0]['temperature'])}" if len(curves) == 1 else ""
        extra += f"; band{where}: 95% bootstrap of {summary.get('metric', '')} ({band['resamples']} resamples)"
    return f"{name.strip()}\n{extra}".strip()


def figure_paths(path: Union[str, Path], formats: Sequence[str] = ("png",)) -> list[Path]:
    """``path`` (``curve.png``) with each of ``formats``' suffix; refuses formats outside :data:`FIGURE_FORMATS`."""
    path = Path(path)
    bad = [f for f in formats if f not in FIGURE_FORMATS]
    if bad:
        raise PatchCSRAError(f"figure format {bad[0]!r}: choose from {', '.join(FIGURE_FORMATS)}")
    return [path.with_suffix("." + f) for f in dict.fromkeys(formats)]


def plot_curve(frame: pd.DataFrame, summary: dict, path: Union[str, Path], formats: Sequence[str] = ("png",)) -> None:
    """``metric`` vs λ, one line per temperature, each with its 95% bootstrap band where the sweep computed one,
    labelled with its T; baseline dashed, fixed / oracle λ marked, the CV λ a dotted line; N in the title.
    Written as ``path`` with each suffix of ``formats`` (png, pdf, svg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.subplots()
    ends = _draw_run(ax, frame, summary)
    _finish(fig, ax, summary["metric"], _title(summary), figure_paths(path, formats), ends)


def plot_curves(runs: Sequence[tuple[str, pd.DataFrame, dict]], path: Union[str, Path],
                formats: Sequence[str] = ("png",)) -> None:
    """The curves of several runs in one figure: ``runs`` is ``[(name, results frame, summary)]``; each run's
    baseline is a dashed line in its first curve's colour. Runs with different metrics are drawn on one axis
    labelled with the first run's metric."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib as mpl
    from matplotlib.figure import Figure

    colors = mpl.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    fig = Figure(figsize=(7.2, 4.8), dpi=120)
    ax = fig.subplots()
    offset, ends = 0, []
    for name, frame, summary in runs:
        metric = summary["metric"]
        ends += _draw_run(ax, frame, summary, prefix=f"{name} ", marks=False, color_offset=offset)
        ax.axhline(summary["baseline"][metric], color=colors[offset % len(colors)], ls="--", lw=0.8)
        offset += frame["temperature"].nunique()
    ns = [str((s.get("images") or {}).get("scored")) for _, _, s in runs]
    title = f"{len(runs)} runs; N = {', '.join(ns)} images; dashed: each run's baseline (λ=0)"
    _finish(fig, ax, runs[0][2]["metric"] if runs else "", title, figure_paths(path, formats), ends)
