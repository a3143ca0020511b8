"""Head-discovery coverage over every timm model that builds on CPU.

For each name in ``timm.list_models()``: count parameters on the meta device (skip and count
models over ``--max-params``), build it with random weights (``pretrained=False``), patch it
at λ=0 and check ``max|patched(x) - model(x)| <= 1e-5 * max(1, max|model(x)|)`` on a fresh
probe at the model's default input size. Prints the fraction patched exactly, the head kinds,
and every refusal with its reason. Results are appended to a JSONL file as they come, so an
interrupted run resumes where it stopped (``--out``).

    python benchmarks/coverage.py --out runs/coverage.jsonl --workers 2
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
import warnings


def _check(name: str, max_params: float) -> dict:
    import torch
    import timm

    import patchcsra
    from patchcsra.heads.base import allclose_logits, probe_input

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    t0 = time.time()
    rec: dict = {"name": name}
    try:
        with torch.device("meta"):
            meta = timm.create_model(name, pretrained=False)
        n_params = sum(p.numel() for p in meta.parameters())
        del meta
    except Exception as e:  # noqa: BLE001
        return {**rec, "status": "no-build", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
    rec["params_m"] = round(n_params / 1e6, 2)
    if n_params > max_params:
        return {**rec, "status": "too-big"}
    try:
        model = timm.create_model(name, pretrained=False).eval()
    except Exception as e:  # noqa: BLE001
        return {**rec, "status": "no-build", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
    try:
        with torch.no_grad():
            patched = patchcsra.patch(model, lam=0.0)
            size = patched.info.probe_input_size
            x = probe_input(size, batch=2) * 0.5 + 0.1
            y = model(x)
            z = patched(x)
            exact = allclose_logits(z, y)
            err = float((z - y).abs().max())
            patched.lam = 0.2
            moved = float((patched(x) - y).abs().max())
        info = patched.info
        rec.update(status="exact" if exact else "inexact", max_abs_err=err, moved_at_0_2=moved,
                   kind=info.kind, layout=info.layout, adapter=info.adapter, locations=info.num_locations,
                   prefix=info.num_prefix_tokens, linear=info.exact_linear, input_size=list(size))
    except patchcsra.PatchCSRAError as e:
        rec.update(status="refused", reason=str(e))
    except Exception as e:  # noqa: BLE001 - a bug in patchcsra: record it loudly
        rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}",
                   trace=traceback.format_exc()[-1500:])
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def _worker(args):
    return _check(*args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/coverage.jsonl", help="JSONL results (resumed if present)")
    ap.add_argument("--filter", default="*", help="timm.list_models pattern")
    ap.add_argument("--max-params", type=float, default=120e6)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--limit", type=int, default=0, help="only the first N names (0: all)")
    args = ap.parse_args(argv)

    import timm

    names = timm.list_models(args.filter)
    if args.limit:
        names = names[: args.limit]
    done: dict[str, dict] = {}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    done[r["name"]] = r
    todo = [n for n in names if n not in done]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    print(f"{len(names)} names, {len(done)} already in {args.out}, {len(todo)} to check", flush=True)
    ctx = mp.get_context("spawn")
    with open(args.out, "a") as fh, ctx.Pool(args.workers, maxtasksperchild=20) as pool:
        for i, rec in enumerate(pool.imap_unordered(_worker, [(n, args.max_params) for n in todo])):
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done[rec["name"]] = rec
            if rec["status"] not in ("exact", "too-big"):
                print(f"[{i + 1}/{len(todo)}] {rec['name']}: {rec['status']} {rec.get('reason', '')[:160]}", flush=True)
            elif (i + 1) % 50 == 0:
                print(f"[{i + 1}/{len(todo)}] ...", flush=True)
    return report([done[n] for n in names if n in done])


def report(recs: list[dict]) -> int:
    st = collections.Counter(r["status"] for r in recs)
    built = [r for r in recs if r["status"] in ("exact", "inexact", "refused", "error")]
    exact = [r for r in built if r["status"] == "exact"]
    print(f"\nnames: {len(recs)}  over the size limit (skipped): {st['too-big']}  do not build: {st['no-build']}")
    frac = len(exact) / max(1, len(built))
    print(f"built and tried: {len(built)}  patched exactly at lam=0: {len(exact)} ({100 * frac:.2f}%)  "
          f"inexact: {st['inexact']}  refused: {st['refused']}  errors: {st['error']}")
    kinds = collections.Counter(f"{r['layout']} {r['kind']}" for r in exact)
    print(f"\nhead kinds ({len(kinds)}):")
    for k, v in kinds.most_common():
        print(f"  {v:5d}  {k}")
    print(f"  exact_linear heads: {sum(1 for r in exact if r.get('linear'))}")
    for status in ("inexact", "refused", "error"):
        rows = [r for r in built if r["status"] == status]
        if rows:
            print(f"\n{status} ({len(rows)}):")
            for r in rows:
                extra = f" max_abs_err={r.get('max_abs_err')}" if status == "inexact" else ""
                print(f"  {r['name']}: {r.get('reason', '')}{extra}")
    nb = [r for r in recs if r["status"] == "no-build"]
    if nb:
        print(f"\ndo not build on CPU ({len(nb)}): " + ", ".join(r["name"] for r in nb))
    return 0 if frac >= 0.97 else 1


if __name__ == "__main__":
    sys.exit(main())
