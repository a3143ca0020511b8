"""Memory of a ``torchrun`` pass with the statistics in RAM against past the store limit (issue 19 §3-§4).

``python benchmarks/dist_store.py`` starts ``torchrun --standalone --nproc-per-node W`` twice on the same synthetic
problem (images generated in ``__getitem__``, a small GAP + Linear CNN with ``--classes`` outputs and 8x8
locations, a stats cache in a temporary folder): once with the statistics in RAM (``store_above`` above their
size) and once past the store limit (``store_above=0``: every rank fills row files of its shard, rank 0 copies the
shards' parts into the entry's row files and returns the entry's store). Each rank samples its anonymous resident
memory (``RssAnon`` in ``/proc/self/status``, every 10 ms; page-cache pages of the memory-mapped files are
file-backed and reclaimable, so they are not counted) and rank 0 also writes a digest of the statistics and the
mAP of the baseline.

A third run is on disk at twice the images. Prints the runs side by side. Exit 1 unless the statistics in RAM and
on disk are equal byte for byte and rank 0's peak anonymous memory on disk does not grow with N: at 2N it may grow
by at most a tenth of the N-image statistics (or 32 MiB, the allocator's noise at small sizes) more than at N. (What it grows by at all is the pass's batch buffers
and one block of the store being written: fixed, whatever N.)

    python benchmarks/dist_store.py                         # 12,000 (and 24,000) images x 1,000 classes x 3 T: 275 MiB (550 MiB) of statistics
    python benchmarks/dist_store.py --images 2000 --classes 100   # a quick look
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Peak:
    """Samples RssAnon in a thread; ``.peak`` is the largest seen (MiB)."""

    def __init__(self, every: float = 0.01):
        self.base = self.peak = _rss_anon_mib()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, _rss_anon_mib())

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_anon_mib())
        return self.peak


def _worker(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import patchcsra
    from patchcsra import dist
    from patchcsra.metrics import average_precision
    from patchcsra.options import CollectOptions
    from patchcsra.stats import collect
    from patchcsra.stats_disk import stats_bytes
    from _synthetic import synthetic_problem

    dist.init_from_env()
    torch.set_num_threads(1)
    n, c = a.images, a.classes
    ds, model = synthetic_problem(n, c, positives=0.02)
    patched = patchcsra.patch(model, lam=0.0, input_size=(3, 32, 32))
    opts = CollectOptions(batch_size=200, device="cpu", amp="none", workers=0, cache_dir=Path(a.cache),
                          store_above=a.store_above, save_interval=1e9)
    peak = _Peak()
    t0 = time.perf_counter()
    st = collect(patched, ds, temperatures=(1.0, 2.0, float("inf")), options=opts, fingerprint={"source": "bench"})
    seconds = time.perf_counter() - t0
    out = {"rank": dist.rank(), "seconds": seconds, "anon_base_mib": peak.base,
           "anon_peak_mib": peak.stop()}  # before the digest below, which copies the statistics into RAM
    if st is not None:  # rank 0
        h = hashlib.blake2b(digest_size=12)
        for name in ("base", "max", "att"):
            h.update(np.ascontiguousarray(getattr(st, name).numpy()).tobytes())
        out.update(digest=h.hexdigest(), store=st.store is not None,
                   mAP=float(np.nanmean(average_precision(np.ascontiguousarray(st.base.numpy()), st.targets))),
                   stats_mib=stats_bytes(n, c, 3) / 2 ** 20)
    Path(a.report, f"r{dist.rank()}.json").write_text(json.dumps(out))
    return 0


def _launch(a: argparse.Namespace, store_above: int, work: Path) -> list[dict]:
    report = work / "report"
    report.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.world),
           str(Path(__file__).resolve()), "--worker", "--images", str(a.images), "--classes", str(a.classes),
           "--store-above", str(store_above), "--cache", str(work / "cache"), "--report", str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        sys.exit(f"torchrun failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return [json.loads((report / f"r{k}.json").read_text()) for k in range(a.world)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=12_000)
    p.add_argument("--classes", type=int, default=1_000)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store-above", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return _worker(a)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="patchcsra-dist-store-") as tmp:
        for name, above, n in (("in RAM", 2 ** 62, a.images), ("on disk", 0, a.images),
                               ("on disk 2N", 0, 2 * a.images)):
            runs[name] = _launch(argparse.Namespace(**{**vars(a), "images": n}), above,
                                 Path(tmp) / name.replace(" ", "-"))
    print(f"torchrun x {a.world} (gloo, 1 thread each), {a.classes:,} classes x 3 T; growth of RssAnon from the "
          f"start of collect to its peak (MiB)")
    print(f"{'':11} {'images':>7} {'statistics':>10} {'rank':>4} {'seconds':>8} {'growth':>7} {'store':>6} {'mAP':>7}")
    for name, ranks in runs.items():
        for r in ranks:
            n = a.images * (2 if name.endswith("2N") else 1)
            grow = r["anon_peak_mib"] - r["anon_base_mib"]
            extra = f"{str(r['store']):>6} {r['mAP']:7.3f}" if r["rank"] == 0 else ""
            stats = f"{runs[name][0]['stats_mib']:.0f}" if r["rank"] == 0 else ""
            print(f"{name:11} {n:7,} {stats:>10} {r['rank']:>4} {r['seconds']:8.1f} {grow:7.0f} {extra}")
    ram, disk, disk2 = (runs[k][0] for k in ("in RAM", "on disk", "on disk 2N"))
    grow = {k: runs[k][0]["anon_peak_mib"] - runs[k][0]["anon_base_mib"] for k in runs}
    equal = ram["digest"] == disk["digest"] and ram["mAP"] == disk["mAP"] and disk["store"] and disk2["store"] \
        and not ram["store"]
    more = grow["on disk 2N"] - grow["on disk"]
    allowed = max(0.1 * ram["stats_mib"], 32.0)  # 32 MiB: the allocator's own noise at small sizes
    ok = equal and more <= allowed
    print(f"rank 0: in RAM it grew by {grow['in RAM']:.0f} MiB ({grow['in RAM'] / ram['stats_mib']:.1f}x the "
          f"{ram['stats_mib']:.0f} MiB of statistics); on disk by {grow['on disk']:.0f} MiB, and by "
          f"{more:+.0f} MiB more at 2N (target: <= +{allowed:.0f}, a tenth of the statistics or 32 MiB: "
          f"memory that does not grow with N): {'met' if ok else 'MISSED'}; statistics in RAM and on disk "
          f"{'equal' if equal else 'DIFFER'} byte for byte")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
