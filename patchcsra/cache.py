"""The on-disk stats cache: one entry per (model, data, class index, AMP, fingerprint), written in parts.

An entry is a folder ``<key[:24]>-<temperatures digest>`` with ``meta.json`` (key, ``n``, temperatures,
``complete``) and ``part-<start>-<end>.pt`` files, each written atomically (:mod:`patchcsra._io`), so an
interrupted pass resumes at its last saved part. :func:`open_entry` finds the entry whose temperatures cover
a request (complete ones first) or makes a new one covering every temperature this key was ever collected at.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ._io import describe_os_error, torch_save, write_bytes
from .errors import PatchCSRAError

__all__ = ["CacheEntry", "shard_name", "open_entry", "find_entry", "known_temperatures", "mark_complete", "row_shapes",
           "alloc_rows", "digest", "part_digest", "valid_meta", "CONTENTS_FILE", "guarded_write"]

#: per image, blake2b-128 of the file's bytes when its rows were computed (``--verify-cache`` compares them)
CONTENTS_FILE = "contents.bin"

_logger = logging.getLogger(__name__)


def digest(obj: object) -> str:
    """A short blake2b of ``obj`` as sorted JSON (the cache key of a run's facts)."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def part_digest(part: dict[str, Tensor]) -> str:
    """blake2b over every tensor of a part (name, shape, dtype, bytes): what :meth:`CacheEntry.load_into` checks."""
    h = hashlib.blake2b(digest_size=20)
    for k in sorted(part):
        v = part[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
        if v.numel():
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def valid_meta(m: object) -> bool:
    """``meta.json`` as :func:`open_entry` writes it: ``key`` (str), ``n`` (int), ``temperatures`` (numbers)."""
    if not isinstance(m, dict) or not isinstance(m.get("key"), str) or not isinstance(m.get("n"), int):
        return False
    ts = m.get("temperatures")
    try:
        return isinstance(ts, list) and bool(ts) and all(float(t) > 0 for t in ts)
    except (TypeError, ValueError):
        return False


class CacheEntry:
    """A cache entry: ``meta.json`` + ``part-<start>-<end>.pt`` files, each written atomically.

    Every part carries its rows' tensors, the entry's key, its row range and a digest of its tensors; a
    part that does not match (bytes changed, copied from another entry, truncated, unreadable) is dropped
    with one warning naming it, together with the parts after it, and those rows are computed again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key_value: Optional[str] = None
        self.broken = False  # a write failed: the pass goes on without the cache and never marks it complete

    def meta(self) -> Optional[dict]:
        """``meta.json``, or None when it is missing, unreadable or not of the expected shape."""
        try:
            m = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return m if valid_meta(m) else None

    def write_meta(self, meta: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_bytes(self.path / "meta.json", json.dumps(meta, indent=1, default=str).encode())

    def write_contents(self, digests: np.ndarray) -> None:
        """Store ``(n, 16)`` uint8 content digests of the images (row ``i``: the file row ``i`` was computed from)."""
        raw = np.ascontiguousarray(digests, dtype=np.uint8).tobytes()
        write_bytes(self.path / CONTENTS_FILE, raw)
        m = self.meta()
        if m is not None:
            m["contents"] = hashlib.blake2b(raw, digest_size=16).hexdigest()
            self.write_meta(m)

    def contents(self, n: int) -> Optional[np.ndarray]:
        """The stored ``(n, 16)`` content digests, or None when missing, of another size or changed since written."""
        m = self.meta()
        try:
            raw = (self.path / CONTENTS_FILE).read_bytes()
        except OSError:
            return None
        if m is None or len(raw) != 16 * n or m.get("contents") != hashlib.blake2b(raw, digest_size=16).hexdigest():
            return None
        return np.frombuffer(raw, dtype=np.uint8).reshape(n, 16).copy()

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
        """Images ``[0, done)`` are stored contiguously (by the parts' names; :meth:`load_into` checks them); all of
        them for a complete entry held in per-rank shards."""
        if self.shards() is not None:
            return int(self.meta()["n"])  # type: ignore[index]
        n = 0
        for a, b, _ in self.parts():
            if a != n:
                break
            n = b
        return n

    def save_part(self, start: int, part: dict[str, Tensor]) -> None:
        end = start + int(part["base"].shape[0])
        blob = {**part, "_key": self._key(), "_rows": [start, end], "_digest": part_digest(part)}
        torch_save(blob, self.path / f"part-{start:09d}-{end:09d}.pt")

    def _key(self) -> str:
        """The run key and entry name every part of this entry carries (read from ``meta.json`` once)."""
        if self._key_value is None:
            m = self.meta()
            if m is None:
                return f"None/{self.path.name}"  # no usable meta yet: nothing stored matches it
            self._key_value = f"{m['key']}/{self.path.name}"
        return self._key_value

    def _check(self, blob: object, a: int, b: int, out: dict[str, Tensor], key: str) -> Optional[str]:
        """Why a loaded part cannot be used (None: it can)."""
        if not isinstance(blob, dict) or not all(isinstance(blob.get(k), Tensor) for k in out):
            return "it is not a stats part"
        if blob.get("_key") != key:
            return "it belongs to another cache entry"
        if blob.get("_rows") != [a, b]:
            return f"its rows are not {a}-{b}"
        for k, dst in out.items():
            v = blob[k]
            if tuple(v.shape) != (b - a,) + tuple(dst.shape[1:]) or v.dtype != dst.dtype:
                return f"{k} has shape {tuple(v.shape)} {v.dtype}"
        if blob.get("_digest") != part_digest({k: blob[k] for k in out}):
            return "its bytes changed since it was written"
        return None

    # ------------------------------------------------------------------ per-rank shards (torchrun)
    def shards(self) -> Optional[int]:
        """The world size whose per-rank shards hold this (complete) entry's rows, or None for the plain layout."""
        m = self.meta()
        w = m.get("shards") if m is not None and m.get("complete") else None
        return w if isinstance(w, int) and not isinstance(w, bool) and w >= 1 else None

    def shard(self, world: int, rank: int, n_local: int) -> "CacheEntry":
        """Rank ``rank``'s shard of this entry under a ``world``-process run: a sub-entry ``shard-w<W>-r<R>`` holding
        rows ``rank, rank + W, ...`` as its local rows ``0..n_local`` (parts, content digests, ``complete``), so a
        restarted rank resumes at its own last saved part. A shard whose ``meta.json`` does not match is emptied."""
        sub = CacheEntry(self.path / shard_name(world, rank))
        m, parent = sub.meta(), self.meta()
        if parent is None:
            raise PatchCSRAError(f"stats cache {self.path} has no usable meta.json; delete it and rerun")
        key = f"{parent['key']}#shard-{rank}-of-{world}"
        if m is None or m.get("key") != key or m.get("n") != n_local or m.get("temperatures") != parent["temperatures"]:
            if sub.path.exists():
                shutil.rmtree(sub.path)
            sub.write_meta({"key": key, "n": n_local, "temperatures": parent["temperatures"], "complete": False,
                            "world": world, "rank": rank})
        return sub

    def drop_shards(self, keep_world: Optional[int] = None) -> None:
        """Remove the per-rank shards (all, or those of other world sizes than ``keep_world``)."""
        for d in self.path.glob("shard-w*-r*"):
            if keep_world is None or not d.name.startswith(f"shard-w{keep_world}-"):
                shutil.rmtree(d, ignore_errors=True)

    def _load_shards(self, out: dict[str, Tensor], world: int) -> int:
        """All rows from the ``world`` complete shards (row ``i`` from shard ``i % world``), or 0 when one of them
        is missing, incomplete or changed (then every shard is dropped, ``out``'s rows are undefined and are
        computed again). Each part is copied into its rows of ``out`` (RAM or row files): no shard is held whole."""
        n = int(out["base"].shape[0])
        for r in range(world):
            rows = range(r, n, world)
            sub = CacheEntry(self.path / shard_name(world, r))
            m = sub.meta()
            local = {k: v[r::world] for k, v in out.items()}  # strided views: the parts go straight into ``out``
            if m is None or not m.get("complete") or m.get("n") != len(rows) or sub.load_into(local) != len(rows):
                _logger.warning("stats cache %s: shard %s is missing or incomplete; its images are computed again",
                                self.path, sub.path.name)
                self.drop_from(0)
                return 0
        return n

    def load_into(self, out: dict[str, Tensor]) -> int:
        """Copy the contiguous, verified stored parts into ``out``'s rows (preallocated, ``N`` rows).

        Returns the rows filled. The first part that fails its check is removed with the parts after it,
        with one warning naming it. An entry written by a ``torchrun`` pass is read from its per-rank shards,
        all or nothing.
        """
        world = self.shards()
        if world is not None:
            return self._load_shards(out, world)
        stop, key = 0, self._key()
        parts = self.parts()
        for i, (a, b, p) in enumerate(parts):
            if a != stop or b > out["base"].shape[0]:
                break
            try:
                blob = torch.load(p, weights_only=True)
                why = self._check(blob, a, b, out, key)
            except Exception as e:  # noqa: BLE001  (truncated, random bytes, another format: recompute)
                why = f"it cannot be read ({type(e).__name__})"
            if why is not None:
                _logger.warning("stats cache part %s is not used: %s; its images are computed again", p, why)
                self.drop_from(a)
                break
            for k in out:
                out[k][a:b] = blob[k]
            stop = b
        return stop

    def drop_from(self, row: int) -> int:
        """Remove every part that ends after ``row``; returns where the kept parts end (the resume point). An entry
        held in per-rank shards is dropped whole (its rows are not contiguous on disk)."""
        if self.shards() is not None:
            self.drop_shards()
            m = self.meta() or {}
            m.pop("shards", None)
            m["complete"] = False
            self.write_meta(m)
            row = 0
        keep = 0
        for a, b, p in self.parts():
            if b > row:
                p.unlink(missing_ok=True)
            elif a == keep:
                keep = b
        m = self.meta()
        if m is not None and m.get("complete"):
            m["complete"] = False
            self.write_meta(m)
        return keep

    def load(self, n: int, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, Tensor]:
        """All ``n`` rows; ``shapes`` maps each key to its per-row shape and dtype."""
        out = alloc_rows(n, shapes)
        stop = self.load_into(out)
        if stop != n:
            raise PatchCSRAError(f"stats cache {self.path} is incomplete ({stop}/{n} images); delete it and rerun")
        return out


def shard_name(world: int, rank: int) -> str:
    """The folder of rank ``rank``'s shard in a ``world``-process pass."""
    return f"shard-w{int(world)}-r{int(rank)}"


def row_shapes(c: int, n_t: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-image shapes of the stored statistics for ``c`` classes and ``n_t`` temperatures (``avgmax``: the head
    on the avg+max pooled feature vector, :attr:`patchcsra.stats.Stats.avgmax`; NaN where it does not apply)."""
    return {"base": ((c,), torch.float32), "max": ((c,), torch.float32), "att": ((c, n_t), torch.float32),
            "avgmax": ((c,), torch.float32), "ok": ((), torch.bool)}


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
    if entry.broken:
        return
    m = entry.meta() or {}
    if not m.get("complete"):
        m["complete"] = True
        try:
            entry.write_meta(m)
        except OSError as e:
            _logger.warning("stats cache %s cannot be written (%s); it stays incomplete", entry.path,
                            describe_os_error(e))


def usable_entry(cache_dir: Union[str, Path], key: str, temps: list[float], temps_req: set[float], n: int,
                 fingerprint: Optional[dict]) -> Optional[CacheEntry]:
    """:func:`open_entry`, or None with one warning when the cache cannot be used (a file in its place, no
    permission, a full or read-only disk): the pass then runs without it."""
    try:
        return open_entry(cache_dir, key, temps, temps_req, n, fingerprint)
    except (OSError, PatchCSRAError) as e:
        why = describe_os_error(e) if isinstance(e, OSError) else str(e)
        _logger.warning("stats cache %s cannot be used (%s); running without it", cache_dir, why)
        return None


def guarded_write(entry: CacheEntry, write, *args) -> None:
    """``write(*args)`` (a :class:`CacheEntry` method); on a failed write, one warning and the pass goes on
    without the cache (the entry is never marked complete)."""
    if entry.broken:
        return
    try:
        write(*args)
    except (OSError, PatchCSRAError) as e:
        entry.broken = True
        why = describe_os_error(e) if isinstance(e, OSError) else str(e)
        _logger.warning("stats cache %s cannot be written (%s); the pass goes on without it", entry.path, why)


def save_part_or_give_up(entry: CacheEntry, start: int, part: dict[str, Tensor]) -> None:
    """:meth:`CacheEntry.save_part` through :func:`guarded_write`."""
    guarded_write(entry, entry.save_part, start, part)
