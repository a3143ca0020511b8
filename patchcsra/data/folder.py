"""ImageFolder reader: ``ROOT/<class>/<image>`` or ``ROOT/<split>/<class>/<image>``.

Classes are the sorted folder names (torchvision ``ImageFolder`` order) unless ``classes`` gives
the column order; images are the files with torchvision's ``IMG_EXTENSIONS``. The data is
single-label: each image's target row holds exactly one 1.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from ..errors import DatasetError
from ._imagefolder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset
from .base import ImageDataset, register_format

__all__ = ["FOLDER_SPLIT_ORDER", "open_folder", "detect_folder", "resolve_folder_split", "IMG_EXTENSIONS"]

_logger = logging.getLogger(__name__)

FOLDER_SPLIT_ORDER = ("test", "val")  # default split among several split dirs
_PROBE_DIRS = 3      # class dirs looked at by detection
_PROBE_ENTRIES = 64  # entries looked at per dir by detection


def _subdirs(d: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(d) if e.is_dir())
    except OSError:
        return []


def _has_images(d: Path) -> bool:
    """``d`` directly holds an image file (looks at the first few entries only)."""
    try:
        with os.scandir(d) as it:
            for k, e in enumerate(it):
                if k >= _PROBE_ENTRIES:
                    break
                if e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS):
                    return True
    except OSError:
        return False
    return False


def _is_class_root(d: Path) -> bool:
    return any(_has_images(s) for s in _subdirs(d)[:_PROBE_DIRS])


def resolve_folder_split(path: Path, split: Optional[str]) -> tuple[Path, Optional[str]]:
    """``(class_root, split)``: ``path/split`` when given, ``path`` when its subdirs hold images,
    else the one split dir (or ``test``/``val`` among several) whose subdirs hold images."""
    path = Path(path)
    if split is not None:
        d = path / split
        if not d.is_dir():
            have = ", ".join(s.name for s in _subdirs(path)) or "none"
            raise DatasetError(f"split={split!r}: {d} is not a folder; available subfolders: {have}")
        return d, split
    if _is_class_root(path):
        return path, None
    splits = [s for s in _subdirs(path) if _is_class_root(s)]
    if len(splits) == 1:
        return splits[0], splits[0].name
    for name in FOLDER_SPLIT_ORDER:
        for s in splits:
            if s.name == name:
                return s, name
    if splits:
        raise DatasetError(f"{path} has several splits ({', '.join(s.name for s in splits)}); pass split= one of them")
    raise DatasetError(f"{path}: no <class>/<image> folders with {', '.join(IMG_EXTENSIONS[:4])} ... images; "
                       "give an ImageFolder root")


def detect_folder(path: Path) -> bool:
    """A dir whose subdirs (or whose split dirs' subdirs) directly hold image files."""
    path = Path(path)
    if not path.is_dir():
        return False
    return _is_class_root(path) or any(_is_class_root(s) for s in _subdirs(path)[:_PROBE_DIRS])


def _each_file_once(samples: list[tuple[str, int]], root: Path, links: bool = True) -> list[tuple[str, int]]:
    """Every real file once: a symbolic link back up the tree (``cat/again -> .``) or a second link to an
    image would list it again; the first path (in sorted order) is kept. ``links=False`` (the walk met no
    symbolic link, so no file can be listed twice) skips resolving the paths."""
    if not links:
        return samples
    seen: set[str] = set()
    out = []
    for p, c in samples:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append((p, c))
    if len(out) < len(samples):
        _logger.warning("%s: %d path(s) reach an image already listed (symbolic links); each image is counted once",
                        root, len(samples) - len(out))
    return out


def open_folder(path: Path, split: Optional[str] = None, *, difficult: str = "ignore",
                classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """Read an ImageFolder tree as single-label data.

    ``classes`` sets the column order; every class folder must be in it (a listed class without a
    folder just has no images). ``difficult`` has no meaning here.
    """
    path = Path(path)
    root, split = resolve_folder_split(path, split)
    try:
        found, _ = find_classes(root)
    except FileNotFoundError:
        raise DatasetError(f"{root}: no class folders; give an ImageFolder root (ROOT/<class>/<image>)") from None
    if classes is None:
        names = tuple(found)
    else:
        names = tuple(classes)
        extra = [c for c in found if c not in set(names)]
        if extra:
            raise DatasetError(f"{root}: class folders {extra[:5]} are not in classes=; add them or remove the "
                               "folders")
        absent = [c for c in names if c not in set(found)]
        if absent:
            _logger.info("%s: %d listed classes have no folder (e.g. %s)", root, len(absent), absent[0])
    class_to_idx = {c: k for k, c in enumerate(names)}
    links = [False]
    samples = _each_file_once(make_dataset(str(root), class_to_idx, IMG_EXTENSIONS, links), root, links[0])
    if not samples:
        raise DatasetError(f"{root}: the class folders hold no {', '.join(IMG_EXTENSIONS)} images; "
                           "give a folder with images")
    empty = sorted(set(found) - {names[c] for _, c in samples})
    if empty:
        _logger.warning("%s: class folders without images: %s", root, ", ".join(empty[:5]))
    files = tuple(Path(p) for p, _ in samples)
    prefix = os.path.join(os.path.expanduser(os.fspath(root)), "")  # what make_dataset's paths start with
    ids = tuple(p[len(prefix):].replace(os.sep, "/") if p.startswith(prefix) else Path(p).relative_to(root).as_posix()
                for p, _ in samples)
    labels = np.fromiter((c for _, c in samples), dtype=np.int64, count=len(samples))
    targets = np.zeros((len(samples), len(names)), dtype=np.int8)
    targets[np.arange(len(samples)), labels] = 1
    top = path.resolve().name or "folder"
    name = top if split is None or split in top else f"{top}-{split}"
    return ImageDataset(
        name=name, format="folder", root=root, split=split, classes=names, files=files,
        ids=ids, targets=targets, single_label=True)


register_format("folder", detect=detect_folder, open=open_folder, priority=40)
