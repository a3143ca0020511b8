"""What a one-pass λ sweep costs, measured side by side in one run.

Three ways over the same images, with the same model, DataLoader and device:

* **baseline** -- one plain evaluation: ``model(x)`` for every image, then the metric once.
* **sweep** -- what ``patchcsra sweep-lambda`` does: one pass of :func:`patchcsra.collect`
  (base, max and attention for 8 temperatures per image, no cache), then every metric at each of
  the 21 points of the default λ grid.
* **naive** -- one full evaluation of the patched model per λ (21 passes).

Target: ``sweep / baseline <= 1.15`` (exit 1 otherwise). Default data: the shared CIFAR-10 test
subset (2,000 real images) with the real ResNet-56 weights; any source/dataset works:

    python benchmarks/sweep_cost.py
    python benchmarks/sweep_cost.py --source timm:resnet18 --no-pretrained --data ../shared/data/voc2007-trainval-rf
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def _floats(text):
    return None if text is None else [float(v) for v in text.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(SHARED / "weights" / "resnet56-4bfd9763.th"))
    p.add_argument("--arch", default=f"{HERE / 'cifar_resnet.py'}:resnet56")
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10-test-subset"))
    p.add_argument("--split", default=None)
    p.add_argument("--input-size", default="3,32,32")
    p.add_argument("--mean", default="0.485,0.456,0.406")
    p.add_argument("--std", default="0.229,0.224,0.225")
    p.add_argument("--no-pretrained", action="store_true")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    p.add_argument("--naive-points", type=int, default=21, help="λ points timed for the naive way")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each timing is its minimum over them")
    p.add_argument("--target", type=float, default=1.15)
    a = p.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader

    import patchcsra
    from patchcsra import metrics as M
    from patchcsra.api import prepare
    from patchcsra.runtime import default_workers, resolve_amp, resolve_device
    from patchcsra.stats import collect
    from patchcsra.grid import DEFAULT_LAMS, evaluate_grid

    is_file = Path(a.source).exists()
    size = None
    if a.input_size and is_file:
        size = [int(v) for v in a.input_size.split(",")]
    load_kwargs = {"pretrained": not a.no_pretrained, "num_classes": a.num_classes}
    if is_file:
        load_kwargs["arch"] = a.arch
    prep = prepare(a.source, a.data, split=a.split, img_size=a.img_size, input_size=size,
                   mean=_floats(a.mean) if is_file else None, std=_floats(a.std) if is_file else None,
                   load_kwargs=load_kwargs)
    ds, patched = prep.dataset, prep.patched
    dev = resolve_device(a.device)
    amp = resolve_amp(a.amp, dev)
    workers = default_workers() if a.workers is None else a.workers
    model = prep.model.to(dev).eval()
    patched.to(dev)
    idx = torch.as_tensor(prep.class_index, device=dev)
    targets = ds.targets

    def metric(scores):
        if ds.single_label:
            return M.topk_accuracy(scores, ds.labels, ks=(1, 5))["top1"]
        return M.mean_average_precision(scores, targets)[0]

    def full_eval(net) -> float:
        loader = DataLoader(ds, batch_size=a.batch_size, num_workers=workers, pin_memory=dev.type == "cuda")
        outs = []
        with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            for x, _, _ in loader:
                outs.append(net(x.to(dev, non_blocking=True)).float()[:, idx].cpu())
        return metric(torch.cat(outs).numpy())

    def sweep_once() -> float:
        stats = collect(patched, ds, class_index=prep.class_index, batch_size=a.batch_size, device=str(dev),
                        amp=a.amp, workers=workers, cache_dir=None)
        frame = evaluate_grid(stats, DEFAULT_LAMS, (math.inf,))
        return float(frame["top1" if ds.single_label else "mAP"].max())

    def clock(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        value = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, value

    def timed(fn):
        best, value = math.inf, None
        for _ in range(a.repeats):
            seconds, value = clock(fn)
            best = min(best, seconds)
        return best, value

    def collect_only():
        return collect(patched, ds, class_index=prep.class_index, batch_size=a.batch_size, device=str(dev),
                       amp=a.amp, workers=workers, cache_dir=None)

    full_eval(model)  # warm-up: file cache, allocator, kernels
    collect_only()
    # the three ways run interleaved, round after round, so drift in the machine's speed hits each alike;
    # each figure is its minimum over the rounds
    t_base = t_sweep = t_collect = math.inf
    for _ in range(a.repeats):
        t, v_base = clock(lambda: full_eval(model))
        t_base = min(t_base, t)
        t, _ = clock(collect_only)
        t_collect = min(t_collect, t)
        t, v_best = clock(sweep_once)
        t_sweep = min(t_sweep, t)
    lams = list(DEFAULT_LAMS)[: a.naive_points]

    def naive() -> float:
        vals = []
        for lam in lams:
            patched.lam = lam
            vals.append(full_eval(patched))
        patched.lam = 0.0
        return max(vals)

    t_naive, v_naive = timed(naive) if a.naive_points else (math.nan, math.nan)
    per_point = t_naive / max(1, len(lams))
    t_naive21 = per_point * len(DEFAULT_LAMS)
    name = "top1" if ds.single_label else "mAP"
    print(f"model {prep.model_name} ({patched.info.kind}, {patched.info.num_locations} locations) on {ds.name}: "
          f"{len(ds)} images, device {dev}, amp {amp}, workers {workers}, batch {a.batch_size}, "
          f"torch {torch.__version__}, patchcsra {patchcsra.__version__}")
    print(f"{'way':<34}{'seconds':>10}{'vs baseline':>14}{'best ' + name:>12}")
    print(f"{'baseline (1 plain evaluation)':<34}{t_base:>10.2f}{1.0:>14.2f}{v_base:>12.2f}")
    print(f"{'collection only (base/max/att)':<34}{t_collect:>10.2f}{t_collect / t_base:>14.2f}{'':>12}")
    print(f"{'sweep (1 pass, 21-point grid)':<34}{t_sweep:>10.2f}{t_sweep / t_base:>14.2f}{v_best:>12.2f}")
    if a.naive_points:
        print(f"{f'naive ({len(lams)} full evaluations)':<34}{t_naive:>10.2f}{t_naive / t_base:>14.2f}"
              f"{v_naive:>12.2f}")
        print(f"naive for the 21-point grid: {t_naive21:.2f} s = {t_naive21 / t_sweep:.1f}x the sweep")
    print(f"collection throughput / plain inference throughput: {t_base / t_collect:.3f} (target >= 0.95), "
          f"{len(ds) / t_collect:.0f} vs {len(ds) / t_base:.0f} images/s")
    ratio = t_sweep / t_base
    ok = ratio <= a.target and t_base / t_collect >= 0.95
    print(f"sweep/baseline = {ratio:.3f} (target <= {a.target}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
