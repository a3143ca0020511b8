"""Hardening promises 3 and 5.

3. Nothing is half-written: a real process is killed with SIGKILL while it collects (mid-batch, and while
   a stats-cache part is being written), while it writes a run directory, a patched model over an existing
   one (``--force``) and a train-head checkpoint. Afterwards the previous outputs are byte-identical, no
   final name holds a partial file (temporaries only under hidden names, which nothing reads), and the
   re-run (``--force`` reusing the stats cache, or ``--resume``) gives what an uninterrupted run gives.
5. CUDA out of memory during collection: the batch is retried at half the size (warning logged, recorded in
   the stats meta, a ``note:`` from the CLI), tested on the CPU by injecting ``torch.OutOfMemoryError``.

The killed runs go through ``_DRIVER``: it replaces one function (``torch.save``, ``torch.jit.save``,
``ImageDataset.__getitem__``, ``report.plot_curve``, ``shutil.rmtree``) by one that, on its k-th call,
records the hashes of the watched folder, writes half of its file (where it writes one), and sends
SIGKILL to its own process; then it runs the real CLI.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import patchcsra
from patchcsra.api import prepare
from patchcsra.cli import app
from patchcsra.data import open_dataset
from patchcsra.errors import PatchCSRAError
from patchcsra.report import read_run
from patchcsra.stats import collect

from conftest import HERE, REPO, image_folder

runner = CliRunner()
N_CLASSES, PER_CLASS = 10, 2  # 20 images of 32x32
MODEL = ["--arch", "custom_nets:resnet20", "--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", "0.25"]
SWEEP = ["--split", "train", "--workers", "0", "--device", "cpu", "--bootstrap", "0", "--folds", "2", "-b", "4",
         "--lams", "0,0.1,0.5", "--temperatures", "inf,1"]

_DRIVER = r'''
import functools, hashlib, json, os, signal, sys
from pathlib import Path

spec = json.loads(os.environ["PATCHCSRA_KILL_SPEC"])
sys.path[:0] = spec["sys_path"]
import torch

torch.set_num_threads(spec["threads"])
calls = [0]


def snapshot():
    d = spec.get("snapshot")
    if d:
        files = {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(d).rglob("*")
                 if p.is_file() and not any(s.startswith(".") for s in p.relative_to(d).parts)}
        Path(spec["snapshot_out"]).write_text(json.dumps(files))


def hit(path):
    if spec.get("match", "") not in str(path):
        return False
    calls[0] += 1
    return calls[0] == spec["k"]


def die(half=None):
    if half is not None:  # what dying in the middle of a write leaves: the first half of the bytes
        p = Path(half)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


target = spec["target"]
if target in ("torch.save", "torch.jit.save"):
    owner = torch if target == "torch.save" else torch.jit
    real_save = owner.save

    def save(obj, f, *a, **kw):
        if not hit(f):
            return real_save(obj, f, *a, **kw)
        snapshot()
        real_save(obj, f, *a, **kw)
        die(half=f)

    owner.save = save
elif target == "getitem":
    from patchcsra.data.base import ImageDataset

    real_get = ImageDataset.__getitem__

    def getitem(self, i):
        if hit(""):
            snapshot()
            die()
        return real_get(self, i)

    ImageDataset.__getitem__ = getitem
elif target == "signal":  # Ctrl-C / a scheduler's SIGTERM while the k-th image loads
    from patchcsra.data.base import ImageDataset

    real_get = ImageDataset.__getitem__

    def getitem(self, i):
        if hit(""):
            os.kill(os.getpid(), getattr(signal, spec["signal"]))
        return real_get(self, i)

    ImageDataset.__getitem__ = getitem
elif target == "barrier":  # two processes reach the final write together: only the name claim can decide
    import time
    import patchcsra.report as R

    real_write = R.write_run

    def write_run(*a, **kw):
        d = Path(spec["barrier"])
        d.mkdir(exist_ok=True)
        (d / str(os.getpid())).touch()
        t0 = time.time()
        while len(list(d.iterdir())) < 2 and time.time() - t0 < 120:
            time.sleep(0.02)
        return real_write(*a, **kw)

    R.write_run = write_run
elif target == "plot_curve":
    import patchcsra.report as R

    real_plot = R.plot_curve

    def plot(frame, summary, path, *args, **kwargs):
        snapshot()
        real_plot(frame, summary, path, *args, **kwargs)
        die(half=path)

    R.plot_curve = plot
    import patchcsra.plot_worker as W  # the CLI draws the curve in a worker process: the kill lands the same

    real_submit = W.PlotWorker.submit

    def submit(self, frame, summary, path, *args, **kwargs):
        snapshot()
        wait = real_submit(self, frame, summary, path, *args, **kwargs)

        def killed():
            wait()
            die(half=path)
        return killed

    W.PlotWorker.submit = submit
elif target == "rmtree":
    import shutil

    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **kw):
        if hit(path):
            snapshot()
            die()
        return real_rmtree(path, *a, **kw)

    shutil.rmtree = rmtree
if spec.get("save_every"):  # the CLI has no flag for it: parts of a few images, so a kill lands between parts
    import patchcsra.api, patchcsra.stats

    patchcsra.api.collect = functools.partial(patchcsra.stats.collect, save_every=spec["save_every"])
from patchcsra.cli import app

app(spec["argv"], prog_name="patchcsra")
raise SystemExit("the kill point was never reached")
'''


# ----------------------------------------------------------------------------- helpers
def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tree(d: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of the files under ``d`` that are not under a hidden name."""
    return {str(p.relative_to(d)): _sha(p) for p in sorted(d.rglob("*"))
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(d).parts)}


def _visible(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))


def _hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def _kill(tmp: Path, argv: list[str], target: str, k: int = 1, match: str = "", snapshot: Path | None = None,
          save_every: int | None = None) -> dict[str, str] | None:
    """Run the CLI with ``argv`` in a child killed at the ``k``-th ``target`` call; the watched hashes then."""
    driver = tmp / "kill_driver.py"
    driver.write_text(_DRIVER)
    snap = tmp / f"snapshot-{target}.json"
    spec = {"argv": [str(a) for a in argv], "target": target, "k": k, "match": match,
            "snapshot": None if snapshot is None else str(snapshot), "snapshot_out": str(snap),
            "save_every": save_every, "threads": torch.get_num_threads(),
            "sys_path": [str(HERE), str(REPO / "benchmarks"), str(REPO)]}
    env = {**os.environ, "PATCHCSRA_KILL_SPEC": json.dumps(spec), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(driver)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == -signal.SIGKILL, f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return json.loads(snap.read_text()) if snapshot is not None else None


def _driver(tmp: Path, argv: list, target: str, **extra) -> tuple[list[str], dict]:
    """The command line and environment that run the CLI under ``_DRIVER`` (``target``: what it hooks)."""
    driver = tmp / "kill_driver.py"
    driver.write_text(_DRIVER)
    spec = {"argv": [str(a) for a in argv], "target": target, "k": 1, "match": "", "snapshot": None,
            "threads": torch.get_num_threads(), "sys_path": [str(HERE), str(REPO / "benchmarks"), str(REPO)],
            **extra}
    return [sys.executable, str(driver)], {**os.environ, "PATCHCSRA_KILL_SPEC": json.dumps(spec),
                                           "PYTHONPATH": str(REPO)}


def _invoke(args: list) -> None:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An ImageFolder (``train/c0..c9``, 20 PNGs), a CIFAR ResNet-20 state dict, and an uninterrupted sweep."""
    import custom_nets

    tmp = tmp_path_factory.mktemp("interrupts")
    image_folder(tmp / "data", N_CLASSES, PER_CLASS)
    torch.manual_seed(0)
    model = custom_nets.resnet20().eval()
    src = tmp / "r20.pt"
    torch.save(model.state_dict(), src)
    sweep = ["sweep-lambda", src, *MODEL, "--data", tmp / "data", *SWEEP]
    _invoke(sweep + ["--no-cache", "--out", tmp / "ref"])
    _invoke(sweep + ["--no-cache", "--out", tmp / "old", "--lams", "0,0.2"])  # a previous, different output
    assert _sha(tmp / "ref" / "results.csv") != _sha(tmp / "old" / "results.csv")
    return {"tmp": tmp, "src": src, "model": model, "sweep": sweep, "ref": tmp / "ref", "old": tmp / "old"}


def _previous_run(world, out: Path) -> dict[str, str]:
    """``out`` as a copy of the previous run; its hashes."""
    import shutil

    shutil.copytree(world["old"], out)
    return _tree(out)


# ----------------------------------------------------------------------------- 3: SIGKILL
@pytest.mark.parametrize("target,k,match,kept", [
    ("getitem", 14, "", 3),  # mid-batch: images 12, 13 of the batch 12..15 loaded; parts 0-4, 4-8, 8-12 saved
    ("torch.save", 2, "part-", 1),  # while writing part 4-8: its temporary file is half written
], ids=["mid-batch", "writing-a-part"])
def test_sigkill_during_collection_then_force_rerun_resumes(world, tmp_path, target, k, match, kept):
    cache, out = tmp_path / "cache", tmp_path / "out"
    before = _previous_run(world, out)
    argv = world["sweep"] + ["--cache-dir", cache, "--out", out, "--force"]
    snap = _kill(tmp_path, argv, target, k, match, snapshot=cache, save_every=4)
    assert _tree(out) == before and _visible(tmp_path).count("out") == 1  # the previous run is untouched
    [entry] = list(cache.iterdir())
    assert _tree(cache) == snap  # every cache file with a final name is as it was before the kill
    parts = sorted(p.name for p in entry.glob("part-*.pt"))
    assert parts == [f"part-{4 * i:09d}-{4 * i + 4:09d}.pt" for i in range(kept)]
    for p in entry.glob("part-*.pt"):  # complete: each loads, with its 4 rows
        assert torch.load(p, weights_only=True)["base"].shape == (4, N_CLASSES)
    temps = _hidden(entry)
    assert len(temps) == (1 if target == "torch.save" else 0)  # the half-written temporary: hidden, never read
    assert all(".tmp." in t for t in temps)
    assert not json.loads((entry / "meta.json").read_text())["complete"]

    _invoke(argv)  # the re-run: resumes from the saved parts
    s = json.loads((out / "summary.json").read_text())
    assert s["collect"]["forward_images"] == N_CLASSES * PER_CLASS - 4 * kept
    assert _sha(out / "results.csv") == _sha(world["ref"] / "results.csv")
    assert _sha(out / "per_class.csv") == _sha(world["ref"] / "per_class.csv")
    assert json.loads((entry / "meta.json").read_text())["complete"]
    assert _hidden(entry) == [] and _hidden(tmp_path) == []  # the killed process's temporaries are gone


@pytest.mark.parametrize("target,match", [
    ("plot_curve", ""),  # filling the new run: results.csv, per_class.csv ... written, curve.png half written
    ("rmtree", "/.out."),  # between swapping the new run into place and deleting the old one
], ids=["filling", "swapping"])
def test_sigkill_while_writing_the_run_directory(world, tmp_path, target, match):
    out = tmp_path / "out"
    before = _previous_run(world, out)
    new = _tree(world["ref"])
    argv = world["sweep"] + ["--no-cache", "--out", out, "--force"]
    _kill(tmp_path, argv, target, 1, match)
    after = _tree(out)
    drop = {"summary.json", "table.md", "table.tex", "curve.png"}  # times and the date differ between runs
    if target == "plot_curve":
        assert after == before
    else:  # one complete run or the other, never a mix
        assert after == before or {k: v for k, v in after.items() if k not in drop} == {
            k: v for k, v in new.items() if k not in drop} and set(after) == set(new)
    assert _visible(tmp_path) == ["kill_driver.py", "out"]  # leftovers only under hidden names
    assert len(_hidden(tmp_path)) == 1 and _hidden(out) == []
    json.loads((out / "summary.json").read_text())  # complete

    _invoke(argv)
    assert _sha(out / "results.csv") == _sha(world["ref"] / "results.csv")
    assert set(_tree(out)) == set(new) and _hidden(tmp_path) == []
    assert read_run(out)["metric"] == "top1"


def test_sigkill_while_patching_over_an_existing_file(world, tmp_path):
    out, fresh = tmp_path / "p.pt", tmp_path / "fresh.pt"
    patch = ["patch", world["src"], "--arch", "custom_nets:resnet20", "--input-size", "3,32,32"]
    _invoke(patch + ["--lam", "0.1", "-o", out])
    before = _sha(out)
    _kill(tmp_path, patch + ["--lam", "0.3", "-o", out, "--force"], "torch.jit.save")
    assert _sha(out) == before  # the old model, whole
    assert _visible(tmp_path) == ["kill_driver.py", "p.pt"] and len(_hidden(tmp_path)) == 1
    assert patchcsra.load(out, trust=True).patchcsra_meta["lam"] == 0.1

    _invoke(patch + ["--lam", "0.3", "-o", out, "--force"])
    assert _hidden(tmp_path) == []
    _invoke(patch + ["--lam", "0.3", "-o", fresh])
    x = torch.randn(3, 3, 32, 32)
    a, b = torch.jit.load(str(out)), torch.jit.load(str(fresh))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert patchcsra.load(out, trust=True).patchcsra_meta["lam"] == 0.3


def test_sigkill_while_writing_a_train_checkpoint_then_resume(world, tmp_path):
    train = ["train-head", world["src"], *MODEL, "--data", world["tmp"] / "data", "--split", "train", "--epochs", "2",
             "-b", "8", "--heads", "2", "--workers", "0", "--device", "cpu"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    _invoke(train + ["--out", ref])
    snap = _kill(tmp_path, train + ["--out", out], "torch.save", 2, "checkpoint", snapshot=out)
    assert _tree(out) == snap  # checkpoint, features, history and curve of epoch 1, as they were
    assert sorted(snap) == ["checkpoint.pt", "curve.png", "features.pt", "history.csv"]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert len(pd.read_csv(out / "history.csv")) == 1
    assert len(_hidden(out)) == 1  # the half-written checkpoint: hidden

    _invoke(train + ["--out", out, "--resume"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert {k: v for k, v in sa.items() if k != "feature_seconds"} == {k: v for k, v in sb.items()
                                                                     if k != "feature_seconds"}
    timing = ["seconds", "images_per_s"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "history.csv").drop(columns=timing),
                                  pd.read_csv(ref / "history.csv").drop(columns=timing))
    a = torch.load(out / "checkpoint.pt", weights_only=False)
    b = torch.load(ref / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["best"]["epoch"] == b["best"]["epoch"] and _hidden(out) == []
    for k, v in b["trainable"].items():
        assert torch.equal(a["trainable"][k], v), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(torch.jit.load(str(out / "model.pt"))(x), torch.jit.load(str(ref / "model.pt"))(x))


# ----------------------------------------------------------------------------- 5: out of memory
@pytest.fixture(scope="module")
def collected(world):
    """The dataset with its transform, the patched model, and a pass without failures (batch size 8)."""
    ds = open_dataset(world["tmp"] / "data", split="train")
    prep = prepare(world["model"], ds, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    full = collect(prep.patched, ds, temperatures=[1.0], batch_size=8, device="cpu", workers=0)
    assert full.meta["batch_size"] == 8 and full.meta["oom_retries"] == 0
    return ds, prep.patched, full


def _inject_oom(monkeypatch, patched, above: int) -> list[int]:
    """``forward_features`` raises CUDA out of memory for batches of more than ``above`` images."""
    real, sizes = patched.split.forward_features, []

    def forward_features(x):
        sizes.append(int(x.shape[0]))
        if x.shape[0] > above:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(x)

    monkeypatch.setattr(patched.split, "forward_features", forward_features)
    return sizes


def test_oom_retries_with_half_the_batch_and_keeps_it(collected, monkeypatch, caplog, tmp_path):
    ds, patched, full = collected
    sizes = _inject_oom(monkeypatch, patched, above=3)
    with caplog.at_level(logging.WARNING, logger="patchcsra.stats"):
        st = collect(patched, ds, temperatures=[1.0], batch_size=8, device="cpu", workers=0, cache_dir=tmp_path,
                     save_every=8)
    assert sizes[:3] == [8, 4, 2] and set(sizes[3:]) == {2}  # halved twice, then 2 for the rest of the pass
    assert sum(sizes[2:]) == len(ds)
    assert st.meta["batch_size"] == 2 and st.meta["oom_retries"] == 2
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert msgs == ["out of memory at batch size 8; retrying with 4", "out of memory at batch size 4; retrying with 2"]
    for k in ("base", "max", "att"):  # batch sizes 2 and 8 run other CPU kernels: equal within float32 round-off
        torch.testing.assert_close(getattr(st, k), getattr(full, k), rtol=1.3e-6, atol=1e-5)
    assert (st.ok == full.ok).all() and st.temperatures == full.temperatures
    again = collect(patched, ds, temperatures=[1.0], batch_size=8, device="cpu", workers=0, cache_dir=tmp_path)
    assert again.meta["forward_images"] == 0  # the parts were cached whole: the very bytes of the retried pass
    for k in ("base", "max", "att"):
        assert torch.equal(getattr(again, k), getattr(st, k)), k


def test_oom_at_batch_size_one_is_one_clear_error(collected, monkeypatch):
    ds, patched, _ = collected
    sizes = _inject_oom(monkeypatch, patched, above=0)
    with pytest.raises(PatchCSRAError, match=r"out of memory even at batch size 1 .*--img-size .*--amp bf16") as e:
        collect(patched, ds, batch_size=5, device="cpu", workers=0)
    assert sizes == [5, 2, 1] and "\n" not in str(e.value)


def test_other_errors_are_not_retried(collected, monkeypatch):
    ds, patched, _ = collected
    calls = []

    def broken(x):
        calls.append(x.shape[0])
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(patched.split, "forward_features", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        collect(patched, ds, batch_size=8, device="cpu", workers=0)
    assert calls == [8]


def test_cli_says_when_it_retried(world, monkeypatch, tmp_path):
    import patchcsra.api as api

    real_patch = api.patch

    def patch_with_small_memory(*a, **kw):
        p = real_patch(*a, **kw)
        _inject_oom(monkeypatch, p, above=2)
        return p

    monkeypatch.setattr(api, "patch", patch_with_small_memory)
    r = runner.invoke(app, [str(a) for a in world["sweep"] + ["--no-cache", "--out", tmp_path / "o"]])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert "note: CUDA ran out of memory 1 time(s) at batch size 4; collected at batch size 2" in said
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["collect"]["batch_size"] == 2 and s["collect"]["oom_retries"] == 1
    # collected at batch size 2 instead of 4 (other CPU kernels): the same metrics within float32 round-off
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "o" / "results.csv"),
                                  pd.read_csv(world["ref"] / "results.csv"), check_exact=False, rtol=1e-5)


# ----------------------------------------------------------------------------- Ctrl-C, SIGTERM, two runs at once
@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_sweep_says_what_was_saved_and_resumes(world, tmp_path, sig, code):
    cache = tmp_path / "cache"
    argv = world["sweep"] + ["--cache-dir", cache, "--out", tmp_path / "out"]
    cmd, env = _driver(tmp_path, argv, "signal", k=14, signal=sig, save_every=4)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == code, f"rc={r.returncode}\n{r.stderr[-3000:]}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), r.stderr
    said = " ".join(r.stderr.split())
    assert str(cache) in said and "run the same command again to resume" in said and "Traceback" not in said
    assert not (tmp_path / "out").exists()
    _invoke(argv)  # the same command: resumes from the saved parts
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert 0 < s["collect"]["forward_images"] < N_CLASSES * PER_CLASS
    for f in ("results.csv", "per_class.csv"):
        assert _sha(tmp_path / "out" / f) == _sha(world["ref"] / f), f


def test_two_processes_into_one_new_out_one_wins_the_other_says_so(world, tmp_path):
    out = tmp_path / "out"
    argv = world["sweep"] + ["--no-cache", "--out", out]
    cmd, env = _driver(tmp_path, argv, "barrier", barrier=str(tmp_path / "barrier"))
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    _, _, lost = next(r for r in results if r[0] == 2)
    lines = [ln for ln in lost.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(out.name) in lines[0], lost
    assert "Traceback" not in lost
    for f in ("results.csv", "per_class.csv"):  # the winner's run is whole
        assert _sha(out / f) == _sha(world["ref"] / f), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
