"""Baseline vs 4-line patch vs trained CSRA heads on real VOC2007 images (the paper's Tables 1-3, small).

Starts from the model of ``voc_linear_probe.py`` (the shared real ImageNet MobileNetV2 with a VOC linear
head fitted by logistic regression on the official ``train`` images), then trains heads on the same frozen
backbone with ``patchcsra.train_head`` on the same ``train`` images, from random init (the linear probe has
already fitted every training image, so starting from it leaves nothing to learn and no held-out part to
select epochs on); the best epoch is chosen on a carved 10% of ``train``. Everything is evaluated on the
official ``val`` images (1,450, disjoint) with the sweep code:

* baseline (the linear head) and the training-free 4-line patch (fixed λ=0.2, and oracle λ);
* CSRA H=1, 4, 8 (λ=0.1, the paper's temperature sets) and a PatchConvNet-style attention-pool head.

    python benchmarks/voc_heads.py --out runs/voc-heads --epochs 30
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--voc", default=str(HERE.parent.parent / "shared" / "data" / "voc2007-trainval-rf" / "VOCdevkit"))
    p.add_argument("--out", default="runs/voc-heads")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    a = p.parse_args(argv)

    import patchcsra
    from patchcsra.data import open_dataset
    from patchcsra.report import display_frame, merge_runs, to_markdown, write_table
    from voc_linear_probe import main as probe_main, mobilenet_v2_tf_same  # noqa: F401

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # 1. the baseline model: shared MobileNetV2 + VOC linear head (and its training-free sweep)
    import voc_linear_probe as vlp

    model, tf = vlp.build_probe(a.voc, workers=a.workers)
    base = patchcsra.sweep_lambda(model, a.voc, split="val", temperatures=[1, 2, 4, math.inf], workers=a.workers,
                                  cache_dir=a.cache_dir, **tf)
    base.summary["model"]["name"] = "MobileNetV2 + linear head (baseline, 4-line patch)"
    runs = [base.write(out / "linear", force=True)]
    train = open_dataset(a.voc, split="train")
    spec = patchcsra.data.resolve_transform(model, **tf)
    for kind, heads in (("csra", 1), ("csra", 4), ("csra", 8), ("attention", 1)):
        name = f"{kind}-h{heads}"
        t0 = time.perf_counter()
        cfg = patchcsra.TrainConfig(kind=kind, heads=heads, lam=0.1 if kind == "csra" else 0.0, epochs=a.epochs,
                                    batch_size=a.batch_size, init="random")
        res = patchcsra.train_head(model, train, out / f"train-{name}", config=cfg, transform=spec, force=True,
                                   workers=a.workers, source="mobilenet_v2+voc-linear")
        ev = patchcsra.sweep_lambda(res.model, a.voc, split="val", workers=a.workers, cache_dir=a.cache_dir,
                                    bootstrap=1000)
        ev.summary["model"]["name"] = ("trained CSRA H=%d" % heads) if kind == "csra" else "trained attention pool"
        runs.append(ev.write(out / name, force=True))
        print(f"{name}: best epoch {res.best_epoch} (carved val mAP {res.best_metric:.2f}), "
              f"val2007 mAP {ev.result.baseline['mAP']:.2f}, {time.perf_counter() - t0:.0f} s", flush=True)
    table = merge_runs(runs)
    write_table(table, out / "table", force=True)
    print(to_markdown(display_frame(table)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
