"""PASCAL VOC reader: ``VOCdevkit/VOC20xx/{JPEGImages, Annotations, ImageSets/Main}``.

Labels come from ``ImageSets/Main/<class>_<split>.txt`` (values ``1`` present, ``-1`` absent,
``0`` difficult-only), or, where those lists are absent, from ``Annotations/<id>.xml`` (a class
with a non-difficult object is ``1``, with only difficult objects ``0``, else ``-1``). Both give
the same VOC value, which is then mapped to targets: ``1 -> 1``, ``-1 -> 0``, and ``0 -> -1``
(``difficult="ignore"``, the VOC classification protocol) or ``0 -> 1`` (``"positive"``).
"""
from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import DatasetError
from .base import ImageDataset, register_format

__all__ = ["VOC_CLASSES", "VOC_SPLIT_ORDER", "open_voc", "detect_voc", "find_voc_year_dir", "voc_splits",
           "voc_values_to_targets"]

_logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_SPLIT_ORDER = ("test", "val", "trainval", "train")  # default split: the first one present
_YEAR_RE = re.compile(r"^VOC\d{4}$", re.IGNORECASE)


def _is_year_dir(d: Path) -> bool:
    return (d / "ImageSets" / "Main").is_dir() or ((d / "Annotations").is_dir() and (d / "JPEGImages").is_dir())


def _year_candidates(d: Path) -> list[Path]:
    try:
        return sorted(c for c in d.iterdir() if _YEAR_RE.match(c.name) and c.is_dir() and _is_year_dir(c))
    except OSError:
        return []


def find_voc_year_dir(path: Path) -> Optional[Path]:
    """The ``VOC20xx`` dir for ``path`` (the year dir, ``VOCdevkit``, or its parent); ``None`` if not VOC.

    Raises:
        DatasetError: several ``VOC20xx`` dirs are present.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if _is_year_dir(path):
        return path
    for base in (path / "VOCdevkit", path):
        found = _year_candidates(base) if base.is_dir() else []
        if len(found) > 1:
            raise DatasetError(f"{base} holds several VOC years ({', '.join(c.name for c in found)}); "
                               f"pass one of them, e.g. {found[0]}")
        if found:
            return found[0]
    return None


def detect_voc(path: Path) -> bool:
    """A VOC year dir, a ``VOCdevkit`` dir, or a dir holding ``VOCdevkit``."""
    try:
        return find_voc_year_dir(path) is not None
    except DatasetError:
        return True  # VOC, but ambiguous: open_voc says which years


def voc_splits(year_dir: Path, classes: Sequence[str] = VOC_CLASSES) -> list[str]:
    """Splits with a ``<split>.txt`` or ``<class>_<split>.txt`` list in ``ImageSets/Main``, default first."""
    main = year_dir / "ImageSets" / "Main"
    if not main.is_dir():
        return []
    names = set()
    prefixes = tuple(f"{c}_" for c in dict.fromkeys((*classes, *VOC_CLASSES)))
    for f in main.glob("*.txt"):
        stem = f.stem
        pre = next((p for p in prefixes if stem.startswith(p)), None)
        names.add(stem[len(pre):] if pre else stem)
    order = {s: k for k, s in enumerate(VOC_SPLIT_ORDER)}
    return sorted(names, key=lambda s: (order.get(s, len(order)), s))


def voc_values_to_targets(values: np.ndarray, difficult: str = "ignore") -> np.ndarray:
    """VOC list values ``(N, C)`` in {1, -1, 0} -> targets int8 {1, 0, -1 or 1}."""
    t = np.zeros(values.shape, dtype=np.int8)
    t[values == 1] = 1
    t[values == 0] = 1 if difficult == "positive" else -1
    return t


def _read_id_list(f: Path) -> list[str]:
    try:
        lines = f.read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{f}: cannot read the id list ({type(e).__name__}); fix or remove the file") from None
    return [ln.strip() for ln in lines if ln.strip()]


def _read_class_list(f: Path) -> dict[str, int]:
    """``<class>_<split>.txt`` -> {id: value in {1, -1, 0}}."""
    out: dict[str, int] = {}
    try:
        text = f.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{f}: cannot read the label list ({type(e).__name__}); fix or remove the file") from None
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
            raise DatasetError(f"{f}:{n}: expected 'ID VALUE' with VALUE 1, -1 or 0, got {line.strip()!r}; "
                               "fix the label list")
        out[parts[0]] = int(parts[1])
    return out


def _labels_from_lists(main: Path, split: str, classes: Sequence[str],
                       ids: Optional[list[str]]) -> tuple[list[str], np.ndarray]:
    lists = []
    for c in classes:
        f = main / f"{c}_{split}.txt"
        if not f.is_file():
            raise DatasetError(f"{f} is missing; give every class list of split {split!r}, or remove them all "
                               "to derive labels from Annotations/*.xml")
        lists.append((f, _read_class_list(f)))
    if ids is None:
        ids = list(lists[0][1])
    values = np.empty((len(ids), len(classes)), dtype=np.int8)
    for j, (f, d) in enumerate(lists):
        try:
            values[:, j] = [d[i] for i in ids]
        except KeyError as e:
            raise DatasetError(f"{f} has no label for image {e.args[0]} of split {split!r}; "
                               "give one line per image of the split") from None
        if len(d) > len(ids):
            _logger.warning("%s lists %d ids not in split %r; ignored", f, len(d) - len(ids), split)
    return ids, values


def _labels_from_xml(ann_dir: Path, ids: list[str], classes: Sequence[str]) -> np.ndarray:
    pos = {c: j for j, c in enumerate(classes)}
    values = np.full((len(ids), len(classes)), -1, dtype=np.int8)
    for k, i in enumerate(ids):
        f = ann_dir / f"{i}.xml"
        try:
            root = ET.parse(f).getroot()
        except (OSError, ET.ParseError) as e:
            raise DatasetError(f"{f}: cannot read the annotation ({type(e).__name__}); restore it, or give "
                               "ImageSets/Main/<class>_<split>.txt lists") from None
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in pos:
                raise DatasetError(f"{f}: object class {name!r} is not one of the {len(classes)} classes; "
                                   "pass classes= with every class name")
            j = pos[name]
            diff = (obj.findtext("difficult") or "0").strip() in ("1", "true")
            if not diff:
                values[k, j] = 1
            elif values[k, j] == -1:
                values[k, j] = 0
    return values


def open_voc(path: Path, split: Optional[str] = None, *, difficult: str = "ignore",
             classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """Read a VOC split (default: ``test``, else ``val``, else ``trainval``) as an :class:`ImageDataset`.

    ``classes`` replaces the 20 VOC classes (a subset, another order, or a VOC-layout dataset's
    own classes); each needs its ``<class>_<split>.txt`` list or must name the XML objects.
    """
    year = find_voc_year_dir(Path(path))
    if year is None:
        raise DatasetError(f"{path}: not a VOC dataset (no VOCdevkit/VOC20xx with ImageSets or Annotations); "
                           "pass the VOCdevkit or VOC20xx dir, or another format=")
    classes = tuple(classes) if classes is not None else VOC_CLASSES
    main = year / "ImageSets" / "Main"
    ann = year / "Annotations"
    splits = voc_splits(year, classes)
    if split is None:
        split = splits[0] if splits else None
    elif split not in splits:
        have = ", ".join(splits) if splits else "none (no ImageSets/Main lists)"
        raise DatasetError(f"split={split!r} is not in {main}; available splits: {have}")

    ids: Optional[list[str]] = None
    if split is None:  # no ImageSets at all: every annotated image
        if not ann.is_dir():
            raise DatasetError(f"{year}: no ImageSets/Main lists and no Annotations; give one of them")
        ids = sorted(f.stem for f in ann.glob("*.xml"))
    elif (main / f"{split}.txt").is_file():
        ids = _read_id_list(main / f"{split}.txt")

    have_lists = split is not None and any((main / f"{c}_{split}.txt").is_file() for c in classes)
    if have_lists:
        ids, values = _labels_from_lists(main, split, classes, ids)
        source = "ImageSets/Main"
    else:
        if ids is None:
            raise DatasetError(f"{main}: split {split!r} has neither {split}.txt nor <class>_{split}.txt; "
                               "give the split's id list")
        if not ann.is_dir():
            raise DatasetError(f"{main}: no <class>_{split}.txt lists and no {ann}; give one of them")
        values = _labels_from_xml(ann, ids, classes)
        source = "Annotations"
    if not ids:
        others = [s for s in splits if s != split]
        hint = f"choose another split ({', '.join(others)})" if others else "add image ids to it"
        raise DatasetError(f"{main / f'{split}.txt'}: split {split!r} lists no images; {hint}")
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{main / f'{split}.txt'}: an image id is listed twice; list each image once")
    name = year.name.lower() if _YEAR_RE.match(year.name) else year.name
    _logger.debug("VOC %s split %s: %d images, labels from %s", year, split, len(ids), source)
    return ImageDataset(
        name=f"{name}-{split}" if split else name, format="voc", root=year, split=split, classes=classes,
        files=tuple(year / "JPEGImages" / f"{i}.jpg" for i in ids), ids=tuple(ids),
        targets=voc_values_to_targets(values, difficult), single_label=False)


register_format("voc", detect=detect_voc, open=open_voc, priority=20)
