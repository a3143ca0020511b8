"""A pass whose statistics would not fit in memory: its rows go to files, its result is a store on disk.

:func:`patchcsra.collect` with a stats cache, when ``N x C x (3 + nT)`` float32 exceeds
``CollectOptions.store_above`` bytes (default :data:`STORE_ABOVE_BYTES`), fills memory-mapped row files in the
cache entry instead of tensors in RAM (resumed parts are read into them the same way), then writes them once, in
blocks of rows, as a class-major store (:class:`patchcsra.store.StatsWriter`) in the entry's ``store/`` folder and
returns :func:`patchcsra.store.open_stats` of it: the sweep then evaluates it in blocks of classes. The row files
are removed. A later pass over the same entry opens the store at once while the entry's parts are the ones it was
built from (their names, sizes and mtimes are in the store's header); otherwise it is built again.

The values are those of the in-memory pass, bit for bit (float32 copies; ``tests/test_store.py``). Page-cache
pages of the row files count in RSS while they are resident, but they are file-backed and reclaimable: what the
kernel needs it writes back, nothing is held in anonymous memory.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .cache import CacheEntry
from .errors import PatchCSRAError

__all__ = ["STORE_ABOVE_BYTES", "stats_bytes", "use_store", "open_built", "file_rows", "drop_rows", "build_store"]

_logger = logging.getLogger(__name__)

#: statistics (float32 bytes of base, max, avgmax and att) above which a cached pass keeps them on disk
STORE_ABOVE_BYTES = 2 * 2 ** 30
STORE_DIR = "store"
ROWS_DIR = "rows.tmp"
#: rows per block when the row files are copied into the class-major store
_BLOCK_ENTRIES = 2 ** 24


def stats_bytes(n: int, c: int, n_t: int) -> int:
    """float32 bytes of one pass's statistics: ``N x C x (3 + nT)`` (base, max, avgmax, att)."""
    return 4 * int(n) * int(c) * (3 + int(n_t))


def use_store(n: int, c: int, n_t: int, store_above: Optional[int]) -> bool:
    """Whether a cached pass of this size keeps its statistics on disk (``store_above`` None: the default)."""
    limit = STORE_ABOVE_BYTES if store_above is None else int(store_above)
    return stats_bytes(n, c, n_t) > limit


def _parts_signature(entry: CacheEntry) -> str:
    """blake2b of the entry's ``meta.json`` and of every part file's name, size and mtime (shards included)."""
    h = hashlib.blake2b(digest_size=16)
    try:
        h.update((entry.path / "meta.json").read_bytes())
    except OSError:
        return ""
    for p in sorted(entry.path.rglob("part-*.pt")):  # the store and the row files hold .bin files only
        try:
            st = p.stat()
        except OSError:
            return ""
        h.update(f"{p.relative_to(entry.path).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def open_built(entry: CacheEntry, key: str, temps: Sequence[float], meta: dict) -> Optional[Any]:
    """The entry's store as store-backed :class:`~patchcsra.stats.Stats` when it was built from the entry's
    current parts for this key and temperatures, with ``meta`` (this pass's record) as its meta; else None."""
    from .store import open_stats

    folder = entry.path / STORE_DIR
    if not (folder / "header.json").exists():
        return None
    try:
        stats = open_stats(folder)
    except PatchCSRAError as e:
        _logger.warning("stats store %s cannot be read (%s); it is built again", folder, e)
        return None
    built = stats.meta.get("built_from") or {}
    if (built.get("key") != key or built.get("parts") != _parts_signature(entry)
            or [float(t) for t in stats.temperatures] != [float(t) for t in temps]):
        return None
    stats.meta = dict(meta)
    return stats


def file_rows(entry: CacheEntry, n: int, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, Tensor]:
    """Zeroed ``(n, *shape)`` tensors backed by files in the entry's ``rows.tmp/`` (what :func:`alloc_rows` gives,
    on disk): a pass writes into them in place."""
    folder = entry.path / ROWS_DIR
    shutil.rmtree(folder, ignore_errors=True)  # a pass killed before it built its store left them
    folder.mkdir(parents=True)
    out = {}
    for k, (shape, dtype) in shapes.items():
        np_dtype = np.bool_ if dtype == torch.bool else np.float32
        mm = np.memmap(folder / f"{k}.bin", dtype=np_dtype, mode="w+", shape=(int(n),) + tuple(shape))
        out[k] = torch.from_numpy(mm)
    return out


def drop_rows(entry: CacheEntry, data: dict[str, Tensor]) -> None:
    """Forget the row files of :func:`file_rows` (``data``'s maps) and remove them from ``entry``."""
    data.clear()  # the maps of the row files, before they go
    shutil.rmtree(entry.path / ROWS_DIR, ignore_errors=True)


def build_store(entry: CacheEntry, key: str, data: dict[str, Tensor], temps: Sequence[float], *, ids: Sequence[str],
                classes: Sequence[str], single_label: bool, targets: np.ndarray, meta: dict) -> Any:
    """Write the row files ``data`` as the entry's class-major store, remove them, and return the store-backed
    Stats (its meta: ``meta``)."""
    from .store import StatsWriter

    n, c = int(data["base"].shape[0]), int(data["base"].shape[1])
    folder = entry.path / STORE_DIR
    step = max(1, _BLOCK_ENTRIES // max(1, c * (3 + len(temps))))
    built = {"key": key, "parts": _parts_signature(entry)}
    with StatsWriter(folder, n, c, temps, avgmax=True, force=True) as w:
        for a in range(0, n, step):
            w.write_rows(a, {k: data[k][a:a + step].numpy() for k in ("base", "max", "att", "avgmax", "ok")})
        stats = w.finish(ids=ids, classes=classes, single_label=single_label, targets=targets,
                         meta={"built_from": built})
    drop_rows(entry, data)
    stats.meta = dict(meta)
    _logger.info("statistics of %d x %d kept on disk in %s (%.1f GB)", n, c, folder,
                 sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e9)
    return stats
