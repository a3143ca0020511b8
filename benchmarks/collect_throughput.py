"""``patchcsra.collect`` against a plain timm-validate-style inference loop, and two related checks (issue 19 §5).

Modes:

* ``throughput`` (default): the same DataLoader (batch size, workers, ``pin_memory`` on CUDA) over synthetic JPEG
  images written to a temporary folder feeds (a) ``model(x)`` under autocast, channels_last on CUDA -- what
  ``timm``'s ``validate.py`` does -- and (b) ``patchcsra.collect`` of the patched model with the same options.
  Each is run ``--repeats`` times, alternating, after a warm-up; the ratio of the best images/s is printed.
  Target: collect >= 0.95x the plain loop; exit 1 when missed.
* ``channels-last``: the plain loop with channels_last on and off (timings only, no target).
* ``agreement``: ``collect`` with ``--amp bf16`` and with fp32 on the shared COCO images
  (``../shared/data/coco2017-mini`` relative to the repository root's parent, val2017); prints max |bf16 - fp32|
  of ``base`` and ``max`` and the mAP of both under each (no target; exit 0 unless the data is missing).

    python benchmarks/collect_throughput.py --device cpu --images 16 --img-size 64 --batch-size 8 --workers 0
    python benchmarks/collect_throughput.py --device cuda --model resnet50 --images 2048 --batch-size 256 --workers 8
    python benchmarks/collect_throughput.py --mode agreement --device cuda --model resnet50 --limit 0
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COCO = HERE.parent.parent / "shared" / "data" / "coco2017-mini"
TARGET = 0.95


def _images(root: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    return root


def _model(name: str, num_classes: int):
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes).eval()


def _autocast(device: str, amp: str):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def plain_loop(model, ds, *, device: str, amp: str, batch_size: int, workers: int, channels_last: bool) -> float:
    """timm validate.py's loop: DataLoader -> to(device) -> channels_last -> autocast model(x); images/s."""
    import torch
    from torch.utils.data import DataLoader

    cuda = device.startswith("cuda")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=cuda)
    n = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _, _ in loader:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                y = model(x)
            y.float().cpu()  # the loop keeps its outputs, as collect does
            n += x.shape[0]
    if cuda:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def collect_loop(patched, ds, *, device: str, amp: str, batch_size: int, workers: int, channels_last: bool) -> float:
    import math

    import torch

    import patchcsra

    t0 = time.perf_counter()
    st = patchcsra.collect(patched, ds, temperatures=(math.inf,), batch_size=batch_size, workers=workers,
                           device=device, amp=amp, channels_last=channels_last, cache_dir=None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(st) / (time.perf_counter() - t0)


def _dataset(args, model):
    from patchcsra.data import open_dataset, resolve_transform

    tmp = tempfile.mkdtemp(prefix="patchcsra-collect-")
    ds = open_dataset(_images(Path(tmp), args.images, args.src_size))
    spec = resolve_transform(model, img_size=args.img_size)
    ds.transform = spec.build()
    return ds, spec


def mode_throughput(args) -> int:
    import patchcsra

    model = _model(args.model, args.num_classes)
    ds, spec = _dataset(args, model)
    patched = patchcsra.patch(model, lam=0.2, input_size=spec.input_size)
    cl = args.device.startswith("cuda") if args.channels_last is None else args.channels_last
    kw = {"device": args.device, "amp": args.amp, "batch_size": args.batch_size, "workers": args.workers,
          "channels_last": cl}
    plain_loop(model, ds, **kw)  # warm-up: kernels, cudnn.benchmark, page cache
    collect_loop(patched, ds, **kw)
    p, c = [], []
    for _ in range(args.repeats):
        p.append(plain_loop(model, ds, **kw))
        c.append(collect_loop(patched, ds, **kw))
    ratio = max(c) / max(p)
    ok = ratio >= TARGET
    print(f"collect throughput: {args.model} {spec.input_size[1]}px, {len(ds)} images, batch {args.batch_size}, "
          f"{args.workers} workers, amp {args.amp}, channels_last {cl}, device {args.device}")
    print(f"  plain loop {max(p):.1f} img/s (runs {', '.join(f'{v:.1f}' for v in p)})")
    print(f"  collect    {max(c):.1f} img/s (runs {', '.join(f'{v:.1f}' for v in c)})")
    print(f"  ratio {ratio:.3f} (target >= {TARGET}){'' if ok else '  MISSED'}")
    return 0 if ok else 1


def mode_channels_last(args) -> int:
    model = _model(args.model, args.num_classes)
    ds, spec = _dataset(args, model)
    kw = {"device": args.device, "amp": args.amp, "batch_size": args.batch_size, "workers": args.workers}
    res = {True: [], False: []}
    plain_loop(model, ds, channels_last=False, **kw)
    for _ in range(args.repeats):
        for cl in (True, False):
            res[cl].append(plain_loop(model, ds, channels_last=cl, **kw))
    model.to(memory_format=__import__("torch").contiguous_format)
    on, off = max(res[True]), max(res[False])
    print(f"channels_last: {args.model} {spec.input_size[1]}px, batch {args.batch_size}, amp {args.amp}, "
          f"device {args.device}: on {on:.1f} img/s, off {off:.1f} img/s, on/off {on / off:.3f}")
    return 0


def mode_agreement(args) -> int:
    import math

    import numpy as np

    import patchcsra
    from patchcsra.data import open_dataset, resolve_transform
    from patchcsra.metrics import mean_average_precision

    root = Path(args.coco) if args.coco else COCO
    if not root.exists():
        print(f"agreement: {root} is missing", file=sys.stderr)
        return 1
    ds = open_dataset(root, split="val2017")
    if args.limit:
        ds = ds.subset(list(range(min(args.limit, len(ds)))))
    model = _model(args.model, len(ds.classes))
    spec = resolve_transform(model, img_size=args.img_size)
    ds.transform = spec.build()
    patched = patchcsra.patch(model, lam=0.2, input_size=spec.input_size)
    got = {}
    for amp in ("none", "bf16"):
        got[amp] = patchcsra.collect(patched, ds, temperatures=(math.inf,), batch_size=args.batch_size,
                                     workers=args.workers, device=args.device, amp=amp, cache_dir=None)
    print(f"bf16 vs fp32 statistics: {args.model} (random init, {len(ds.classes)} classes) on {len(ds)} COCO "
          f"val2017 images at {spec.input_size[1]}px, device {args.device}")
    for key in ("base", "max"):
        a, b = getattr(got["none"], key), getattr(got["bf16"], key)
        scale = float(a.abs().max())
        m32 = mean_average_precision(a.numpy(), got["none"].targets)[0]
        m16 = mean_average_precision(b.numpy(), got["bf16"].targets)[0]
        print(f"  {key:<4}: max|bf16 - fp32| {float((a - b).abs().max()):.4g} (max|fp32| {scale:.4g}); "
              f"mAP fp32 {m32:.2f}, bf16 {m16:.2f}, difference {m16 - m32:+.2f}")
    assert np.array_equal(got["none"].targets, got["bf16"].targets)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("throughput", "channels-last", "agreement"), default="throughput")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    ap.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--images", type=int, default=64, help="synthetic images (throughput, channels-last)")
    ap.add_argument("--src-size", type=int, default=256, help="side of the synthetic JPEGs")
    ap.add_argument("--img-size", type=int, default=224, help="model input side")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="agreement: first N COCO images (0: all)")
    ap.add_argument("--coco", default=None, help="agreement: COCO root (default ../shared/data/coco2017-mini)")
    args = ap.parse_args(argv)
    return {"throughput": mode_throughput, "channels-last": mode_channels_last, "agreement": mode_agreement}[
        args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
