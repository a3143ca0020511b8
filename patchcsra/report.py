"""Table-1 reports: frames first, then every format is rendered from a frame.

* :func:`summary_record` -- a :class:`~patchcsra.grid.SweepResult` + run records -> ``summary.json`` dict.
* :func:`table_frame` -- summaries -> the Table-1 frame (one row per dataset x model), machine columns.
* :func:`display_frame` -- the same rows with the paper's column groups, formatted for reading.
* :func:`to_markdown`, :func:`to_latex` -- renderers of a display frame; :func:`rich_table` of a table frame.
* :func:`plot_curve` -- metric vs λ, one line per T, baseline and chosen λs marked (paper Fig. 5).
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
from typing import Any, Sequence, Union

import pandas as pd

from ._io import atomic_dir, atomic_path, json_default
from .patcher import temperature_text
from .errors import PatchCSRAError
from .grid import SweepResult

__all__ = ["summary_record", "table_frame", "display_frame", "to_markdown", "to_latex", "rich_table",
           "plot_curve", "write_run", "write_table", "read_run", "merge_runs", "RUN_FILES", "TABLE_COLUMNS",
           "RESULTS_FILE_COLUMNS", "results_file_row", "check_results_file", "append_results_file"]

RUN_FILES = ("results.csv", "per_class.csv", "summary.json", "table.md", "table.tex", "curve.png")
TABLE_FILES = ("table.csv", "table.md", "table.tex")
TABLE_COLUMNS = ("dataset", "resolution", "model", "metric", "n_images", "baseline",
                 "oracle_lam", "oracle_T", "oracle_score", "oracle_delta", "oracle_ci_low", "oracle_ci_high",
                 "fixed_lam", "fixed_score", "fixed_delta", "fixed_ci_low", "fixed_ci_high",
                 "cv_lam", "cv_T", "cv_score", "cv_delta", "cv_ci_low", "cv_ci_high")
_GROUPS = (("oracle", "Varying λ (oracle)"), ("fixed", "Fixed λ"), ("cv", "λ by CV"))


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
        "settings": result.settings,
        "images": {"total": len(stats), "scored": int(stats.ok.sum()), "bad": len(bad), "bad_ids": bad[:100]},
        "classes": {"names": list(stats.classes), "without_positives": no_pos},
        **records,
    }


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
    return pd.DataFrame(data, columns=pd.MultiIndex.from_tuples(list(data)))


def _flat(df: pd.DataFrame) -> list[str]:
    return [f"{a} {b}".strip() if a else b for a, b in df.columns]


def to_markdown(display: pd.DataFrame) -> str:
    """GitHub-flavoured Markdown table."""
    flat = display.copy()
    flat.columns = _flat(display)
    return flat.to_markdown(index=False, disable_numparse=True) + "\n"


def to_latex(display: pd.DataFrame, caption: str = "Baseline vs residual-attention patched scores") -> str:
    """A booktabs LaTeX table with the column groups as multicolumns."""
    import re

    def esc(s: str) -> str:
        s = s.replace("\\", r"\textbackslash{}")
        s = re.sub(r"([&%$#_{}])", r"\\\1", s)
        return s.replace("λ", r"$\lambda$").replace("Δ", r"$\Delta$").replace("~", r"\textasciitilde{}")

    body = display.map(esc)
    body.columns = pd.MultiIndex.from_tuples([(esc(a), esc(b)) for a, b in display.columns])
    return body.to_latex(index=False, escape=False, multicolumn=True, multicolumn_format="c",
                         caption=esc(caption), column_format="l" * display.shape[1])


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
    return t


def plot_curve(frame: pd.DataFrame, summary: dict, path: Union[str, Path]) -> None:
    """``metric`` vs λ, one line per temperature; baseline dashed, fixed and oracle λ marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    metric = summary["metric"]
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    for t, g in frame.groupby("temperature", sort=True):
        g = g.sort_values("lam")
        ax.plot(g["lam"], g[metric], marker="o", ms=3, label=f"T={temperature_text(t).replace('inf', '∞')}")
    ax.axhline(summary["baseline"][metric], color="grey", ls="--", lw=1, label="baseline (λ=0)")
    for key, style in (("fixed", "s"), ("oracle", "*")):
        c = summary["choices"].get(key)
        if c:
            ax.plot([c["lam"]], [c["score"]], style, ms=9, color="black" if key == "fixed" else "red",
                    label=f"{key} λ={c['lam']:g}")
    ax.set_xlabel("λ")
    ax.set_ylabel(metric + " (%)")
    name = f"{(summary.get('model') or {}).get('name', '')} on {(summary.get('dataset') or {}).get('name', '')}"
    ax.set_title(name.strip(), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_table(table: pd.DataFrame, out_dir: Union[str, Path], *, force: bool = False) -> Path:
    """A merged Table 1 as ``table.csv`` (machine columns), ``table.md`` and ``table.tex``."""
    def fill(tmp: Path) -> None:
        table.to_csv(tmp / "table.csv", index=False, float_format="%.6f")
        disp = display_frame(table)
        (tmp / "table.md").write_text(to_markdown(disp))
        (tmp / "table.tex").write_text(to_latex(disp))

    return atomic_dir(out_dir, fill, force=force, known=TABLE_FILES)


def write_run(result: SweepResult, out_dir: Union[str, Path], summary: dict, *, force: bool = False) -> Path:
    """Write every file of a run into ``out_dir`` atomically (a temporary sibling, then renamed).

    Raises:
        PatchCSRAError: ``out_dir`` exists and ``force`` is False.
    """
    def fill(tmp: Path) -> None:
        frame = result.frame.assign(temperature=[repr(float(t)) for t in result.frame["temperature"]])
        frame.to_csv(tmp / "results.csv", index=False, float_format="%.6f")  # T as given: 1e-30 is not 0.000000
        result.per_class.to_csv(tmp / "per_class.csv", index=False, float_format="%.6f")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=json_default) + "\n")
        disp = display_frame(table_frame([summary]))
        (tmp / "table.md").write_text(to_markdown(disp))
        (tmp / "table.tex").write_text(to_latex(disp))
        plot_curve(result.frame, summary, tmp / "curve.png")

    return atomic_dir(out_dir, fill, force=force, known=RUN_FILES)


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


def merge_runs(run_dirs: Sequence[Union[str, Path]]) -> pd.DataFrame:
    """One Table-1 frame from several runs, sorted by dataset, resolution and model."""
    if not run_dirs:
        raise PatchCSRAError("give at least one run directory")
    t = table_frame([read_run(d) for d in run_dirs])
    return t.sort_values(["dataset", "resolution", "model"], kind="stable").reset_index(drop=True)


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
