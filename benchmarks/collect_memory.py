"""Peak memory of collection on a COCO-sized problem: 40,000 images x 80 classes x the temperature list.

Statistics are held in float32 on the CPU (``base``, ``max`` and ``att`` for each T: ``N * C * (2 + nT) * 4``
bytes); per-location maps are reduced inside each batch and never kept. This script runs the real
:func:`patchcsra.collect` over 40,000 synthetic 32x32 images (generated in ``__getitem__``, no files) through
a small GAP + Linear CNN with 80 outputs and 8x8 locations, with the paper's temperatures {1..7, inf}, and
prints the stats' size and the process's peak RSS growth during collection (Linux ``ru_maxrss``).

    python benchmarks/collect_memory.py            # exit 1 if the peak growth exceeds 2x the stats' size (activations and the allocator add a fixed ~85 MiB)
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=40_000)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=256)
    a = p.parse_args(argv)

    import torch

    import patchcsra
    from patchcsra.stats import DEFAULT_TEMPERATURES, collect
    from _synthetic import synthetic_problem

    n, c = a.images, a.classes
    ds, model = synthetic_problem(n, c, positives=0.04, name="synthetic-coco-sized")
    patched = patchcsra.patch(model, lam=0.0, input_size=(3, 32, 32))
    temps = tuple(DEFAULT_TEMPERATURES)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    t0 = time.perf_counter()
    st = collect(patched, ds, temperatures=temps, batch_size=a.batch_size, device="cpu", amp="none", workers=0,
                 cache_dir=None)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = sum(t.numel() * t.element_size() for t in (st.base, st.max, st.att)) / 2**20
    want = n * c * (2 + len(st.temperatures)) * 4 / 2**20
    print(f"collect: {n:,} images x {c} classes x {len(st.temperatures)} temperatures "
          f"({', '.join('inf' if math.isinf(t) else f'{t:g}' for t in st.temperatures)}), {seconds:.1f} s, "
          f"torch {torch.__version__}")
    print(f"stats held: {held:.1f} MiB float32 (N*C*(2+nT)*4 = {want:.1f} MiB); dtype {st.att.dtype}, "
          f"device {st.att.device}")
    growth = after - before
    print(f"peak RSS: {before:.0f} MiB before, {after:.0f} MiB after; growth {growth:.0f} MiB "
          f"= {growth / held:.2f}x the stats")
    ok = st.att.dtype == torch.float32 and st.att.device.type == "cpu" and abs(held - want) < 1e-6 \
        and growth <= 2 * held
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
