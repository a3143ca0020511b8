"""Statistics larger than memory: synthetic stores (no backbone) evaluated in blocks, time per grid point and peak RSS.

Cases (issue 19 §3), each generated straight to disk in blocks of classes (never N x C in RAM) and evaluated in a
fresh subprocess, so that its peak RSS (``ru_maxrss`` and ``VmHWM``) is its own:

* ``imagenet-val-8t``     -- 50,000 x 1,000, the paper's 8 temperatures, single-label (top-1/top-5 + mAP)
* ``openimages``          -- 125,000 x 9,605 dense, T = inf only (base + max), multi-label
* ``openimages-sparse``   -- 125,000 x 9,605 with 1% of the entries labelled (SparseStats), the full 21-point grid
* ``imagenet-train``      -- 1,281,167 x 1,000, T = inf only, single-label
* ``float16``             -- not a scale case: how much mAP moves when the store is float16 (5,000 x 80, 21 λ x 2 T)

Targets: peak RSS <= 2 GB in every case; the sparse case's 21-point grid in <= 120 s. The dense cases time
``--points`` grid points (default 3, spread over λ and T) and report the mean time per point. Exits 1 on a miss.

    python benchmarks/scale.py                              # every case, stores under /tmp, removed after
    python benchmarks/scale.py --cases openimages-sparse --points 21 --keep --tmp /data/tmp
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "imagenet-val-8t": dict(n=50_000, c=1_000, temps=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, math.inf), single=True),
    "openimages": dict(n=125_000, c=9_605, temps=(math.inf,), single=False),
    "openimages-sparse": dict(n=125_000, c=9_605, temps=(math.inf,), single=False, labelled=0.01),
    "imagenet-train": dict(n=1_281_167, c=1_000, temps=(math.inf,), single=True),
    "float16": dict(n=5_000, c=80, temps=(2.0, math.inf), single=False),
}
RSS_TARGET = 2 * 2 ** 30
SPARSE_GRID_TARGET_S = 120.0
GEN_BLOCK = 2 ** 22   # entries per generated block (16 MB of float32 per field)


def _peak() -> dict:
    hwm = 0
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "vmhwm": hwm}


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _signal(rng, tg, shape):
    import numpy as np

    base = rng.standard_normal(shape, dtype=np.float32)
    base += 2.0 * (tg == 1)
    mx = base + np.abs(rng.standard_normal(shape, dtype=np.float32))
    return base, mx


def _generate_dense(spec: dict, folder: Path) -> None:
    import numpy as np

    from patchcsra.store import StatsWriter

    n, c, temps = spec["n"], spec["c"], spec["temps"]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, c, n) if spec["single"] else None
    step = max(1, GEN_BLOCK // n)
    w = StatsWriter(folder, n, c, temps, "float32")
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        if labels is not None:
            tg = (labels[None, :] == np.arange(c0, c1)[:, None]).astype(np.int8)
        else:
            tg = (rng.random((c1 - c0, n), dtype=np.float32) < 0.002).astype(np.int8)
        base, mx = _signal(rng, tg, (c1 - c0, n))
        arrays = {"base": base, "max": mx, "targets": tg}
        if len(temps) > 1:
            arrays["att"] = np.stack([mx if math.isinf(t) else base + (1.0 / t) * mx for t in temps])
        w.write_classes(c0, arrays)
    w.finish(ids=[str(i) for i in range(n)], single_label=spec["single"], ok=np.ones(n, bool))


def _generate_sparse(spec: dict, folder: Path) -> None:
    import numpy as np

    from patchcsra.store import SparseStats, save_stats

    n, c = spec["n"], spec["c"]
    rng = np.random.default_rng(0)
    step = max(1, GEN_BLOCK // n)
    rows, counts = [], np.zeros(c, np.int64)
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        keep = rng.random((c1 - c0, n), dtype=np.float32) < spec["labelled"]
        counts[c0:c1] = keep.sum(axis=1)
        rows.append(np.nonzero(keep)[1].astype(np.int32))
    r = np.concatenate(rows)
    del rows
    nnz = len(r)
    tg = (rng.random(nnz, dtype=np.float32) < 0.3).astype(np.int8)      # labelled: 30% positive
    base, mx = _signal(rng, tg, (nnz,))
    sp = SparseStats(n=n, c=c, indptr=np.concatenate(([0], np.cumsum(counts))), rows=r, targets=tg, base=base,
                     max=mx, att=mx[None], temperatures=(math.inf,), ok=np.ones(n, bool),
                     ids=tuple(str(i) for i in range(n)), classes=tuple(str(j) for j in range(c)))
    save_stats(sp, folder)


def _points(temps, count: int) -> list:
    from patchcsra.options import DEFAULT_LAMS

    lams = sorted(DEFAULT_LAMS)
    grid = [(lam, t) for t in sorted(temps, key=lambda t: (math.isinf(t), t)) for lam in lams]
    if count >= len(grid):
        return grid
    pick = [grid[round(i * (len(grid) - 1) / max(1, count - 1))] for i in range(count)]
    return [(lam if lam else 0.2, t) for lam, t in pick]     # λ=0 is only base: time real points


def _float16_check() -> dict:
    """Max |ΔmAP| (float16 store vs float32 in RAM) over 21 λ x T in {2, inf}, COCO-like synthetic logits."""
    import tempfile

    import numpy as np
    import torch

    from patchcsra.grid import evaluate_grid
    from patchcsra.options import DEFAULT_LAMS
    from patchcsra.stats import Stats
    from patchcsra.store import open_stats, save_stats

    n, c = CASES["float16"]["n"], CASES["float16"]["c"]
    rng = np.random.default_rng(0)
    tg = (rng.random((n, c)) < 0.03).astype(np.int8)
    base = (3.0 * rng.standard_normal((n, c)) - 4.0 + 3.0 * tg).astype(np.float32)
    s = base[..., None] + rng.standard_normal((n, c, 16)).astype(np.float32)
    mx = s.max(-1)
    e = np.exp(2.0 * (s - mx[..., None]))
    att2 = ((s * e).sum(-1) / e.sum(-1)).astype(np.float32)
    st = Stats(torch.from_numpy(base), torch.from_numpy(mx), torch.from_numpy(np.stack([att2, mx], -1)),
               (2.0, math.inf), tg, np.ones(n, bool), tuple(map(str, range(n))), tuple(map(str, range(c))), False)
    with tempfile.TemporaryDirectory() as d:
        half = open_stats(save_stats(st, Path(d) / "h", dtype="float16"))
        a = evaluate_grid(st, DEFAULT_LAMS, (2.0, math.inf))
        b = evaluate_grid(half, DEFAULT_LAMS, (2.0, math.inf))
    cols = [k for k in a.columns if k not in ("lam", "temperature")]
    diff = {k: float(np.abs(a[k] - b[k]).max()) for k in cols}
    return {"max_abs_dmAP": diff["mAP"], "max_abs_d_any": max(diff.values()), "worst_metric": max(diff, key=diff.get),
            "points": len(a)}


def child(case: str, tmp: Path, points: int, keep: bool) -> dict:
    import numpy as np

    from patchcsra import grid as G
    from patchcsra.store import open_stats

    if case == "float16":
        return {"case": case, **_float16_check(), **_peak()}
    spec = CASES[case]
    folder = tmp / f"patchcsra-scale-{case}"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        (_generate_sparse if "labelled" in spec else _generate_dense)(spec, folder)
        gen_s = time.perf_counter() - t0
        disk = _du(folder)
        st = open_stats(folder)
        rows = np.asarray(st.ok, bool)
        t1 = time.perf_counter()
        proto, kind, _ = G._resolve_protocol(st, None, "logit", rows)
        scan_s = time.perf_counter() - t1
        pts = _points(spec["temps"], 21 if "labelled" in spec and points <= 0 else (points or 3))
        t2 = time.perf_counter()
        frame = G._evaluate(st, pts, 3, rows, proto, kind)
        eval_s = time.perf_counter() - t2
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    metric = "top1" if spec["single"] else "mAP"
    return {"case": case, "n": spec["n"], "c": spec["c"], "nT": len(spec["temps"]),
            "nnz": getattr(st, "nnz", None), "disk_bytes": disk, "gen_s": gen_s, "scan_s": scan_s,
            "points": len(pts), "eval_s": eval_s, "per_point_s": eval_s / len(pts),
            "metric": metric, "first_value": float(frame[metric].iloc[0]), **_peak()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--tmp", default="/tmp", help="where the stores are written (needs ~12 GB free)")
    p.add_argument("--points", type=int, default=0,
                   help="grid points timed per dense case (default 3; the sparse case runs all 21 unless given)")
    p.add_argument("--keep", action="store_true", help="keep the generated stores")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, Path(a.tmp), a.points, a.keep)))
        return 0
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"unknown case(s) {', '.join(bad)}; choose from {', '.join(CASES)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1])] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    missed = []
    print(f"{'case':18} {'N':>9} {'C':>6} {'nT':>3} {'disk GB':>8} {'gen s':>7} {'scan s':>7} {'points':>6} "
          f"{'s/point':>8} {'eval s':>7} {'peak RSS GB':>11} {'VmHWM GB':>8}  verdict", flush=True)
    for case in cases:
        cmd = [sys.executable, __file__, "--child", case, "--tmp", a.tmp, "--points", str(a.points)] + \
            (["--keep"] if a.keep else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{case:18} FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            missed.append(case)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rss = max(r["ru_maxrss"], r["vmhwm"])
        if case == "float16":
            print(f"{case:18} float16 store vs float32: max |ΔmAP| {r['max_abs_dmAP']:.5f} over {r['points']} points "
                  f"(largest change of any metric: {r['max_abs_d_any']:.5f} in {r['worst_metric']}); "
                  f"peak RSS {rss / 2 ** 30:.2f} GB", flush=True)
            continue
        why = []
        if rss > RSS_TARGET:
            why.append(f"peak RSS {rss / 2 ** 30:.2f} GB > 2 GB")
        if "labelled" in CASES[case] and r["points"] >= 21 and r["eval_s"] > SPARSE_GRID_TARGET_S:
            why.append(f"21-point grid {r['eval_s']:.0f} s > {SPARSE_GRID_TARGET_S:.0f} s")
        verdict = "ok" if not why else "MISSED: " + "; ".join(why)
        if why:
            missed.append(case)
        print(f"{case:18} {r['n']:>9,} {r['c']:>6,} {r['nT']:>3} {r['disk_bytes'] / 1e9:>8.2f} {r['gen_s']:>7.1f} "
              f"{r['scan_s']:>7.1f} {r['points']:>6} {r['per_point_s']:>8.2f} {r['eval_s']:>7.1f} "
              f"{r['ru_maxrss'] / 2 ** 30:>11.2f} {r['vmhwm'] / 2 ** 30:>8.2f}  {verdict}"
              + (f"  (nnz {r['nnz']:,})" if r.get("nnz") else ""), flush=True)
    if missed:
        print(f"targets missed: {', '.join(missed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
