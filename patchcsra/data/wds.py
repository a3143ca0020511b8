"""webdataset reader: tar shards of ``<key>.<image ext>`` + ``<key>.cls`` / ``<key>.json`` samples.

``path`` is one ``.tar`` shard, a folder of ``*.tar`` shards (sorted by name; or a ``<split>/`` folder of them,
or shards named ``<split>-*.tar``), or a brace pattern as webdataset writes it (``shards-{000..009}.tar``,
expanded by webdataset's ``braceexpand``, in its order). Members are grouped into samples by webdataset's own
rule (:func:`webdataset.tariterators.group_by_keys`: the name up to its first dot is the key) and read in
member order, so the order is the same on every run and every rank.

Labels, per sample:

* ``.json``: a list of class indices or names, or ``{"labels": [...]}`` (multi-label), or ``{"label": x}``;
* else ``.cls``: one class index (single-label data).

Class names: a ``classes.txt`` (or ``class_names.txt``, ``class_names``, ``classes.json``) next to the shards,
one name per line (line i names class i); else the sorted names used in the JSON labels; else ``0..C-1``.
Images: ``jpg``, ``jpeg``, ``png``, ``webp``, ``ppm``, ``bmp`` members.

The shards are indexed once (member offsets, read with :mod:`tarfile`); images are then read by offset, so the
dataset has random access, a DataLoader's workers read their own items, and ``torchrun`` ranks take their
strided share of the items (``rank, rank + W, ...``) with no sample read twice. Shards must be uncompressed
``.tar`` (as ``webdataset.TarWriter`` / ``ShardWriter`` write them): a compressed stream has no offsets.
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import DatasetError
from .base import (
    SAMPLE_BYTES,
    BlobSource,
    ImageDataset,
    is_brace_pattern,
    register_format,
    select_class_names,
)

__all__ = ["WDS_IMAGE_EXTS", "CLASS_FILES", "open_webdataset", "detect_webdataset", "shard_paths", "TarMembers"]

_logger = logging.getLogger(__name__)

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
CLASS_FILES = ("classes.txt", "class_names.txt", "class_names", "classes.json")
SPLIT_ORDER = ("test", "validation", "val")
_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_PROBE = 256  # entries looked at by detection


def _is_shard(name: str) -> bool:
    return name.lower().endswith(".tar")


def _is_compressed(name: str) -> bool:
    return name.lower().endswith(_COMPRESSED)


def _tars_in(d: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(d) if e.is_file() and (_is_shard(e.name)
                                                                          or _is_compressed(e.name)))
    except OSError:
        return []


def _probe_tars(d: Path) -> bool:
    try:
        with os.scandir(d) as it:
            for k, e in enumerate(it):
                if k >= _PROBE:
                    break
                if e.is_file() and (_is_shard(e.name) or _is_compressed(e.name)):
                    return True
    except OSError:
        return False
    return False


def _subdirs(d: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(d) if e.is_dir())
    except OSError:
        return []


def detect_webdataset(path: Path) -> bool:
    """A ``.tar`` file, a brace pattern of them, a folder holding ``*.tar`` files, or a folder whose split
    subfolders hold them."""
    path = Path(path)
    if not path.exists():
        return is_brace_pattern(path) and (_is_shard(path.name) or _is_compressed(path.name))
    if path.is_file():
        return _is_shard(path.name) or _is_compressed(path.name)
    return path.is_dir() and (_probe_tars(path) or any(_probe_tars(s) for s in _subdirs(path)[:8]))


def shard_paths(path: Path, split: Optional[str] = None) -> tuple[list[Path], Path, Optional[str]]:
    """``(shards, root, split)``: the shard files ``path`` names, the folder they are named relative to, the split."""
    path = Path(path)
    if not path.exists() and is_brace_pattern(path):
        from braceexpand import (
            braceexpand,  # webdataset's own pattern expansion (one of its dependencies)
        )

        shards = [Path(s) for s in braceexpand(str(path))]
        gone = [s for s in shards if not s.is_file()]
        if gone:
            raise DatasetError(f"{path}: {len(gone)} of its {len(shards)} shards are missing (e.g. {gone[0]}); "
                               "fix the pattern or restore the shards")
        return shards, shards[0].parent, split
    if path.is_file():
        return [path], path.parent, split
    direct = _tars_in(path)
    if split is not None:
        if (path / split).is_dir() and _tars_in(path / split):
            return _tars_in(path / split), path / split, split
        named = [s for s in direct if s.name.startswith((f"{split}-", f"{split}_", f"{split}."))]
        if named:
            return named, path, split
        have = sorted({s.name for s in _subdirs(path) if _tars_in(s)})
        raise DatasetError(f"split={split!r}: {path} has neither a {split}/ folder of .tar shards nor shards named "
                           f"{split}-*.tar; available split folders: {', '.join(have) or 'none'}")
    if direct:
        return direct, path, None
    splits = [s for s in _subdirs(path) if _tars_in(s)]
    if len(splits) == 1:
        return _tars_in(splits[0]), splits[0], splits[0].name
    for name in SPLIT_ORDER:
        for s in splits:
            if s.name == name:
                return _tars_in(s), s, name
    if splits:
        raise DatasetError(f"{path} has several split folders of shards ({', '.join(s.name for s in splits)}); "
                           "pass --split one of them")
    raise DatasetError(f"{path}: no .tar shards; give a webdataset shard, a folder of them or a pattern "
                       "such as shards-{000..009}.tar")


class TarMembers(BlobSource):
    """Images inside uncompressed tar shards, read by offset (``os.pread``: no tar parsing per read).

    It holds the shard paths and, per item, ``(shard, offset, size)``; it pickles as those, and each process
    opens the shards it reads (one descriptor per shard, kept open; a forked worker opens its own).
    """

    kind = "webdataset"

    def __init__(self, shards: Sequence[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray) -> None:
        self.shards = tuple(str(s) for s in shards)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # a forked worker: descriptors of its own
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            fd = os.open(self.shards[s], os.O_RDONLY)
            fd = self._fds.setdefault(s, fd)  # another thread may have opened it first: keep one
        return fd

    def _pread(self, item: int, n: int, at: int) -> bytes:
        s = int(self.shard[item])
        data = os.pread(self._fd(s), n, int(self.offset[item]) + at)
        if len(data) != n:
            raise OSError(0, f"the shard ends before this member does (it was rewritten or cut: {len(data)} of "
                             f"{n} bytes)")
        return data

    def read(self, item: int) -> bytes:
        return self._pread(item, int(self.size[item]), 0)

    def read_sample(self, item: int) -> tuple[int, bytes]:
        size, block = int(self.size[item]), SAMPLE_BYTES // 3
        if size <= SAMPLE_BYTES:
            return size, self._pread(item, size, 0)
        return size, b"".join(self._pread(item, block, at) for at in (0, (size - block) // 2, size - block))

    def container(self, item: int) -> str:
        return self.shards[int(self.shard[item])]


def _index_shard(shard: Path) -> list[dict[str, Any]]:
    """The samples of ``shard``: ``{"__key__": key, ext: (offset, size), ...}`` in member order."""
    from webdataset.tariterators import group_by_keys, meta_prefix, meta_suffix

    if _is_compressed(shard.name):
        raise DatasetError(f"{shard}: a compressed shard has no member offsets to read by; write uncompressed .tar "
                           "shards (webdataset.ShardWriter does)")
    try:
        if os.path.getsize(shard) == 0:
            raise DatasetError(f"{shard}: an empty file, not a tar shard; remove it or write it again")
        members = []
        with tarfile.open(shard, mode="r:") as tf:
            for m in tf:
                name = m.name
                if not m.isreg() or ("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)):
                    continue
                members.append({"fname": name, "data": (m.offset_data, m.size), "__url__": str(shard)})
            tf.members = []
    except tarfile.TarError as e:
        raise DatasetError(f"{shard}: not a readable tar shard ({e}); write it again (webdataset.TarWriter)") from None
    except OSError as e:
        raise DatasetError(f"{shard}: cannot be read ({e.strerror or e}); fix its permissions or restore it") from None
    try:
        samples = list(group_by_keys(iter(members)))
    except ValueError as e:
        raise DatasetError(f"{shard}: {str(e).splitlines()[0]}; each key's members must be stored together "
                           "(as webdataset.TarWriter writes them)") from None
    if not samples:
        raise DatasetError(f"{shard}: no samples (an empty shard); remove it or write it again")
    return samples


def _read_member(f, loc: tuple[int, int]) -> bytes:
    f.seek(loc[0])
    return f.read(loc[1])


def _raw_labels(sample: dict, f, where: str) -> tuple[list[Any], bool]:
    """``(class indices or names, single)`` of one sample, from its ``.json``, else its ``.cls``."""
    labels: Any = None
    single = False
    if "json" in sample:
        try:
            doc = json.loads(_read_member(f, sample["json"]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{where}.json: not JSON ({e}); write the labels as a JSON list or "
                               '{"labels": [...]}') from None
        if isinstance(doc, list):
            labels = doc
        elif isinstance(doc, dict) and "labels" in doc:
            labels = doc["labels"]
        elif isinstance(doc, dict) and "label" in doc:
            labels, single = doc["label"], True
        if labels is not None and not isinstance(labels, list):
            labels, single = [labels], True
    if labels is None and "cls" in sample:
        text = _read_member(f, sample["cls"]).decode("utf-8", "replace").strip()
        try:
            labels, single = [int(text)], True
        except ValueError:
            raise DatasetError(f"{where}.cls: {text[:40]!r} is not a class index; write one integer") from None
    if labels is None:
        raise DatasetError(f"{where}: sample without a label (no .cls member and no .json with a list of labels or "
                           '"labels"/"label"); add one to each sample')
    for v in labels:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise DatasetError(f"{where}: label {v!r} is neither a class index nor a class name; fix the sample")
    return labels, single


def _class_file(folders: Sequence[Path]) -> Optional[Path]:
    for d in folders:
        for name in CLASS_FILES:
            if (d / name).is_file():
                return d / name
    return None


def open_webdataset(path: Path, split: Optional[str] = None, *, difficult: str = "ignore",
                    classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """Read webdataset shards (see the module doc). ``classes`` picks/reorders the classes found (as for VOC and
    COCO); ``difficult`` has no meaning here."""
    path = Path(path)
    shards, root, split = shard_paths(path, split)
    class_file = _class_file([root] + ([path] if path.is_dir() else []))
    names: Optional[list[str]] = None
    if class_file is not None:
        from .classes import load_class_names

        names = load_class_names(class_file, what="the class names file")
    shard_ix, offs, sizes, files, ids, raw, singles = [], [], [], [], [], [], []
    for s, shard in enumerate(shards):
        samples = _index_shard(shard)
        try:
            rel = shard.relative_to(root).as_posix()
        except ValueError:
            rel = str(shard)
        seen: set[str] = set()
        with open(shard, "rb") as f:
            for sample in samples:
                key = sample["__key__"]
                where = f"{shard}#{key}"
                if key in seen:
                    raise DatasetError(f"{where}: key appears twice in the shard; each key's members must be stored "
                                       "together (as webdataset.TarWriter writes them)")
                seen.add(key)
                ext = next((e for e in WDS_IMAGE_EXTS if e in sample), None)
                if ext is None:
                    have = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
                    raise DatasetError(f"{where}: sample without an image (members: {have}); give each sample a "
                                       f"{', '.join(WDS_IMAGE_EXTS)} member")
                labels, single = _raw_labels(sample, f, where)
                off, size = sample[ext]
                shard_ix.append(s)
                offs.append(off)
                sizes.append(size)
                files.append(Path(f"{shard}#{key}.{ext}"))
                ids.append(f"{rel}#{key}")
                raw.append((labels, where))
                singles.append(single)
    names = _resolve_names(raw, names, class_file)
    pos = {c: k for k, c in enumerate(names)}
    targets = np.zeros((len(files), len(names)), dtype=np.int8)
    for r, (labels, where) in enumerate(raw):
        for v in labels:
            if isinstance(v, str) and v.strip().lstrip("-").isdigit() and v not in pos:
                v = int(v)
            if isinstance(v, int):
                if not 0 <= v < len(names):
                    fix = f"fix the label or {class_file}" if class_file else "fix the label"
                    raise DatasetError(f"{where}: class index {v} is out of range for {len(names)} classes; {fix}")
                targets[r, v] = 1
            else:
                if v not in pos:
                    raise DatasetError(f"{where}: class name {v!r} is not in {class_file}; add it there or fix the "
                                       "label")
                targets[r, pos[v]] = 1
    single_label = bool(all(singles) and ((targets == 1).sum(axis=1) == 1).all())
    top = root.name or "webdataset"
    name = top if split is None or split in top else f"{top}-{split}"
    source = TarMembers([str(s) for s in shards], np.asarray(shard_ix), np.asarray(offs), np.asarray(sizes))
    _logger.info("%s: %d samples in %d shard(s)", path, len(files), len(shards))
    ds = ImageDataset(name=name, format="webdataset", root=root, split=split, classes=tuple(names), files=tuple(files),
                      ids=tuple(ids), targets=targets, single_label=single_label, blobs=source)
    return select_class_names(ds, classes, str(path))


def _resolve_names(raw: list, names: Optional[list[str]], class_file: Optional[Path]) -> list[str]:
    """The class names: the class names file, else the sorted names the labels use, else ``0..C-1``."""
    if names is not None:
        return names
    strs = {v for labels, _ in raw for v in labels if isinstance(v, str) and not v.strip().lstrip("-").isdigit()}
    ints = [int(v) for labels, _ in raw for v in labels if not (isinstance(v, str) and v in strs)]
    if strs and ints:
        where = next(w for labels, w in raw if any(isinstance(v, int) for v in labels))
        raise DatasetError(f"{where}: labels mix class indices and class names; put a classes.txt (one name per "
                           "line) next to the shards or use one kind")
    if strs:
        return sorted(strs)
    if any(v < 0 for v in ints):
        where = next(w for labels, w in raw if any(int(v) < 0 for v in labels))
        raise DatasetError(f"{where}: negative class index; class indices count from 0")
    return [str(k) for k in range(max(ints, default=-1) + 1)] or ["0"]


register_format("webdataset", detect=detect_webdataset, open=open_webdataset, priority=50, aliases=("wds",))
