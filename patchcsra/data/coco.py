"""MS-COCO reader: ``ROOT/annotations/instances_<split>.json`` and images in ``ROOT/<split>/``.

Classes are the json's ``categories`` sorted by id (COCO's 80 non-contiguous ids 1..90 map to
columns 0..79 in id order). An image's target is 1 for every category with at least one
annotation, ``iscrowd`` ones included (as CSRA and ML-GCN do), else 0.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import DatasetError
from .base import ImageDataset, register_format, select_class_names

__all__ = ["COCO_SPLIT_ORDER", "open_coco", "detect_coco", "coco_splits"]

_logger = logging.getLogger(__name__)

COCO_SPLIT_ORDER = ("val2017", "val2014")  # default split: the first one present, else the only one
_INSTANCES_RE = re.compile(r"^instances_(.+)\.json$")
_PEEK_BYTES = 1 << 18


def _looks_like_coco_json(f: Path) -> bool:
    if _INSTANCES_RE.match(f.name):
        return True
    try:
        with open(f, "rb") as fh:
            head = fh.read(_PEEK_BYTES)
    except OSError:
        return False
    return b'"images"' in head and (b'"annotations"' in head or b'"categories"' in head)


def coco_splits(root: Path) -> list[str]:
    """Splits with an ``annotations/instances_<split>.json`` under ``root``, default first."""
    ann = Path(root) / "annotations"
    if not ann.is_dir():
        return []
    names = [m.group(1) for f in ann.iterdir() if (m := _INSTANCES_RE.match(f.name))]
    order = {s: k for k, s in enumerate(COCO_SPLIT_ORDER)}
    return sorted(names, key=lambda s: (order.get(s, len(order)), s))


def detect_coco(path: Path) -> bool:
    """A COCO root (``annotations/instances_*.json``) or a COCO instances json file."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".json" and _looks_like_coco_json(path)
    return bool(coco_splits(path))


def _image_dir(json_file: Path, split: Optional[str]) -> Path:
    """Where the images of ``json_file`` are: ``../<split>``, ``<split>``, ``images/<split>``, ``images``, or
    the json's own folder when it holds images."""
    base = json_file.parent
    tried = [base.parent / split, base / split, base.parent / "images" / split] if split else []
    tried += [base.parent / "images", base / "images"]
    for d in tried:
        if d.is_dir():
            return d
    if any(f.suffix.lower() in (".jpg", ".jpeg", ".png") for f in base.iterdir()):
        return base
    raise DatasetError(f"{json_file}: no image folder found (tried {tried[0]}); put the images in "
                       f"{tried[0]} or next to the json")


def _load_json(f: Path) -> dict:
    try:
        with open(f, "rb") as fh:
            data = json.load(fh)
    except RecursionError:
        raise DatasetError(f"{f}: the JSON is nested too deeply to be a COCO instances file; restore the file") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{f}: cannot read the COCO json ({type(e).__name__}: {str(e)[:80]}); "
                           "restore the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise DatasetError(f"{f}: not a COCO instances file (needs 'images' and 'categories' lists); "
                           "pass the instances_<split>.json file")
    return data


def open_coco(path: Path, split: Optional[str] = None, *, difficult: str = "ignore",
              classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """Read a COCO split (default ``val2017``, else ``val2014``, else the only one).

    ``path`` is the COCO root or the ``instances_<split>.json`` file itself. ``classes`` picks
    a subset/order of the category names. ``difficult`` has no meaning for COCO.
    """
    path = Path(path)
    if path.is_file():
        json_file = path
        m = _INSTANCES_RE.match(path.name)
        split = split or (m.group(1) if m else None)
    else:
        splits = coco_splits(path)
        if not splits:
            raise DatasetError(f"{path}: no annotations/instances_<split>.json; pass a COCO root or the json file")
        if split is None:
            if splits[0] not in COCO_SPLIT_ORDER and len(splits) > 1:
                raise DatasetError(f"{path}: several COCO splits ({', '.join(splits)}); pass split= one of them")
            split = splits[0]
        elif split not in splits:
            raise DatasetError(f"split={split!r} has no {path / 'annotations'}/instances_{split}.json; "
                               f"available splits: {', '.join(splits)}")
        json_file = path / "annotations" / f"instances_{split}.json"
    data = _load_json(json_file)
    img_dir = _image_dir(json_file, split)

    cats = sorted(data["categories"], key=lambda c: int(c["id"]))
    col = {int(c["id"]): j for j, c in enumerate(cats)}
    names = tuple(str(c["name"]) for c in cats)
    images = sorted(data["images"], key=lambda im: int(im["id"]))
    row = {int(im["id"]): k for k, im in enumerate(images)}
    targets = np.zeros((len(images), len(cats)), dtype=np.int8)
    anns = data.get("annotations") or []
    if anns:
        r = np.empty(len(anns), dtype=np.int64)
        c = np.empty(len(anns), dtype=np.int64)
        for k, a in enumerate(anns):
            for key, table, what, dst in (("image_id", row, "images", r), ("category_id", col, "categories", c)):
                v = a.get(key) if isinstance(a, dict) else None
                try:
                    dst[k] = table[int(v)]
                except (KeyError, TypeError, ValueError):
                    ann_id = a.get("id") if isinstance(a, dict) else "?"
                    raise DatasetError(f"{json_file}: annotations[{k}] (id {ann_id}) "
                                       f"refers to {key.replace('_id', '')} id {v!r}, which is not in '{what}'; "
                                       "fix the json") from None
        targets[r, c] = 1
    n_empty = int((targets.sum(axis=1) == 0).sum())
    if n_empty:
        _logger.info("%s: %d images have no annotation (all-zero targets)", json_file, n_empty)
    ids = tuple(str(im["file_name"]) for im in images)
    ds = ImageDataset(
        name=f"coco-{split}" if split else f"coco-{json_file.stem}", format="coco", root=img_dir, split=split,
        classes=names, files=tuple(img_dir / i for i in ids), ids=ids, targets=targets, single_label=False)
    return select_class_names(ds, classes, str(json_file))


register_format("coco", detect=detect_coco, open=open_coco, priority=10)
