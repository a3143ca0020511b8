"""Baseline vs 4-line patch vs trained CSRA / attention heads on real VOC2007 (the paper's Tables 1-3, small).

Backbone: the shared real ImageNet MobileNetV2 (``mobilenet_tf.load_mobilenet_v2``: TFLite weights
dequantized to float, TF "SAME" padding, input ``(p - 128) / 128``), **frozen**. Every head is trained
with ``patchcsra.train_head`` (frozen mode: backbone feature maps computed once and cached, head only) on
the official VOC2007 ``train`` ids (1,450 images; a seeded 10% of them is carved off to pick the best
epoch), from random init (ImageNet's 1001 outputs are not VOC's 20 classes):

* ``linear``: GAP + Linear (``kind="linear"``) -- the baseline; its sweep row is "baseline vs 4-line patch";
* ``csra-h1``, ``csra-h4``, ``csra-h8``: CSRA heads (λ=0.1, the paper's temperature sets);
* ``attention-h1``: a PatchConvNet-style attention-pooling head (one query per class).

Each trained model is then evaluated on the official ``val`` ids (1,450 images, disjoint from ``train``)
by ``patchcsra.sweep_lambda``: baseline, the training-free patch at fixed λ=0.2 (the paper's MobileNet
value), the oracle λ/T, the 5-fold cross-validated λ/T, each Δ with a 1000-resample paired bootstrap CI.
At each size (224 and 448 by default) the backbone features of ``train`` are computed once and
hard-linked into every head's run directory, so only the first head pays for them.

    python benchmarks/voc_heads.py --out runs/voc-heads --sizes 224 448
    python benchmarks/voc_heads.py --out /tmp/voc-smoke --sizes 64 --limit 40 --epochs 2 --bootstrap 50  # smoke

Writes ``OUT/<size>/<head>/`` (sweep run), ``OUT/<size>/train-<head>/`` (train_head run),
``OUT/<size>/table/`` (merged table: csv, md, tex) and prints the markdown table per size.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

HEADS = {  # name: (kind, heads, λ, display name)
    "linear": ("linear", 1, 0.0, "linear head (GAP + Linear), baseline"),
    "csra-h1": ("csra", 1, 0.1, "trained CSRA H=1"),
    "csra-h4": ("csra", 4, 0.1, "trained CSRA H=4"),
    "csra-h8": ("csra", 8, 0.1, "trained CSRA H=8"),
    "attention-h1": ("attention", 1, 0.0, "trained attention pool"),
}
TEMPERATURES = [1, 2, 4, math.inf]
FEATURES = "features.pt"


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src`` (a hard link where the file system allows it, else a copy)."""
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_size(a, size: int, names: list[str]) -> tuple[list[Path], list[dict], float]:
    """Train and sweep every head of ``names`` at ``size`` px; returns (run dirs, per-head records, seconds)."""
    import patchcsra
    from patchcsra.data import open_dataset
    from mobilenet_tf import TRANSFORM, load_mobilenet_v2

    t_size = time.perf_counter()
    out = Path(a.out) / str(size)
    out.mkdir(parents=True, exist_ok=True)
    tf = dict(TRANSFORM, input_size=(3, size, size))
    train = open_dataset(a.voc, split="train")
    val = open_dataset(a.voc, split="val")
    if a.limit:
        train, val = train.subset(range(min(a.limit, len(train)))), val.subset(range(min(a.limit, len(val))))
    store = out / FEATURES  # the backbone's cached train features, shared by every head of this size
    cache_dir = a.cache_dir or str(Path(a.out) / "cache")
    runs, records = [], []
    for name in names:
        kind, heads, lam, label = HEADS[name]
        t0 = time.perf_counter()
        model = load_mobilenet_v2(img_size=size)
        spec = patchcsra.data.resolve_transform(model, **tf)
        cfg = patchcsra.TrainConfig(kind=kind, heads=heads, lam=lam, epochs=a.epochs, batch_size=a.batch_size,
                                    init="random", seed=a.seed)
        train_dir = out / f"train-{name}"
        if train_dir.exists():
            shutil.rmtree(train_dir)
        train_dir.mkdir(parents=True)
        if store.exists():
            _link_or_copy(store, train_dir / FEATURES)
        # resume=True on a fresh directory (no checkpoint.pt): a fresh run that keeps the linked features.pt
        res = patchcsra.train_head(model, train, train_dir, config=cfg, transform=spec, resume=True,
                                   workers=a.workers, source=f"mobilenet_v2_1.0_224 (ImageNet, frozen) @{size}")
        feat_s = float(res.summary.get("feature_seconds", 0.0))
        if feat_s > 0 or not store.exists():
            _link_or_copy(train_dir / FEATURES, store)
        t_train = time.perf_counter() - t0
        ev = patchcsra.sweep_lambda(res.model, val, temperatures=TEMPERATURES, fixed_lam=a.fixed_lam,
                                    bootstrap=a.bootstrap, folds=a.folds, workers=a.workers, cache_dir=cache_dir,
                                    **tf)
        ev.summary["model"]["name"] = label
        runs.append(ev.write(out / name, force=True))
        rec = {"size": size, "head": name, "best_epoch": res.best_epoch, "carved_val_mAP": res.best_metric,
               "val_mAP": ev.result.baseline["mAP"], "feature_s": feat_s, "train_s": t_train,
               "sweep_s": time.perf_counter() - t0 - t_train, "seconds": time.perf_counter() - t0}
        records.append(rec)
        print(f"[{size}px] {name}: best epoch {rec['best_epoch']}/{a.epochs} (carved-val mAP "
              f"{rec['carved_val_mAP']:.2f}), val mAP {rec['val_mAP']:.2f}; {rec['seconds']:.0f} s "
              f"(train features {feat_s:.0f} s, training {t_train - feat_s:.0f} s, val sweep {rec['sweep_s']:.0f} s)",
              flush=True)
    return runs, records, time.perf_counter() - t_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--voc", default=str(HERE.parent.parent / "shared" / "data" / "voc2007-trainval-rf" / "VOCdevkit"))
    p.add_argument("--out", default="runs/voc-heads")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixed-lam", type=float, default=0.2, help="the fixed-λ column (paper: 0.2 for MobileNet)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="sweep score cache (default OUT/cache)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N train and N val ids (smoke test)")
    a = p.parse_args(argv)

    import json

    from patchcsra.report import display_frame, merge_runs, to_markdown, write_table

    for size in a.sizes:
        runs, records, seconds = run_size(a, size, a.heads)
        out = Path(a.out) / str(size)
        table = merge_runs(runs)
        write_table(table, out / "table", force=True)
        (out / "heads.json").write_text(json.dumps({"records": records, "seconds": seconds}, indent=2) + "\n")
        print(f"\n## {size}x{size}: {seconds:.0f} s in all\n")
        print(to_markdown(display_frame(table)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
