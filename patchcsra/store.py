"""Statistics on disk: a folder of raw class-major arrays, read in blocks of classes, never whole.

In RAM a :class:`~patchcsra.stats.Stats` costs ``N x C x (2 + nT)`` float32: ImageNet val with the paper's 8
temperatures is 2 GB, OpenImages test (125,436 x 9,605) 4.8 GB per array. A *store* keeps them on disk:

* :func:`save_stats` -- write dense :class:`~patchcsra.stats.Stats` (or :class:`SparseStats`) to a folder,
  atomically (:func:`patchcsra._io.atomic_dir`): ``header.json`` plus one raw array file per field.
* :class:`StatsWriter` -- the same folder filled incrementally, in blocks of images (:meth:`StatsWriter.write_rows`,
  what a collection pass produces) or of classes (:meth:`StatsWriter.write_classes`); :meth:`StatsWriter.finish`
  renames it into place and returns the opened statistics. Nothing ``N x C`` is ever held in RAM.
* :func:`open_stats` -- a :class:`~patchcsra.stats.Stats` whose tensors are memory maps of the files (no copy)
  and whose ``store`` is a :class:`DenseStore`: :func:`patchcsra.grid.evaluate_grid` and
  :func:`patchcsra.grid.sweep` then evaluate it in blocks of classes (:mod:`patchcsra.blocked`), reading each block
  with plain reads (``numpy.fromfile`` at an offset) so that no page of a map becomes resident: peak memory is
  ``O(N x block)``, not ``O(N x C)``. Sparse folders open as :class:`SparseStats`.
* :class:`SparseStats` / :func:`to_sparse` -- partial labels at OpenImages scale: only the labelled
  ``(image, class)`` entries (targets != -1), by class (CSR); AP and P/R/F1 read nothing else.

Layout (``layout: class-major``): every ``(N, C)`` field is stored as ``(C, N)`` (a block of classes is one
contiguous read), ``att`` as ``(nT, C, N)`` in the order of ``temperatures``; ``max`` is the ``inf`` slot of
``att`` (not stored twice) whenever ``inf`` is collected. ``targets`` int8 ``(C, N)``, ``ok`` uint8 ``(N,)``,
``ids.json``. The header records shapes, dtypes, byte sizes and a digest of its own content (the arrays' bytes are
not hashed: they are gigabytes; a truncated or resized file is refused by its size).

float16 (``dtype="float16"``) halves the files. Each stored value is then rounded to the nearest float16: relative
error at most ``2**-11`` (about 4.9e-4) per value for ``|x| >= 6.1e-5`` (absolute ``2**-25`` below), and values
beyond 65504 become inf (refused by :func:`save_stats`). Scores are formed in float32 from the rounded values.
Measured effect (``benchmarks/scale.py --cases float16``: 5,000 images x 80 classes, COCO-like synthetic logits
``3 N(0, 1) - 4`` (+3 on the 3% positives), 21 λ x T in {2, inf}, float16 store vs float32 in RAM): mAP moved by at
most 0.0043 points, any metric by at most 0.017 (OR_top3: a threshold/top-k cut flipping); rounding creates ties
between nearby scores, which is where it moves.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ._io import atomic_dir, describe_os_error, remove_stale_temps, temp_prefix, write_json
from .errors import PatchCSRAError

__all__ = ["save_stats", "open_stats", "StatsWriter", "DenseStore", "SparseStats", "to_sparse", "is_store",
           "FLOAT16_RELATIVE_ERROR", "HEADER"]

_logger = logging.getLogger(__name__)

HEADER = "header.json"
FORMAT = "patchcsra-stats"
VERSION = 1
#: the largest relative rounding error of one float16 value (normal range): 2**-11
FLOAT16_RELATIVE_ERROR = 2.0 ** -11
#: rows gathered by :meth:`StatsWriter.write_rows` before they are written
ROW_BUFFER_BYTES = 64 * 2 ** 20
_DTYPES = {"float32": np.float32, "float16": np.float16}
_FLOAT16_MAX = 65504.0
#: every name a store folder may hold (what ``force`` may replace)
_NAMES = (HEADER, "ids.json", "base.bin", "max.bin", "att.bin", "avgmax.bin", "targets.bin", "ok.bin",
          "indptr.bin", "rows.bin")


def _t_json(t: float) -> Union[float, str]:
    return "inf" if math.isinf(t) else float(t)


def _t_from(v: Any) -> float:
    return math.inf if v == "inf" else float(v)


def _inf_slot(temperatures: Sequence[float]) -> Optional[int]:
    for i, t in enumerate(temperatures):
        if math.isinf(t):
            return i
    return None


def _header_digest(h: Mapping[str, Any]) -> str:
    body = {k: v for k, v in h.items() if k != "digest"}
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()


def _ids_digest(ids: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for i in ids:
        h.update(str(i).encode() + b"\0")
    return h.hexdigest()


def is_store(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` is a folder holding a statistics ``header.json``."""
    return (Path(path) / HEADER).is_file()


# ----------------------------------------------------------------------------- sparse statistics
@dataclass
class SparseStats:
    """Only the labelled ``(image, class)`` entries (targets != -1) of ``N`` images and ``C`` classes, by class.

    Class ``c``'s entries are ``indptr[c]:indptr[c+1]``, with image indices ``rows`` (ascending within a class),
    targets (1/0) and the statistics at those entries: ``base``, ``max`` ``(nnz,)`` and ``att`` ``(nT, nnz)``
    float32. Metrics on it (:func:`patchcsra.grid.evaluate_grid`) equal the dense ones with every other entry
    ignored: AP and the threshold P/R/F1 read only labelled entries. Top-k metrics (CP_top3 ... and single-label
    top-1/top-5) rank a whole row and are **not available** (left out of the frame); protocols that count ignored
    entries as negatives (``mlgcn``, ``asl``) are refused, since unlabelled entries are not stored.
    """

    n: int
    c: int
    indptr: np.ndarray
    rows: np.ndarray
    targets: np.ndarray
    base: np.ndarray
    max: np.ndarray
    att: np.ndarray
    temperatures: tuple[float, ...]
    ok: np.ndarray
    ids: tuple[str, ...]
    classes: tuple[str, ...]
    single_label: bool = False
    meta: dict = field(default_factory=dict)
    avgmax: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.n)

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def entry_classes(self) -> np.ndarray:
        """``(nnz,)`` int32 class of every entry."""
        return np.repeat(np.arange(self.c, dtype=np.int32), np.diff(self.indptr))

    def att_for(self, temperature: float) -> np.ndarray:
        t = float(temperature)
        if math.isinf(t):
            return self.max
        for i, have in enumerate(self.temperatures):
            if have == t:
                return self.att[i]
        raise PatchCSRAError(f"temperature {t:g} was not collected "
                             f"(have {','.join(str(_t_json(x)) for x in self.temperatures)})")

    def scores(self, lam: float, temperature: float = math.inf) -> np.ndarray:
        """``(nnz,)`` float32 ``base + lam * att(T)`` (the same float32 operations as :meth:`Stats.scores`)."""
        if lam == 0:
            return self.base
        return (torch.from_numpy(self.base) + float(lam) * torch.from_numpy(self.att_for(temperature))).numpy()


def to_sparse(stats: Any, block: int = 0) -> SparseStats:
    """The labelled entries (targets != -1) of dense :class:`~patchcsra.stats.Stats` as :class:`SparseStats`
    (read in blocks of classes, so a store-backed ``stats`` is never loaded whole)."""
    from .blocked import block_size, reader

    rd = reader(stats)
    n, c = rd.n, rd.c
    step = block or block_size(n)
    parts: dict[str, list[np.ndarray]] = {"rows": [], "targets": [], "base": [], "max": [], "avgmax": []}
    att_parts: list[list[np.ndarray]] = [[] for _ in stats.temperatures]
    counts = np.zeros(c, np.int64)
    has_am = rd.has("avgmax")
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        tg = rd.targets(c0, c1)
        keep = tg != -1
        counts[c0:c1] = keep.sum(axis=1)
        parts["rows"].append(np.nonzero(keep)[1].astype(np.int32))
        parts["targets"].append(tg[keep])
        parts["base"].append(rd.read("base", c0, c1)[keep])
        parts["max"].append(rd.read("max", c0, c1)[keep])
        if has_am:
            parts["avgmax"].append(rd.read("avgmax", c0, c1)[keep])
        for i, t in enumerate(stats.temperatures):
            att_parts[i].append(rd.read("att", c0, c1, t)[keep])
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    att = np.stack([np.concatenate(p) for p in att_parts]) if att_parts else np.zeros((0, int(counts.sum())),
                                                                                           np.float32)
    return SparseStats(n=n, c=c, indptr=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
                       rows=cat["rows"].astype(np.int32), targets=cat["targets"].astype(np.int8),
                       base=cat["base"].astype(np.float32), max=cat["max"].astype(np.float32),
                       att=att.astype(np.float32), temperatures=tuple(float(t) for t in stats.temperatures),
                       ok=np.asarray(stats.ok, bool).copy(), ids=tuple(stats.ids), classes=tuple(stats.classes),
                       single_label=bool(stats.single_label), meta=dict(stats.meta),
                       avgmax=cat["avgmax"].astype(np.float32) if has_am else None)


# ----------------------------------------------------------------------------- dense reader
class DenseStore:
    """Block reads of a dense store folder (``header`` is its ``header.json``): ``(cb, N)`` float32 blocks of
    classes read with ``numpy.fromfile`` at an offset (plain reads: the page cache holds them, the process does
    not), so reading every block of a 10 GB file keeps resident memory at one block."""

    def __init__(self, folder: Path, header: dict) -> None:
        self.folder = folder
        self.header = header
        self.n, self.c = int(header["n"]), int(header["c"])
        self.temperatures = tuple(_t_from(t) for t in header["temperatures"])
        self.np_dtype = np.dtype(_DTYPES[header["dtype"]])
        self.max_slot = header.get("max_in_att")

    def has(self, name: str) -> bool:
        return name in self.header["files"]

    def _read(self, name: str, dtype: np.dtype, offset_items: int, count: int) -> np.ndarray:
        path = self.folder / f"{name}.bin"
        try:
            out = np.fromfile(path, dtype=dtype, count=count, offset=offset_items * dtype.itemsize)
        except OSError as e:
            raise PatchCSRAError(f"cannot read {path}: {describe_os_error(e)}; write the statistics again "
                                 "(patchcsra.store.save_stats)") from None
        if out.size != count:
            raise PatchCSRAError(f"{path} is truncated ({out.size} of {count} values at item {offset_items}); "
                                 "write the statistics again (patchcsra.store.save_stats)")
        return out

    def read(self, name: str, c0: int, c1: int, temperature: Optional[float] = None) -> np.ndarray:
        """``(c1 - c0, N)`` float32 block of ``base``/``max``/``avgmax``, or of ``att`` at ``temperature``."""
        n = self.n
        if name == "max" and self.max_slot is not None:
            name, slot = "att", int(self.max_slot)
        elif name == "att":
            t = float(temperature)
            if math.isinf(t):
                return self.read("max", c0, c1)
            if t not in self.temperatures:
                raise PatchCSRAError(f"temperature {t:g} was not collected in {self.folder}")
            slot = self.temperatures.index(t)
        else:
            slot = 0
        block = self._read(name, self.np_dtype, (slot * self.c + c0) * n, (c1 - c0) * n)
        return block.astype(np.float32, copy=False).reshape(c1 - c0, n)

    def targets(self, c0: int, c1: int) -> np.ndarray:
        """``(c1 - c0, N)`` int8 targets."""
        return self._read("targets", np.dtype(np.int8), c0 * self.n, (c1 - c0) * self.n).reshape(c1 - c0, self.n)


# ----------------------------------------------------------------------------- writing
def _dense_header(n: int, c: int, temperatures: Sequence[float], dtype: str, has_avgmax: bool) -> dict:
    isz = np.dtype(_DTYPES[dtype]).itemsize
    slot = _inf_slot(temperatures)
    files = {"base": {"shape": [c, n], "dtype": dtype}, "att": {"shape": [len(temperatures), c, n], "dtype": dtype},
             "targets": {"shape": [c, n], "dtype": "int8"}, "ok": {"shape": [n], "dtype": "uint8"}}
    if slot is None:
        files["max"] = {"shape": [c, n], "dtype": dtype}
    if has_avgmax:
        files["avgmax"] = {"shape": [c, n], "dtype": dtype}
    for f in files.values():
        f["bytes"] = int(np.prod(f["shape"], dtype=np.int64)) * (1 if f["dtype"] in ("int8", "uint8") else isz)
    return {"format": FORMAT, "version": VERSION, "kind": "dense", "layout": "class-major", "n": int(n), "c": int(c),
            "temperatures": [_t_json(float(t)) for t in temperatures], "dtype": dtype, "max_in_att": slot,
            "files": files}


def _check_dtype(dtype: str) -> str:
    if dtype not in _DTYPES:
        raise PatchCSRAError(f"dtype={dtype!r}; choose float32 or float16 (max relative error 2**-11 per value)",
                             param="dtype")
    return dtype


def _as_np(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float().numpy() if x.is_floating_point() else x.numpy()
    a = np.asarray(x)
    if np.dtype(dtype) == np.float16 and a.dtype.kind == "f" and a.size:
        big = np.abs(a[np.isfinite(a)]).max(initial=0.0)
        if big > _FLOAT16_MAX:
            raise PatchCSRAError(f"a score of {big:g} does not fit in float16 (max 65504); save with "
                                 "dtype='float32'", param="dtype")
    return a.astype(dtype, copy=False)


class StatsWriter:
    """Fill a dense store folder incrementally; :meth:`finish` renames it into place (atomically).

    ``StatsWriter(folder, n, c, temperatures, dtype)`` preallocates the files (sparse on disk) in a hidden
    temporary folder beside ``folder``; then :meth:`write_rows` (a block of images, as a collection pass makes them:
    ``{"base", "max", "att", "avgmax", "ok", "targets"}`` of rows ``start .. start + b``, each ``(b, C)`` /
    ``(b, C, nT)`` / ``(b,)``) or :meth:`write_classes` (a block of classes, ``(cb, N)`` / ``(nT, cb, N)``) writes
    with ``os.pwrite`` (one call per class run of a row block: no map is dirtied, the page cache takes it).
    ``max`` goes to the ``inf`` slot of ``att`` (``att[..., inf]`` is not written: ``Stats.att_for(inf)`` is
    ``max``). :meth:`finish` (``ids``, ``classes``, ``single_label``, ``meta``, and ``targets`` unless written)
    returns :func:`open_stats` of the folder; :meth:`abort` removes the temporary. Usable as a context manager
    (an exception aborts).
    """

    def __init__(self, folder: Union[str, os.PathLike], n: int, c: int, temperatures: Sequence[float],
                 dtype: str = "float32", *, avgmax: bool = False, force: bool = False) -> None:
        self.folder = Path(folder)
        self.n, self.c = int(n), int(c)
        if self.n < 1 or self.c < 1:
            raise PatchCSRAError(f"StatsWriter needs n >= 1 and c >= 1 (got n={n}, c={c})")
        self.temperatures = tuple(float(t) for t in temperatures)
        self.dtype = _check_dtype(dtype)
        self.np_dtype = np.dtype(_DTYPES[dtype])
        self.force = force
        if self.folder.exists() and not force:
            raise PatchCSRAError(f"{self.folder} exists; pass force=True (CLI --force) or choose another folder")
        self.header = _dense_header(self.n, self.c, self.temperatures, self.dtype, avgmax)
        self.slot = self.header["max_in_att"]
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder.parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(self.folder.name + "-w"), dir=self.folder.parent))
        self._fds: dict[str, int] = {}
        try:
            for name, f in self.header["files"].items():
                fd = os.open(self.tmp / f"{name}.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
                self._fds[name] = fd
                os.ftruncate(fd, f["bytes"])
        except OSError as e:
            self.abort()
            raise PatchCSRAError(f"cannot create the statistics files in {self.folder.parent}: "
                                 f"{describe_os_error(e)}") from None
        self._targets_written = False
        self._buf: Optional[list] = None

    def __enter__(self) -> "StatsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _pwrite(self, name: str, data: np.ndarray, offset_items: int) -> None:
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        off = offset_items * data.dtype.itemsize
        while len(buf):
            done = os.pwrite(self._fds[name], buf, off)
            buf, off = buf[done:], off + done

    def _field_rows(self, name: str, slot: int, start: int, block: np.ndarray) -> None:
        """``block`` ``(b, C)``: class ``k`` of rows ``start..start+b`` lands at ``((slot*C + k) * N + start)``."""
        cm = np.ascontiguousarray(block.T)   # (C, b)
        for k in range(self.c):
            self._pwrite(name, cm[k], (slot * self.c + k) * self.n + start)

    def write_rows(self, start: int, rows: Mapping[str, Any]) -> None:
        """Rows ``start .. start + b`` of any of ``base, max, att, avgmax, targets`` (``(b, C)``, att ``(b, C, nT)``)
        and ``ok`` ``(b,)``. The rows are copied; consecutive calls are gathered up to :data:`ROW_BUFFER_BYTES`
        and written together (one ``pwrite`` per class and field per gathered run), so small batches cost no more
        system calls than large ones."""
        b = None
        for key, value in rows.items():
            if key not in ("base", "max", "att", "avgmax", "ok", "targets"):
                raise PatchCSRAError(f"write_rows: unknown field {key!r}; give base, max, att, avgmax, ok, targets")
            v = value.shape[0]
            if b is not None and v != b:
                raise PatchCSRAError(f"write_rows: {key} has {v} rows, the others {b}")
            b = v
        if b is None or b == 0:
            return
        if not 0 <= start <= self.n - b:
            raise PatchCSRAError(f"write_rows: rows {start}..{start + b} are outside 0..{self.n}")
        conv = {}
        for key, value in rows.items():
            want = {"ok": (b,), "att": (b, self.c, len(self.temperatures))}.get(key, (b, self.c))
            self._check_shape(key, value, want)
            dt = np.uint8 if key == "ok" else np.int8 if key == "targets" else self.np_dtype
            conv[key] = np.array(_as_np(value, dt), copy=True)
        buf = self._buf
        if buf is not None and (buf[0] + buf[1] != start or set(buf[2]) != set(conv)):
            self.flush()
            buf = None
        if buf is None:
            self._buf = buf = [start, 0, {k: [] for k in conv}]
        for key, value in conv.items():
            buf[2][key].append(value)
        buf[1] += b
        if buf[1] * sum(v[0].nbytes // max(1, len(v[0])) for v in buf[2].values()) >= ROW_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the gathered rows now (:meth:`finish` does)."""
        if self._buf is None:
            return
        start, b, parts = self._buf
        self._buf = None
        self._write_now(start, {k: np.concatenate(v) for k, v in parts.items()})

    def _write_now(self, start: int, rows: Mapping[str, np.ndarray]) -> None:
        for key, a in rows.items():
            if key == "ok":
                self._pwrite("ok", a, start)
            elif key == "targets":
                self._field_rows("targets", 0, start, a)
                self._targets_written = True
            elif key == "avgmax" and "avgmax" not in self._fds:
                continue   # not kept (StatsWriter(avgmax=False))
            elif key == "att":
                for i in range(len(self.temperatures)):
                    if i != self.slot:
                        self._field_rows("att", i, start, a[:, :, i])
            elif key == "max" and self.slot is not None:
                self._field_rows("att", int(self.slot), start, a)
            else:
                self._field_rows(key, 0, start, a)

    def write_classes(self, c0: int, arrays: Mapping[str, Any]) -> None:
        """Classes ``c0 .. c0 + cb`` of ``base, max, avgmax, targets`` (``(cb, N)``) or ``att`` (``(nT, cb, N)``):
        one contiguous write per field (and temperature)."""
        for key, value in arrays.items():
            a = _as_np(value, np.int8 if key == "targets" else self.np_dtype)
            if key == "att":
                cb = a.shape[1]
                self._check_shape(key, a, (len(self.temperatures), cb, self.n))
                for i in range(len(self.temperatures)):
                    if i != self.slot:
                        self._pwrite("att", a[i], (i * self.c + c0) * self.n)
                continue
            if key not in ("base", "max", "avgmax", "targets"):
                raise PatchCSRAError(f"write_classes: unknown field {key!r}; give base, max, att, avgmax, targets")
            self._check_shape(key, a, (a.shape[0], self.n))
            if not 0 <= c0 <= self.c - a.shape[0]:
                raise PatchCSRAError(f"write_classes: classes {c0}..{c0 + a.shape[0]} are outside 0..{self.c}")
            if key == "avgmax" and "avgmax" not in self._fds:
                continue
            if key == "max" and self.slot is not None:
                self._pwrite("att", a, (int(self.slot) * self.c + c0) * self.n)
            else:
                self._pwrite(key, a, c0 * self.n)
            if key == "targets":
                self._targets_written = True

    def _check_shape(self, key: str, value: Any, shape: tuple[int, ...]) -> None:
        if tuple(value.shape) != tuple(shape):
            raise PatchCSRAError(f"{key} has shape {tuple(value.shape)}; expected {tuple(shape)}")

    def finish(self, *, ids: Optional[Sequence[str]] = None, classes: Optional[Sequence[str]] = None,
               single_label: bool = False, meta: Optional[dict] = None, targets: Any = None,
               ok: Any = None) -> Any:
        """Write ``header.json`` (and ``targets`` ``(N, C)`` / ``ok`` ``(N,)`` when given), rename the folder into
        place, and return :func:`open_stats` of it."""
        self.flush()
        ids = tuple(str(i) for i in (range(self.n) if ids is None else ids))
        classes = tuple(str(c) for c in (range(self.c) if classes is None else classes))
        if len(ids) != self.n or len(classes) != self.c:
            raise PatchCSRAError(f"finish: {len(ids)} ids and {len(classes)} classes for n={self.n}, c={self.c}")
        if targets is not None:
            t = _as_np(targets, np.int8)
            self._check_shape("targets", t, (self.n, self.c))
            step = max(1, 2 ** 24 // self.n)
            for c0 in range(0, self.c, step):
                self._pwrite("targets", np.ascontiguousarray(t[:, c0:c0 + step].T), c0 * self.n)
            self._targets_written = True
        if ok is not None:
            self._pwrite("ok", _as_np(ok, np.uint8).reshape(-1), 0)
        if not self._targets_written:
            _logger.warning("%s: no targets were written; every entry is 0 (absent)", self.folder)
        h = dict(self.header, classes=list(classes), single_label=bool(single_label), meta=meta or {},
                 ids_digest=_ids_digest(ids))
        h["digest"] = _header_digest(h)
        tmp = self.tmp
        try:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}
            (tmp / "ids.json").write_text(json.dumps(list(ids)))
            write_json(tmp / HEADER, h, indent=1)

            def fill(out: Path) -> None:
                for name in os.listdir(tmp):
                    os.replace(tmp / name, out / name)

            atomic_dir(self.folder, fill, force=self.force, known=_NAMES)
        except OSError as e:
            self.abort()
            raise PatchCSRAError(f"cannot write {self.folder}: {describe_os_error(e)}") from None
        shutil.rmtree(tmp, ignore_errors=True)
        return open_stats(self.folder)

    def abort(self) -> None:
        """Close and remove the temporary folder (nothing is left at ``folder``)."""
        self._buf = None
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}
        shutil.rmtree(self.tmp, ignore_errors=True)


def save_stats(stats: Any, folder: Union[str, os.PathLike], dtype: str = "float32", *, force: bool = False) -> Path:
    """Write :class:`~patchcsra.stats.Stats` (dense, in blocks of classes) or :class:`SparseStats` to ``folder``.

    ``dtype``: ``float32`` (exact) or ``float16`` (half the bytes; each value rounded, relative error <= 2**-11;
    see the module docstring for what it does to mAP). Returns the folder.
    """
    _check_dtype(dtype)
    if isinstance(stats, SparseStats):
        return _save_sparse(stats, Path(folder), dtype, force)
    from .blocked import block_size, reader

    rd = reader(stats)
    n, c = rd.n, rd.c
    has_am = rd.has("avgmax")
    with StatsWriter(folder, n, c, stats.temperatures, dtype, avgmax=has_am, force=force) as w:
        step = block_size(n)
        for c0 in range(0, c, step):
            c1 = min(c, c0 + step)
            arrays = {"base": rd.read("base", c0, c1), "max": rd.read("max", c0, c1), "targets": rd.targets(c0, c1)}
            if has_am:
                arrays["avgmax"] = rd.read("avgmax", c0, c1)
            if w.slot is None or len(stats.temperatures) > 1:
                arrays["att"] = np.stack([rd.read("att", c0, c1, t) if not math.isinf(t) else arrays["max"]
                                          for t in stats.temperatures])
            w.write_classes(c0, arrays)
        w.finish(ids=stats.ids, classes=stats.classes, single_label=stats.single_label, meta=_json_meta(stats.meta),
                 ok=np.asarray(stats.ok, bool))
    return Path(folder)


def _json_meta(meta: dict) -> dict:
    """``meta`` as JSON can hold it (numpy/torch values through ``tolist``, others as text)."""
    from ._io import json_default

    return json.loads(json.dumps(meta or {}, default=json_default))


def _save_sparse(sp: SparseStats, folder: Path, dtype: str, force: bool) -> Path:
    npd = _DTYPES[dtype]
    slot = _inf_slot(sp.temperatures)
    arrays: dict[str, np.ndarray] = {
        "indptr": np.asarray(sp.indptr, np.int64), "rows": np.asarray(sp.rows, np.int32),
        "targets": np.asarray(sp.targets, np.int8), "base": _as_np(sp.base, npd), "ok": np.asarray(sp.ok, np.uint8)}
    att = _as_np(sp.att, npd).copy() if len(sp.temperatures) else np.zeros((0, sp.nnz), npd)
    if slot is not None:
        att[slot] = _as_np(sp.max, npd)
    else:
        arrays["max"] = _as_np(sp.max, npd)
    arrays["att"] = att
    if sp.avgmax is not None:
        arrays["avgmax"] = _as_np(sp.avgmax, npd)
    if len(arrays["indptr"]) != sp.c + 1 or arrays["indptr"][-1] != len(arrays["rows"]):
        raise PatchCSRAError(f"sparse stats: indptr has {len(arrays['indptr'])} entries ending at "
                             f"{arrays['indptr'][-1]}, expected {sp.c + 1} ending at {len(arrays['rows'])}")
    files = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "bytes": int(v.nbytes)} for k, v in arrays.items()}
    h = {"format": FORMAT, "version": VERSION, "kind": "sparse", "layout": "csr-by-class", "n": int(sp.n),
         "c": int(sp.c), "nnz": sp.nnz, "temperatures": [_t_json(float(t)) for t in sp.temperatures],
         "dtype": dtype, "max_in_att": slot, "files": files, "classes": list(sp.classes),
         "single_label": bool(sp.single_label), "meta": _json_meta(sp.meta), "ids_digest": _ids_digest(sp.ids)}
    h["digest"] = _header_digest(h)

    def fill(tmp: Path) -> None:
        for k, v in arrays.items():
            v.tofile(tmp / f"{k}.bin")
        (tmp / "ids.json").write_text(json.dumps(list(sp.ids)))
        write_json(tmp / HEADER, h, indent=1)

    try:
        atomic_dir(folder, fill, force=force, known=_NAMES)
    except OSError as e:
        raise PatchCSRAError(f"cannot write {folder}: {describe_os_error(e)}") from None
    return folder


# ----------------------------------------------------------------------------- opening
def _load_header(folder: Path) -> dict:
    path = folder / HEADER
    fix = "write the statistics again (patchcsra.store.save_stats)"
    try:
        h = json.loads(path.read_text())
    except FileNotFoundError:
        raise PatchCSRAError(f"{path} is missing: {folder} is not a statistics store; {fix}") from None
    except (OSError, ValueError) as e:
        raise PatchCSRAError(f"{path} is unreadable ({e}); {fix}") from None
    if not isinstance(h, dict) or h.get("format") != FORMAT or not isinstance(h.get("files"), dict):
        raise PatchCSRAError(f"{path} is not a patchcsra statistics header; {fix}")
    if h.get("version") != VERSION:
        raise PatchCSRAError(f"{path} has version {h.get('version')!r}, this patchcsra reads {VERSION}; {fix}")
    if h.get("digest") != _header_digest(h):
        raise PatchCSRAError(f"{path} does not match its digest (edited or damaged); {fix}")
    for name, f in h["files"].items():
        p = folder / f"{name}.bin"
        try:
            size = p.stat().st_size
        except OSError:
            raise PatchCSRAError(f"{p} is missing; {fix}") from None
        if size != f["bytes"]:
            raise PatchCSRAError(f"{p} has {size} bytes, the header says {f['bytes']} (truncated or from another "
                                 f"store); {fix}")
    return h


def _ids(folder: Path, h: dict) -> tuple[str, ...]:
    path = folder / "ids.json"
    try:
        ids = tuple(json.loads(path.read_text()))
    except (OSError, ValueError):
        raise PatchCSRAError(f"{path} is missing or unreadable; write the statistics again "
                             "(patchcsra.store.save_stats)") from None
    if len(ids) != int(h["n"]) or _ids_digest(ids) != h.get("ids_digest"):
        raise PatchCSRAError(f"{path} does not match {folder / HEADER} ({len(ids)} ids for n={h['n']}); write the "
                             "statistics again (patchcsra.store.save_stats)")
    return ids


def _map(path: Path, dtype: str, shape: Sequence[int]) -> np.ndarray:
    # mode "c": copy-on-write, so torch.from_numpy gets a writable array (no warning) and the file is never changed
    return np.memmap(path, dtype=np.dtype(dtype), mode="c", shape=tuple(int(s) for s in shape))


def open_stats(folder: Union[str, os.PathLike]) -> Any:
    """Open a store folder: :class:`~patchcsra.stats.Stats` backed by memory maps (``store`` set: evaluated in
    blocks), or :class:`SparseStats` for a sparse folder (its arrays read into RAM: only labelled entries).

    Raises:
        PatchCSRAError: a missing, truncated or mismatched file, one line naming it.
    """
    folder = Path(folder)
    h = _load_header(folder)
    ids = _ids(folder, h)
    temps = tuple(_t_from(t) for t in h["temperatures"])
    if h["kind"] == "sparse":
        return _open_sparse(folder, h, ids, temps)
    from .stats import Stats

    n, c, dt = int(h["n"]), int(h["c"]), h["dtype"]
    files = h["files"]
    base = torch.from_numpy(_map(folder / "base.bin", dt, files["base"]["shape"])).T
    att_mm = _map(folder / "att.bin", dt, files["att"]["shape"])
    att = torch.from_numpy(att_mm).permute(2, 1, 0)          # (N, C, nT) view, nothing read
    slot = h.get("max_in_att")
    mx = att[..., int(slot)] if slot is not None else torch.from_numpy(_map(folder / "max.bin", dt, [c, n])).T
    avgmax = torch.from_numpy(_map(folder / "avgmax.bin", dt, [c, n])).T if "avgmax" in files else None
    targets = _map(folder / "targets.bin", "int8", [c, n]).T
    ok = np.fromfile(folder / "ok.bin", dtype=np.uint8).astype(bool)
    return Stats(base=base, max=mx, att=att, temperatures=temps, targets=targets, ok=ok, ids=ids,
                 classes=tuple(h["classes"]), single_label=bool(h["single_label"]), meta=dict(h.get("meta") or {}),
                 avgmax=avgmax, store=DenseStore(folder, h))


def _open_sparse(folder: Path, h: dict, ids: tuple[str, ...], temps: tuple[float, ...]) -> SparseStats:
    def load(name: str) -> np.ndarray:
        f = h["files"][name]
        return np.fromfile(folder / f"{name}.bin", dtype=np.dtype(f["dtype"])).reshape(f["shape"])

    att = load("att").astype(np.float32)
    slot = h.get("max_in_att")
    mx = att[int(slot)] if slot is not None else load("max").astype(np.float32)
    return SparseStats(n=int(h["n"]), c=int(h["c"]), indptr=load("indptr"), rows=load("rows"),
                       targets=load("targets"), base=load("base").astype(np.float32), max=mx, att=att,
                       temperatures=temps, ok=load("ok").astype(bool), ids=ids, classes=tuple(h["classes"]),
                       single_label=bool(h["single_label"]), meta=dict(h.get("meta") or {}),
                       avgmax=load("avgmax").astype(np.float32) if "avgmax" in h["files"] else None)
