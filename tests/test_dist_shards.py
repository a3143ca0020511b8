"""torchrun with a stats cache (issue 19 §4): each rank writes its own shard of the statistics into the cache entry,
no statistics travel through the process group, rank 0 reads the shards back; 1 node x 2 processes and 2 nodes x 1
process (gloo, localhost) give results.csv byte-for-byte equal to one process, and a rank killed mid-pass and
restarted by ``torchrun --max-restarts 1`` resumes at its shard's last saved part. Every torchrun runs through
``conftest.run_bounded``: a hung mesh fails the test after its timeout instead of holding the suite."""
from __future__ import annotations

import json
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from patchcsra.cache import CacheEntry, row_shapes

from conftest import HERE, REPO, run_bounded, shared_path

N = 400  # --limit: a stratified 400 of the 2,000 shared CIFAR-10 test images


def _args(out: Path, cache: Path, arch: str = f"{REPO / 'benchmarks' / 'cifar_resnet.py'}:resnet20") -> list[str]:
    return ["sweep-lambda", str(shared_path("weights", "resnet20-12fca82f.th")), "--arch", arch,
            "--data", str(shared_path("data", "cifar10-test-subset")), "--limit", str(N), "--input-size", "3,32,32",
            "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "-b", "50", "--workers", "0",
            "--bootstrap", "100", "--lams", "0,0.02,0.05,0.2", "--temperatures", "inf,1", "--cache-dir", str(cache),
            "--save-interval", "0.001", "-q", "--out", str(out)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}


def _run(cmd: list[str], **kw):
    r = run_bounded(cmd, cwd=HERE, env=kw.pop("env", _env()), timeout=kw.pop("timeout", 300), **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _torchrun(*extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *extra, "-m", "patchcsra"]


def _entry(cache: Path) -> CacheEntry:
    (d,) = [p for p in cache.iterdir() if p.is_dir()]
    return CacheEntry(d)


def _rows(entry: CacheEntry) -> dict:
    return entry.load(N, row_shapes(10, len(entry.meta()["temperatures"])))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The reference: one process (its own thread count), with a cache."""
    tmp = tmp_path_factory.mktemp("one")
    _run([sys.executable, "-m", "patchcsra", *_args(tmp / "out", tmp / "cache")], env={**_env(), "OMP_NUM_THREADS": "2"})
    return tmp


def test_one_node_two_processes_write_shards_equal_to_one_process(one, tmp_path):
    _run(_torchrun("--standalone", "--nproc-per-node", "2") + _args(tmp_path / "out", tmp_path / "cache"))
    assert (tmp_path / "out" / "results.csv").read_bytes() == (one / "out" / "results.csv").read_bytes()
    entry = _entry(tmp_path / "cache")
    assert entry.shards() == 2 and entry.meta()["complete"] and not entry.parts()  # no gathered copy
    assert sorted(p.name for p in entry.path.glob("shard-*")) == ["shard-w2-r0", "shard-w2-r1"]
    for r in (0, 1):
        sub = CacheEntry(entry.path / f"shard-w2-r{r}")
        assert sub.meta()["n"] == N // 2 and sub.meta()["complete"] and len(sub.parts()) == 4  # 50 images a part
    ours, ref = _rows(entry), _rows(_entry(one / "cache"))
    assert all(torch.equal(ours[k], ref[k]) for k in ref)  # the statistics themselves, byte for byte
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["collect"]["world_size"] == 2 and s["collect"]["forward_images"] == N
    # a single process reads the shards back: no forward pass, the same bytes
    r = _run([sys.executable, "-m", "patchcsra", *_args(tmp_path / "again", tmp_path / "cache")])
    assert "pass: 0 forward" in r.stdout + r.stderr
    assert (tmp_path / "again" / "results.csv").read_bytes() == (one / "out" / "results.csv").read_bytes()
    # a shard that changed on disk is never trusted: the single process computes every image again
    sub = CacheEntry(entry.path / "shard-w2-r1")
    part = sub.parts()[1][2]
    blob = torch.load(part, weights_only=True)
    blob["base"][3, 2] += 1.0  # one logit changed, the stored digest left as it was
    torch.save(blob, part)
    r = _run([sys.executable, "-m", "patchcsra", *[a for a in _args(tmp_path / "third", tmp_path / "cache")
                                                   if a != "-q"]])
    assert f"pass: {N} forward" in r.stdout + r.stderr and "shard-w2-r1" in r.stderr
    assert (tmp_path / "third" / "results.csv").read_bytes() == (one / "out" / "results.csv").read_bytes()


def test_two_nodes_one_process_each_equal_to_one_process(one, tmp_path):
    port = str(_port())
    def node(k: int):
        return run_bounded(_torchrun("--nnodes", "2", "--node-rank", str(k), "--nproc-per-node", "1",
                                     "--master-addr", "127.0.0.1", "--master-port", port)
                           + _args(tmp_path / "out", tmp_path / "cache"), cwd=HERE, env=_env(), timeout=300)

    with ThreadPoolExecutor(2) as pool:
        nodes = list(pool.map(node, (0, 1)))
    assert all(r.returncode == 0 for r in nodes), "\n".join(r.stderr[-2000:] for r in nodes)
    assert (tmp_path / "out" / "results.csv").read_bytes() == (one / "out" / "results.csv").read_bytes()
    entry = _entry(tmp_path / "cache")
    assert entry.shards() == 2
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["collect"]["world_size"] == 2


CRASHING_NET = '''
import os
from cifar_resnet import resnet20

def net():
    m = resnet20()
    rank, attempt = os.environ.get("RANK", "0"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    log, marker = os.path.join(LOGS, f"r{rank}-a{attempt}.txt"), os.path.join(LOGS, "crashed")
    calls = [0]

    def hook(module, args):
        if args[0].shape[0] != 50:  # the probes of head discovery
            return
        calls[0] += 1
        if rank == "1" and calls[0] == 3 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)  # killed after its 2nd batch was saved as a part
        with open(log, "a") as f:
            f.write("50\\n")

    m.conv1.register_forward_pre_hook(hook)
    return m
'''


def test_rank_killed_and_restarted_resumes_from_its_shard(one, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    net = tmp_path / "crashing_net.py"
    net.write_text(f"LOGS = {str(logs)!r}\n" + CRASHING_NET)
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(HERE), str(REPO)])}
    # the restarted ranks must build a fresh mesh (patchcsra.dist._round_store): with torchrun's shared agent
    # store they read the dead ranks' gloo addresses and timed out or hung in 4 of 6 restarts
    r = run_bounded(_torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1")
                    + _args(tmp_path / "out", tmp_path / "cache", arch=f"{net}:net"), cwd=HERE, env=env, timeout=300)
    said = r.stdout + r.stderr
    assert r.returncode == 0, said[-3000:]
    assert (logs / "crashed").exists()
    done = {p.stem: len(p.read_text().split()) * 50 for p in logs.glob("r*-a*.txt")}
    assert done["r1-a0"] == 100  # two batches, then killed
    assert done["r1-a1"] == N // 2 - 100  # the restart resumed at its shard's saved rows
    # rank 0 was stopped by torchrun wherever it was (its counts depend on timing): only the bytes are checked
    assert (tmp_path / "out" / "results.csv").read_bytes() == (one / "out" / "results.csv").read_bytes()


def test_past_the_store_limit_torchrun_ranks_and_rank_0_work_on_disk(one, tmp_path):
    """With ``--store-above 0`` each rank fills row files of its shard and rank 0 the entry's, which become the
    entry's class-major store: results.csv equals one process in RAM byte for byte, no row files stay behind, and
    the next pass (one process or torchrun) opens that store with zero forward passes."""
    disk = ["--store-above", "0"]
    _run(_torchrun("--standalone", "--nproc-per-node", "2") + _args(tmp_path / "out", tmp_path / "cache") + disk)
    assert (tmp_path / "out" / "results.csv").read_bytes() == (one / "out" / "results.csv").read_bytes()
    entry = _entry(tmp_path / "cache")
    assert (entry.path / "store" / "header.json").exists() and entry.shards() == 2
    assert not list(entry.path.rglob("rows.tmp"))
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["collect"]["world_size"] == 2 and s["collect"]["forward_images"] == N
    built = (entry.path / "store" / "header.json").stat().st_mtime_ns
    r = _run([sys.executable, "-m", "patchcsra", *[a for a in _args(tmp_path / "again", tmp_path / "cache")
                                                   if a != "-q"], *disk])
    assert "pass: 0 forward" in r.stdout + r.stderr
    _run(_torchrun("--standalone", "--nproc-per-node", "2") + _args(tmp_path / "third", tmp_path / "cache") + disk)
    for run in ("again", "third"):
        assert (tmp_path / run / "results.csv").read_bytes() == (one / "out" / "results.csv").read_bytes(), run
    assert (entry.path / "store" / "header.json").stat().st_mtime_ns == built  # opened, never rebuilt
    assert json.loads((tmp_path / "third" / "summary.json").read_text())["collect"]["forward_images"] == 0
