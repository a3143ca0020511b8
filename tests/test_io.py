"""patchcsra._io: atomic files and directories, stale temporaries, JSON."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from patchcsra import _io
from patchcsra.errors import OutputError


def test_atomic_path_renames_only_on_success(tmp_path):
    p = tmp_path / "a.txt"
    _io.write_text(p, "one")
    with pytest.raises(RuntimeError):
        with _io.atomic_path(p, force=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "one" and sorted(os.listdir(tmp_path)) == ["a.txt"]  # no temporary left
    with pytest.raises(OutputError, match="exists; pass force=True"):
        _io.write_text(p, "two", force=False)
    with pytest.raises(OutputError, match="folder .* does not exist"):
        _io.write_text(tmp_path / "nope" / "b.txt", "x")
    with pytest.raises(OutputError, match="is a directory"):
        _io.write_text(tmp_path, "x")


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    host = _io.temp_prefix("x").split(".tmp.")[1].rsplit("-", 1)[0]
    stale = tmp_path / f".a.tmp.{host}-{pid}.xyz"
    stale.write_text("left by a killed writer")
    mine = tmp_path / f"{_io.temp_prefix('b')}abc"
    mine.write_text("a live writer's")
    (tmp_path / ".c.tmp.otherhost-1.q").write_text("another host's")
    assert _io.remove_stale_temps(tmp_path) == [stale]
    assert mine.exists() and (tmp_path / ".c.tmp.otherhost-1.q").exists()


def test_write_json_converts_numpy_and_torch_values(tmp_path):
    p = _io.write_json(tmp_path / "r.json", {"a": np.float32(0.5), "b": np.arange(3), "c": torch.tensor(2.0),
                                             "d": math.inf, "e": tmp_path})
    got = json.loads(p.read_text())
    assert got == {"a": 0.5, "b": [0, 1, 2], "c": 2.0, "d": math.inf, "e": str(tmp_path)}
    assert p.read_text().endswith("\n")


def test_atomic_dir_swaps_whole_directories(tmp_path):
    out = tmp_path / "run"

    def fill(tag):
        def f(d):
            (d / "a.txt").write_text(tag)
            (d / f"{tag}.txt").write_text(tag)
        return f

    _io.atomic_dir(out, fill("old"))
    with pytest.raises(OutputError, match="exists; pass --force"):
        _io.atomic_dir(out, fill("new"))
    mine = ("a.txt", "old.txt", "new.txt")
    with pytest.raises(ValueError):
        _io.atomic_dir(out, lambda d: (_ for _ in ()).throw(ValueError("fill failed")), force=True, known=mine)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "old.txt"]  # the old one, whole
    with pytest.raises(OutputError, match="holds files patchcsra did not write"):
        _io.atomic_dir(out, fill("new"), force=True, known=("a.txt",))  # old.txt is not one of its names
    _io.atomic_dir(out, fill("new"), force=True, known=mine)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "new.txt"] and (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_atomic_dir_restores_a_run_moved_aside(tmp_path):
    out, old = tmp_path / "run", tmp_path / ".run.old"
    old.mkdir()
    (old / "a.txt").write_text("kept")  # what a process killed between the two renames leaves
    with pytest.raises(OutputError):
        _io.atomic_dir(out, lambda d: None)
    assert (out / "a.txt").read_text() == "kept" and not old.exists()


def test_a_new_name_taken_meanwhile_is_not_replaced(tmp_path):
    """Two writers of one new name: the second fails with one line instead of replacing the first."""
    out = tmp_path / "run"

    def fill_while_another_wins(d):
        (d / "x.txt").write_text("mine")
        out.mkdir()
        (out / "x.txt").write_text("theirs")  # the other process finished first

    with pytest.raises(OutputError, match="created by another process meanwhile"):
        _io.atomic_dir(out, fill_while_another_wins)
    assert (out / "x.txt").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    f = tmp_path / "f.txt"
    with pytest.raises(OutputError, match="created by another process meanwhile"):
        with _io.atomic_path(f) as tmp:
            tmp.write_text("mine")
            f.write_text("theirs")
    assert f.read_text() == "theirs"


def test_force_replaces_regular_files_only(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        _io.write_text(fifo, "x", force=True)
    assert fifo.is_fifo()
    link = tmp_path / "link"
    (tmp_path / "real").mkdir()
    link.symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="symbolic link"):
        _io.atomic_dir(link, lambda d: None, force=True)


def test_names_too_long_for_the_file_system_are_refused_up_front(tmp_path):
    with pytest.raises(OutputError, match="choose a shorter name"):
        _io.check_name(tmp_path / ("x" * 240))
    _io.check_name(tmp_path / "fine")


def test_a_torch_write_failure_becomes_one_os_error(tmp_path, monkeypatch):
    def broken(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError) as e:
        _io.torch_save({"x": 1}, tmp_path / "t.pt")
    msg = _io.describe_os_error(e.value)
    assert "t.pt" in msg and "unexpected pos" in msg and "\n" not in msg
    assert sorted(os.listdir(tmp_path)) == []


def test_torch_save_is_atomic(tmp_path):
    p = _io.torch_save({"x": torch.ones(2)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(p, weights_only=True)["x"], torch.ones(2))
