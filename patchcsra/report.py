"""Table-1 reports: frames first, then every format is rendered from a frame.

* :func:`summary_record` -- a :class:`~patchcsra.grid.SweepResult` + run records -> ``summary.json`` dict.
* :func:`table_frame` -- summaries -> the Table-1 frame (one row per dataset x model), machine columns.
* :func:`display_frame` -- the same rows with the paper's column groups, formatted for reading.
* :func:`to_markdown`, :func:`to_latex` -- renderers of a display frame; :func:`rich_table` of a table frame.
* :func:`plot_curve` -- metric vs λ, one line per T with its bootstrap band, baseline and chosen λs marked
  (paper Fig. 5); :func:`plot_curves` -- the curves of several runs in one figure (``report``).
* :func:`table_caption` -- the caption of ``table.tex``; :func:`protocol_caption` is its hook for one line
  naming the metric protocol.
* :func:`write_run` / :func:`read_run` -- a run directory (``results.csv``, ``per_class.csv``,
  ``summary.json``, ``table.md``, ``table.tex``, ``curve.png``), written atomically.
* :func:`merge_runs` -- several run directories -> one Table 1.
* :func:`results_file_row` / :func:`append_results_file` -- one row per run in a timm-style results CSV
  (``validate.py --results-file``), appended atomically.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import pandas as pd

from ._io import atomic_dir, atomic_path, json_default
from .errors import PatchCSRAError
from .figures import FIGURE_FORMATS, figure_paths, plot_curve, plot_curves
from .grid import SweepResult

__all__ = ["summary_record", "table_frame", "display_frame", "to_markdown", "to_latex", "rich_table",
           "plot_curve", "plot_curves", "table_caption", "protocol_caption", "write_run", "write_table", "read_run", "merge_runs", "RUN_FILES", "TABLE_COLUMNS",
           "RESULTS_FILE_COLUMNS", "results_file_row", "check_results_file", "append_results_file"]

RUN_FILES = ("results.csv", "per_class.csv", "summary.json", "table.md", "table.tex", "curve.png")
#: figure formats ``--formats`` may add beside ``curve.png`` (and ``curves.*`` of a merged report)
OPTIONAL_RUN_FILES = tuple(f"curve.{f}" for f in FIGURE_FORMATS if f != "png")
TABLE_FILES = ("table.csv", "table.md", "table.tex") + tuple(f"curves.{f}" for f in FIGURE_FORMATS)
TABLE_COLUMNS = ("dataset", "resolution", "model", "metric", "n_images", "baseline",
                 "oracle_lam", "oracle_T", "oracle_score", "oracle_delta", "oracle_ci_low", "oracle_ci_high",
                 "fixed_lam", "fixed_score", "fixed_delta", "fixed_ci_low", "fixed_ci_high",
                 "cv_lam", "cv_T", "cv_score", "cv_delta", "cv_ci_low", "cv_ci_high",
                 "ttp_score", "ttp_delta", "ttp_ci_low", "ttp_ci_high",
                 "multihead_lam", "multihead_score", "multihead_delta", "multihead_ci_low", "multihead_ci_high",
                 "avgmax_score", "avgmax_delta", "avgmax_ci_low", "avgmax_ci_high")
_GROUPS = (("oracle", "Varying λ (oracle)"), ("fixed", "Fixed λ"), ("cv", "λ by CV"))
#: comparator rows from the same one-pass stats (:func:`patchcsra.grid.comparator_scores`), as table groups
_COMPARATORS = (("ttp", "Test-time pool (avg+max)/2"), ("multihead", "Multi-head CSRA (H=8)"),
                ("avgmax", "Feature avg+max pool"))
_HAS_LAM = ("multihead",)


def summary_record(result: SweepResult, **records: Any) -> dict[str, Any]:
    """The ``summary.json`` of a run: settings, baseline, the three λ choices, and ``records``
    (``model``, ``dataset``, ``transform``, ``collect`` ...) as given."""
    stats = result.stats
    bad = [stats.ids[i] for i in range(len(stats)) if not stats.ok[i]]
    pc = result.per_class
    no_pos = pc.loc[pc["positives"] == 0, "class"].tolist() if "positives" in pc else []
    return {
        "metric": result.metric,
        "baseline": result.baseline,
        "choices": {k: c.as_dict() for k, c in result.choices.items()},
        "comparators": {k: _comparator_dict(c) for k, c in getattr(result, "comparators", {}).items()},
        "curve_band": getattr(result, "band", {}) or {},
        "settings": result.settings,
        "images": {"total": len(stats), "scored": int(stats.ok.sum()), "bad": len(bad), "bad_ids": bad[:100]},
        "classes": {"names": list(stats.classes), "without_positives": no_pos},
        **records,
    }


def _comparator_dict(c) -> dict[str, Any]:
    d = c.as_dict()
    d.pop("per_fold", None)
    if isinstance(d.get("lam"), float) and math.isnan(d["lam"]):
        d["lam"] = None  # the row has no λ (test-time pooling)
    return d


def _resolution(summary: dict) -> str:
    t = summary.get("transform") or {}
    size = t.get("input_size")
    return f"{size[1]}x{size[2]}" if size else ""


def table_frame(summaries: Sequence[dict]) -> pd.DataFrame:
    """One Table-1 row per run: :data:`TABLE_COLUMNS`."""
    rows = []
    for s in summaries:
        row: dict[str, Any] = {
            "dataset": (s.get("dataset") or {}).get("name", ""), "resolution": _resolution(s),
            "model": (s.get("model") or {}).get("name", ""), "metric": s["metric"],
            "n_images": (s.get("images") or {}).get("scored"), "baseline": s["baseline"][s["metric"]]}
        for key, _ in _GROUPS:
            c = s["choices"].get(key)
            row[f"{key}_lam"] = c["lam"] if c else math.nan
            if key != "fixed":
                row[f"{key}_T"] = c["temperature"] if c else ""
            row[f"{key}_score"] = c["score"] if c else math.nan
            row[f"{key}_delta"] = c["delta"] if c else math.nan
            row[f"{key}_ci_low"] = c["ci"][0] if c else math.nan
            row[f"{key}_ci_high"] = c["ci"][1] if c else math.nan
        for key, _ in _COMPARATORS:
            c = (s.get("comparators") or {}).get(key)
            if key in _HAS_LAM:
                row[f"{key}_lam"] = c["lam"] if c and c.get("lam") is not None else math.nan
            for f in ("score", "delta"):
                row[f"{key}_{f}"] = c[f] if c else math.nan
            row[f"{key}_ci_low"] = c["ci"][0] if c else math.nan
            row[f"{key}_ci_high"] = c["ci"][1] if c else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _num(v: Any, nd: int = 2) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "" if math.isnan(f) else f"{f:.{nd}f}"


def _lam(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "" if math.isnan(f) else f"{f:g}"


def _delta(d: Any, lo: Any, hi: Any) -> str:
    try:
        d, lo, hi = float(d), float(lo), float(hi)
    except (TypeError, ValueError):
        return ""
    if math.isnan(d):
        return ""
    s = f"{d:+.2f}"
    return s if math.isnan(lo) else f"{s} [{lo:+.2f}, {hi:+.2f}]"


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Readable Table 1 with two-level columns ``(group, field)``: baseline, oracle, fixed, CV."""
    data: dict[tuple[str, str], list[str]] = {}
    for col, label in (("dataset", "Dataset"), ("resolution", "Res."), ("model", "Model"), ("metric", "Metric")):
        data[("", label)] = table[col].astype(str).tolist()
    data[("", "Baseline")] = [_num(v) for v in table["baseline"]]
    for key, label in _GROUPS:
        data[(label, "λ")] = [_lam(v) for v in table[f"{key}_lam"]]
        if key != "fixed":
            data[(label, "T")] = [str(v) for v in table[f"{key}_T"]]
        data[(label, "score")] = [_num(v) for v in table[f"{key}_score"]]
        data[(label, "Δ [95% CI]")] = [_delta(*r) for r in zip(table[f"{key}_delta"], table[f"{key}_ci_low"],
                                                                  table[f"{key}_ci_high"])]
    for key, label in _COMPARATORS:
        if f"{key}_score" not in table or table[f"{key}_score"].isna().all():
            continue  # runs written before the comparators existed, or a T set that lacks them
        if key in _HAS_LAM:
            data[(label, "λ")] = [_lam(v) for v in table[f"{key}_lam"]]
        data[(label, "score")] = [_num(v) for v in table[f"{key}_score"]]
        data[(label, "Δ [95% CI]")] = [_delta(*r) for r in zip(table[f"{key}_delta"], table[f"{key}_ci_low"],
                                                                  table[f"{key}_ci_high"])]
    return pd.DataFrame(data, columns=pd.MultiIndex.from_tuples(list(data)))


def _flat(df: pd.DataFrame) -> list[str]:
    return [f"{a} {b}".strip() if a else b for a, b in df.columns]


def to_markdown(display: pd.DataFrame) -> str:
    """GitHub-flavoured Markdown table."""
    flat = display.copy()
    flat.columns = _flat(display)
    return flat.to_markdown(index=False, disable_numparse=True) + "\n"


DEFAULT_CAPTION = "Baseline vs residual-attention patched scores"
#: columns of a display frame that hold text (left-aligned in LaTeX); every other column is numeric
_TEXT_COLUMNS = {"Dataset", "Res.", "Model", "Metric"}


def protocol_caption(summaries: Sequence[dict]) -> str:
    """The hook for one caption line naming the metric protocol of ``summaries`` (``""``: no line).

    :func:`table_caption` appends what this returns to the caption of ``table.tex`` (and under ``table.md``);
    the metric protocol's name comes from :mod:`patchcsra.metrics` when it provides one.
    """
    from . import metrics

    fn = getattr(metrics, "protocol_caption", None)
    return str(fn(summaries) or "") if callable(fn) else ""


def table_caption(summaries: Sequence[dict]) -> str:
    """The caption of a Table 1: what it shows, the images scored, how Δ's interval was computed, and the
    :func:`protocol_caption` line."""
    ns = sorted({int(n) for n in ((s.get("images") or {}).get("scored") for s in summaries) if n is not None})
    boots = sorted({int((s.get("settings") or {}).get("bootstrap") or 0) for s in summaries})
    parts = [DEFAULT_CAPTION + "."]
    if ns:
        parts.append(f"N = {', '.join(str(n) for n in ns)} images.")
    if boots and boots != [0]:
        parts.append(f"Δ: score minus baseline, 95% paired bootstrap interval ({'/'.join(map(str, boots))} "
                     "resamples); the oracle λ is chosen on the evaluation images themselves (optimistic).")
    line = protocol_caption(summaries)
    if line:
        parts.append(line)
    return " ".join(parts)


def to_latex(display: pd.DataFrame, caption: str = DEFAULT_CAPTION, label: str = "tab:patchcsra-table1") -> str:
    """A booktabs LaTeX table (``\\toprule/\\midrule/\\bottomrule``) with the column groups as multicolumns:
    text columns left-aligned, numbers right-aligned, ``T = inf`` written ``$\\infty$``, a caption and a label."""
    import re

    def esc(s: str) -> str:
        s = s.replace("\\", r"\textbackslash{}")
        s = re.sub(r"([&%$#_{}])", r"\\\1", s)
        return s.replace("λ", r"$\lambda$").replace("Δ", r"$\Delta$").replace("~", r"\textasciitilde{}")

    def cell(s: str) -> str:
        return r"$\infty$" if s.strip() in ("inf", "∞") else esc(s)

    body = display.map(cell)
    body.columns = pd.MultiIndex.from_tuples([(esc(a), esc(b)) for a, b in display.columns])
    fmt = "".join("l" if b in _TEXT_COLUMNS else "r" for _, b in display.columns)
    return body.to_latex(index=False, escape=False, multicolumn=True, multicolumn_format="c",
                         caption=esc(caption), label=label, column_format=fmt, position="t")


def rich_table(table: pd.DataFrame, title: str = "Table 1"):
    """A :class:`rich.table.Table` of a Table-1 frame, one line per (run, λ choice) to fit a terminal."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for name in ("Dataset", "Res.", "Model", "λ choice", "λ", "T", "score", "Δ [95% CI]"):
        t.add_column(name, overflow="fold", justify="right" if name in ("λ", "T", "score") else "left")
    for _, r in table.iterrows():
        head = [str(r["dataset"]), str(r["resolution"]), str(r["model"])]
        t.add_row(*head, "baseline", "0", "", f"{_num(r['baseline'])} {r['metric']}", "")
        for key, label in _GROUPS:
            if _num(r[f"{key}_score"]) == "":
                continue
            t.add_row("", "", "", label, _lam(r[f"{key}_lam"]), str(r.get(f"{key}_T", "inf")),
                      _num(r[f"{key}_score"]), _delta(r[f"{key}_delta"], r[f"{key}_ci_low"], r[f"{key}_ci_high"]),
                      end_section=key == "cv")
        for key, label in _COMPARATORS:
            if _num(r.get(f"{key}_score", math.nan)) == "":
                continue
            lam = _lam(r[f"{key}_lam"]) if key in _HAS_LAM else ""
            t.add_row("", "", "", label, lam, "", _num(r[f"{key}_score"]),
                      _delta(r[f"{key}_delta"], r[f"{key}_ci_low"], r[f"{key}_ci_high"]))
    return t


def write_table(table: pd.DataFrame, out_dir: Union[str, Path], *, force: bool = False,
                summaries: Optional[Sequence[dict]] = None, formats: Sequence[str] = ("png",)) -> Path:
    """A merged Table 1 as ``table.csv`` (machine columns), ``table.md`` and ``table.tex``; with ``summaries``
    (each with ``run_dir``, as :func:`read_run` gives) also ``curves.<format>``: every run's curves in one figure."""
    figure_paths("curves.png", formats)  # refuse a bad format before anything is written

    def fill(tmp: Path) -> None:
        table.to_csv(tmp / "table.csv", index=False, float_format="%.6f")
        disp = display_frame(table)
        caption = table_caption(summaries or [])
        (tmp / "table.md").write_text(to_markdown(disp) + f"\n{caption}\n")
        (tmp / "table.tex").write_text(to_latex(disp, caption=caption))
        if summaries:
            runs = [(str(n), pd.read_csv(Path(s["run_dir"]) / "results.csv"), s)
                    for n, s in zip(table["model"], summaries)]
            plot_curves(runs, tmp / "curves.png", formats)

    return atomic_dir(out_dir, fill, force=force, known=TABLE_FILES)


def write_run(result: SweepResult, out_dir: Union[str, Path], summary: dict, *, force: bool = False,
              formats: Sequence[str] = ("png",), plotter: Optional[Any] = None) -> Path:
    """Write every file of a run into ``out_dir`` atomically (a temporary sibling, then renamed); the curve as
    ``curve.png`` plus each other of ``formats`` (``pdf``, ``svg``), drawn by ``plotter`` (a
    :class:`~patchcsra.plot_worker.PlotWorker`, while the tables are written) or else in this process.

    Raises:
        PatchCSRAError: ``out_dir`` exists and ``force`` is False, or a format is unknown.
    """
    formats = tuple(dict.fromkeys(("png",) + tuple(formats)))
    figure_paths("curve.png", formats)

    def fill(tmp: Path) -> None:
        wait = plotter.submit(result.frame, summary, tmp / "curve.png", formats) if plotter is not None else None
        frame = result.frame.assign(temperature=[repr(float(t)) for t in result.frame["temperature"]])
        frame.to_csv(tmp / "results.csv", index=False, float_format="%.6f")  # T as given: 1e-30 is not 0.000000
        result.per_class.to_csv(tmp / "per_class.csv", index=False, float_format="%.6f")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=json_default) + "\n")
        disp = display_frame(table_frame([summary]))
        caption = table_caption([summary])
        (tmp / "table.md").write_text(to_markdown(disp) + f"\n{caption}\n")
        (tmp / "table.tex").write_text(to_latex(disp, caption=caption))
        if wait is not None:
            wait()
        else:
            plot_curve(result.frame, summary, tmp / "curve.png", formats)

    return atomic_dir(out_dir, fill, force=force, known=RUN_FILES + OPTIONAL_RUN_FILES)


def read_run(run_dir: Union[str, Path]) -> dict:
    """The ``summary.json`` of a run directory (with ``run_dir`` added)."""
    p = Path(run_dir) / "summary.json"
    try:
        s = json.loads(p.read_text())
    except FileNotFoundError:
        raise PatchCSRAError(f"{run_dir}: no summary.json; give a directory written by "
                             "'patchcsra sweep-lambda --out DIR'") from None
    except ValueError as e:
        raise PatchCSRAError(f"{p}: not valid JSON ({e}); rerun the sweep") from None
    why = _summary_problem(s)
    if why:
        raise PatchCSRAError(f"{p}: not a patchcsra sweep summary ({why}); give a run written by "
                             "'patchcsra sweep-lambda --out DIR'")
    s["run_dir"] = str(run_dir)
    return s


def _summary_problem(s: Any) -> str:
    """What in a loaded ``summary.json`` does not fit :func:`table_frame` ("" when all does)."""
    if not isinstance(s, dict) or "metric" not in s or "choices" not in s:
        return "no 'metric' and 'choices'"
    m = s["metric"]
    if not isinstance(m, str) or not isinstance(s.get("baseline"), dict) or not _is_num(s["baseline"].get(m)):
        return f"no baseline number for metric {m!r}"
    if not isinstance(s["choices"], dict):
        return "'choices' is not a mapping"
    for k, c in s["choices"].items():
        ci = c.get("ci") if isinstance(c, dict) else None
        if not isinstance(c, dict) or not all(_is_num(c.get(f)) for f in ("lam", "score", "delta")) \
                or not (isinstance(ci, list) and len(ci) == 2):
            return f"choice {k!r} lacks lam/score/delta/ci"
    for key in ("dataset", "model", "images", "transform"):
        if key in s and not isinstance(s[key], dict):
            return f"{key!r} is not a mapping"
    return ""


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) or v is None


_DEFAULT_SORT = ("dataset", "resolution", "model")


def merge_runs(run_dirs: Sequence[Union[str, Path]], *, sort: Optional[Sequence[str]] = _DEFAULT_SORT,
               names: Optional[Sequence[str]] = None, with_summaries: bool = False):
    """One Table-1 frame from several runs.

    Args:
        sort: columns of :data:`TABLE_COLUMNS` to sort by (stable; default dataset, resolution, model);
            ``None`` or ``()`` keeps the order given.
        names: one name per run, shown in the ``model`` column (default: the model's name).
        with_summaries: return ``(frame, summaries)``, the summaries in the frame's row order.
    """
    if not run_dirs:
        raise PatchCSRAError("give at least one run directory")
    summaries = [read_run(d) for d in run_dirs]
    t = table_frame(summaries)
    if names is not None:
        if len(names) != len(run_dirs):
            raise PatchCSRAError(f"--name given {len(names)} time(s) for {len(run_dirs)} run(s); give one per run")
        t["model"] = [str(n) for n in names]
    if sort:
        bad = [c for c in sort if c not in t.columns]
        if bad:
            raise PatchCSRAError(f"--sort {bad[0]!r}: not a column; choose from {', '.join(TABLE_COLUMNS)}")
        t = t.sort_values(list(sort), kind="stable")
    order = list(t.index)
    t = t.reset_index(drop=True)
    return (t, [summaries[i] for i in order]) if with_summaries else t


# ----------------------------------------------------------------------------- timm-style results file
RESULTS_FILE_COLUMNS = ("model", "img_size", "crop_pct", "interpolation", "metric", "baseline",
                        "cv_lam", "cv_score", "cv_delta", "fixed_lam", "fixed_score", "fixed_delta",
                        "oracle_lam", "oracle_score")


def results_file_row(summary: dict) -> dict[str, Any]:
    """One :data:`RESULTS_FILE_COLUMNS` row of a run (timm's validate.py results: the model, its preprocessing,
    then our metric: the baseline and the cross-validated, fixed and oracle λ with their scores)."""
    t = summary.get("transform") or {}
    size = t.get("input_size")
    row: dict[str, Any] = {"model": (summary.get("model") or {}).get("name", ""),
                           "img_size": size[-1] if size else "", "crop_pct": t.get("crop_pct", ""),
                           "interpolation": t.get("interpolation", ""), "metric": summary["metric"],
                           "baseline": summary["baseline"][summary["metric"]]}
    for key, fields in (("cv", ("lam", "score", "delta")), ("fixed", ("lam", "score", "delta")),
                        ("oracle", ("lam", "score"))):
        c = summary["choices"].get(key) or {}
        for f in fields:
            row[f"{key}_{f}"] = c.get(f, "")
    return {k: ("" if isinstance(v, float) and math.isnan(v) else round(v, 4) if isinstance(v, float) else v)
            for k, v in row.items()}


def _results_header(path: Path) -> Union[list, None]:
    import csv

    with open(path, newline="") as f:
        return next(csv.reader(f), None)


def check_results_file(path: Union[str, Path], flag: str = "results file") -> None:
    """Refuse, before any work, a results file that cannot take a row: a folder, a missing folder, or a CSV
    whose header is not :data:`RESULTS_FILE_COLUMNS`."""
    path = Path(path)
    if path.is_dir():
        raise PatchCSRAError(f"{flag} {path} is a directory; give a file name, e.g. results.csv")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise PatchCSRAError(f"{flag} {path}: folder {parent} does not exist; create it first")
    if path.exists():
        try:
            header = _results_header(path)
        except (UnicodeDecodeError, OSError) as e:
            raise PatchCSRAError(f"{flag} {path} cannot be read as CSV ({e}); choose another file") from None
        if header is not None and header != list(RESULTS_FILE_COLUMNS):
            raise PatchCSRAError(f"{flag} {path} holds other columns ({', '.join(header[:6])}...); rows are added "
                                 "only to a patchcsra results file; choose another file")


def append_results_file(path: Union[str, Path], summary: dict) -> Path:
    """Add the run's :func:`results_file_row` to ``path`` (the header first when the file is new or empty).

    The whole file is written beside ``path`` and renamed onto it (:func:`~patchcsra._io.atomic_path`): a
    reader sees the old rows or the old rows plus this one, never half a row. Rows are appended rather than
    the file replaced (timm's validate.py writes one file per invocation of many models; a patchcsra
    invocation scores one model, so a loop over models builds one table).
    """
    import csv
    import io

    path = Path(path)
    check_results_file(path)
    old = path.read_text() if path.exists() else ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(RESULTS_FILE_COLUMNS), lineterminator="\n")
    if not old.strip():
        old = ""
        w.writeheader()
    elif not old.endswith("\n"):
        old += "\n"
    w.writerow(results_file_row(summary))
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(old + buf.getvalue())
    return path
