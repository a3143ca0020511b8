"""Trained CSRA / attention-pool heads: frozen and fine-tuned training, resume, CLI, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import patchcsra
from patchcsra.cli import app
from patchcsra.data import open_dataset, resolve_transform
from patchcsra.errors import PatchCSRAError
from patchcsra.training.loop import TrainConfig, carve_validation, lr_factor, masked_bce, train_head

from conftest import HERE, shared_path
from test_sweep import _folder, _tiny_model

runner = CliRunner()


@pytest.fixture
def small(tmp_path):
    ds = open_dataset(_folder(tmp_path / "data", n_per_class=8))
    model = _tiny_model(3)
    return ds, model, resolve_transform(model, img_size=64), tmp_path


def test_recipe_parts():
    cfg = TrainConfig(warmup_epochs=1, lr_step=2, lr_gamma=0.1)
    assert [round(lr_factor(i, 4, cfg), 4) for i in range(0, 16, 2)] == [0.25, 0.75, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1]
    assert lr_factor(16, 4, cfg) == pytest.approx(0.01)
    tr, va = carve_validation(20, 0.1, 0)
    assert len(va) == 2 and not set(tr) & set(va) and sorted(set(tr) | set(va)) == list(range(20))
    assert (carve_validation(20, 0.1, 0)[1] == va).all()
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    t = torch.tensor([[1.0, -1.0, 0.0]])  # the -1 entry is ignored
    ref = (torch.nn.functional.softplus(-logits[0, 0]) + torch.nn.functional.softplus(logits[0, 2])) / 2
    assert float(masked_bce(logits, t)) == pytest.approx(float(ref))
    with pytest.raises(PatchCSRAError, match="mode"):
        TrainConfig(mode="half").check()
    with pytest.raises(PatchCSRAError, match="lr_head"):
        TrainConfig(lr_head=-1).check()


def test_frozen_training_moves_only_the_head(small):
    ds, model, spec, tmp = small
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train_head(model, ds, tmp / "run", config=TrainConfig(epochs=3, heads=4, batch_size=8), transform=spec,
                     workers=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the backbone (and the old fc) did not change
    head0 = patchcsra.CSRAHead.from_linear(before["fc.weight"], before["fc.bias"], heads=4, lam=0.1)
    assert not torch.allclose(res.model.head.weight, head0.weight)
    assert sorted(p.name for p in (tmp / "run").iterdir()) == sorted(
        ["checkpoint.pt", "features.pt", "history.csv", "curve.png", "model.pt", "summary.json"])
    h = pd.read_csv(tmp / "run" / "history.csv")
    assert list(h.columns) == ["epoch", "lr", "train_loss", "val_top1", "seconds", "images_per_s"] and len(h) == 3
    assert res.best_metric == h["val_top1"].max() and res.best_epoch == int(h.loc[h.val_top1.idxmax(), "epoch"])
    # model.pt reloads in plain PyTorch and gives the trained model's logits
    x = torch.stack([ds[i][0] for i in range(4)])
    ts = torch.jit.load(str(tmp / "run" / "model.pt"))
    with torch.no_grad():
        torch.testing.assert_close(ts(x), res.model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(PatchCSRAError, match="--resume"):
        train_head(model, ds, tmp / "run", config=TrainConfig(epochs=1), transform=spec, workers=0)


def test_linear_head_trains_and_is_patched_like_any_classifier(small):
    ds, model, spec, tmp = small
    res = train_head(model, ds, tmp / "lin", config=TrainConfig(kind="linear", epochs=2, batch_size=8),
                     transform=spec, workers=0)
    assert res.model.head_info["kind"] == "linear" and not torch.equal(res.model.head.fc.weight, model.fc.weight)
    x = torch.stack([ds[i][0] for i in range(4)])
    with torch.no_grad():
        f = res.model.forward_features(x)
        s = res.model.head.fc(f.flatten(2).transpose(1, 2))            # (B, L, C): the head at every location
        want = res.model(x) + 0.25 * s.amax(dim=1)
        torch.testing.assert_close(patchcsra.patch(res.model, lam=0.25)(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.jit.load(str(tmp / "lin" / "model.pt"))(x), res.model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_resume_equals_uninterrupted(small, mode):
    ds, model, spec, tmp = small
    cfg = TrainConfig(mode=mode, epochs=3 if mode == "frozen" else 2, batch_size=8, heads=2)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    full = train_head(model, ds, tmp / "full", config=cfg, transform=spec, workers=0)
    model.load_state_dict(state0)  # fine-tuning changed the shared backbone; start the second run from scratch

    def stop_after_first_epoch(e):
        if e.get("done") and e["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_head(model, ds, tmp / "cut", config=cfg, transform=spec, workers=0, progress=stop_after_first_epoch)
    model.load_state_dict(state0) if mode == "frozen" else None
    if mode == "finetune":  # what an interrupted process leaves: the checkpoint; rebuild the model from disk
        model = _tiny_model(3)
        model.load_state_dict(state0)
    resumed = train_head(model, ds, tmp / "cut", config=cfg, transform=spec, workers=0, resume=True)
    a, b = full.history.drop(columns=["seconds", "images_per_s"]), resumed.history.drop(
        columns=["seconds", "images_per_s"])
    pd.testing.assert_frame_equal(a, b)
    for (k, v), (_, w) in zip(full.model.head.state_dict().items(), resumed.model.head.state_dict().items()):
        assert torch.equal(v, w), k


def test_resume_refuses_another_config(small):
    ds, model, spec, tmp = small
    train_head(model, ds, tmp / "r", config=TrainConfig(epochs=1), transform=spec, workers=0)
    with pytest.raises(PatchCSRAError, match="another run"):
        train_head(model, ds, tmp / "r", config=TrainConfig(epochs=2, heads=4), transform=spec, workers=0,
                   resume=True)


def test_cli_train_head_on_shared_voc_and_evaluate(tmp_path):
    voc = shared_path("data", "voc2007-mini", "VOCdevkit")
    out = tmp_path / "run"
    args = ["train-head", "timm:resnet10t", "--no-pretrained", "--num-classes", "20", "--data", str(voc), "--split",
            "trainval", "--eval-split", "test", "--img-size", "64", "--epochs", "2", "--heads", "4", "--out",
            str(out), "--workers", "0"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "eval" / "summary.json").read_text())
    assert s["model"]["head"]["adapter"] == "patchcsra-head" and s["images"]["scored"] == 5
    assert json.loads((out / "summary.json").read_text())["head"]["heads"] == 4
    r = runner.invoke(app, ["describe", str(out / "model.pt"), "--json", "--trust"])
    assert r.exit_code == 0 and json.loads(r.output)["head"]["heads"] == 4
    r = runner.invoke(app, ["patch", str(out / "model.pt"), "-o", str(tmp_path / "p.pt"), "--trust"])
    assert r.exit_code == 2 and "trained" in r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--resume" in r.output
    r = runner.invoke(app, args[:-2] + ["--workers", "0", "--heads", "3"] + ["--force"])
    assert r.exit_code == 2 and "heads" in r.output


def test_torchrun_ddp_training_equals_one_process_with_the_global_batch(tmp_path):
    root = _folder(tmp_path / "data", n_per_class=6, size=40)  # 18 images: 16 train (2 x 8) + 2 val
    model = _tiny_model(3)
    weights = tmp_path / "m.pth"
    torch.save(model.state_dict(), weights)
    common = ["train-head", str(weights), "--arch", "timm:resnet10t", "--data", str(root), "--split", "",
              "--img-size", "64", "--epochs", "2", "--heads", "2", "--workers", "0", "--val-fraction", "0.1"]
    one = runner.invoke(app, common + ["--batch-size", "8", "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "patchcsra"] + common + ["--batch-size", "4", "--out", str(tmp_path / "two")],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = pd.read_csv(tmp_path / "one" / "history.csv")
    b = pd.read_csv(tmp_path / "two" / "history.csv")
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    ds = open_dataset(root)
    ds.transform = resolve_transform(model, img_size=64).build()
    x = torch.stack([ds[i][0] for i in range(6)])
    m1, m2 = (torch.jit.load(str(tmp_path / d / "model.pt")) for d in ("one", "two"))
    with torch.no_grad():
        torch.testing.assert_close(m1(x), m2(x), rtol=1e-3, atol=1e-3)
