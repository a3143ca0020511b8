"""Hardening promise 8: the file system can fail, and --force replaces only what patchcsra wrote.

Each case runs the real CLI: one line on stderr, exit 2, the previous outputs intact, nothing half-written.
The full-disk cases mount a tiny tmpfs and are skipped (with the reason) where the tests cannot mount one.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from patchcsra.cli import app

runner = CliRunner()
MODEL = ["--arch", "custom_nets:resnet20", "--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", "0.25"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import custom_nets

    tmp = tmp_path_factory.mktemp("fs")
    for c in ("a", "b"):
        (tmp / "data" / "train" / c).mkdir(parents=True)
        for j in range(4):
            Image.fromarray(np.full((32, 32, 3), 40 * j + (60 if c == "b" else 0), np.uint8)).save(
                tmp / "data" / "train" / c / f"{j}.png")
    torch.manual_seed(0)
    src = tmp / "r20.pt"
    torch.save(custom_nets.resnet20(num_classes=2).state_dict(), src)
    sweep = ["sweep-lambda", str(src), *MODEL, "--num-classes", "2", "--data", str(tmp / "data"), "--split", "train",
             "--workers", "0", "--device", "cpu", "--bootstrap", "0", "--folds", "0", "--no-cache"]
    patch = ["patch", str(src), *MODEL[:4], "--num-classes", "2"]
    return {"tmp": tmp, "src": src, "sweep": sweep, "patch": patch}


def _one_line_exit_2(r, *needles):
    assert r.exit_code == 2, r.output
    said = " ".join(r.output.split())
    assert "Traceback" not in r.output and said.startswith("error:"), r.output
    for n in needles:
        assert n in said, (n, said)


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


# ----------------------------------------------------------------------------- --force replaces only our own
def test_force_never_replaces_a_users_folder(world, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a year of notes")
    r = runner.invoke(app, world["sweep"] + ["--out", str(mine), "--force"])
    _one_line_exit_2(r, str(mine), "notes.txt", "did not write")
    assert (mine / "notes.txt").read_text() == "a year of notes"
    run = tmp_path / "run"
    assert runner.invoke(app, world["sweep"] + ["--out", str(run)]).exit_code == 0
    assert runner.invoke(app, world["sweep"] + ["--out", str(run), "--force"]).exit_code == 0  # its own: fine


def test_force_never_turns_a_device_or_fifo_into_a_file(world, tmp_path):
    fifo = tmp_path / "p.pt"
    os.mkfifo(fifo)
    r = runner.invoke(app, world["patch"] + ["-o", str(fifo), "--force"])
    _one_line_exit_2(r, "not a regular file")
    assert fifo.is_fifo()


def test_train_head_force_on_a_symlink_is_one_line(world, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    r = runner.invoke(app, ["train-head", str(world["src"]), *MODEL, "--num-classes", "2", "--data",
                            str(world["tmp"] / "data"), "--epochs", "1", "--workers", "0", "--device", "cpu",
                            "--out", str(link), "--force"])
    _one_line_exit_2(r, "symbolic link")
    assert real.is_dir() and link.is_symlink()


@pytest.mark.parametrize("out", [".", "..", "x" * 250], ids=["dot", "dotdot", "long-name"])
def test_outputs_that_cannot_work_are_refused_before_the_pass(world, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, world["sweep"] + ["--out", out, "--force"])
    _one_line_exit_2(r, "--out" if out in (".", "..") else "shorter name")
    assert "forward" not in r.output  # no pass ran


# ----------------------------------------------------------------------------- a cache that cannot be used
@pytest.mark.parametrize("kind", ["a-file", "read-only"])
def test_an_unusable_cache_warns_once_and_the_run_goes_on(world, tmp_path, kind, caplog):
    cache = tmp_path / "cache"
    if kind == "a-file":
        cache.write_text("not a folder")
    else:
        cache.mkdir()
        cache.chmod(0o555)
        if os.access(cache, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable here")
    ref = tmp_path / "ref"
    assert runner.invoke(app, world["sweep"] + ["--out", str(ref)]).exit_code == 0
    args = [a for a in world["sweep"] if a != "--no-cache"] + ["--cache-dir", str(cache), "--out", str(tmp_path / "o")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "results.csv").read_bytes() == (ref / "results.csv").read_bytes()


# ----------------------------------------------------------------------------- a full disk
@pytest.fixture
def full_disk(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]}): full-disk cases need root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _fill(mnt: Path) -> None:
    """Fill the tmpfs to the last byte."""
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)


def test_patch_onto_a_full_disk_is_one_line_not_an_abort(world, full_disk):
    _fill(full_disk)
    for suffix in (".pt", ".pt2"):
        argv = [sys.executable, "-m", "patchcsra", *world["patch"], "-o", str(full_disk / f"m{suffix}")]
        r = subprocess.run(argv, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(_paths())})
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert "No space left on device" in r.stderr and "ENOSPC" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_a_full_disk_under_out_keeps_the_old_run_whole(world, full_disk):
    run = full_disk / "run"
    assert runner.invoke(app, world["sweep"] + ["--out", str(run)]).exit_code == 0
    before = _tree(run)
    _fill(full_disk)
    r = runner.invoke(app, world["sweep"] + ["--out", str(run), "--force"])
    _one_line_exit_2(r, str(run), "ENOSPC")
    assert _tree(run) == before and sorted(p.name for p in full_disk.iterdir()) == ["filler", "run"]


def test_a_full_disk_under_the_cache_only_costs_the_cache(world, full_disk, tmp_path):
    ref = tmp_path / "ref"
    assert runner.invoke(app, world["sweep"] + ["--out", str(ref)]).exit_code == 0
    _fill(full_disk)
    args = [a for a in world["sweep"] if a != "--no-cache"] + ["--cache-dir", str(full_disk / "cache"),
                                                               "--out", str(tmp_path / "o")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "results.csv").read_bytes() == (ref / "results.csv").read_bytes()


def _paths() -> list[str]:
    from conftest import HERE, REPO

    return [str(HERE), str(REPO / "benchmarks"), str(REPO)]
