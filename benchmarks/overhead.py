"""The patch's own cost: forward time of ``patch(model, λ=0.2)`` against the original model, in one process.

For each model and batch size the two forwards run as interleaved pairs (the order alternates every pair, so
drift and frequency scaling hit both alike) after a warm-up; the figure is the median of the per-pair ratios
``t_patched / t_original`` with their min and max. Random-init timm models with 1,000 classes, on CPU (or
``--device cuda`` where one is lent). The arithmetic limit for ResNet-50 at 224 is 1.024x (2·d·C·L extra
FLOPs against 8.2 GFLOPs); the targets are <= 1.03x there and <= 1.05x elsewhere, and the script exits 1 when
a median misses its target.

    python benchmarks/overhead.py                                  # the issue's full set (slow on CPU)
    python benchmarks/overhead.py --models resnet50@224 --batches 1,8 --pairs 15
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

DEFAULT_MODELS = "resnet50@224,resnet50@448,vit_small_patch16_224@224,convnext_tiny@224,efficientnet_b0@224"
TARGETS = {"resnet50@224": 1.03}
DEFAULT_TARGET = 1.05


def _pairs(a, b, x, pairs: int, sync) -> list[tuple[float, float]]:
    """``pairs`` interleaved timings ``(t_a, t_b)`` of ``a(x)`` and ``b(x)``, the order alternating."""
    out = []
    for i in range(pairs):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        times = {}
        for f in (first, second):
            sync()
            t0 = time.perf_counter()
            f(x)
            sync()
            times[f] = time.perf_counter() - t0
        out.append((times[a], times[b]))
    return out


def measure(name: str, size: int, batches: list[int], pairs: int, device: str) -> list[dict]:
    import timm
    import torch

    import patchcsra

    model = timm.create_model(name, pretrained=False, num_classes=1000, img_size=size) if "vit" in name else \
        timm.create_model(name, pretrained=False, num_classes=1000)
    model = model.eval().to(device)
    patched = patchcsra.patch(model, lam=0.2, input_size=(3, size, size)).eval().to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, 3, size, size, device=device)
            for _ in range(2):  # warm-up: allocator, kernels, caches
                model(x)
                patched(x)
            t = _pairs(model, patched, x, pairs, sync)
            ratios = [tp / to for to, tp in t]
            rows.append({"model": f"{name}@{size}", "batch": b, "orig_ms": 1e3 * statistics.median(to for to, _ in t),
                         "patched_ms": 1e3 * statistics.median(tp for _, tp in t),
                         "ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                         "head": patched.info.kind, "locations": patched.info.num_locations})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm NAME@SIZE")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--pairs", type=int, default=15, help="interleaved pairs per point (>= 15 for the figures)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    print(f"device {args.device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"median of {args.pairs} interleaved pairs (min..max)", flush=True)
    print(f"{'model':<30} {'batch':>5} {'orig ms':>9} {'patched ms':>11} {'ratio':>7} {'min..max':>13} {'target':>7}  head")
    missed = 0
    for spec in [m for m in args.models.split(",") if m.strip()]:
        name, _, size = spec.partition("@")
        for r in measure(name, int(size or 224), batches, args.pairs, args.device):
            target = TARGETS.get(r["model"], DEFAULT_TARGET)
            ok = r["ratio"] <= target
            missed += not ok
            print(f"{r['model']:<30} {r['batch']:>5} {r['orig_ms']:>9.1f} {r['patched_ms']:>11.1f} {r['ratio']:>7.3f} "
                  f"{r['min']:>6.3f}..{r['max']:<6.3f} {target:>7.2f}  {r['head']} (L={r['locations']})"
                  f"{'' if ok else '  MISSED'}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
