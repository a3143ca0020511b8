"""Where and how a pass runs: device, mixed precision, DataLoader workers, and what out-of-memory looks like.

* :func:`resolve_device` -- ``auto`` / ``cpu`` / ``cuda[:N]`` -> ``torch.device`` (CUDA when present).
* :func:`resolve_amp` -- ``auto`` (bf16 on CUDA, none on CPU) / ``bf16`` / ``fp16`` / ``none`` -> dtype.
* :func:`default_workers` -- the machine's cores less one for the main process, at most 8.
* :data:`OOM_ERRORS` -- what a device out of memory raises (nothing else is retried).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import PatchCSRAError

__all__ = ["resolve_device", "resolve_amp", "default_workers", "AMP_DTYPES", "OOM_ERRORS"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
#: what a device out of memory raises (``torch.cuda.OutOfMemoryError`` is the same class); nothing else is retried.
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError,)


def resolve_device(device: Optional[str]) -> torch.device:
    """``None``/``auto``: CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise PatchCSRAError(f"device={device!r}: give cpu, cuda, cuda:N or auto") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise PatchCSRAError(f"device={device!r}: CUDA is not available here; use --device cpu")
    return d


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 on CUDA, full precision on CPU; else ``bf16`` / ``fp16`` / ``none``."""
    a = "auto" if amp is None else str(amp).lower()
    if a == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if a not in AMP_DTYPES:
        raise PatchCSRAError(f"amp={amp!r}: choose auto, bf16, fp16 or none")
    return AMP_DTYPES[a]


def default_workers() -> int:
    """DataLoader workers: the machine's cores less one for the main process, at most 8."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, n - 1))
