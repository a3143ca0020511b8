"""ImageDataset: the one multi-label dataset every reader produces, and the format registry.

Every reader (VOC, COCO, ImageFolder, CSV/JSON manifest) returns an :class:`ImageDataset`:
``N`` image files, ``C`` class names and a target matrix ``(N, C)`` int8 with ``1`` present,
``0`` absent and ``-1`` ignore (difficult-only VOC labels, unknown manifest labels).

Readers register themselves with :func:`register_format`; :func:`open_dataset` walks them in
priority order (lowest first) and opens the path with the first whose ``detect`` says yes,
or with the one named by ``format=``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
import stat
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch.utils.data
from PIL import Image

from ..errors import DatasetError
from ..options import DEFAULT_MAX_PIXELS

__all__ = [
    "ImageDataset", "DatasetFormat", "open_dataset", "register_format", "list_formats", "get_format",
    "DIFFICULT_MODES", "BAD_IMAGE_SIZE", "select_class_names", "DEFAULT_MAX_PIXELS", "UnreadableImage",
    "read_image", "read_image_bytes", "SAMPLE_BYTES", "check_max_pixels", "BlobSource", "is_brace_pattern",
]

_logger = logging.getLogger(__name__)

DIFFICULT_MODES = ("ignore", "positive")
BAD_IMAGE_SIZE = (64, 64)  # (W, H) of the black stand-in returned for a missing/undecodable image
#: bytes of each image file the cache key hashes: the whole file up to this size, else this many bytes
#: from its start, its middle and its end (a third each).
SAMPLE_BYTES = 3 * 8192
_CHUNK = 1 << 20
_PIL_LIMIT = threading.Lock()  # PIL's limit is a module global: lifted only inside this lock, and restored


class UnreadableImage(ValueError):
    """An image file that cannot be decoded; ``str(e)`` says why (``path: reason``)."""


def _open_unchecked(path: Any) -> Image.Image:
    """``Image.open`` without PIL's own bomb check (ours, with the user's limit, runs right after)."""
    with _PIL_LIMIT:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def read_image(path: Union[str, os.PathLike], max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The 8-bit RGB image in ``path`` (:func:`to_rgb`), decoded only if it has at most ``max_pixels`` pixels.

    Only regular files are opened (a FIFO would block forever, a device never ends). ``max_pixels=None``
    lifts the limit. The size is read from the file's header, before anything is decoded.

    Raises:
        UnreadableImage: ``"<path>: <why>"``: missing, not a regular file, over the pixel limit, not decodable.
    """
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UnreadableImage(f"{path}: not a regular file")
        return _decode(lambda: path, path, max_pixels)
    except UnreadableImage:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise UnreadableImage(f"{path}: {why}") from None


def read_image_bytes(data: Callable[[], bytes], where: Union[str, os.PathLike],
                     max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Image.Image:
    """:func:`read_image` for an image that is no file of its own (a tar member, an arrow/parquet cell):
    ``data()`` returns its encoded bytes, ``where`` names it in messages (``shard-000.tar#key.jpg``).

    Raises:
        UnreadableImage: ``"<where>: <why>"``: its container cannot be read, over the pixel limit, not decodable.
    """
    try:
        blob = data()
        return _decode(lambda: io.BytesIO(blob), where, max_pixels)
    except UnreadableImage:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise UnreadableImage(f"{where}: {why}") from None


def _decode(source: Callable[[], Any], where: Any, max_pixels: Optional[int]) -> Image.Image:
    """Open ``source()`` (a path or a file object), check the pixel limit from its header, decode it to RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours is the limit that counts
        try:
            im = Image.open(source())
        except Image.DecompressionBombError:
            im = _open_unchecked(source())
    with im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise UnreadableImage(
                f"{where}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} pixels (--max-pixels, "
                "a guard against decompression bombs); raise --max-pixels to read it")
        im.load()
        return to_rgb(im)


def _sample_digest(path: Path) -> tuple[int, int, bytes]:
    """``(size, mtime_ns, blake2b of the file's sampled bytes)``; ``(-1, -1, b"")`` when it cannot be read."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return st.st_size, st.st_mtime_ns, b"not a regular file"
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            size, block = st.st_size, SAMPLE_BYTES // 3
            if size <= SAMPLE_BYTES:
                data = os.pread(fd, size, 0)
            else:
                data = b"".join(os.pread(fd, block, at) for at in (0, (size - block) // 2, size - block))
        finally:
            os.close(fd)
        return st.st_size, st.st_mtime_ns, hashlib.blake2b(data, digest_size=16).digest()
    except OSError:
        return -1, -1, b""


def _full_digest(path: Path) -> bytes:
    """blake2b-128 of every byte of ``path`` (16 zero bytes when it is missing or not a regular file)."""
    h = hashlib.blake2b(digest_size=16)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return bytes(16)
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError:
        return bytes(16)
    return h.digest()


#: seconds per file above which the reads of :func:`_map_files` go to threads (a network or cold disk; on files in
#: the page cache threads only contend for the GIL: 10,000 CIFAR files take 0.09 s in one thread, 0.26 s on 8)
SLOW_FILE_S = 50e-6


def _map_files(fn: Callable[[Path], Any], files: Sequence[Path]) -> list:
    """``[fn(f) for f in files]``: the first 512 files in this thread, the rest in blocks of 512 files on up to 8
    threads when those took over :data:`SLOW_FILE_S` each (reads then overlap), else in this thread too."""
    t0 = time.perf_counter()
    head = [fn(f) for f in files[:512]]
    if len(files) <= 512 or time.perf_counter() - t0 <= SLOW_FILE_S * len(head):
        return head + [fn(f) for f in files[512:]]
    blocks = [files[i:i + 512] for i in range(512, len(files), 512)]
    with ThreadPoolExecutor(min(8, len(blocks), 2 * (os.cpu_count() or 1))) as pool:
        return head + [r for block in pool.map(lambda b: [fn(f) for f in b], blocks) for r in block]


class BlobSource:
    """Images held inside containers -- tar shards, arrow/parquet files -- rather than one file each.

    An :class:`ImageDataset` with ``blobs`` set reads row ``r`` as item ``items[r]`` of its source; its
    ``files`` are then pseudo-paths (``shard-000.tar#key.jpg``, ``data-00000.arrow#row=17``) that name the
    images in messages. A source must pickle (DataLoader workers): it holds paths and offsets, and opens its
    containers in the process that reads.

    Subclasses give :meth:`read` and :meth:`container`; :meth:`read_sample` may read less than the whole item.
    """

    kind = "blob"

    def read(self, item: int) -> bytes:
        """The encoded bytes of ``item``; raises OSError when its container cannot be read."""
        raise NotImplementedError

    def container(self, item: int) -> str:
        """The file that holds ``item``."""
        raise NotImplementedError

    def read_sample(self, item: int) -> tuple[int, bytes]:
        """``(size of the item, its sampled bytes)``: all of it up to :data:`SAMPLE_BYTES`, else a third of
        that from its start, its middle and its end (the blocks :meth:`ImageDataset.fingerprint` hashes)."""
        data = self.read(item)
        size, block = len(data), SAMPLE_BYTES // 3
        if size <= SAMPLE_BYTES:
            return size, data
        return size, b"".join(data[at:at + block] for at in (0, (size - block) // 2, size - block))

    def missing(self, items: Sequence[int]) -> list[bool]:
        """Per item: its container is not a regular file (any more)."""
        ok: dict[str, bool] = {}
        out = []
        for k in items:
            c = self.container(int(k))
            if c not in ok:
                ok[c] = os.path.isfile(c)
            out.append(not ok[c])
        return out

    def sample_keys(self, items: Sequence[int]) -> list[tuple[int, int, bytes]]:
        """Per item ``(size, mtime_ns of its container, blake2b of its sampled bytes)``; ``(-1, -1, b"")``
        where it cannot be read (what :func:`_sample_digest` is for a file)."""
        mtimes: dict[str, int] = {}

        def key(k: int) -> tuple[int, int, bytes]:
            try:
                c = self.container(int(k))
                if c not in mtimes:
                    mtimes[c] = os.stat(c).st_mtime_ns
                size, data = self.read_sample(int(k))
            except (OSError, ValueError):
                return -1, -1, b""
            return size, mtimes[c], hashlib.blake2b(data, digest_size=16).digest()

        return _map_files(key, list(items))

    def full_digests(self, items: Sequence[int]) -> list[bytes]:
        """Per item the blake2b-128 of all its bytes (16 zero bytes where it cannot be read)."""
        def digest(k: int) -> bytes:
            try:
                return hashlib.blake2b(self.read(int(k)), digest_size=16).digest()
            except (OSError, ValueError):
                return bytes(16)

        return _map_files(digest, list(items))


@dataclass(eq=False)
class ImageDataset(torch.utils.data.Dataset):
    """``N`` images with ``C``-class multi-label targets.

    Attributes:
        name: e.g. ``"voc2007-test"``, ``"coco-val2017"``, ``"cifar10-test-subset"``.
        format: the reader that made it: ``"voc" | "coco" | "folder" | "manifest"``.
        root: the directory image ids are relative to.
        split: the split read (``"test"``, ``"val2017"``...), ``None`` where the data has none.
        classes: ``C`` class names, in the column order of ``targets``.
        files: ``N`` image paths.
        ids: ``N`` image ids (VOC id, COCO file name, path relative to ``root``).
        targets: ``(N, C)`` int8: ``1`` present, ``0`` absent, ``-1`` ignore.
        single_label: every row has exactly one positive (ImageFolder data).
        transform: PIL RGB image -> tensor ``(3, H, W)``; may be set after creation.
        max_pixels: images with more pixels are not decoded (:func:`read_image`); ``None``: no limit.
        blobs: where the images are when they are no files of their own (webdataset shards, Hugging Face
            ``datasets`` folders): a :class:`BlobSource`; ``files`` then holds pseudo-paths that name them.
            ``None`` (every other reader): ``files`` are the image files.
        items: ``(N,)`` int64, the item of ``blobs`` each row reads (default ``0..N-1``); ``None`` without blobs.

    ``dataset[i]`` is ``(transform(image), i, ok)``. A missing or undecodable image does not
    raise: it gives ``(transform(black 64x64 RGB image), i, False)`` so that a DataLoader keeps
    going and the caller can count, name and skip the bad images.
    """

    name: str
    format: str
    root: Path
    split: Optional[str]
    classes: tuple[str, ...]
    files: tuple[Path, ...]
    ids: tuple[str, ...]
    targets: np.ndarray
    single_label: bool
    transform: Optional[Callable] = None
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
    blobs: Optional[BlobSource] = None
    items: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.classes = tuple(str(c) for c in self.classes)
        self.files = tuple(f if isinstance(f, Path) else Path(f) for f in self.files)  # 10,000 re-parses: 0.1 s
        self.ids = tuple(str(i) for i in self.ids)
        self.targets = np.ascontiguousarray(np.asarray(self.targets, dtype=np.int8))
        n, c = len(self.files), len(self.classes)
        if self.targets.shape != (n, c):
            raise DatasetError(f"{self.name}: targets have shape {self.targets.shape}, expected ({n}, {c}) "
                               "(files x classes); fix the reader or label file")
        if len(self.ids) != n:
            raise DatasetError(f"{self.name}: {len(self.ids)} ids for {n} files; give one id per file")
        if len(set(self.classes)) != c:
            dup = sorted({x for x in self.classes if self.classes.count(x) > 1})
            raise DatasetError(f"{self.name}: duplicate class names {dup[:5]}; give each class once")
        if self.targets.size and not np.isin(self.targets, (-1, 0, 1)).all():
            raise DatasetError(f"{self.name}: targets hold values other than 1, 0, -1; fix the label file")
        if self.blobs is None:
            self.items = None
        else:
            items = np.arange(n, dtype=np.int64) if self.items is None else np.asarray(self.items, dtype=np.int64)
            if items.shape != (n,):
                raise DatasetError(f"{self.name}: {items.shape} items for {n} files; give one item per file")
            self.items = items

    def _read(self, i: int) -> Image.Image:
        """Image ``i`` as RGB (:func:`read_image` or, inside a container, :func:`read_image_bytes`)."""
        if self.blobs is None:
            return read_image(self.files[i], self.max_pixels)
        item, blobs = int(self.items[i]), self.blobs
        return read_image_bytes(lambda: blobs.read(item), self.files[i], self.max_pixels)

    # ------------------------------------------------------------------ sequence protocol
    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, int, bool]:
        """``(transform(PIL RGB image), i, ok)``; ``ok=False`` for a missing/undecodable image."""
        i = int(i)
        ok = True
        try:
            img = self._read(i)
        except UnreadableImage as e:
            _logger.debug("bad image %s", e)
            img, ok = Image.new("RGB", BAD_IMAGE_SIZE), False
        if self.transform is not None:
            img = self.transform(img)
        return img, i, ok

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, format={self.format!r}, split={self.split!r}, "
                f"images={len(self)}, classes={len(self.classes)}, single_label={self.single_label}, "
                f"root='{self.root}')")

    # ------------------------------------------------------------------ label views
    @property
    def num_classes(self) -> int:
        """``C``."""
        return len(self.classes)

    @property
    def labels(self) -> np.ndarray:
        """``(N,)`` int64 class index of each image; single-label data only."""
        if not self.single_label:
            raise DatasetError(f"{self.name}: labels needs single-label data (one positive per image); "
                               "use targets for multi-label data")
        return self.targets.argmax(axis=1).astype(np.int64)

    def positives_per_class(self) -> np.ndarray:
        """``(C,)`` int64 number of images labelled ``1`` per class."""
        return (self.targets == 1).sum(axis=0).astype(np.int64)

    # ------------------------------------------------------------------ checks
    def missing_files(self) -> list[str]:
        """Ids whose image file does not exist (one ``os.stat`` each; run it before any compute). For images
        inside containers: ids whose container (tar shard, arrow/parquet file) is gone."""
        if self.blobs is not None:
            return [i for i, gone in zip(self.ids, self.blobs.missing(self.items)) if gone]
        return [i for i, f in zip(self.ids, self.files) if not os.path.isfile(f)]  # isfile: regular files only

    def unreadable_reason(self, i: int) -> Optional[str]:
        """Why image ``i`` cannot be read (``"<path>: <why>"``), or None when it can be now."""
        try:
            self._read(int(i)).close()
        except UnreadableImage as e:
            return str(e)
        return None

    def fingerprint(self) -> str:
        """sha256 hex over format, split, classes, ids, targets, the pixel limit and, per file, its size, its
        mtime_ns and a blake2b of its sampled bytes (the whole file up to :data:`SAMPLE_BYTES`, else blocks from
        its start, middle and end).

        It changes when a label or an image file changes -- also a file rewritten with other pixels but the same
        size and mtime, unless it is larger than :data:`SAMPLE_BYTES` and the change misses all three blocks
        (:meth:`content_digests` sees every byte) -- and not when the data moves to another root.
        Images inside containers (``blobs``) count the same way, with the size of the item and the mtime of its
        container.
        """
        h = hashlib.sha256()
        for part in (self.format, str(self.split), "\x1f".join(self.classes), "\x1f".join(self.ids),
                     str(self.targets.shape)):
            h.update(part.encode("utf-8"))
            h.update(b"\x1e")
        h.update(self.targets.tobytes())
        keys = _map_files(_sample_digest, self.files) if self.blobs is None else self.blobs.sample_keys(self.items)
        h.update(np.asarray([k[:2] for k in keys], dtype=np.int64).reshape(-1, 2).tobytes())
        for k in keys:
            h.update(len(k[2]).to_bytes(1, "little") + k[2])
        return h.hexdigest()

    def content_digests(self, rows: Optional[Sequence[int]] = None) -> np.ndarray:
        """``(len(rows), 16)`` uint8 (default: all ``N`` files): blake2b-128 of every byte of each image file
        (16 zeros for a missing file or one that is not a regular file)."""
        files = self.files if rows is None else [self.files[int(i)] for i in rows]
        if self.blobs is not None:
            got = self.blobs.full_digests(self.items if rows is None else [self.items[int(i)] for i in rows])
        else:
            got = _map_files(_full_digest, files)
        return np.frombuffer(b"".join(got), dtype=np.uint8).reshape(len(files), 16).copy()

    # ------------------------------------------------------------------ derived datasets
    def subset(self, indices: Union[Sequence[int], np.ndarray]) -> "ImageDataset":
        """The images at ``indices`` (ints, or a boolean mask of length ``N``), same classes."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise DatasetError(f"{self.name}: subset mask has shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise DatasetError(f"{self.name}: subset index out of range for {len(self)} images")
        return dataclasses.replace(
            self, files=tuple(self.files[k] for k in idx), ids=tuple(self.ids[k] for k in idx),
            targets=self.targets[idx], items=None if self.items is None else self.items[idx])

    def sample(self, n: int, seed: int = 0) -> "ImageDataset":
        """A seeded, class-stratified subset of ``n`` images, in the dataset's order (``n >= N``: all of them).

        Each image belongs to the stratum of its rarest positive class (images without positives form one
        more); every stratum gets its share of ``n`` (largest remainders, at least one image for each stratum
        while ``n`` allows), drawn by a ``seed``-ed permutation. The same ``(n, seed)`` gives the same images.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise DatasetError(f"limit={n!r}: give a number of images >= 1", param="limit")
        total = len(self)
        if n >= total:
            return self
        pos = self.targets == 1
        count = pos.sum(axis=0)
        rarest = np.where(pos.any(axis=1), np.where(pos, count[None, :], np.iinfo(np.int64).max).argmin(axis=1), -1)
        rng = np.random.default_rng(seed)
        strata = [np.flatnonzero(rarest == k) for k in np.unique(rarest)]
        strata = [rng.permutation(ix) for ix in strata]
        share = np.array([len(ix) for ix in strata], dtype=np.float64) * n / total
        quota = np.floor(share).astype(int)
        if n >= len(strata):
            quota = np.maximum(quota, 1)
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        k = 0
        while quota.sum() < n:  # largest remainders first
            j = order[k % len(order)]
            if quota[j] < len(strata[j]):
                quota[j] += 1
            k += 1
        while quota.sum() > n:  # the minimum of one per stratum overshot: trim the largest
            quota[int(np.argmax(quota))] -= 1
        keep = np.sort(np.concatenate([ix[:q] for ix, q in zip(strata, quota)]))
        return self.subset(keep)

    def select_classes(self, order: Sequence[int]) -> "ImageDataset":
        """Keep/reorder target columns: new class ``j`` is old class ``order[j]``."""
        idx = np.asarray(order, dtype=np.int64).reshape(-1)
        c = len(self.classes)
        if idx.size and (idx.min() < 0 or idx.max() >= c):
            raise DatasetError(f"{self.name}: class index out of range [0, {c}) in select_classes")
        if len(set(idx.tolist())) != idx.size:
            raise DatasetError(f"{self.name}: select_classes got a class index twice; give each once")
        targets = self.targets[:, idx]
        single = bool(self.single_label and ((targets == 1).sum(axis=1) == 1).all())
        return dataclasses.replace(self, classes=tuple(self.classes[k] for k in idx), targets=targets,
                                   single_label=single)


def select_class_names(ds: ImageDataset, classes: Optional[Sequence[str]], source: str) -> ImageDataset:
    """``ds`` with its columns restricted/reordered to the names in ``classes`` (``None``: unchanged)."""
    if classes is None:
        return ds
    pos = {c: k for k, c in enumerate(ds.classes)}
    unknown = [c for c in classes if c not in pos]
    if unknown:
        raise DatasetError(f"classes={list(unknown[:5])} are not classes of {source}; choose from "
                           f"{', '.join(ds.classes[:25])}{' ...' if len(ds.classes) > 25 else ''}")
    return ds.select_classes([pos[c] for c in classes])


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: grayscale, palette, CMYK, and 16-bit images scaled (not clipped) to 8 bits.

    PIL's own ``convert("RGB")`` clips 16-bit values at 255, which turns a 16-bit PNG nearly white.
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        a = np.nan_to_num(a * (255.0 if a.max(initial=0) <= 1.0 else 1.0))
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------------------- format registry
OpenFn = Callable[..., ImageDataset]


@dataclass(frozen=True)
class DatasetFormat:
    """A reader: ``detect(path) -> bool`` (cheap) and
    ``open(path, split, *, difficult, classes) -> ImageDataset``. Lower ``priority`` is tried first."""

    name: str
    detect: Callable[[Path], bool]
    open: OpenFn
    priority: int = 100


_FORMATS: dict[str, DatasetFormat] = {}
_ALIASES: dict[str, str] = {}  # another accepted spelling -> the registered name ("wds" -> "webdataset")
_BRACE_RE = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def is_brace_pattern(path: Union[str, os.PathLike]) -> bool:
    """``path`` names several files by a brace pattern, as webdataset does (``shards-{000..009}.tar``)."""
    return bool(_BRACE_RE.search(os.fspath(path)))


def register_format(name: str, *, detect: Callable[[Path], bool], open: OpenFn,  # noqa: A002
                    priority: int = 100, aliases: Sequence[str] = ()) -> DatasetFormat:
    """Add the reader ``name`` (``aliases``: other names ``format=`` accepts for it); returns its
    :class:`DatasetFormat`.

    Raises:
        ValueError: a reader of that name is registered already (names are unique, as in timm's registry).
    """
    for key in (name, *aliases):
        if key in _FORMATS or key in _ALIASES:
            raise ValueError(f"dataset format {key!r} is already registered; choose another name")
    fmt = DatasetFormat(name=name, detect=detect, open=open, priority=int(priority))
    _FORMATS[name] = fmt
    _ALIASES.update({a: name for a in aliases})
    return fmt


def list_formats() -> list[str]:
    """Names of the registered readers, in the order auto-detection tries them."""
    return [f.name for f in sorted(_FORMATS.values(), key=lambda f: (f.priority, f.name))]


def get_format(name: str) -> DatasetFormat:
    """The reader registered as ``name`` (case-insensitive)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _FORMATS:
        raise DatasetError(f"format={name!r} is unknown; accepted formats: {', '.join(list_formats())}")
    return _FORMATS[key]


def open_dataset(path: Union[str, os.PathLike], format: Optional[str] = None,  # noqa: A002
                 split: Optional[str] = None, *, difficult: str = "ignore",
                 classes: Optional[Sequence[str]] = None,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> ImageDataset:
    """Open the dataset at ``path`` (format auto-detected unless given).

    Args:
        path: a VOC devkit/year dir, a COCO root or ``instances_*.json``, an ImageFolder tree,
            a ``.csv``/``.json`` manifest, webdataset tar shards (a ``.tar``, a folder of them or a brace
            pattern ``shards-{000..009}.tar``) or a Hugging Face ``datasets`` folder (``save_to_disk`` or
            parquet files).
        format: ``"voc" | "coco" | "folder" | "manifest" | "webdataset" (or "wds") | "hf-datasets"`` (or any
            registered name); ``None`` detects it.
        split: e.g. ``"test"``, ``"val2017"``; ``None`` takes the reader's default.
        difficult: VOC ``0`` labels (difficult-only): ``"ignore"`` (-1, the VOC classification
            protocol) or ``"positive"`` (1).
        classes: explicit class list: column order override (folder/manifest), or a subset/order of
            the dataset's classes (VOC/COCO).
        max_pixels: images with more pixels are not decoded but counted as unreadable, naming the limit
            (default :data:`DEFAULT_MAX_PIXELS`; ``0`` or ``None``: no limit).

    Returns:
        An :class:`ImageDataset` with at least one image.

    Raises:
        DatasetError: missing/unreadable path, unknown format, empty split, bad label file.
    """
    p = Path(os.fspath(path)).expanduser()
    limit = check_max_pixels(max_pixels)
    if difficult not in DIFFICULT_MODES:
        raise DatasetError(f"difficult={difficult!r} is not accepted; use one of {', '.join(DIFFICULT_MODES)}")
    if classes is not None:
        if isinstance(classes, str):
            raise DatasetError(f"classes={classes!r} must be a list of class names, not one string")
        classes = [str(c) for c in classes]
        if not classes:
            raise DatasetError("classes=[] is empty; give the class names or leave classes out")
    pattern = not p.exists() and is_brace_pattern(p)  # shards-{000..009}.tar: the reader expands it
    if not p.exists() and not pattern:
        raise DatasetError(f"{p}: no such file or directory; give a dataset root or manifest file")
    if not pattern and not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise DatasetError(f"{p}: not readable; fix its permissions")
    if format is not None:
        fmt = get_format(format)
    else:
        fmt = _detect(p)
    ds = fmt.open(p, split, difficult=difficult, classes=classes)
    ds.max_pixels = limit
    if len(ds) == 0:
        raise DatasetError(f"{p}: split {ds.split!r} holds no images; choose another split or fix its list")
    _logger.info("opened %r: %d images, %d classes", ds.name, len(ds), len(ds.classes))
    return ds


def check_max_pixels(value: Optional[int]) -> Optional[int]:
    """``max_pixels`` as :class:`ImageDataset` holds it: an int >= 1, or None (``0`` / ``None``: no limit)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DatasetError(f"max_pixels={value!r}: give an integer >= 0 (0: no limit)", param="max_pixels")
    return value


def _detect(p: Path) -> DatasetFormat:
    for fmt in sorted(_FORMATS.values(), key=lambda f: (f.priority, f.name)):
        try:
            if fmt.detect(p):
                _logger.debug("%s: detected format %s", p, fmt.name)
                return fmt
        except DatasetError:
            raise
        except OSError as e:  # an unreadable entry: this reader says no
            _logger.debug("%s: detect %s failed (%s)", p, fmt.name, e)
    raise DatasetError(f"{p}: cannot tell its dataset format; pass format= one of {', '.join(list_formats())}")
