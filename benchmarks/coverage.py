"""Head-discovery coverage over every timm model that builds on CPU.

For each name in ``timm.list_models()``: count parameters on the meta device (skip and count
models over ``--max-params``), build it with random weights (``pretrained=False``), patch it
at λ=0 and check ``max|patched(x) - model(x)| <= 1e-5 * max(1, max|model(x)|)`` on a fresh
probe at the model's default input size. Prints the fraction patched exactly, the head kinds,
and every refusal with its reason. Results are appended to a JSONL file as they come, so an
interrupted run resumes where it stopped (``--out``).

    python benchmarks/coverage.py --out runs/coverage.jsonl --workers 2

``--library transformers`` instead tries every ``*ForImageClassification`` class of
``transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``, built from a
shrunk config (``benchmarks/hf_tiny.py``: 1-2 layers, hidden sizes 8-64, 32-128 px) with random init,
wrapped by ``patchcsra.hf_models.HFImageClassifier``, patched at λ=0 and checked the same way. A class that
needs a package not installed here (natten) or that does not classify image tensors is counted apart,
with its reason. Single process, about a minute on one core:

    python benchmarks/coverage.py --library transformers
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


def _compare(model, rec: dict, t0: float) -> dict:
    """Patch ``model`` at λ=0 and record whether it is exact (and moves at λ=0.2), its head facts or the refusal."""
    import torch

    import patchcsra
    from patchcsra.heads.base import allclose_logits, probe_input

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


def _check(name: str, max_params: float) -> dict:
    import torch
    import timm


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
    return _compare(model, rec, t0)


def _worker(args):
    return _check(*args)


def _check_hf(model_type: str, class_name: str) -> dict:
    """One transformers class: build tiny, wrap, patch at λ=0, compare (same record as :func:`_check`)."""

    import hf_tiny
    import patchcsra

    t0 = time.time()
    rec: dict = {"name": class_name, "model_type": model_type}
    reason = hf_tiny.cannot_build_reason(model_type)
    if reason:
        return {**rec, "status": "no-build", "reason": reason}
    if model_type not in hf_tiny.TINY:
        return {**rec, "status": "no-build", "reason": "no tiny config in benchmarks/hf_tiny.py yet"}
    try:
        model = hf_tiny.tiny_model(class_name, model_type)
    except patchcsra.PatchCSRAError as e:
        return {**rec, "status": "not-image", "reason": str(e)}
    except Exception as e:  # noqa: BLE001
        return {**rec, "status": "no-build", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
    rec["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    return _compare(model, rec, t0)


def main_transformers(out: str = "") -> int:
    """Every transformers image-classification class; prints the report, writes JSONL when ``out``."""
    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import hf_tiny

    classes = hf_tiny.classifier_classes()
    print(f"transformers {transformers.__version__}: {len(classes)} *ForImageClassification classes "
          f"in {len({m for m, _ in classes})} model types", flush=True)
    recs = []
    for model_type, name in classes:
        rec = _check_hf(model_type, name)
        recs.append(rec)
        extra = f" {rec.get('layout', '')} P={rec.get('prefix', 0)} L={rec.get('locations', '')} {rec.get('kind', '')}" \
            if rec["status"] in ("exact", "inexact") else f" {rec.get('reason', '')[:160]}"
        print(f"  {name} ({model_type}): {rec['status']}{extra}", flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            for rec in recs:
                fh.write(json.dumps(rec) + "\n")
    code = report(recs, target=0.95)
    nb = [r for r in recs if r["status"] in ("no-build", "not-image")]
    for r in nb:
        print(f"  {r['name']}: {r['status']}: {r.get('reason', '')}")
    built = [r for r in recs if r["status"] in ("exact", "inexact", "refused", "error")]
    types = {r["model_type"] for r in built}
    ok_types = {t for t in types if all(r["status"] == "exact" for r in built if r["model_type"] == t)}
    frac = len(ok_types) / max(1, len(types))
    print(f"\nmodel types built: {len(types)}  all classes exact: {len(ok_types)} ({100 * frac:.2f}%)")
    # the target (issue 16: >= 95% of the architectures) counts model types: Perceiver's three preprocessors
    # are one architecture, refused on principle (its latents are not image locations)
    del code
    return 0 if frac >= 0.95 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/coverage.jsonl", help="JSONL results (resumed if present)")
    ap.add_argument("--filter", default="*", help="timm.list_models pattern")
    ap.add_argument("--max-params", type=float, default=120e6)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--limit", type=int, default=0, help="only the first N names (0: all)")
    ap.add_argument("--library", choices=("timm", "transformers"), default="timm",
                    help="timm (default): every timm name; transformers: every *ForImageClassification class")
    args = ap.parse_args(argv)
    if args.library == "transformers":
        return main_transformers(args.out if args.out != ap.get_default("out") else "")

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


def report(recs: list[dict], target: float = 0.97) -> int:
    st = collections.Counter(r["status"] for r in recs)
    built = [r for r in recs if r["status"] in ("exact", "inexact", "refused", "error")]
    exact = [r for r in built if r["status"] == "exact"]
    print(f"\nnames: {len(recs)}  over the size limit (skipped): {st['too-big']}  do not build: {st['no-build'] + st['not-image']}")
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
    nb = [r for r in recs if r["status"] in ("no-build", "not-image")]
    if nb:
        print(f"\ndo not build on CPU ({len(nb)}): " + ", ".join(r["name"] for r in nb))
    return 0 if frac >= target else 1


if __name__ == "__main__":
    sys.exit(main())
