"""One pass over a dataset -> everything a λ/T sweep needs, cached on disk and resumable.

* :class:`Stats` -- per image and class: the model's own logit ``base``, ``max_k s_k`` and
  ``y_att(T)`` for a list of temperatures, plus targets, ids and which images decoded (``ok``).
  ``Stats.scores(lam, T)`` is ``base + lam * att(T)``: every grid point after the pass is free.
* :func:`collect` -- run the backbone once per image (AMP + channels_last + pinned memory on GPU),
  writing parts of the result to a cache entry (:mod:`patchcsra.cache`) keyed by the model / dataset / transform / class
  map fingerprint. An interrupted run resumes at its last saved part; a later call whose
  temperatures are already in a cached entry does no forward pass at all.
* :func:`model_fingerprint` -- a hash of a module's class, parameters and buffers.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .cache import (CacheEntry, alloc_rows, digest, guarded_write, mark_complete, row_shapes, save_part_or_give_up,
                    shard_name, usable_entry)
from . import stats_disk as SD
from ._io import describe_os_error
from .runtime import OOM_ERRORS, default_workers, resolve_amp, resolve_device
from .errors import DatasetError, PatchCSRAError
from .data.classes import check_class_reduce, class_groups
from .options import CollectOptions, split_options
from .heads.base import HeadSplit, to_locations
from .patcher import PatchedClassifier, check_temperatures, residual_attention, temperature_text

__all__ = ["Stats", "collect", "model_fingerprint", "DEFAULT_TEMPERATURES", "STATS_VERSION"]

_logger = logging.getLogger(__name__)

STATS_VERSION = 2  # 2: + avgmax (the head on the avg+max pooled features)
#: collected with every pass (cheap next to the backbone): the paper's multi-head temperature set.
DEFAULT_TEMPERATURES: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, math.inf)
#: stats elements (N x C x nT) up to which DEFAULT_TEMPERATURES are collected besides the requested ones.
EXTRA_T_BUDGET = 2 ** 27

Progress = Callable[[int, int], None]


@dataclass
class Stats:
    """The result of one pass: ``N`` images, ``C`` dataset classes, ``nT`` temperatures.

    Attributes:
        base: ``(N, C)`` float32, the model's own logits (λ = 0).
        max: ``(N, C)`` float32, ``max_k s_k`` over the ``L`` locations.
        att: ``(N, C, nT)`` float32, ``sum_k softmax_k(T s_k) s_k`` for each of ``temperatures``.
        temperatures: ``nT`` values, ``inf`` included (equal to ``max``).
        targets: ``(N, C)`` int8, 1 present / 0 absent / -1 ignored.
        ok: ``(N,)`` bool, False for images that could not be read.
        ids: ``N`` image ids; classes: ``C`` class names.
        single_label: one positive per image (top-1/top-5 are reported).
        meta: fingerprint, model, dataset and transform records.
        avgmax: ``(N, C)`` float32 or None, ``head(0.5 * (mean_k x_k + max_k x_k))``: the model's own
            single-location head (``forward_single``) on the avg+max pooled feature vector (timm's
            ``avgmax`` global pooling, then the head); NaN for splits whose locations are not one feature map
            (multi-branch, attention pooling).
    """

    base: Tensor
    max: Tensor
    att: Tensor
    temperatures: tuple[float, ...]
    targets: np.ndarray
    ok: np.ndarray
    ids: tuple[str, ...]
    classes: tuple[str, ...]
    single_label: bool
    meta: dict = field(default_factory=dict)
    avgmax: Optional[Tensor] = None
    #: the :class:`patchcsra.store.DenseStore` these arrays are memory-mapped from (:func:`patchcsra.store.open_stats`),
    #: or None for statistics in RAM; a store-backed Stats is evaluated in blocks of classes (:mod:`patchcsra.blocked`)
    store: Optional[Any] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.base.shape[0])

    def att_for(self, temperature: float) -> Tensor:
        """``(N, C)`` attention scores for one temperature (must have been collected)."""
        t = float(temperature)
        if math.isinf(t):
            return self.max
        for i, have in enumerate(self.temperatures):
            if have == t:
                return self.att[..., i]
        raise PatchCSRAError(f"temperature {t:g} was not collected "
                             f"(have {','.join(temperature_text(t) for t in self.temperatures)})")

    def scores(self, lam: float, temperature: float = math.inf) -> Tensor:
        """``(N, C)`` patched logits ``base + lam * att(T)``.

        Computed by numpy on the tensors' memory (the same float32 products and sums, bit for bit): torch's thread
        pool costs ~100x more than the arithmetic on arrays this small when the cores are busy."""
        if lam == 0:
            return self.base
        att = self.att_for(temperature).numpy()
        return torch.from_numpy(self.base.numpy() + np.float32(lam) * att)

    def labels(self) -> np.ndarray:
        """``(N,)`` int64 class index of single-label data."""
        if not self.single_label:
            raise PatchCSRAError("labels() needs single-label data; these targets are multi-label")
        return self.targets.argmax(axis=1).astype(np.int64)

    def select(self, rows: np.ndarray) -> "Stats":
        """A subset of images (bool mask or indices)."""
        idx = np.flatnonzero(rows) if rows.dtype == bool else np.asarray(rows)
        t = torch.as_tensor(idx, dtype=torch.long)
        return Stats(self.base[t], self.max[t], self.att[t], self.temperatures, self.targets[idx], self.ok[idx],
                     tuple(self.ids[i] for i in idx), self.classes, self.single_label, dict(self.meta),
                     None if self.avgmax is None else self.avgmax[t])


# ----------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: nn.Module) -> str:
    """blake2b over the class name and every parameter and buffer (names, shapes, dtypes, bytes)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(type(model).__name__.encode())
    try:
        sd = model.state_dict()
    except Exception:  # noqa: BLE001  (some exported modules have no state dict)
        sd = {}
    for k in sorted(sd):
        v = sd[k]
        if not isinstance(v, Tensor):
            continue
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
        if v.numel():
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- collect
def collect(patched: PatchedClassifier, dataset, *, temperatures: Sequence[float] = (math.inf,),
            class_index: Optional[Sequence[Any]] = None, class_reduce: str = "max",
            options: Optional[CollectOptions] = None, fingerprint: Optional[dict] = None,
            progress: Optional[Progress] = None, **option_kwargs: Any) -> Stats:
    """Run ``patched``'s backbone once per image of ``dataset`` and keep what a λ/T sweep needs.

    Args:
        patched: a :class:`PatchedClassifier` (its λ and T are not used; all are collected).
        dataset: a :class:`patchcsra.data.ImageDataset` whose ``transform`` is set; items are
            ``(image (3, H, W), index, ok)``.
        temperatures: T values to collect; ``inf`` always, and :data:`DEFAULT_TEMPERATURES` too while
            ``N x C x 8 <= EXTRA_T_BUDGET`` (e.g. VOC, COCO; not ImageNet's 50,000 x 1,000).
        class_index: ``(C,)`` model output index per dataset class (default: identity); an entry may be a
            list of output indices (a many-to-one class map, :func:`patchcsra.data.align_class_groups`).
        class_reduce: how the outputs ``j`` of a many-to-one class ``c`` are reduced, ``'max'`` or
            ``'logsumexp'`` (``R`` below). It applies to the model's logits and to the per-location scores
            before the residual attention: ``base_c = R_j base_j`` and ``s_{c,k} = R_j s_{j,k}``, then
            ``max_k s_{c,k}`` and ``y_att(T)`` from those; so λ=0 is exactly ``R_j model(x)_j``. Unused (and
            not in the cache key) when every class has one output.
        options: a :class:`~patchcsra.options.CollectOptions`; its fields may also be given as keywords
            (``batch_size=``, ``device=``, ``amp=``, ``channels_last=``, ``workers=``, ``cache_dir=``,
            ``save_every=``): ``batch_size``/``workers`` are the DataLoader's (``workers=None``:
            :func:`~patchcsra.runtime.default_workers`); ``device`` ``auto``/``cpu``/``cuda[:N]``; ``amp``
            ``auto`` (bf16 on CUDA) / ``bf16`` / ``fp16`` / ``none``; ``channels_last`` NHWC (default: on CUDA);
            ``cache_dir`` where entries are kept (``None``: no caching or resuming); ``save_every`` images per
            cache part and ``save_interval`` seconds between parts, whichever comes first (how much an
            interruption can lose); ``verify_cache`` hashes every byte of every image and
            computes again the rows of any file that changed since its rows were cached (the cache key holds each
            file's size, mtime and sampled bytes, see :meth:`~patchcsra.data.ImageDataset.fingerprint`).
        fingerprint: extra facts that identify the run (model spec, transform); hashed into the key.
        progress: ``progress(done, total)`` after every batch.

    Returns:
        :class:`Stats` over all ``N`` images (``ok`` marks unreadable ones; their rows are zeros). Its
        ``meta["batch_size"]`` is the batch size the pass ended at: on CUDA out of memory a batch is
        retried at half the size (logged as a warning, counted in ``meta["oom_retries"]``).

    Raises:
        PatchCSRAError: CUDA out of memory even at batch size 1.
    """
    opts = split_options(option_kwargs, collect=options, allowed=(CollectOptions,))[1]
    if not isinstance(patched, PatchedClassifier):
        raise PatchCSRAError(f"collect needs a PatchedClassifier (from patchcsra.patch), got {type(patched).__name__}")
    if len(dataset) == 0:
        raise DatasetError(f"dataset {getattr(dataset, 'name', '')!r} has no images")
    p = _plan(patched, dataset, check_temperatures(temperatures), class_index, opts, fingerprint or {},
              class_reduce)
    from . import dist

    if p.options.cache_dir is None and p.past_store_limit(len(p.temps)):
        _logger.warning("the statistics of this pass (%.1f GB: %d images x %d classes x %d temperatures) are held in "
                        "RAM because there is no stats cache; give a stats cache (drop --no-cache) to keep them on "
                        "disk", SD.stats_bytes(p.n, len(p.index), len(p.temps)) / 1e9, p.n, len(p.index),
                        len(p.temps))
    if dist.world_size() > 1:
        return _collect_distributed(p, progress)
    return _collect_single(p, progress)


@dataclass
class _Plan:
    """One pass, resolved once: what every step of the collection reads."""

    patched: PatchedClassifier
    dataset: Any
    index: list[Any]  # model output per dataset class (a list of outputs for a many-to-one class)
    temps: list[float]  # collected: the requested ones (and inf), plus the paper's set while small
    temps_req: set[float]
    options: CollectOptions
    dev: torch.device
    amp_dtype: Optional[torch.dtype]
    workers: int
    key: str  # the cache key: model, data, class index (groups and reduction), AMP, fingerprint
    fingerprint: dict
    groups: Optional[list[list[int]]] = None  # outputs per dataset class when some class has several
    reduce: str = "max"  # how a class's outputs are reduced (with ``groups``)
    data_fingerprint: str = ""  # the dataset's fingerprint, computed once for the key

    @property
    def n(self) -> int:
        return len(self.dataset)

    def past_store_limit(self, n_temps: int) -> bool:
        """Whether this pass's statistics (``N x C x (3 + n_temps)`` float32) exceed ``options.store_above``."""
        return SD.use_store(self.n, len(self.index), n_temps, self.options.store_above)


def _plan(patched: PatchedClassifier, dataset, temperatures: Sequence[float], class_index: Optional[Sequence[Any]],
          opts: CollectOptions, fingerprint: dict, class_reduce: str = "max") -> _Plan:
    temps_req = {float(t) for t in temperatures} | {math.inf}
    # the paper's T set rides along for free unless it would make the stats large (ImageNet-sized C)
    small = len(dataset) * len(dataset.classes) * len(DEFAULT_TEMPERATURES) <= EXTRA_T_BUDGET
    temps = sorted(temps_req | (set(DEFAULT_TEMPERATURES) if small else set()))
    dev = resolve_device(opts.device)
    amp_dtype = resolve_amp(opts.amp, dev)
    c_model = int(patched.info.num_classes)
    index, groups = _class_plan(class_index, c_model, len(dataset.classes))
    reduce = check_class_reduce(class_reduce)
    what = {"index": index} if groups is None else {"index": groups, "reduce": reduce}  # one-to-one: the old key
    data_fp = dataset.fingerprint()  # reads each image's sampled bytes: once per pass (kept in Stats.meta)
    key = digest({"v": STATS_VERSION, "model": model_fingerprint(patched.split), "data": data_fp,
                  **what, "amp": str(amp_dtype), "extra": fingerprint})
    workers = default_workers() if opts.workers is None else int(opts.workers)
    return _Plan(patched, dataset, groups or index, temps, temps_req, opts, dev, amp_dtype, workers, key, fingerprint,
                 groups, reduce, data_fp)


def _class_plan(class_index: Optional[Sequence[Any]], c_model: int,
                c_data: int) -> tuple[list[int], Optional[list[list[int]]]]:
    """``(one output per class, None)`` when every class has one output, else ``([], outputs per class)``."""
    if class_index is None:
        return list(range(c_model)), None
    groups = class_groups(class_index)
    if len(groups) != c_data:
        raise PatchCSRAError(f"class_index has {len(groups)} entries for {c_data} dataset classes")
    bad = [i for g in groups for i in g if not 0 <= i < c_model]
    if bad:
        raise PatchCSRAError(f"class_index: output {bad[0]} is outside [0, {c_model}) (the model outputs {c_model})")
    if all(len(g) == 1 for g in groups):
        return [g[0] for g in groups], None
    return [], groups


def _class_gather(p: _Plan, dev: torch.device) -> Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]]:
    """``gather(base (b, C_m), s (b, C_m, L)) -> (base (b, C), s (b, C, L))`` for the dataset's classes; ``None``
    for the identity. A many-to-one class reduces its outputs (``p.reduce``) over a padded ``(C, G)`` index whose
    padding points at an appended ``-inf`` output (neutral for max and logsumexp)."""
    c_model = int(p.patched.info.num_classes)
    if p.groups is None:
        if p.index == list(range(c_model)):
            return None
        idx = torch.as_tensor(p.index, dtype=torch.long, device=dev)
        return lambda base, s: (base[:, idx], s[:, idx])
    width = max(len(g) for g in p.groups)
    pad = torch.tensor([g + [c_model] * (width - len(g)) for g in p.groups], dtype=torch.long,
                       device=dev)  # (C, G)
    reduce = torch.amax if p.reduce == "max" else torch.logsumexp

    def gather(base: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        base = torch.cat([base, base.new_full((base.shape[0], 1), -math.inf)], dim=1)[:, pad]  # (b, C, G)
        s = torch.cat([s, s.new_full((s.shape[0], 1, s.shape[2]), -math.inf)], dim=1)[:, pad]  # (b, C, G, L)
        return reduce(base, dim=2), reduce(s, dim=2)

    return gather


def _collect_single(p: _Plan, progress: Optional[Progress]) -> Stats:
    """One process: resume from the cache entry's stored parts, run the rest, mark the entry complete."""
    cache_dir = p.options.cache_dir
    entry = usable_entry(cache_dir, p.key, p.temps, p.temps_req, p.n, p.fingerprint) if cache_dir is not None else None
    temps = p.temps if entry is None else sorted(float(t) for t in entry.meta()["temperatures"])  # type: ignore[index]
    shapes = row_shapes(len(p.index), len(temps))
    on_disk = entry is not None and p.past_store_limit(len(temps))
    if on_disk and not p.options.verify_cache and entry.meta().get("complete"):  # type: ignore[union-attr]
        built = SD.open_built(entry, p.key, temps, _meta(p, entry, 0))  # type: ignore[arg-type]
        if built is not None:
            return built
    data = SD.file_rows(entry, p.n, shapes) if on_disk else alloc_rows(p.n, shapes)  # type: ignore[arg-type]
    start = _reusable_rows(p, entry, data) if entry is not None else 0
    if start:
        _logger.info("resuming %s at image %d/%d", entry.path if entry else "", start, p.n)
    used = (p.options.batch_size, 0)
    if start < p.n:
        used = _run(p, list(range(start, p.n)), temps, {k: v[start:] for k, v in data.items()}, entry, progress)
    if entry is not None:
        mark_complete(entry)
    return _result(p, data, temps, entry, p.n - start, on_disk=on_disk, used=used)


def _result(p: _Plan, data: dict[str, Tensor], temps: Sequence[float], entry: Optional[CacheEntry],
            forward_images: int, world: int = 1, *, on_disk: bool, used: Optional[tuple[int, int]] = None) -> Stats:
    """The pass's Stats: ``data`` as tensors in RAM, or (``on_disk``: ``data`` are the entry's row files) written as
    the entry's class-major store and returned memory-mapped. Call it once the entry's parts are final: the store
    records them, and a later pass reopens it while they are unchanged."""
    if on_disk and entry is not None and not entry.broken:
        ds = p.dataset
        try:
            return SD.build_store(entry, p.key, data, temps, ids=tuple(ds.ids), classes=tuple(ds.classes),
                                  single_label=bool(ds.single_label), targets=np.asarray(ds.targets, dtype=np.int8),
                                  meta=_meta(p, entry, forward_images, world, used))
        except OSError as e:  # e.g. no room for the store: the row files hold the same values, memory-mapped
            _logger.warning("stats store in %s cannot be written (%s); the sweep reads the statistics from its row "
                            "files instead", entry.path, describe_os_error(e))
    return _stats(p, data, temps, entry, forward_images, world, used)


def _reusable_rows(p: _Plan, entry: CacheEntry, data: dict[str, Tensor], rows: Optional[Sequence[int]] = None) -> int:
    """Load ``entry``'s verified parts into ``data``; returns the rows ``[0, start)`` kept.

    Rows are dropped (with their parts and those after) from the first image the cache holds as unreadable
    (it may be readable now) and, with ``verify_cache``, from the first image whose bytes differ from the
    digest stored when its rows were computed. The digests of the rows still to compute are stored first.
    ``rows``: the dataset image of each of the entry's rows (a rank's shard; default: all ``N`` in order).
    """
    ds = p.dataset
    idx = list(range(p.n)) if rows is None else list(rows)
    n = len(idx)
    start = entry.load_into(data)
    unread = torch.nonzero(~data["ok"][:start]).flatten()
    if len(unread):  # a file unreadable once may be readable now: never cached as bad
        _logger.warning("%d image(s) the stats cache holds as unreadable are read again", len(unread))
        start = entry.drop_from(int(unread[0]))
    stored = entry.contents(n)
    if p.options.verify_cache and start:
        if stored is None:
            _logger.warning("stats cache %s holds no digests of its images, so it cannot be verified; every image "
                            "is computed again", entry.path)
            start = entry.drop_from(0)
        else:
            changed = np.flatnonzero((ds.content_digests(idx[:start]) != stored[:start]).any(axis=1))
            if len(changed):
                _logger.warning("%d image(s) changed since the stats cache %s was written (e.g. %s); they and the "
                                "images after them are computed again", len(changed), entry.path,
                                ds.files[idx[int(changed[0])]])
                start = entry.drop_from(int(changed[0]))
    if start < n:  # what the rows to come are computed from (zeros: unknown, never verified as equal)
        new = np.zeros((n, 16), dtype=np.uint8) if stored is None else stored
        new[start:] = ds.content_digests(idx[start:])
        guarded_write(entry, entry.write_contents, new)
    return start


def _meta(p: _Plan, entry: Optional[CacheEntry], forward_images: int, world: int = 1,
          used: Optional[tuple[int, int]] = None) -> dict:
    """The pass's record in ``Stats.meta``; ``used``: ``(batch size the pass ended at, out-of-memory retries)``."""
    meta = {"key": p.key, "data_fingerprint": p.data_fingerprint,
            "cache": str(entry.path) if entry is not None else None, "device": str(p.dev),
            "amp": str(p.amp_dtype).replace("torch.", "") if p.amp_dtype else "none",
            "forward_images": forward_images, "world_size": world}
    if used is not None:
        meta["batch_size"], meta["oom_retries"] = int(used[0]), int(used[1])
    return meta


def _stats(p: _Plan, data: dict[str, Tensor], temps: Sequence[float], entry: Optional[CacheEntry], forward_images: int,
           world: int = 1, used: Optional[tuple[int, int]] = None) -> Stats:
    """``used``: ``(batch size the pass ended at, out-of-memory retries)`` from :func:`_run`."""
    ds = p.dataset
    meta = _meta(p, entry, forward_images, world, used)
    return Stats(base=data["base"], max=data["max"], att=data["att"], temperatures=tuple(float(t) for t in temps),
                 targets=np.asarray(ds.targets, dtype=np.int8), ok=data["ok"].numpy().astype(bool),
                 ids=tuple(ds.ids), classes=tuple(ds.classes), single_label=bool(ds.single_label), meta=meta,
                 avgmax=data.get("avgmax"))


def _collect_distributed(p: _Plan, progress: Optional[Progress]) -> Optional[Stats]:
    """torchrun: each rank computes its strided shard (rows ``rank, rank + W, ...``); rank 0 returns the Stats,
    the other ranks None.

    With a stats cache every rank writes its shard into the cache entry as it goes (parts in
    ``shard-w<W>-r<R>/``, resumable per shard: a rank killed and restarted -- ``torchrun --max-restarts`` --
    resumes at its last saved part), and rank 0 reads the shards back from disk once all are complete: no
    statistics travel through the process group, and multi-node runs work the same way given a cache folder that
    every node sees. A complete entry (checked by rank 0) is reused as in a single process, whichever world size
    wrote it. Without a cache (or when it cannot be written) the shards are gathered on rank 0 in memory.
    """
    from . import dist

    n, temps, entry, cached = p.n, p.temps, None, None
    world, rank = dist.world_size(), dist.rank()
    if dist.is_main() and p.options.cache_dir is not None:
        entry = usable_entry(p.options.cache_dir, p.key, temps, p.temps_req, n, p.fingerprint)
    ready: Optional[Stats] = None  # rank 0: a complete entry's statistics
    if entry is not None:
        temps = sorted(float(t) for t in entry.meta()["temperatures"])  # type: ignore[index]
        big = p.past_store_limit(len(temps))
        if big and not p.options.verify_cache and entry.done() == n:
            ready = SD.open_built(entry, p.key, temps, _meta(p, entry, 0, world))
        if ready is None and entry.done() == n:  # verified part by part; an image cached as unreadable is read again
            shapes = row_shapes(len(p.index), len(temps))
            cached = SD.file_rows(entry, n, shapes) if big else alloc_rows(n, shapes)
            if entry.load_into(cached) != n or not bool(cached["ok"].all()):
                cached = None
            elif p.options.verify_cache:
                stored = entry.contents(n)
                if stored is None or not np.array_equal(stored, p.dataset.content_digests()):
                    _logger.warning("stats cache %s does not match the images' bytes; every image is computed "
                                    "again", entry.path)
                    cached = None
            if cached is not None:
                ready = _result(p, cached, temps, entry, 0, world, on_disk=big)
        if ready is None:
            try:  # shards of another world size cannot be resumed by this one
                entry.drop_shards(keep_world=world)
            except OSError:
                entry.broken = True
    have = dist.broadcast(None if entry is None or entry.broken else
                          (ready is not None, [str(t) for t in temps], str(entry.path)))
    if have is not None:
        temps = sorted(float(t) for t in have[1])
        if have[0]:
            return ready if dist.is_main() else None
    mine = dist.shard(n)
    shapes = row_shapes(len(p.index), len(temps))
    # past store_above (every rank knows N, C and the temperatures) a rank's rows and rank 0's whole pass live
    # in row files of the cache entry, and rank 0 returns the entry's store, memory-mapped
    big = have is not None and p.past_store_limit(len(temps))
    shard = None
    if have is not None:
        try:
            shard = CacheEntry(Path(have[2])).shard(world, rank, len(mine))
        except (OSError, PatchCSRAError) as e:
            _logger.warning("rank %d: stats cache shard cannot be used (%s); its rows are sent to rank 0", rank, e)
    part_files = big and shard is not None
    part = SD.file_rows(shard, len(mine), shapes) if part_files else alloc_rows(len(mine), shapes)  # type: ignore[arg-type]
    start = _reusable_rows(p, shard, part, rows=mine) if shard is not None else 0
    if start:
        _logger.info("rank %d resumes its shard %s at %d/%d", rank, shard.path if shard else "", start, len(mine))
    used = (p.options.batch_size, 0)
    if start < len(mine):
        used = _run(p, mine[start:], temps, {k: v[start:] for k, v in part.items()}, shard, progress, offset=start)
    on_disk = shard is not None and not shard.broken
    if on_disk:
        mark_complete(shard)  # type: ignore[arg-type]
        on_disk = not shard.broken  # type: ignore[union-attr]
    forward = len(mine) - start
    sent = dist.gather_to_main((on_disk, forward))  # small objects: the statistics stay on disk
    loaded: set[int] = set()
    need: Optional[list[int]] = None
    data: dict[str, Tensor] = {}
    if dist.is_main():  # the whole pass on rank 0: in RAM, or in the entry's row files past store_above
        big = big and entry is not None and not entry.broken
        data = SD.file_rows(entry, n, shapes) if big else alloc_rows(n, shapes)  # type: ignore[arg-type]
        _scatter(data, mine, part)  # rank 0's own rows are in memory
        for r, (disk, _) in enumerate(sent):  # type: ignore[arg-type]
            if r != rank and disk:
                try:  # part by part, straight into its rows (strided views of ``data``)
                    _read_shard(Path(have[2]), world, r, {k: v[r::world] for k, v in data.items()})  # type: ignore[index]
                    loaded.add(r)
                except (OSError, PatchCSRAError) as e:
                    _logger.warning("rank %d's stats cache shard cannot be read on rank 0 (%s); its rows are sent "
                                    "through the process group (give every node the same --cache-dir)", r, e)
        need = [r for r in range(world) if r != rank and r not in loaded]
    need = dist.broadcast(need)
    extra = dist.gather_to_main((mine, part) if rank in need else None)  # rows that are not on a disk rank 0 reads
    if part_files:
        SD.drop_rows(shard, part)  # type: ignore[arg-type]  # the rows are in the shard's parts (and on rank 0 in ``data``)
    if not dist.is_main():
        return None
    for r in need:
        _scatter(data, *extra[r])  # type: ignore[index]
    if entry is not None and not entry.broken:
        if not need and all(disk for disk, _ in sent):  # type: ignore[union-attr]
            _finish_sharded(p, entry, world)
        else:  # some rows are not in shards rank 0 can read: keep the whole pass as one plain entry
            _finish_plain(p, entry, data)
    total = sum(f for _, f in sent)  # type: ignore[misc]
    return _result(p, data, temps, entry, total, world, on_disk=big, used=used)


def _scatter(data: dict[str, Tensor], rows: Sequence[int], got: dict[str, Tensor]) -> None:
    """``data[k][rows[i]] = got[k][i]`` for every key."""
    if len(rows):
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        for k in data:
            data[k][idx] = got[k]


def _read_shard(path: Path, world: int, rank: int, out: dict[str, Tensor]) -> None:
    """Read rank ``rank``'s complete shard of the entry at ``path`` into ``out`` (its rows, e.g. strided views of
    the pass's rows), verified part by part."""
    n_local = int(out["base"].shape[0])
    sub = CacheEntry(path / shard_name(world, rank))
    if sub.load_into(out) != n_local:
        raise PatchCSRAError(f"stats cache shard {sub.path} is incomplete after its rank finished; delete "
                             f"{path} and rerun")


def _finish_sharded(p: _Plan, entry: CacheEntry, world: int) -> None:
    """Mark ``entry`` complete as held by ``world`` shards: the shards' content digests joined into the entry's
    (for ``--verify-cache``), parts of an earlier single-process pass removed (superseded)."""
    n = p.n
    digests = np.zeros((n, 16), dtype=np.uint8)
    for r in range(world):
        got = CacheEntry(entry.path / shard_name(world, r)).contents(len(range(r, n, world)))
        if got is not None:
            digests[r::world] = got
    try:
        for _, _, old in entry.parts():
            old.unlink()
    except OSError:
        entry.broken = True
    guarded_write(entry, entry.write_contents, digests)
    m = entry.meta()
    if m is not None and not entry.broken:
        m["shards"] = int(world)
        guarded_write(entry, entry.write_meta, m)
    mark_complete(entry)


def _finish_plain(p: _Plan, entry: CacheEntry, data: dict[str, Tensor]) -> None:
    """Store the whole pass as one plain part (a rank could not write its shard)."""
    try:
        for _, _, old in entry.parts():
            old.unlink()
        entry.drop_shards()
    except OSError:
        entry.broken = True
    guarded_write(entry, entry.write_contents, p.dataset.content_digests())
    save_part_or_give_up(entry, 0, data)
    mark_complete(entry)


def _forward_into(p: _Plan, temps: Sequence[float], out: dict[str, Tensor]) -> Callable[[Tensor, slice], None]:
    """The model on its device (channels_last where it helps) and ``forward(x, rows)``: images ``(b, 3, H, W)``
    on the CPU -> rows ``rows`` (``b`` of them) of every ``out`` tensor (all computed before any write)."""
    patched, dev, amp_dtype = p.patched, p.dev, p.amp_dtype
    model = patched.to(dev).eval()
    cl = dev.type == "cuda" if p.options.channels_last is None else p.options.channels_last
    if cl and patched.info.layout == "NCHW":
        model = model.to(memory_format=torch.channels_last)
    gather = _class_gather(p, dev)
    finite = [(j, t) for j, t in enumerate(temps) if not math.isinf(t)]
    infinite = [j for j, t in enumerate(temps) if math.isinf(t)]
    split = patched.split
    one_map = not getattr(split, "multi_branch", False) and type(split).forward_locations is HeadSplit.forward_locations

    def forward(x: Tensor, rs: slice) -> None:
        x = x.to(dev, non_blocking=True)
        if cl and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            f, base, s = patched.forward_pass(x)
            am = _feature_avgmax(split, f) if one_map else None
        base, s = base.float(), s.float()
        am = torch.full_like(base, math.nan) if am is None else am.float()
        if gather is not None:
            am = gather(am, s[..., :1])[0]
            base, s = gather(base, s)
        mx = s.amax(dim=-1)
        att = {j: residual_attention(s, t) for j, t in finite}  # (b, C) each
        out["base"][rs] = base
        out["max"][rs] = mx
        out["avgmax"][rs] = am
        for j in infinite:
            out["att"][rs, :, j] = mx
        for j, a in att.items():
            out["att"][rs, :, j] = a

    return forward


def _feature_avgmax(split: HeadSplit, f: Tensor) -> Tensor:
    """``head(0.5 * (mean_k x_k + max_k x_k))`` ``(B, C_model)``: timm's ``avgmax`` pooling of the locations'
    feature vectors (prefix tokens dropped), then the split's single-location head."""
    t = to_locations(f, split.layout, split.num_prefix_tokens)  # (B, L, D)
    return split.forward_single(0.5 * (t.mean(dim=1) + t.amax(dim=1)))


def _forward_chunks(forward: Callable[[Tensor, slice], None], x: Tensor, at: int, bs: int,
                    dev: torch.device) -> tuple[int, int]:
    """``forward`` one loader batch ``x`` (rows ``at..``) in chunks of ``bs``; on out of memory the failed chunk
    is retried at half the size, down to 1. Returns ``(chunk size now, retries)``."""
    pos, retries, b = 0, 0, x.shape[0]
    while pos < b:
        m = min(bs, b - pos)
        failed = False
        try:
            forward(x[pos:pos + m], slice(at + pos, at + pos + m))
        except OOM_ERRORS:
            failed = True  # handled outside the except block, so the failed chunk's tensors are freed
        if not failed:
            pos += m
            continue
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if m <= 1:
            raise PatchCSRAError(
                f"CUDA out of memory even at batch size 1 on {dev} (input {tuple(x.shape[1:])}); "
                "use --img-size smaller / --amp bf16, or free the GPU") from None
        bs = max(1, m // 2)
        retries += 1
        _logger.warning("out of memory at batch size %d; retrying with %d", m, bs)
    return bs, retries


def _run(p: _Plan, rows: list[int], temps: Sequence[float], out: dict[str, Tensor], entry: Optional[CacheEntry],
         progress: Optional[Progress], offset: Optional[int] = None) -> tuple[int, int]:
    """Forward ``dataset[rows]`` and write row ``i`` of every ``out`` tensor for ``rows[i]`` (in place).

    ``out``: preallocated CPU tensors with ``len(rows)`` rows (see :func:`_row_shapes`). With ``entry``
    (a single process's entry, or a rank's shard of it), every ``save_every`` images are also saved as a cache
    part, numbered from ``offset`` (default ``rows[0]``: the entry's rows are the dataset's; a shard's are its own).

    On CUDA out of memory (``torch.OutOfMemoryError``) the failed chunk is retried at half the batch size,
    down to 1, and the smaller size is kept for the rest of the pass (each loader batch of up to
    ``batch_size`` images is cut into chunks, :func:`_forward_chunks`); a warning is logged each time. Rows
    are written only after their chunk succeeded, so the result equals a pass without the failure.

    Returns:
        ``(batch size the pass ended at, number of out-of-memory retries)``.

    Raises:
        PatchCSRAError: out of memory even at batch size 1.
    """
    from torch.utils.data import DataLoader, Subset

    n, opts = p.n, p.options
    start = rows[0] if rows else n
    first = start if offset is None else offset  # where this call's rows start among the entry's rows
    forward = _forward_into(p, temps, out)
    loader = DataLoader(Subset(p.dataset, rows), batch_size=opts.batch_size, shuffle=False,
                        num_workers=p.workers, pin_memory=p.dev.type == "cuda", persistent_workers=False)
    step = rows[1] - rows[0] if len(rows) > 1 else 1  # 1 in a single process; the world size under torchrun
    bs, retries = opts.batch_size, 0  # the current chunk size; it only ever shrinks
    saved, done = 0, 0  # rows of ``out`` saved to the cache / written
    last_save = time.monotonic()
    with torch.inference_mode():
        for x, _, ok in loader:
            bs, r = _forward_chunks(forward, x, done, bs, p.dev)
            retries += r
            out["ok"][done:done + x.shape[0]] = ok.bool()
            done += x.shape[0]
            due = done - saved >= opts.save_every or time.monotonic() - last_save >= opts.save_interval
            if entry is not None and (due or done == len(rows)):
                save_part_or_give_up(entry, first + saved, {k: v[saved:done].clone() for k, v in out.items()})
                saved, last_save = done, time.monotonic()
            if progress is not None:
                progress(min(n, start + done * step), n)
    return bs, retries
