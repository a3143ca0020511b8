"""patchcsra.report: Table-1 frames, their renderings, and run directories."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from patchcsra.errors import PatchCSRAError
from patchcsra.grid import sweep
from patchcsra.report import (RUN_FILES, TABLE_COLUMNS, display_frame, merge_runs, read_run, summary_record,
                              table_frame, to_latex, to_markdown, write_run)

from test_sweep import _stats


def _run(tmp_path, name="r", model="m", seed=0):
    res = sweep(_stats(seed=seed), lams=[0, 0.1, 0.5], temperatures=[1.0, math.inf], bootstrap=50, folds=3)
    s = summary_record(res, model={"name": model}, dataset={"name": "d"}, transform={"input_size": [3, 64, 48]})
    return res, s, write_run(res, tmp_path / name, s)


def test_summary_and_table_frame_hold_every_choice(tmp_path):
    res, s, _ = _run(tmp_path)
    assert set(s["choices"]) == {"oracle", "fixed", "cv"} and s["images"]["scored"] == 60
    t = table_frame([s])
    assert list(t.columns) == list(TABLE_COLUMNS) and len(t) == 1
    row = t.iloc[0]
    assert row["resolution"] == "64x48" and row["baseline"] == pytest.approx(res.baseline["mAP"])
    assert row["fixed_score"] == pytest.approx(s["choices"]["fixed"]["score"])
    assert row["oracle_score"] >= row["baseline"] - 1e-9  # λ = 0 is on the grid


def test_renderings_carry_the_same_numbers(tmp_path):
    _, s, _ = _run(tmp_path)
    disp = display_frame(table_frame([s]))
    md, tex = to_markdown(disp), to_latex(disp)
    base = f"{s['baseline']['mAP']:.2f}"
    assert base in md and base in tex and "Fixed λ" in md
    assert "\\begin{tabular}" in tex or "\\begin{table}" in tex
    delta = s["choices"]["fixed"]["delta"]
    assert f"{delta:+.2f}" in md


def test_run_directory_round_trip_and_merge(tmp_path):
    _, s, out = _run(tmp_path, "a", model="m1")
    _run(tmp_path, "b", model="m0", seed=1)
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    frame = pd.read_csv(out / "results.csv")
    assert {"lam", "temperature", "mAP"} <= set(frame.columns) and len(frame) == 4 * 2  # λ 0, 0.1, 0.5 + the fixed 0.2, at two T
    back = read_run(out)
    assert back["choices"] == json.loads((out / "summary.json").read_text())["choices"]
    merged = merge_runs([tmp_path / "a", tmp_path / "b"])
    assert merged["model"].tolist() == ["m0", "m1"]  # sorted by dataset, resolution, model


def test_read_run_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(PatchCSRAError, match="no summary.json"):
        read_run(tmp_path)
    (tmp_path / "summary.json").write_text("{oops")
    with pytest.raises(PatchCSRAError, match="not valid JSON"):
        read_run(tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(PatchCSRAError, match="not a patchcsra sweep summary"):
        read_run(tmp_path)
