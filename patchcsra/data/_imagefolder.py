"""torchvision's ImageFolder listing (``find_classes`` / ``make_dataset``), without importing torchvision.

``import torchvision`` costs about 1.4 s on a 2-core machine (it pulls in ``torch._dynamo`` through
``torchvision.ops``), more than a whole cached re-sweep should take; this module gives the same lists
(``tests/test_data.py::test_imagefolder_listing_equals_torchvision`` compares both on a tree with nested folders,
upper-case extensions, symbolic links and a link loop) and also says whether the walk met a symbolic link,
so that the caller resolves real paths only when one can list a file twice.

The listing logic follows ``torchvision/datasets/folder.py`` (BSD 3-clause, Copyright (c) Soumith Chintala 2016).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Union

__all__ = ["IMG_EXTENSIONS", "find_classes", "has_file_allowed_extension", "make_dataset"]

#: torchvision's ``IMG_EXTENSIONS`` (0.29)
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def has_file_allowed_extension(filename: str, extensions: Union[str, tuple[str, ...]]) -> bool:
    """``filename`` ends with one of ``extensions`` (case-insensitive), as torchvision decides."""
    return filename.lower().endswith(extensions if isinstance(extensions, str) else tuple(extensions))


def find_classes(directory: Union[str, os.PathLike]) -> tuple[list[str], dict[str, int]]:
    """The sorted names of ``directory``'s sub-folders (links to folders included) and their indices.

    Raises:
        FileNotFoundError: ``directory`` has no sub-folder.
    """
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
    return classes, {c: i for i, c in enumerate(classes)}


def _walk(top: str, links: list[bool]) -> Iterator[tuple[str, list[str]]]:
    """``os.walk(top, followlinks=True)`` as ``(root, file names)``; sets ``links[0]`` on a symbolic link."""
    try:
        it = os.scandir(top)
    except OSError:  # os.walk's default: an unreadable folder (or a link loop at ELOOP) is skipped
        return
    dirs, files = [], []
    with it:
        for e in it:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(e.name)
            try:
                if e.is_symlink():
                    links[0] = True
            except OSError:
                links[0] = True
    yield top, files
    for d in dirs:
        yield from _walk(os.path.join(top, d), links)


def make_dataset(directory: Union[str, os.PathLike], class_to_idx: dict[str, int],
                 extensions: Union[str, tuple[str, ...]] = IMG_EXTENSIONS,
                 links: Optional[list[bool]] = None) -> list[tuple[str, int]]:
    """``(path, class index)`` of every file with an allowed extension under ``directory/<class>``, in
    torchvision's order (classes sorted by name, then ``sorted(os.walk(...))``, then file names sorted).

    Classes without a folder or without images are left out (torchvision's ``allow_empty=True``). ``links``:
    a one-item list set to True when the walk met a symbolic link (a file may then be listed twice).
    """
    directory = os.path.expanduser(os.fspath(directory))
    found = links if links is not None else [False]
    out: list[tuple[str, int]] = []
    for target_class in sorted(class_to_idx):
        index = class_to_idx[target_class]
        target_dir = os.path.join(directory, target_class)
        if not os.path.isdir(target_dir):
            continue
        if os.path.islink(target_dir):
            found[0] = True
        for root, fnames in sorted(_walk(target_dir, found)):
            for fname in sorted(fnames):
                path = os.path.join(root, fname)
                if has_file_allowed_extension(path, extensions):
                    out.append((path, index))
    return out
