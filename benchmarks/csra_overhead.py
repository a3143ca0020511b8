"""What a trained CSRA head costs at test time, against the plain GAP + Linear head, in one run.

Two measurements, each with every variant timed side by side (interleaved, minimum over repeats):

* **head only** -- features of a ResNet-50-sized map, ``(B=64, d=2048, 14, 14)`` (448x448 input),
  ``C = 80`` classes: ``Linear(mean_k x_k)`` vs :class:`patchcsra.CSRAHead` with H=1 and H=8.
* **whole model** -- timm ``resnet50`` (random init, C=80) at 224 (and ``--model-sizes``):
  the model itself vs :func:`patchcsra.training.attach_head` (same backbone + CSRA head H=1 / H=8).

The paper (§4.3) reports +8% total test time for H=8 on MS-COCO (ResNet-101, 448x448, GPU);
this prints the ratios measured here, no exit threshold. CPU always; CUDA too when available.

    python benchmarks/csra_overhead.py
    python benchmarks/csra_overhead.py --threads 1 --model-batch 4 --model-sizes 224,448
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable


def _timer(device):
    import torch

    def run(fn: Callable[[], object], iters: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / iters
    return run


def _bench(fns: dict[str, Callable[[], object]], device, iters: int, repeats: int) -> dict[str, float]:
    """Seconds per call for each fn: interleaved rounds, minimum over rounds (after a warm-up)."""
    run = _timer(device)
    for fn in fns.values():
        run(fn, 1)
    best = {k: math.inf for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            best[k] = min(best[k], run(fn, iters))
    return best


def _table(title: str, times: dict[str, float], base: str) -> None:
    print(title)
    w = max(len(k) for k in times) + 2
    print(f"{'variant':<{w}}{'ms / batch':>12}{'ratio':>8}")
    for k, t in times.items():
        print(f"{k:<{w}}{t * 1e3:>12.2f}{t / times[base]:>8.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64, help="head-only batch")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--grid", type=int, default=14, help="feature map side (14: 448 input to ResNet-50)")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--model-batch", type=int, default=None, help="whole-model batch (default: 8 CPU, 64 CUDA)")
    p.add_argument("--model-sizes", default="224", help="comma-separated input sides for the whole model")
    p.add_argument("--iters", type=int, default=None, help="calls per timing (default: 2 CPU, 20 CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timings are the minimum over repeats")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--devices", default="auto", help="'auto' (cpu, and cuda if available), 'cpu' or 'cuda'")
    p.add_argument("--no-model", action="store_true", help="head-only measurement")
    a = p.parse_args(argv)

    import logging

    import timm
    import torch
    from torch import nn

    import patchcsra
    from patchcsra.training import CSRAHead, attach_head

    logging.getLogger("patchcsra").setLevel(logging.ERROR)
    if a.threads:
        torch.set_num_threads(a.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if a.devices == "auto" else [a.devices]
    print(f"torch {torch.__version__}, timm {timm.__version__}, patchcsra {patchcsra.__version__}, "
          f"CPU threads {torch.get_num_threads()}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"))

    torch.manual_seed(0)
    for name in devices:
        dev = torch.device(name)
        iters = a.iters or (20 if dev.type == "cuda" else 2)
        fc = nn.Linear(a.dim, a.classes).to(dev).eval()
        heads = {h: CSRAHead.from_linear(fc.weight, fc.bias, heads=h, lam=0.1).to(dev).eval() for h in (1, 8)}
        x = torch.randn(a.batch, a.dim, a.grid, a.grid, device=dev)
        with torch.inference_mode():
            times = _bench({"GAP + Linear": lambda: fc(x.mean(dim=(2, 3))),
                            "CSRA H=1 (T=1)": lambda: heads[1](x),
                            "CSRA H=8 (T=1..7, inf)": lambda: heads[8](x)}, dev, iters, a.repeats)
        print()
        _table(f"[{name}] head only: features ({a.batch}, {a.dim}, {a.grid}, {a.grid}), C={a.classes}",
               times, "GAP + Linear")
        if a.no_model:
            continue
        mb = a.model_batch or (64 if dev.type == "cuda" else 8)
        model = timm.create_model(a.model, pretrained=False, num_classes=a.classes).to(dev).eval()
        for side in (int(s) for s in a.model_sizes.split(",")):
            size = (3, side, side)
            hc = {h: attach_head(model, "csra", heads=h, lam=0.1, input_size=size).to(dev).eval() for h in (1, 8)}
            xi = torch.randn(mb, *size, device=dev)
            base = f"{a.model} (GAP + Linear)"
            with torch.inference_mode():
                f = hc[1].forward_features(xi)
                times = _bench({base: lambda: model(xi),
                                f"{a.model} + CSRA H=1": lambda: hc[1](xi),
                                f"{a.model} + CSRA H=8": lambda: hc[8](xi)}, dev, iters, a.repeats)
                parts = _bench({"backbone features": lambda: model.forward_features(xi),
                                "GAP + Linear head": lambda: model.forward_head(f),
                                "CSRA H=1 head": lambda: hc[1].head(f),
                                "CSRA H=8 head": lambda: hc[8].head(f)}, dev, iters, a.repeats)
            print()
            _table(f"[{name}] whole model: {a.model} at {side}x{side}, batch {mb}, feature map "
                   f"{tuple(f.shape[1:])}, ratio vs the model", times, base)
            _table(f"[{name}] the same, by parts (ratio vs backbone features)", parts, "backbone features")
            whole = parts["backbone features"] + parts["GAP + Linear head"]
            for h in (1, 8):
                e2e = times[f"{a.model} + CSRA H={h}"] / times[base] - 1
                by_parts = (parts[f"CSRA H={h} head"] - parts["GAP + Linear head"]) / whole
                print(f"H={h} test-time overhead: {e2e * 100:+.1f}% end to end, {by_parts * 100:+.1f}% from the parts")
            print("(paper, ResNet-101 at 448x448 on MS-COCO, GPU, H=8: +8% total test time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
