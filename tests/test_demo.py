"""The embedded default: deterministic digit canvases, a trained GAP CNN, and the sweep on it."""
from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from patchcsra.cli import app
from patchcsra.demo import digit_canvases


def test_canvases_are_deterministic_multilabel_and_disjoint():
    a, ta = digit_canvases(50, part="train", seed=1)
    b, tb = digit_canvases(50, part="train", seed=1)
    assert (a == b).all() and (ta == tb).all() and a.shape == (50, 48, 48) and ta.shape == (50, 10)
    assert ta.sum(1).min() >= 1 and ta.sum(1).max() <= 4 and (ta.sum(1) > 1).mean() > 0.4
    c, _ = digit_canvases(50, part="test", seed=1)
    assert not (a == c).all()


def test_cli_demo_small(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n-train", "300", "--n-test", "120", "--epochs", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "run" / "summary.json").read_text())
    assert s["images"]["scored"] == 120 and s["classes"]["names"] == [str(d) for d in range(10)]
    assert s["choices"]["fixed"]["lam"] == 0.2 and (out / "run" / "curve.png").exists()
    assert np.isfinite(s["baseline"]["mAP"]) and (out / "digitnet.pt").exists()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--force" in r.output
