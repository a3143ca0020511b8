"""torchrun with 2 gloo processes on CPU: sharded collection gathered on rank 0 equals one process."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from patchcsra import dist
from patchcsra.cli import app

from conftest import HERE, REPO, run_bounded, shared_path

runner = CliRunner()


def _args(out: Path) -> list[str]:
    return ["sweep-lambda", str(shared_path("weights", "resnet20-12fca82f.th")), "--arch", f"{REPO / 'benchmarks' / 'cifar_resnet.py'}:resnet20",
            "--data", str(shared_path("data", "cifar10-test-subset")), "--input-size", "3,32,32",
            "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--no-cache", "-b", "100",
            "--workers", "0", "--bootstrap", "100", "--lams", "0,0.02,0.05,0.2", "--temperatures", "inf,1",
            "--out", str(out)]


def test_single_process_helpers():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.shard(5) == [0, 1, 2, 3, 4]
    assert dist.gather_to_main({"a": 1}) == [{"a": 1}] and dist.broadcast(3) == 3
    assert dist.init_from_env() is False


def test_torchrun_two_gloo_processes_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.chdir(HERE)
    one = runner.invoke(app, _args(tmp_path / "one"))
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    r = run_bounded([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                     "2", "-m", "patchcsra"] + _args(tmp_path / "two"), cwd=HERE, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "summary.json").read_text())
    b = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert b["collect"]["world_size"] == 2 and a["collect"]["world_size"] == 1
    assert b["images"]["scored"] == 2000
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "one" / "results.csv"),
                                  pd.read_csv(tmp_path / "two" / "results.csv"))
    # two shards at one thread each run other CPU kernels than one process: equal within float32 round-off
    for k, ca in a["choices"].items():
        cb = b["choices"][k]
        assert (ca["lam"], ca["temperature"]) == (cb["lam"], cb["temperature"]), k
        assert ca["score"] == pytest.approx(cb["score"], rel=1e-6) and ca["delta"] == pytest.approx(cb["delta"], abs=1e-4)
    assert a["baseline"] == pytest.approx(b["baseline"], rel=1e-6)
    assert (tmp_path / "one" / "table.md").read_text() == (tmp_path / "two" / "table.md").read_text()


def test_round_store_is_none_outside_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert dist._round_store(0) is None


def test_round_store_waits_past_a_dead_rounds_address(monkeypatch):
    """A restarted rank that reads the last round's published store (a live port with the old nonce, or a dead
    port) keeps waiting, and joins only the store rank 0 of its own round publishes."""
    import threading
    import time
    from datetime import timedelta

    import torch.distributed as tdist

    agent = tdist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    old = tdist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    old.set("patchcsra/nonce", "last-round")
    for k, v in {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(agent.port), "TORCHELASTIC_RUN_ID": "t"}.items():
        monkeypatch.setenv(k, v)
    agent.set("patchcsra/round-store/t", f"{old.port} last-round-but-other")  # the old nonce never matches
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(store=dist._round_store(1, timeout=timedelta(seconds=60))))
    t.start()
    time.sleep(1.5)
    assert t.is_alive()  # the stale value is not taken
    mine = dist._round_store(0)
    t.join(30)
    assert not t.is_alive() and mine.port != old.port
    mine.set("k", "this round")
    assert got["store"].get("k") == b"this round"
