"""The patch's own cost: forward time of ``patch(model, λ=0.2)`` against the original model, in one process.

For each model and batch size the two forwards run as interleaved pairs (the order alternates every pair, so
drift and frequency scaling hit both alike) after a warm-up; the figure is the median of the per-pair ratios
``t_patched / t_original`` with their min and max. Random-init timm models with 1,000 classes, on CPU (or
``--device cuda`` where one is lent). The arithmetic limit for ResNet-50 at 224 is 1.024x (2·d·C·L extra
FLOPs against 8.2 GFLOPs); the targets are <= 1.03x there and <= 1.05x elsewhere, and the script exits 1 when
a median misses its target.

    python benchmarks/overhead.py                                  # the issue's full set (slow on CPU)
    python benchmarks/overhead.py --models resnet50@224 --batches 1,8 --pairs 15
    python benchmarks/overhead.py --device cuda --amp bf16 --channels-last --batches 256 \
        --models resnet50@224,vit_base_patch16_224@224                # benchmarks/gpu_check.sh

The ``fast`` column says whether the patched model computes its per-location scores with the classifier layer
applied once to all locations (``HeadSplit.fast_path``) rather than through the head module per location.
"""
from __future__ import annotations

import argparse
import contextlib
import json
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


def measure(name: str, size: int, batches: list[int], pairs: int, device: str, num_classes: int = 1000,
            amp: str = "none", channels_last: bool = False) -> list[dict]:
    import timm
    import torch

    import patchcsra

    kw = {"img_size": size} if "vit" in name else {}
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
    model = model.eval().to(device)
    patched = patchcsra.patch(model, lam=0.2, input_size=(3, size, size)).eval().to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=fmt)  # shared with patched
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=dtype)) if dtype else contextlib.nullcontext
    rows = []
    with torch.inference_mode(), autocast():
        for b in batches:
            x = torch.randn(b, 3, size, size, device=device).contiguous(memory_format=fmt)
            for _ in range(5 if cuda else 2):  # warm-up: allocator, kernels (cudnn.benchmark), caches
                model(x)
                patched(x)
            t = _pairs(model, patched, x, pairs, sync)
            ratios = [tp / to for to, tp in t]
            rows.append({"model": f"{name}@{size}", "batch": b, "orig_ms": 1e3 * statistics.median(to for to, _ in t),
                         "patched_ms": 1e3 * statistics.median(tp for _, tp in t),
                         "ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                         "head": patched.info.kind, "locations": patched.info.num_locations,
                         "fast": bool(getattr(patched.split, "fast_path", False)), "amp": amp,
                         "channels_last": channels_last, "device": device})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm NAME@SIZE")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--pairs", type=int, default=15, help="interleaved pairs per point (>= 15 for the figures)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (none: fp32)")
    ap.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows (with target, ok) as JSON")
    args = ap.parse_args(argv)
    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    import timm

    print(f"device {args.device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"timm {timm.__version__}, amp {args.amp}, channels_last {args.channels_last}, {args.num_classes} classes; "
          f"median of {args.pairs} interleaved pairs (min..max)", flush=True)
    print(f"{'model':<30} {'batch':>5} {'orig ms':>9} {'patched ms':>11} {'ratio':>7} {'min..max':>13} {'target':>7}  "
          "fast  head")
    missed = 0
    out = []
    for spec in [m for m in args.models.split(",") if m.strip()]:
        name, _, size = spec.partition("@")
        for r in measure(name, int(size or 224), batches, args.pairs, args.device, args.num_classes, args.amp,
                         args.channels_last):
            target = TARGETS.get(r["model"], DEFAULT_TARGET)
            ok = r["ratio"] <= target
            missed += not ok
            out.append({**r, "target": target, "ok": ok})
            print(f"{r['model']:<30} {r['batch']:>5} {r['orig_ms']:>9.1f} {r['patched_ms']:>11.1f} {r['ratio']:>7.3f} "
                  f"{r['min']:>6.3f}..{r['max']:<6.3f} {target:>7.2f}  {'yes' if r['fast'] else 'no':<4}  "
                  f"{r['head']} (L={r['locations']}){'' if ok else '  MISSED'}", flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(out, fh, indent=1)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
