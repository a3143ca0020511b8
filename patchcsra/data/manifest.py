"""Manifest reader: a ``.csv`` (or ``.tsv``) or ``.json`` file listing images and their labels.

Accepted forms (image paths are relative to the manifest's folder, or absolute):

* CSV long form, header ``path,labels``: ``labels`` holds class names separated by ``;`` or
  ``|``; blank means no class present.
* CSV wide form, header ``path,<class1>,<class2>,...``: values ``1`` present, ``0`` absent,
  ``-1`` or blank unknown (ignored, as in WIDER-Attribute).
* JSON: ``{"classes": [...optional], "images": [record, ...]}`` or a bare list of records; a
  record is ``{"path": ..., "labels": ["cat", "dog"]}`` or ``{"path": ..., "labels": {"cat": 1,
  "dog": -1}}`` (values 1/0/-1; classes not named are absent).

An optional ``split`` column (CSV) or record key (JSON) lets ``split=`` pick rows.
Classes: the ``classes`` argument, else JSON ``"classes"``, else the wide-form header order,
else the sorted union of the label names. Long-form data with exactly one label per row is
single-label.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import DatasetError
from .base import ImageDataset, register_format

__all__ = ["MANIFEST_SUFFIXES", "open_manifest", "detect_manifest", "parse_label_value"]

_logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".tsv", ".json")
_PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_path", "img")
_LABEL_COLUMNS = ("labels", "label", "tags")
_SPLIT_COLUMN = "split"
_SEP_RE = re.compile(r"[;|]")
_VALUES = {"1": 1, "+1": 1, "1.0": 1, "true": 1, "yes": 1, "0": 0, "0.0": 0, "false": 0, "no": 0,
           "-1": -1, "-1.0": -1, "": -1}


def detect_manifest(path: Path) -> bool:
    """A ``.csv``, ``.tsv`` or ``.json`` file (COCO json files are claimed first by the coco reader)."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES


def parse_label_value(v: Any, where: str) -> int:
    """A wide-form / dict label value -> 1, 0 or -1 (blank/None = -1, unknown)."""
    if v is None:
        return -1
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)) and v in (1, 0, -1):
        return int(v)
    key = str(v).strip().lower()
    if key in _VALUES:
        return _VALUES[key]
    raise DatasetError(f"{where}: label value {v!r} is not 1, 0, -1 or blank; fix the manifest")


class _Rows:
    """Records gathered from a manifest: ids, split, and labels as a name list or a {name: value} dict."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.where: list[str] = []
        self.splits: list[Optional[str]] = []
        self.labels: list[Any] = []   # list[str] (long form) or dict[str, int] (wide/dict form)

    def add(self, path: Any, labels: Any, split: Any, where: str) -> None:
        if not isinstance(path, str) or not path.strip():
            raise DatasetError(f"{where}: missing image path; give a 'path' for every row")
        self.ids.append(path.strip())
        self.where.append(where)
        self.splits.append(None if split is None or str(split).strip() == "" else str(split).strip())
        self.labels.append(labels)


def _split_names(text: Any, where: str) -> list[str]:
    if text is None:
        return []
    if isinstance(text, str):
        return [t.strip() for t in _SEP_RE.split(text) if t.strip()]
    if isinstance(text, (list, tuple)):
        return [str(t).strip() for t in text if str(t).strip()]
    raise DatasetError(f"{where}: labels must be a list of names or a {{name: 1/0/-1}} object; fix the manifest")


def _read_csv(f: Path, rows: _Rows) -> Optional[list[str]]:
    """Fill ``rows``; returns the wide-form class columns (``None`` for the long form)."""
    delim = "\t" if f.suffix.lower() == ".tsv" else ","
    try:
        with open(f, newline="", encoding="utf-8-sig") as fh:
            lines = list(csv.reader(fh, delimiter=delim))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{f}: cannot read the CSV ({type(e).__name__}: {e}); fix the file") from None
    lines = [ln for ln in lines if any(c.strip() for c in ln)]
    if not lines:
        raise DatasetError(f"{f}: the manifest is empty; give a header 'path,labels' and one row per image")
    header = [h.strip() for h in lines[0]]
    if not header or header[0].lower() not in _PATH_COLUMNS:
        raise DatasetError(f"{f}:1: the first column must be 'path' (got {header[0] if header else ''!r}); "
                           "give a header such as 'path,labels' or 'path,cat,dog'")
    low = [h.lower() for h in header]
    split_col = low.index(_SPLIT_COLUMN) if _SPLIT_COLUMN in low[1:] else None
    label_col = next((k for k, h in enumerate(low) if k > 0 and h in _LABEL_COLUMNS), None)
    if label_col is not None:
        extra = [h for k, h in enumerate(header) if k not in (0, label_col, split_col)]
        if extra:
            raise DatasetError(f"{f}:1: long-form manifest has extra columns {extra[:5]}; keep 'path,labels' "
                               "(and optionally 'split'), or use the wide form path,<class>,...")
        class_cols = None
    else:
        class_cols = [k for k in range(1, len(header)) if k != split_col]
        if not class_cols:
            raise DatasetError(f"{f}:1: no label columns; give 'path,labels' or 'path,<class1>,<class2>,...'")
        empty = [k + 1 for k in class_cols if not header[k]]
        if empty:
            raise DatasetError(f"{f}:1: column {empty[0]} has no class name; name every column")
    for n, ln in enumerate(lines[1:], 2):
        where = f"{f}:{n}"
        if len(ln) > len(header):
            raise DatasetError(f"{where}: {len(ln)} fields for {len(header)} columns; quote paths that hold "
                               f"'{delim}'")
        ln = ln + [""] * (len(header) - len(ln))
        split = ln[split_col] if split_col is not None else None
        if class_cols is None:
            labels: Any = _split_names(ln[label_col], where)
        else:
            labels = {header[k]: parse_label_value(ln[k], f"{where} column {header[k]!r}") for k in class_cols}
        rows.add(ln[0], labels, split, where)
    return [header[k] for k in class_cols] if class_cols is not None else None


def _read_json(f: Path, rows: _Rows) -> Optional[list[str]]:
    """Fill ``rows``; returns the JSON ``"classes"`` list when given."""
    try:
        with open(f, encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except RecursionError:
        raise DatasetError(f"{f}: the JSON is nested too deeply to be a manifest; fix the file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{f}: cannot read the JSON ({type(e).__name__}: {str(e)[:80]}); fix the file") from None
    classes = None
    if isinstance(data, dict):
        classes = data.get("classes")
        if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
            raise DatasetError(f"{f}: 'classes' must be a list of names; fix the manifest")
        data = data.get("images")
    if not isinstance(data, list):
        raise DatasetError(f"{f}: expected {{'images': [...]}} or a list of {{'path', 'labels'}} records; "
                           "fix the manifest")
    for k, rec in enumerate(data):
        where = f"{f} images[{k}]"
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: a record must be {{'path': ..., 'labels': ...}}; fix the manifest")
        path = next((rec[c] for c in _PATH_COLUMNS if c in rec), None)
        raw = next((rec[c] for c in _LABEL_COLUMNS if c in rec), None)
        if isinstance(raw, dict):
            labels: Any = {str(n): parse_label_value(v, f"{where} label {n!r}") for n, v in raw.items()}
        else:
            labels = _split_names(raw, where)
        rows.add(path, labels, rec.get(_SPLIT_COLUMN), where)
    return classes


def _inside(root: Path, p: Path) -> bool:
    """``p`` (relative paths resolved lexically, ``..`` included) stays under ``root``."""
    import os.path

    r = os.path.normpath(os.path.abspath(root))
    q = os.path.normpath(os.path.abspath(p))
    return q == r or q.startswith(r.rstrip(os.sep) + os.sep)


def open_manifest(path: Path, split: Optional[str] = None, *, difficult: str = "ignore",
                  classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """Read a CSV/JSON manifest as an :class:`ImageDataset` (see the module docstring for the forms).

    ``split`` keeps the rows whose ``split`` column/key equals it. ``difficult`` has no meaning here.
    """
    f = Path(path)
    if not f.is_file() or f.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DatasetError(f"{f}: a manifest must be a {', '.join(MANIFEST_SUFFIXES)} file")
    rows = _Rows()
    if f.suffix.lower() == ".json":
        wide_cols = None
        file_classes = _read_json(f, rows)
    else:
        wide_cols = _read_csv(f, rows)
        file_classes = None
    _keep_split(rows, split, f)
    names = _class_names(rows, f, classes, file_classes, wide_cols)
    targets = _targets(rows, names, f, wide_cols, classes)
    single = bool(all(isinstance(lab, list) for lab in rows.labels) and ((targets == 1).sum(axis=1) == 1).all())
    root = f.parent
    for i, where in zip(rows.ids, rows.where):
        if not Path(i).is_absolute() and not _inside(root, root / i):
            raise DatasetError(f"{where}: image path {i!r} points outside the manifest's folder {root}; "
                               "give paths relative to it (or absolute paths)")
    files = tuple(Path(i) if Path(i).is_absolute() else root / i for i in rows.ids)
    name = f.stem if split is None else f"{f.stem}-{split}"
    ds = ImageDataset(name=name, format="manifest", root=root, split=split, classes=tuple(names), files=files,
                      ids=tuple(rows.ids), targets=targets, single_label=single)
    if (targets == -1).any():
        _logger.info("%s: %d unknown labels (-1) are ignored", f, int((targets == -1).sum()))
    return ds


def _keep_split(rows: "_Rows", split: Optional[str], f: Path) -> None:
    """Keep the rows of ``split`` (all without one); refuse an empty manifest and images listed twice."""
    if split is not None:
        have = sorted({s for s in rows.splits if s is not None})
        if not have:
            raise DatasetError(f"split={split!r}: {f} has no 'split' column; leave split out or add the column")
        keep = [k for k, s in enumerate(rows.splits) if s == split]
        if not keep:
            raise DatasetError(f"split={split!r} has no rows in {f}; available splits: {', '.join(have)}")
        for attr in ("ids", "where", "splits", "labels"):
            setattr(rows, attr, [getattr(rows, attr)[k] for k in keep])
    if not rows.ids:
        raise DatasetError(f"{f}: the manifest lists no images; add one row per image")
    seen: dict[str, str] = {}
    for i, w in zip(rows.ids, rows.where):
        key = os.path.normpath(i)  # x, ./x and cls/../x name one file
        if key in seen:
            raise DatasetError(f"{w}: image {i!r} is listed twice (also {seen[key]}); list each image once")
        seen[key] = w


def _class_names(rows: "_Rows", f: Path, classes: Optional[Sequence[str]], file_classes: Optional[Sequence[str]],
                 wide_cols: Optional[Sequence[str]]) -> list[str]:
    """The classes: given, else the file's list, else the wide form's columns, else every label seen (sorted)."""
    if classes is not None:
        names = list(classes)
    elif file_classes is not None:
        names = list(file_classes)
    elif wide_cols is not None:
        names = list(wide_cols)
    else:
        names = sorted({n for lab in rows.labels for n in lab})
    if not names:
        raise DatasetError(f"{f}: no class names (every row is unlabelled); pass classes= or label the rows")
    if len(set(names)) != len(names):
        raise DatasetError(f"{f}: a class name is given twice in the class list; give each once")
    if wide_cols is not None and classes is not None:
        absent = [c for c in names if c not in set(wide_cols)]
        if absent:
            raise DatasetError(f"classes={absent[:5]} are not columns of {f}; choose from {', '.join(wide_cols)}")
    return names


def _targets(rows: "_Rows", names: list[str], f: Path, wide_cols: Optional[Sequence[str]],
             classes: Optional[Sequence[str]]) -> np.ndarray:
    """``(N, C)`` int8 targets of the rows' labels; an unknown label is refused (wide form with ``classes``:
    the columns outside the list are dropped)."""
    col = {c: j for j, c in enumerate(names)}
    targets = np.zeros((len(rows.ids), len(names)), dtype=np.int8)
    for k, (lab, where) in enumerate(zip(rows.labels, rows.where)):
        items = ((n, 1) for n in lab) if isinstance(lab, list) else lab.items()
        for n, v in items:
            j = col.get(n)
            if j is None:
                if wide_cols is not None and classes is not None:
                    continue
                raise DatasetError(f"{where}: label {n!r} is not a known class ({len(names)} classes: "
                                   f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}); fix the row or "
                                   "pass classes=")
            targets[k, j] = v
    return targets


register_format("manifest", detect=detect_manifest, open=open_manifest, priority=30)
