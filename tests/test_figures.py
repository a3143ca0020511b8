"""Figures and tables a paper can print: curve.png/pdf/svg with bootstrap bands, the booktabs table.tex, the
``report`` verb's order / names / merged curves, and the command line + versions in summary.json."""
from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from patchcsra.cli import app
from patchcsra.grid import sweep
from patchcsra.provenance import environment
from patchcsra.report import (display_frame, merge_runs, summary_record, table_caption, table_frame, to_latex,
                              write_run)

from test_sweep import _folder, _stats

runner = CliRunner()


def _run(tmp_path, name="r", model="m", seed=0, formats=("png",), temperatures=(1.0, math.inf)):
    res = sweep(_stats(seed=seed), lams=[0, 0.1, 0.5], temperatures=list(temperatures), bootstrap=50, folds=3)
    s = summary_record(res, model={"name": model}, dataset={"name": "d"}, transform={"input_size": [3, 64, 48]})
    return res, s, write_run(res, tmp_path / name, s, formats=formats)


def test_curve_in_three_formats_with_bands_and_n(tmp_path):
    res, s, out = _run(tmp_path, formats=("png", "pdf", "svg"))
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "curve.pdf").read_bytes()[:5] == b"%PDF-"
    svg = (out / "curve.svg").read_text()
    assert "<svg" in svg and "N = 60 images" in svg  # SVG keeps text as text: the title is in it
    band = json.loads((out / "summary.json").read_text())["curve_band"]
    assert band["resamples"] == 50 and {c["temperature"] for c in band["curves"]} == {1.0, "inf"}  # small grid: every T
    for c in band["curves"]:
        g = res.frame[res.frame["temperature"] == (math.inf if c["temperature"] == "inf" else c["temperature"])]
        assert c["lams"] == sorted(g["lam"].tolist())
        assert all(lo <= hi for lo, hi in zip(c["low"], c["high"]))
    for t in ("T=1", "T=∞"):  # each curve labelled with its T, the CV choice marked
        assert t in svg
    assert "CV λ=" in svg
    # a larger grid: the band around the oracle's T only
    big = sweep(_stats(), lams=[i / 25 for i in range(26)], temperatures=[1.0, 2.0, math.inf], bootstrap=60,
                folds=0)
    assert [c["temperature"] for c in big.band["curves"]] == [
        "inf" if math.isinf(big.choices["oracle"].temperature) else big.choices["oracle"].temperature]
    assert sweep(_stats(), lams=[0, 0.1], bootstrap=0, folds=0).band == {}
    assert sweep(_stats(), lams=[0, 0.1], bootstrap=20, folds=0).band == {}  # too few resamples to draw


def test_only_png_by_default_and_bad_format_refused(tmp_path):
    _, _, out = _run(tmp_path)
    assert not (out / "curve.pdf").exists() and not (out / "curve.svg").exists()
    with pytest.raises(Exception, match="figure format 'gif'"):
        _run(tmp_path, "bad", formats=("gif",))
    assert not (tmp_path / "bad").exists()
    # --force over a run that holds curve.pdf/svg works
    res, s, _ = _run(tmp_path, "f", formats=("png", "svg"))
    write_run(res, tmp_path / "f", s, force=True)


def test_table_tex_booktabs_infinity_label_alignment_and_caption(tmp_path, monkeypatch):
    _, s, out = _run(tmp_path)
    tex = (out / "table.tex").read_text()
    for cmd in ("\\toprule", "\\midrule", "\\bottomrule", "\\label{tab:patchcsra-table1}", "\\caption{"):
        assert cmd in tex
    assert "$\\infty$" in tex and " inf " not in tex
    fmt = re.search(r"\\begin\{tabular\}\{([lr]+)\}", tex).group(1)
    disp = display_frame(table_frame([s]))
    assert len(fmt) == disp.shape[1] and fmt[:4] == "llll" and set(fmt[4:]) == {"r"}
    assert "N = 60 images" in tex and "N = 60 images" in (out / "table.md").read_text()
    # the hook for the metric protocol's caption line
    import patchcsra.metrics as M

    monkeypatch.setattr(M, "protocol_caption", lambda summaries: "Protocol: test-protocol-xyz.", raising=False)
    cap = table_caption([s])
    assert cap.endswith("Protocol: test-protocol-xyz.")
    assert "test-protocol-xyz" in to_latex(disp, caption=cap)


def test_merge_order_names_sort(tmp_path):
    _run(tmp_path, "a", model="zeta", seed=0)
    _run(tmp_path, "b", model="alpha", seed=1)
    dirs = [tmp_path / "a", tmp_path / "b"]
    assert merge_runs(dirs)["model"].tolist() == ["alpha", "zeta"]  # the API default: sorted
    assert merge_runs(dirs, sort=None)["model"].tolist() == ["zeta", "alpha"]
    t, summ = merge_runs(dirs, sort=None, names=["A", "B"], with_summaries=True)
    assert t["model"].tolist() == ["A", "B"] and [x["model"]["name"] for x in summ] == ["zeta", "alpha"]
    t = merge_runs(dirs, sort=("baseline",))
    assert t["baseline"].is_monotonic_increasing
    with pytest.raises(Exception, match="--sort 'nope'"):
        merge_runs(dirs, sort=("nope",))
    with pytest.raises(Exception, match="--name given 1"):
        merge_runs(dirs, names=["x"])


def test_cli_report_order_given_names_sort_and_one_figure(tmp_path):
    _run(tmp_path, "a", model="zeta", seed=0)
    _run(tmp_path, "b", model="alpha", seed=1)
    out = tmp_path / "merged"
    r = runner.invoke(app, ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--name", "run-A", "--name",
                            "run-B", "--out", str(out), "--formats", "png,svg"])
    assert r.exit_code == 0, r.output
    assert pd.read_csv(out / "table.csv")["model"].tolist() == ["run-A", "run-B"]  # the order given
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    svg = (out / "curves.svg").read_text()
    assert "run-A T=∞" in svg and "run-B T=1" in svg and "2 runs" in svg
    r = runner.invoke(app, ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--sort", "model", "--out",
                            str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert pd.read_csv(out / "table.csv")["model"].tolist() == ["alpha", "zeta"]
    r = runner.invoke(app, ["report", str(tmp_path / "a"), "--sort", "nope"])
    assert r.exit_code == 2 and "--sort" in r.output
    r = runner.invoke(app, ["report", str(tmp_path / "a"), "--formats", "gif"])
    assert r.exit_code == 2 and "--formats" in r.output


def test_cli_sweep_refuses_a_bad_format_before_the_pass(tmp_path):
    data = _folder(tmp_path / "data")
    r = runner.invoke(app, ["sweep-lambda", "timm:resnet10t", "--data", str(data), "--out", str(tmp_path / "o"),
                            "--formats", "png,gif"])
    assert r.exit_code == 2 and "--formats" in r.output and not (tmp_path / "o").exists()


def test_environment_holds_argv_and_the_versions():
    env = environment(command=["patchcsra", "sweep-lambda", "a b"])
    import shlex

    assert shlex.split(env["command"]) == ["patchcsra", "sweep-lambda", "a b"]
    for k in ("torch", "timm"):
        assert env[k]
    for k in ("numpy", "pillow", "scikit-learn", "pandas", "matplotlib"):
        assert env["packages"][k]


def test_band_budget_cuts_resamples_then_leaves_the_band_out(monkeypatch):
    import patchcsra.grid as G

    st = _stats()  # 60 images x 4 classes
    monkeypatch.setattr(G, "BAND_BUDGET", 4 * 60 * 4 * 100)  # 4 λ at one T with 100 resamples
    b = G.sweep(st, lams=[0, 0.1, 0.5], temperatures=[1.0, math.inf], bootstrap=1000, folds=0).band
    assert b["resamples"] == 100 and len(b["curves"]) == 1
    monkeypatch.setattr(G, "BAND_BUDGET", 4 * 60 * 4 * 10)
    assert G.sweep(st, lams=[0, 0.1, 0.5], temperatures=[1.0, math.inf], bootstrap=1000, folds=0).band == {}


def test_train_head_curve_has_title_legend_and_whole_epochs(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from patchcsra.training.loop import _write_history

    seen = {}
    real = Figure.savefig

    def keep(self, *a, **k):
        seen["fig"] = self
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    hist = [{"epoch": e, "train_loss": 1 / e, "val_mAP": 50 + 3 * e - 0.4 * e * e} for e in range(1, 4)]
    _write_history(tmp_path, hist, "mAP")
    ax = seen["fig"].axes[0]
    assert "validation mAP" in ax.get_title() and ax.get_legend() is not None
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["train loss", "val mAP", "best: epoch 3"]
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_plot_worker_draws_the_same_bytes_and_falls_back_when_its_child_fails(tmp_path, monkeypatch):
    """The curve drawn by the worker process (what the CLI uses) equals, byte for byte, the one drawn in this
    process; a child that died, could not start or cannot unpickle still leaves a complete figure (drawn here);
    the worker imports no torch."""
    import subprocess
    import sys

    import patchcsra.plot_worker as W

    res, s, ref = _run(tmp_path, formats=("png", "svg"))
    plain = json.loads((ref / "summary.json").read_text())
    with W.PlotWorker() as w:
        assert w._proc is not None
        w.submit(res.frame, s, tmp_path / "w.png", ("png", "svg"))()
    assert (tmp_path / "w.png").read_bytes() == (ref / "curve.png").read_bytes()
    def ids_out(svg):  # matplotlib salts its SVG ids with a random uuid per process (rcParams svg.hashsalt)
        return re.sub(rb"\b[a-z][0-9a-f]{10}\b", b"ID", svg)

    assert ids_out((tmp_path / "w.svg").read_bytes()) == ids_out((ref / "curve.svg").read_bytes())

    drawn_here = []
    import patchcsra.figures as F  # the fallback: figures.plot_curve, looked up at submit time

    real_plot = F.plot_curve

    def spy(*a, **k):
        drawn_here.append(a[2])
        return real_plot(*a, **k)

    monkeypatch.setattr(F, "plot_curve", spy)
    w = W.PlotWorker()  # the child dies before it is handed the figure
    w._proc.kill()
    w._proc.wait()
    w.submit(res.frame, plain, tmp_path / "dead.png")()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    w = W.PlotWorker()  # the child cannot start
    assert w._proc is None
    w.submit(res.frame, plain, tmp_path / "none.png")()
    assert drawn_here == [str(tmp_path / "dead.png"), str(tmp_path / "none.png")]
    for name in ("dead.png", "none.png"):
        assert (tmp_path / name).read_bytes() == (ref / "curve.png").read_bytes()
    monkeypatch.undo()
    probe = "import sys, patchcsra.plot_worker, patchcsra.figures; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
