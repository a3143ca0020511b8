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


# the canvases are integer arithmetic on numpy's PCG64 stream: these digests hold on every machine
TRAIN_SHA = "b4c9579a715b13fd395c9a8d11c1645d60e9380d72b1f7fc94957a77605bdfb3"
TEST_SHA = "b107322b09a9a8059e086a56904590650e904d51c11030fd59d2c910ed39128b"


def test_canvases_are_the_same_bytes_everywhere():
    from patchcsra.demo import RECIPE, canvases_digest

    assert canvases_digest(*digit_canvases(RECIPE["n_train"], part="train", seed=RECIPE["seed"])) == TRAIN_SHA
    assert canvases_digest(*digit_canvases(1000, part="test", seed=RECIPE["seed"])) == TEST_SHA


def test_glyph_resize_is_exact_bilinear():
    import torch
    import torch.nn.functional as F

    from patchcsra.demo import _resize_glyph

    rng = np.random.default_rng(0)
    levels = rng.integers(0, 17, (8, 8))
    for s in (10, 17, 24):
        ref = F.interpolate(torch.tensor(levels * 255 / 16, dtype=torch.float64)[None, None], size=(s, s),
                            mode="bilinear", align_corners=False)[0, 0].numpy()
        got = _resize_glyph(levels, s).astype(np.float64)
        assert np.abs(got - ref).max() <= 0.5 + 1e-9  # torch's bilinear, rounded to the nearest level


def test_shipped_weights_are_the_recipe_on_these_canvases():
    from patchcsra.demo import RECIPE, DigitNet, shipped_digit_net

    model, record = shipped_digit_net()
    assert isinstance(model, DigitNet) and not model.training
    assert record["recipe"] == RECIPE and record["train_canvases_sha256"] == TRAIN_SHA
    assert record["trained_with"]["packages"]["numpy"] and record["trained_with"]["kernels"]["aten"]


def test_shipped_weights_refuse_another_recipe_without_retrain(tmp_path):
    import pytest

    from patchcsra.demo import run_demo
    from patchcsra.errors import PatchCSRAError

    with pytest.raises(PatchCSRAError, match="--retrain"):
        run_demo(tmp_path / "d", epochs=3, retrain=False)
    assert not (tmp_path / "d").exists()


def test_cli_demo_default_uses_the_shipped_weights(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-test", "60"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "run" / "summary.json").read_text())
    assert s["model"]["weights"].startswith("shipped") and s["images"]["scored"] == 60
    assert s["environment"]["packages"]["pillow"] and s["environment"]["command"]
