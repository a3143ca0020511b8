"""The on-disk stats cache: one entry per (model, data, class index, AMP, fingerprint), written in parts.

An entry is a folder ``<key[:24]>-<temperatures digest>`` with ``meta.json`` (key, ``n``, temperatures,
``complete``) and ``part-<start>-<end>.pt`` files, each written atomically (:mod:`patchcsra._io`), so an
interrupted pass resumes at its last saved part. :func:`open_entry` finds the entry whose temperatures cover
a request (complete ones first) or makes a new one covering every temperature this key was ever collected at.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._io import torch_save, write_bytes
from .errors import PatchCSRAError

__all__ = ["CacheEntry", "open_entry", "find_entry", "known_temperatures", "mark_complete", "row_shapes",
           "alloc_rows", "digest"]


def digest(obj: object) -> str:
    """A short blake2b of ``obj`` as sorted JSON (the cache key of a run's facts)."""
    import hashlib

    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


class CacheEntry:
    """A cache entry: ``meta.json`` + ``part-<start>-<end>.pt`` files, each written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def meta(self) -> Optional[dict]:
        try:
            return json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def write_meta(self, meta: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_bytes(self.path / "meta.json", json.dumps(meta, indent=1, default=str).encode())

    def parts(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in self.path.glob("part-*.pt"):
            try:
                a, b = p.stem.split("-")[1:3]
                out.append((int(a), int(b), p))
            except ValueError:
                continue
        return sorted(out)

    def done(self) -> int:
        """Images ``[0, done)`` are stored contiguously."""
        n = 0
        for a, b, _ in self.parts():
            if a != n:
                break
            n = b
        return n

    def save_part(self, start: int, part: dict[str, Tensor]) -> None:
        end = start + int(part["base"].shape[0])
        torch_save(part, self.path / f"part-{start:09d}-{end:09d}.pt")

    def load_into(self, out: dict[str, Tensor]) -> int:
        """Copy the contiguous stored parts into ``out``'s rows (preallocated, ``N`` rows); returns rows filled."""
        stop = 0
        for a, b, p in self.parts():
            if a != stop:
                break
            for k, v in torch.load(p, weights_only=True).items():
                out[k][a:b] = v
            stop = b
        return stop

    def load(self, n: int, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, Tensor]:
        """All ``n`` rows; ``shapes`` maps each key to its per-row shape and dtype."""
        out = alloc_rows(n, shapes)
        stop = self.load_into(out)
        if stop != n:
            raise PatchCSRAError(f"stats cache {self.path} is incomplete ({stop}/{n} images); delete it and rerun")
        return out


def row_shapes(c: int, n_t: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-image shapes of the stored statistics for ``c`` classes and ``n_t`` temperatures."""
    return {"base": ((c,), torch.float32), "max": ((c,), torch.float32), "att": ((c, n_t), torch.float32),
            "ok": ((), torch.bool)}


def alloc_rows(n: int, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, Tensor]:
    """Zeroed ``(n, *shape)`` tensors, one per key: the stats are written in place, never concatenated."""
    return {k: torch.zeros((n,) + shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}


def find_entry(root: Path, key: str, temps: Sequence[float]) -> Optional[CacheEntry]:
    """A cached entry with the same key whose temperatures cover ``temps`` (complete ones first)."""
    best: Optional[tuple[int, CacheEntry]] = None
    for d in sorted(root.glob(f"{key[:24]}-*")):
        e = CacheEntry(d)
        m = e.meta()
        if not m or m.get("key") != key:
            continue
        have = {float(t) for t in m["temperatures"]}
        if not set(float(t) for t in temps) <= have:
            continue
        rank = 0 if m.get("complete") else 1
        if best is None or rank < best[0]:
            best = (rank, e)
    return best[1] if best else None


def known_temperatures(root: Path, key: str) -> set[float]:
    out: set[float] = set()
    for d in root.glob(f"{key[:24]}-*"):
        m = CacheEntry(d).meta()
        if m and m.get("key") == key:
            out |= {float(t) for t in m["temperatures"]}
    return out


def open_entry(cache_dir: Union[str, Path], key: str, temps: list[float], temps_req: set[float], n: int,
                fingerprint: Optional[dict]) -> CacheEntry:
    """The cached entry covering ``temps_req`` (to load or resume), or a new one for ``temps``."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    entry = find_entry(root, key, temps_req)
    if entry is None:
        temps = sorted(set(temps) | known_temperatures(root, key))
        entry = CacheEntry(root / f"{key[:24]}-{digest(temps)[:8]}")
        entry.write_meta({"key": key, "n": n, "temperatures": [str(t) for t in temps], "complete": False,
                          "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "fingerprint": fingerprint or {}})
    return entry


def mark_complete(entry: CacheEntry) -> None:
    m = entry.meta() or {}
    if not m.get("complete"):
        m["complete"] = True
        entry.write_meta(m)
