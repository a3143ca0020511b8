"""glibc malloc settings for a pass on the CPU: a fixed mmap threshold and no heap trimming.

PyTorch's CPU tensors come from the C allocator. With glibc's dynamic thresholds, a network whose intermediate
tensors are freed as soon as they are used -- every ``torch.fx`` GraphModule, and so the forward-feature graphs
of :mod:`patchcsra.heads.fx` -- makes glibc trim its heap and grow it again at every layer, and each regrown
page faults on first touch: on a 2-core machine a CIFAR ResNet-56 feature graph at batch 32 ran 12-20% slower
than the same modules called eagerly, and the eager model itself ~10% slower than it can. A fixed mmap threshold
of 32 MiB (glibc's maximum) and a trim threshold of 1 GiB remove the difference (``benchmarks/sweep_cost.py
--mode first``). It is what PyTorch's CPU performance guide gets from jemalloc/tcmalloc, set in-process.

Called by the command line at start-up (:func:`patchcsra.cli.main`); library code never changes the process's
allocator. Skipped where it cannot apply or someone chose already: not glibc, ``MALLOC_*`` / ``GLIBC_TUNABLES``
set, an allocator in ``LD_PRELOAD``, or ``PATCHCSRA_MALLOC=system``.
"""
from __future__ import annotations

import os
import sys

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 32 * 2 ** 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: larger blocks still get their own map
TRIM_THRESHOLD = 2 ** 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds for this process; returns whether they were set."""
    env = os.environ
    if not sys.platform.startswith("linux") or env.get("PATCHCSRA_MALLOC", "").lower() == "system":
        return False
    if any(k.startswith("MALLOC_") for k in env) or "malloc" in env.get("GLIBC_TUNABLES", ""):
        return False
    if any(a in env.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
