"""The one-pass sweep: stats cache/resume, grid evaluation, λ choices, reports, and the CLI
end to end on the shared real VOC images against an independent computation."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from typer.testing import CliRunner

import patchcsra
from patchcsra.cli import app
from patchcsra.data import open_dataset, resolve_transform
from patchcsra.errors import PatchCSRAError
from patchcsra.stats import Stats, collect
from patchcsra.grid import DEFAULT_LAMS, evaluate_grid, sweep

from conftest import shared_path

runner = CliRunner()
VOC_CLASSES = ("aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
               "pottedplant sheep sofa train tvmonitor").split()


# ----------------------------------------------------------------------------- helpers
def _folder(root: Path, n_per_class: int = 4, classes=("a", "b", "c"), size=24, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for i, c in enumerate(classes):
        d = root / c
        d.mkdir(parents=True)
        for j in range(n_per_class):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            arr[..., i % 3] = 255 - 20 * j  # make the class visible in one channel
            Image.fromarray(arr).save(d / f"{j:03d}.png")
    return root


def _tiny_model(num_classes=3):
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes).eval()


def _stats(n=60, c=4, l=5, temps=(1.0, 2.0, math.inf), seed=0, single=False) -> Stats:
    """Synthetic stats built from per-location scores, so att/max are consistent."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, l, generator=g)
    base = s.mean(-1)
    att = torch.stack([s.amax(-1) if math.isinf(t) else (torch.softmax(s * t, -1) * s).sum(-1) for t in temps], -1)
    if single:
        lab = torch.randint(0, c, (n,), generator=g).numpy()
        targets = np.eye(c, dtype=np.int8)[lab]
    else:
        targets = (torch.rand(n, c, generator=g) < 0.4).numpy().astype(np.int8)
        targets[0, 0] = -1
    return Stats(base, s.amax(-1), att, tuple(temps), targets, np.ones(n, bool), tuple(f"{i}" for i in range(n)),
                 tuple(f"c{j}" for j in range(c)), single)


# ----------------------------------------------------------------------------- collect
def test_collect_matches_patched_model_and_caches(tmp_path):
    ds = open_dataset(_folder(tmp_path / "data"))
    model = _tiny_model()
    spec = resolve_transform(model, img_size=64)
    ds.transform = spec.build()
    patched = patchcsra.patch(model, lam=0.0, input_size=spec.input_size)
    st = collect(patched, ds, temperatures=[0.5], batch_size=5, workers=0, cache_dir=tmp_path / "cache")
    assert st.meta["forward_images"] == len(ds) == 12
    assert 0.5 in st.temperatures and math.inf in st.temperatures
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        y = model(x)
        out = patched.forward_scores(x, [0.5, math.inf])
    torch.testing.assert_close(st.base, y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st.max, out["max"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st.att_for(0.5), out["att"][..., 0], rtol=1e-4, atol=1e-4)
    patched.lam = 0.3
    with torch.no_grad():
        torch.testing.assert_close(st.scores(0.3), patched(x), rtol=1e-4, atol=1e-4)
    # a second call, another λ grid and a T already collected: zero forward passes
    calls = []
    h = model.register_forward_pre_hook(lambda *a: calls.append(1))  # forward_features runs model's modules
    for mod in model.modules():
        mod.register_forward_pre_hook(lambda *a: calls.append(1))
    st2 = collect(patched, ds, temperatures=[2.0], batch_size=5, workers=0, cache_dir=tmp_path / "cache")
    h.remove()
    assert not calls
    assert st2.meta["forward_images"] == 0
    torch.testing.assert_close(st2.base, st.base)
    # a new temperature needs a new pass, which then keeps the old ones too
    st3 = collect(patched, ds, temperatures=[0.25], batch_size=5, workers=0, cache_dir=tmp_path / "cache")
    assert st3.meta["forward_images"] == 12 and {0.25, 0.5}.issubset(st3.temperatures)


def test_collect_keeps_large_stats_to_the_requested_temperatures(tmp_path, monkeypatch):
    import patchcsra.stats as S

    ds = open_dataset(_folder(tmp_path / "data", n_per_class=1))
    model = _tiny_model()
    spec = resolve_transform(model, img_size=64)
    ds.transform = spec.build()
    monkeypatch.setattr(S, "EXTRA_T_BUDGET", 0)
    st = collect(patchcsra.patch(model, lam=0.0, input_size=spec.input_size), ds, temperatures=[3.5], workers=0)
    assert st.temperatures == (3.5, math.inf) and st.att.shape == (3, 3, 2)


def test_collect_resumes_after_interruption(tmp_path):
    ds = open_dataset(_folder(tmp_path / "data", n_per_class=5))
    model = _tiny_model()
    spec = resolve_transform(model, img_size=64)
    ds.transform = spec.build()
    patched = patchcsra.patch(model, lam=0.0, input_size=spec.input_size)

    def stop_after_8(done, total):
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(patched, ds, batch_size=4, workers=0, cache_dir=tmp_path / "c", save_every=4, progress=stop_after_8)
    resumed = collect(patched, ds, batch_size=4, workers=0, cache_dir=tmp_path / "c", save_every=4)
    assert resumed.meta["forward_images"] == 15 - 8
    full = collect(patched, ds, batch_size=4, workers=0, cache_dir=None)
    torch.testing.assert_close(resumed.base, full.base)
    torch.testing.assert_close(resumed.att, full.att)


def test_cache_parts_are_saved_by_time_too(tmp_path, monkeypatch):
    """A part every ``save_interval`` seconds, even far below ``save_every`` images: a kill loses at most that."""
    import patchcsra.stats as S
    from patchcsra.errors import PatchCSRAError

    ds = open_dataset(_folder(tmp_path / "data", n_per_class=4))
    model = _tiny_model()
    spec = resolve_transform(model, img_size=64)
    ds.transform = spec.build()
    patched = patchcsra.patch(model, lam=0.0, input_size=spec.input_size)
    clock = iter(range(0, 10_000, 50))  # 50 s between two reads of the clock: every batch is due
    monkeypatch.setattr(S.time, "monotonic", lambda: float(next(clock)))
    collect(patched, ds, batch_size=4, workers=0, cache_dir=tmp_path / "c", save_every=10_000, save_interval=30)
    [entry] = [d for d in (tmp_path / "c").iterdir() if d.is_dir()]
    assert len(list(entry.glob("part-*.pt"))) == 3  # 12 images, batches of 4
    monkeypatch.setattr(S.time, "monotonic", lambda: 0.0)  # a frozen clock: by count only
    collect(patched, ds, batch_size=4, workers=0, cache_dir=tmp_path / "d", save_every=10_000, save_interval=30)
    [entry] = [d for d in (tmp_path / "d").iterdir() if d.is_dir()]
    assert len(list(entry.glob("part-*.pt"))) == 1
    with pytest.raises(PatchCSRAError, match="save_interval=0"):
        collect(patched, ds, workers=0, save_interval=0)


def test_collect_marks_unreadable_images(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "a" / "zzz.png").write_bytes(b"not an image")
    ds = open_dataset(root)
    model = _tiny_model()
    spec = resolve_transform(model, img_size=64)
    ds.transform = spec.build()
    st = collect(patchcsra.patch(model, lam=0.0, input_size=spec.input_size), ds, workers=0, batch_size=4)
    assert (~st.ok).sum() == 1 and st.ids[int(np.flatnonzero(~st.ok)[0])].endswith("zzz.png")
    res = sweep(st, bootstrap=0, folds=0)  # scored without the bad image
    y = st.scores(0.0).numpy()[st.ok]
    assert res.baseline["top1"] == pytest.approx(100 * (y.argmax(1) == st.labels()[st.ok]).mean())


# ----------------------------------------------------------------------------- sweep
def test_evaluate_grid_rows_and_columns():
    st = _stats()
    f = evaluate_grid(st, [0, 0.1, 0.5], [1.0, math.inf])
    assert list(f.columns[:9]) == ["lam", "temperature", "mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"]
    assert {"CP_top3", "OF1_top3"} <= set(f.columns) and len(f) == 6
    row = f[(f.lam == 0.1) & (f.temperature == 1.0)].iloc[0]
    y = (st.base + 0.1 * st.att[..., 0]).numpy()
    aps = [average_precision_score(st.targets[st.targets[:, j] >= 0, j], y[st.targets[:, j] >= 0, j])
           for j in range(4)]
    assert row["mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-6)
    single = evaluate_grid(_stats(single=True), [0, 0.2])
    assert {"top1", "top5", "mAP"} <= set(single.columns)


def test_single_label_map_is_one_vs_rest_and_selectable():
    st = _stats(n=120, single=True, seed=5)
    f = evaluate_grid(st, [0, 0.3], [math.inf])
    y = (st.base + 0.3 * st.max).numpy()
    aps = [average_precision_score(st.targets[:, j], y[:, j]) for j in range(4)]
    assert f[f.lam == 0.3]["mAP"].iloc[0] == pytest.approx(100 * np.mean(aps), abs=1e-6)
    res = sweep(st, lams=[0, 0.1, 0.3], metric="mAP", fixed_lam=0.1, bootstrap=50, folds=3)
    assert res.metric == "mAP"
    assert res.choices["oracle"].score == pytest.approx(res.frame["mAP"].max())
    assert res.baseline["mAP"] == pytest.approx(f[f.lam == 0]["mAP"].iloc[0])


def test_sweep_choices_are_consistent():
    st = _stats(n=200, seed=3)
    res = sweep(st, lams=[0, 0.05, 0.1, 0.3, 1.0], temperatures=[1.0, math.inf], fixed_lam=0.2, bootstrap=200, folds=4)
    f = res.frame
    assert 0.2 in set(f.lam)  # the fixed λ is always on the grid
    o, fx, cv = res.choices["oracle"], res.choices["fixed"], res.choices["cv"]
    assert o.score == pytest.approx(f["mAP"].max())
    assert fx.score == pytest.approx(f[(f.lam == 0.2) & np.isinf(f.temperature)]["mAP"].iloc[0])
    assert fx.delta == pytest.approx(fx.score - res.baseline["mAP"])
    assert len(cv.per_fold) == 4 and cv.score == pytest.approx(res.baseline["mAP"] + cv.delta)
    for c in (o, fx, cv):
        assert c.ci[0] <= c.ci[1] and np.isfinite(c.ci).all()
    # recomputed here: each fold scored with the λ/T chosen on the other three folds
    from patchcsra.metrics import mean_average_precision as mean_ap

    perm = np.random.default_rng(0).permutation(200)
    deltas = []
    for fold, (lam, t) in zip(np.array_split(perm, 4), cv.per_fold):
        rest = np.setdiff1d(perm, fold)
        best = max(((mean_ap(st.scores(l2, t2).numpy()[rest], st.targets[rest])[0], -l2, not math.isinf(t2), l2, t2)
                    for l2, t2 in zip(f.lam, f.temperature)))
        assert (best[3], best[4]) == (lam, t)
        fs = np.sort(fold)
        deltas.append(mean_ap(st.scores(lam, t).numpy()[fs], st.targets[fs])[0]
                      - mean_ap(st.base.numpy()[fs], st.targets[fs])[0])
    assert cv.delta == pytest.approx(np.mean(deltas))
    # same seed -> same result
    again = sweep(st, lams=[0, 0.05, 0.1, 0.3, 1.0], temperatures=[1.0, math.inf], fixed_lam=0.2, bootstrap=200,
                  folds=4)
    assert again.choices["cv"] == cv


def test_sweep_rejects_nan_logits_and_bad_lams():
    st = _stats()
    with pytest.raises(PatchCSRAError, match="lams"):
        sweep(st, lams=[-0.1, 0.2], bootstrap=0)
    st.base[3, 1] = float("nan")
    with pytest.raises(PatchCSRAError, match="NaN/inf logits on 1 image"):
        sweep(st, bootstrap=0)


# ----------------------------------------------------------------------------- reports
def test_write_run_and_merge(tmp_path):
    from patchcsra.report import merge_runs, read_run, summary_record, write_run

    st = _stats(n=80)
    res = sweep(st, lams=[0, 0.1, 0.2], bootstrap=50, folds=2)
    summ = summary_record(res, model={"name": "m1"}, dataset={"name": "d1"}, transform={"input_size": [3, 8, 8]})
    out = write_run(res, tmp_path / "run1", summ)
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.csv", "per_class.csv", "summary.json",
                                                            "table.md", "table.tex", "curve.png"])
    csv = pd.read_csv(out / "results.csv")
    assert list(csv.columns[:9]) == ["lam", "temperature", "mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"]
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    tex = (out / "table.tex").read_text()
    assert "\\begin{table}" in tex and "$\\lambda$" in tex and "multicolumn" in tex
    assert "Varying λ (oracle)" in (out / "table.md").read_text()
    with pytest.raises(PatchCSRAError, match="--force"):
        write_run(res, out, summ)
    write_run(res, out, summ, force=True)
    summ2 = dict(summ, model={"name": "m2"})
    write_run(res, tmp_path / "run2", summ2)
    t = merge_runs([tmp_path / "run2", tmp_path / "run1"])
    assert t["model"].tolist() == ["m1", "m2"] and t["baseline"].nunique() == 1
    assert read_run(out)["choices"]["oracle"]["score"] == pytest.approx(res.choices["oracle"].score)
    with pytest.raises(PatchCSRAError, match="summary.json"):
        read_run(tmp_path)


# ----------------------------------------------------------------------------- transforms
def test_transform_resolution():
    import timm
    import torchvision

    m = timm.create_model("resnet10t", pretrained=False)
    t = resolve_transform(m)
    assert t.input_size == (3, 224, 224) and t.crop_pct == 0.95 and t.interpolation == "bicubic"
    assert t.resize_size == 235 and "timm" in t.source
    assert resolve_transform(m, img_size=448).input_size == (3, 448, 448)
    tv = torchvision.models.resnet18()
    tv.patchcsra_source = {"spec": "torchvision:resnet18", "weights": None}
    s = resolve_transform(tv)
    assert (s.resize_size, s.input_size[1], s.interpolation) == (256, 224, "bilinear")
    with pytest.raises(PatchCSRAError, match="--input-size, --mean, --std"):
        resolve_transform(torch.nn.Linear(2, 2))
    own = resolve_transform(torch.nn.Linear(2, 2), input_size=(3, 32, 32), mean=(0.5,), std=(0.5,))
    assert own.mean == (0.5, 0.5, 0.5) and own.crop_pct == 1.0
    x = own.build()(Image.new("RGB", (40, 50), (255, 0, 0)))
    assert x.shape == (3, 32, 32) and float(x[0].mean()) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- CLI end to end
@pytest.fixture(scope="module")
def voc_model_file(tmp_path_factory):
    """A small timm model with 20 outputs, saved as a state dict, so the CLI and the test use one model."""
    model = _tiny_model(20)
    path = tmp_path_factory.mktemp("w") / "resnet10t-voc.pth"
    torch.save(model.state_dict(), path)
    return path, model


def _independent_scores(model, voc_root: Path, split: str, img_size: int = 64):
    """Scores and labels computed here from the files, with torchvision transforms and sklearn only."""
    from torchvision import transforms as T

    main = voc_root / "ImageSets" / "Main"
    ids = [ln.split()[0] for ln in (main / f"{split}.txt").read_text().split("\n") if ln.strip()]
    targets = np.zeros((len(ids), 20), np.int8)
    pos = {i: k for k, i in enumerate(ids)}
    for j, c in enumerate(VOC_CLASSES):
        for ln in (main / f"{c}_{split}.txt").read_text().split("\n"):
            if ln.strip():
                i, v = ln.split()
                targets[pos[i], j] = {"1": 1, "-1": 0, "0": -1}[v]
    tf = T.Compose([T.Resize(int(img_size / 0.95), interpolation=T.InterpolationMode.BICUBIC),
                    T.CenterCrop(img_size), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    base, mx = [], []
    with torch.no_grad():
        for k in range(0, len(ids), 64):
            x = torch.stack([tf(Image.open(voc_root / "JPEGImages" / f"{i}.jpg").convert("RGB"))
                             for i in ids[k:k + 64]])
            f = model.forward_features(x)                                   # (B, 512, h, w)
            s = torch.einsum("bdhw,cd->bchw", f, model.fc.weight) + model.fc.bias[None, :, None, None]
            base.append(model(x))
            mx.append(s.flatten(2).amax(-1))
    return torch.cat(base).numpy().astype(np.float64), torch.cat(mx).numpy().astype(np.float64), targets


def _map(scores, targets):
    aps = [average_precision_score(targets[targets[:, j] >= 0, j] == 1, scores[targets[:, j] >= 0, j])
           for j in range(targets.shape[1]) if (targets[:, j] == 1).any()]
    return 100 * float(np.mean(aps))


def test_cli_sweep_on_shared_voc_matches_independent_computation(voc_model_file, tmp_path):
    voc = shared_path("data", "voc2007-trainval-rf", "VOCdevkit")
    path, model = voc_model_file
    out = tmp_path / "run"
    args = ["sweep-lambda", str(path), "--arch", "timm:resnet10t", "--data", str(voc), "--split", "val",
            "--img-size", "64", "--lams", "0,0.02,0.2,1", "--temperatures", "inf,2", "--out", str(out),
            "--workers", "1", "--batch-size", "64", "--bootstrap", "100", "--folds", "3",
            "--cache-dir", str(tmp_path / "cache")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "Varying" in r.output and "wrote" in r.output
    csv = pd.read_csv(out / "results.csv")
    summ = json.loads((out / "summary.json").read_text())
    base, mx, targets = _independent_scores(model, voc / "VOC2007", "val")
    assert summ["images"]["scored"] == 1450 and summ["dataset"]["split"] == "val"
    assert summ["transform"]["input_size"] == [3, 64, 64] and summ["transform"]["resize_size"] == 67
    for lam in (0.0, 0.02, 0.2, 1.0):
        row = csv[(csv.lam == lam) & np.isinf(csv.temperature)].iloc[0]
        assert row["mAP"] == pytest.approx(_map(base + lam * mx, targets), abs=2e-3), lam
    # OP/OR at threshold 0.5 on sigmoid scores, computed here
    keep = targets >= 0
    pred = (base + 0.2 * mx) >= 0
    tp = (pred & (targets == 1) & keep).sum()
    row = csv[(csv.lam == 0.2) & np.isinf(csv.temperature)].iloc[0]
    if (pred & keep).sum():
        assert row["OP"] == pytest.approx(100 * tp / (pred & keep).sum(), abs=1e-3)
    assert row["OR"] == pytest.approx(100 * tp / ((targets == 1) & keep).sum(), abs=1e-3)
    assert summ["baseline"]["mAP"] == pytest.approx(_map(base, targets), abs=2e-3)
    assert summ["choices"]["fixed"]["lam"] == 0.02  # ResNet family
    # a second sweep with another grid: zero forward passes
    r2 = runner.invoke(app, args[:-2] + ["--cache-dir", str(tmp_path / "cache"), "--lams", "0.1,0.5",
                                          "--out", str(tmp_path / "run2")])
    assert r2.exit_code == 0, r2.output
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["collect"]["forward_images"] == 0
    # merge both runs into one table
    r3 = runner.invoke(app, ["report", str(out), str(tmp_path / "run2"), "--out", str(tmp_path / "merged")])
    assert r3.exit_code == 0, r3.output
    assert len(pd.read_csv(tmp_path / "merged" / "table.csv")) == 2


def test_cli_sweep_on_voc_mini_xml_lists_classes_without_positives(voc_model_file, tmp_path):
    voc = shared_path("data", "voc2007-mini", "VOCdevkit")
    path, _ = voc_model_file
    r = runner.invoke(app, ["sweep-lambda", str(path), "--arch", "timm:resnet10t", "--data", str(voc),
                            "--split", "trainval", "--img-size", "64", "--out", str(tmp_path / "r"), "--workers", "0",
                            "--bootstrap", "20", "--no-cache"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert "aeroplane" in s["classes"]["without_positives"] and "car" not in s["classes"]["without_positives"]
    assert len(pd.read_csv(tmp_path / "r" / "results.csv")) == len(DEFAULT_LAMS)


@pytest.mark.parametrize("extra, message", [
    (["--lams", "0,-1"], "invalid"),
    (["--lams", "0,abc"], "not a number"),
    (["--temperatures", "0"], "invalid"),
    (["--data-format", "parquet"], "parquet"),
    (["--num-classes", "7"], "7"),
])
def test_cli_sweep_bad_input(voc_model_file, tmp_path, extra, message):
    voc = shared_path("data", "voc2007-mini", "VOCdevkit")
    path, _ = voc_model_file
    out = tmp_path / "r"
    r = runner.invoke(app, ["sweep-lambda", str(path), "--arch", "timm:resnet10t", "--data", str(voc), "--out",
                            str(out), "--no-cache", "--workers", "0", "--img-size", "64"] + extra)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and message in r.output
    assert not out.exists()


def test_cli_refuses_existing_out_and_missing_images(voc_model_file, tmp_path):
    path, _ = voc_model_file
    root = _folder(tmp_path / "data")
    out = tmp_path / "r"
    out.mkdir()
    base = ["sweep-lambda", str(path), "--arch", "timm:resnet10t", "--num-classes", "20", "--data", str(root),
            "--no-cache", "--workers", "0", "--img-size", "64"]
    r = runner.invoke(app, base + ["--out", str(out)])
    assert r.exit_code == 2 and "--force" in r.output
    # dataset of 3 classes vs a 20-output model: a clear error before any compute
    r = runner.invoke(app, base + ["--out", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "3 classes" in r.output and "--class-map" in r.output
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"a": 0, "b": 5, "c": 19}))
    (root / "b" / "001.png").write_bytes(b"\x89PNG broken")
    r = runner.invoke(app, base + ["--out", str(tmp_path / "r3"), "--class-map", str(cmap)])
    assert r.exit_code == 2 and "could not be read" in r.output and "--skip-bad" in r.output
    r = runner.invoke(app, base + ["--out", str(tmp_path / "r3"), "--class-map", str(cmap), "--skip-bad",
                                   "--bootstrap", "0"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "r3" / "summary.json").read_text())
    assert s["images"]["bad"] == 1 and s["model"]["class_index"] == [0, 5, 19] and s["metric"] == "top1"


def test_model_without_config_needs_flags(tmp_path):
    root = _folder(tmp_path / "data")
    m = torch.jit.script(_tiny_model())
    p = tmp_path / "m.pt"
    m.save(str(p))
    r = runner.invoke(app, ["sweep-lambda", str(p), "--data", str(root), "--out", str(tmp_path / "r"), "--no-cache"])
    assert r.exit_code == 2 and "TorchScript archive" in r.output and "--trust" in r.output
    r = runner.invoke(app, ["sweep-lambda", str(p), "--data", str(root), "--out", str(tmp_path / "r"), "--no-cache",
                            "--trust"])
    assert r.exit_code == 2 and "--input-size, --mean, --std" in r.output
    r = runner.invoke(app, ["sweep-lambda", str(p), "--data", str(root), "--out", str(tmp_path / "r"), "--no-cache",
                            "--input-size", "3,64,64", "--mean", "0.5,0.5,0.5", "--std", "0.25", "--workers", "0",
                            "--bootstrap", "0", "--trust"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["transform"]["source"] == "flags"


def test_python_api_sweep_lambda(tmp_path):
    root = _folder(tmp_path / "data")
    run = patchcsra.sweep_lambda(_tiny_model(), root, img_size=64, lams=[0, 0.5], workers=0, bootstrap=10,
                                 folds=2)
    assert run.summary["metric"] == "top1" and len(run.result.frame) == 3  # 0, 0.5 and the fixed 0.02
    run.write(tmp_path / "out")
    assert (tmp_path / "out" / "table.md").exists()


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "patchcsra", "sweep-lambda", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--temperatures" in r.stdout


def test_sweep_on_shared_coco_val_fp32_and_bf16(tmp_path):
    coco = shared_path("data", "coco2017-mini")
    model = _tiny_model(80)
    kw = dict(img_size=64, lams=[0, 0.2], workers=0, bootstrap=0, folds=0, device="cpu")
    run32 = patchcsra.sweep_lambda(model, coco, amp="none", **kw)
    run16 = patchcsra.sweep_lambda(model, coco, amp="bf16", **kw)
    s = run32.summary
    assert s["dataset"]["split"] == "val2017" and s["images"]["scored"] == 158 and len(s["classes"]["names"]) == 80
    assert s["classes"]["without_positives"] == []  # every category appears in the mini val set
    assert run16.summary["collect"]["amp"] == "bfloat16" and s["collect"]["amp"] == "none"
    assert abs(run16.result.baseline["mAP"] - run32.result.baseline["mAP"]) < 2.0
    assert not np.allclose(run16.stats.base.numpy(), run32.stats.base.numpy())  # bf16 really ran


def test_cli_report_bad_dir(tmp_path):
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "summary.json" in r.output


def test_img_size_resizes_a_vit_and_its_transform(tmp_path):
    root = _folder(tmp_path / "data")
    prep = patchcsra.prepare("timm:vit_tiny_patch16_224", root, img_size=96, class_map={"a": 0, "b": 1, "c": 2},
                             load_kwargs={"pretrained": False})
    assert prep.transform.input_size == (3, 96, 96) and prep.patched.info.num_locations == 36
    assert prep.fixed_lam == 0.2 and prep.class_index == [0, 1, 2]
    x, _, ok = prep.dataset[0]
    assert ok and x.shape == (3, 96, 96)
    with torch.no_grad():
        assert prep.patched(x[None]).shape == (1, 1000)
