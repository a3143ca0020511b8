"""Frozen-backbone head training: cached features vs recomputing the backbone every epoch.

Same data, model, head (CSRA H=4) and batch order, side by side in one run:

* **cached** -- what ``patchcsra train-head --mode frozen`` does: the backbone's feature maps are computed
  once (timed separately) and every epoch only runs the head;
* **recompute** -- every epoch decodes, transforms and runs the frozen backbone again (no grad), then the
  head step.

Prints seconds per epoch and the ratio. Default: the real ResNet-56 weights on the 2,000 shared CIFAR-10
test images. Then the CSRA head's forward overhead vs the plain GAP+Linear head (H=1 and H=8) on this
model's feature map (``benchmarks/csra_overhead.py`` head-only; run that script alone for the ResNet-50
sized map and the whole-model figures).

    python benchmarks/train_head.py --epochs 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(SHARED / "weights" / "resnet56-4bfd9763.th"))
    p.add_argument("--arch", default=f"{HERE / 'cifar_resnet.py'}:resnet56")
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10-test-subset"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out", default="runs/bench-train-head")
    a = p.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader

    import patchcsra
    from patchcsra.data import open_dataset, resolve_transform
    from patchcsra.runtime import default_workers
    from patchcsra.training.loop import TrainConfig, _loss, carve_validation

    workers = default_workers() if a.workers is None else a.workers
    model = patchcsra.load(a.weights, arch=a.arch)
    spec = resolve_transform(model, input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ds = open_dataset(a.data)
    cfg = TrainConfig(heads=a.heads, epochs=a.epochs, batch_size=a.batch_size)

    t0 = time.perf_counter()
    res = patchcsra.train_head(model, ds, a.out, config=cfg, transform=spec, force=True, workers=workers)
    total_cached = time.perf_counter() - t0
    feat_s = res.summary["feature_seconds"]
    cached_epoch = float(res.history["seconds"].mean())

    headed = patchcsra.attach_head(model, "csra", heads=a.heads, lam=cfg.lam, input_size=spec.input_size)
    opt = torch.optim.SGD(headed.head.parameters(), lr=cfg.lr_head, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    train_rows, _ = carve_validation(len(ds), cfg.val_fraction, cfg.seed)
    targets = torch.as_tensor(ds.targets, dtype=torch.float32)
    ds.transform = spec.build()
    times = []
    for epoch in range(a.epochs):
        g = torch.Generator().manual_seed(epoch)
        order = train_rows[torch.randperm(len(train_rows), generator=g).numpy()].tolist()
        t = time.perf_counter()
        for x, idx, _ in DataLoader(torch.utils.data.Subset(ds, order), batch_size=a.batch_size,
                                    num_workers=workers):
            with torch.no_grad():
                f = headed.forward_features(x)
            loss = _loss(headed.head(f), targets[idx], ds.single_label)
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t)
    recompute_epoch = sum(times) / len(times)
    print(f"{len(train_rows)} training images, CSRA H={a.heads}, batch {a.batch_size}, workers {workers}, "
          f"torch {torch.__version__}")
    print(f"{'way':<40}{'s / epoch':>12}")
    print(f"{'cached features (head only)':<40}{cached_epoch:>12.3f}")
    print(f"{'recompute backbone every epoch':<40}{recompute_epoch:>12.3f}")
    print(f"one-off feature pass: {feat_s:.2f} s; whole cached run ({a.epochs} epochs + validation + export): "
          f"{total_cached:.2f} s")
    print(f"recompute / cached per epoch = {recompute_epoch / max(cached_epoch, 1e-9):.1f}x")
    sys.path.insert(0, str(HERE))
    from csra_overhead import main as overhead

    d, (h, _) = headed.split.info.feature_dim, headed.split.info.grid
    return overhead(["--no-model", "--batch", str(a.batch_size), "--dim", str(d), "--grid", str(h),
                     "--classes", str(len(ds.classes)), "--devices", "cpu"])


if __name__ == "__main__":
    sys.exit(main())
