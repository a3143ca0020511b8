"""What a one-pass λ sweep costs, measured side by side in one run.

Three ways over the same images, with the same model, DataLoader and device:

* **baseline** -- one plain evaluation: ``model(x)`` for every image, then the metric once.
* **sweep** -- what ``patchcsra sweep-lambda`` does: one pass of :func:`patchcsra.collect`
  (base, max and attention for 8 temperatures per image, no cache), then every metric at each of
  the 21 points of the default λ grid.
* **naive** -- one full evaluation of the patched model per λ (21 passes).

Target: ``sweep / baseline <= 1.15`` (exit 1 otherwise). Default data: the shared CIFAR-10 test
subset (2,000 real images) with the real ResNet-56 weights; any source/dataset works:

    python benchmarks/sweep_cost.py --mode pass
    python benchmarks/sweep_cost.py --mode pass --source timm:resnet18 --no-pretrained --data ../shared/data/voc2007-trainval-rf

The fixed cost of a run, whole processes side by side (``--mode cached,first``, the default), on all 10,000
CIFAR-10 test images (``../shared/weights/cifar10-test-full-jpeg.tar.gz``, unpacked once under ``--work``):

* **cached** -- ``patchcsra sweep-lambda`` whose statistics are already cached (zero forward passes), 21 λ x 4 T,
  the default bootstrap (1,000) and 5-fold CV: the wall time of the whole process (minimum of ``--repeats``), then
  where the time goes (imports, model build + load, fingerprints, dataset scan, grid metrics, bootstrap, CV, plot,
  writes; :mod:`_sweep_phases`). Target: ``<= 5 s``.
* **first** -- the same command with an empty cache against one plain evaluation process (``_plain_eval.py``:
  torchvision ImageFolder, ``model(x)``, top-1; same batch size and workers), interleaved. Target: ``<= 1.10x``.
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
    p.add_argument("--mode", default="cached,first", help="comma-separated: cached, first, pass")
    p.add_argument("--work", default="/tmp/patchcsra-bench-cifar10k", help="where the 10k CIFAR images are unpacked")
    p.add_argument("--cached-target", type=float, default=5.0, help="seconds")
    p.add_argument("--first-target", type=float, default=1.10, help="first sweep / plain evaluation")
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
    modes = [m.strip() for m in a.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("cached", "first", "pass")]
    if bad:
        p.error(f"--mode {bad[0]}: choose cached, first or pass")
    ok = True
    if "cached" in modes or "first" in modes:
        data = _cifar10k(Path(a.work))
        if "cached" in modes:
            ok &= _cached(a, data)
        if "first" in modes:
            ok &= _first(a, data)
    if "pass" in modes:
        ok &= _in_process(a) == 0
    return 0 if ok else 1


CIFAR10K = SHARED / "weights" / "cifar10-test-full-jpeg.tar.gz"
CIFAR10K_SHA256 = "2f78efc30b2c0bb10b3c9e22a3c9a788ae74677a6e367fe5703461199ffe67e0"


def _cifar10k(work: Path) -> Path:
    """The 10,000 CIFAR-10 test JPEGs unpacked under ``work`` (once; the tarball's sha256 checked)."""
    import hashlib
    import tarfile

    root = work / "test"
    if (work / "unpacked.ok").exists():
        return root
    digest = hashlib.sha256(CIFAR10K.read_bytes()).hexdigest()
    if digest != CIFAR10K_SHA256:
        raise SystemExit(f"{CIFAR10K}: sha256 {digest} is not the one in shared/weights/MANIFEST.md")
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(CIFAR10K) as tar:
        tar.extractall(work, filter="data")
    (work / "unpacked.ok").write_text("10000\n")
    return root


def _cli_args(a, data: Path, out: Path, cache: Path) -> list[str]:
    size = a.input_size.replace(" ", ",")
    return [a.source, "--arch", a.arch, "--data", str(data), "--input-size", size, "--mean", a.mean, "--std", a.std,
            "--temperatures", "inf,1,2,4", "--cache-dir", str(cache), "--out", str(out), "-q"]


def _wall(cmd: list[str]) -> float:
    import subprocess

    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _cached(a, data: Path) -> bool:
    """Whole-process wall time of a cached re-sweep, and its breakdown (in a separate fresh process)."""
    import json
    import subprocess
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="sweep-cost-"))
    cache = tmp / "cache"
    cli = [sys.executable, "-m", "patchcsra", "sweep-lambda"]
    first = _wall(cli + _cli_args(a, data, tmp / "run0", cache))  # fills the cache
    walls = [_wall(cli + _cli_args(a, data, tmp / f"run{i + 1}", cache)) for i in range(max(1, a.repeats))]
    got = subprocess.run([sys.executable, str(HERE / "_sweep_phases.py"), *_cli_args(a, data, tmp / "phases", cache)],
                         check=True, capture_output=True, text=True)
    phases = json.loads(got.stdout.strip().splitlines()[-1])
    summary = json.loads((tmp / "run1" / "summary.json").read_text())
    forward = (summary.get("collect") or {}).get("forward_images")
    best = min(walls)
    print(f"cached re-sweep: {summary['images']['scored']} images, forward passes {forward}, 21 λ x 4 T, bootstrap "
          f"{summary['settings']['bootstrap']}, {summary['settings']['folds']}-fold CV "
          f"(first, filling the cache: {first:.1f} s)")
    print(f"  whole process: {best:.2f} s (min of {len(walls)}: {', '.join(f'{w:.2f}' for w in walls)}); "
          f"target <= {a.cached_target:.1f} s: {'PASS' if best <= a.cached_target else 'FAIL'}")
    print(f"  breakdown (one more process, {phases['total']:.2f} s):")
    for name, sec in sorted(phases["phases"].items(), key=lambda kv: -kv[1]):
        print(f"    {sec:7.3f} s  {name}")
    return best <= a.cached_target


def _first(a, data: Path) -> bool:
    """A first sweep (empty cache) and one plain evaluation, each a whole process, interleaved."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="sweep-first-"))
    size = int(a.input_size.replace(" ", ",").split(",")[-1])
    plain = [sys.executable, str(HERE / "_plain_eval.py"), "--weights", a.source, "--arch", a.arch, "--data",
             str(data), "--size", str(size), "--mean", a.mean, "--std", a.std]
    cli = [sys.executable, "-m", "patchcsra", "sweep-lambda"]
    t_plain, t_sweep = [], []
    for i in range(max(1, a.repeats)):
        t_plain.append(_wall(plain))
        t_sweep.append(_wall(cli + _cli_args(a, data, tmp / f"run{i}", tmp / f"cache{i}")))
    ratio = min(t_sweep) / min(t_plain)
    print(f"first sweep (empty cache, {len(t_sweep)} rounds): {min(t_sweep):.1f} s vs one plain evaluation "
          f"{min(t_plain):.1f} s = {ratio:.3f}x; target <= {a.first_target:.2f}x: "
          f"{'PASS' if ratio <= a.first_target else 'FAIL'}")
    print(f"  rounds: sweep {', '.join(f'{t:.1f}' for t in t_sweep)} s; plain {', '.join(f'{t:.1f}' for t in t_plain)} s")
    return ratio <= a.first_target


def _in_process(a) -> int:

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
