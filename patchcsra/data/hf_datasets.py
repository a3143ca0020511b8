"""Hugging Face ``datasets`` reader: a ``save_to_disk`` folder (arrow) or a folder of parquet files.

``path`` is a folder written by ``Dataset.save_to_disk`` (``dataset_info.json``, ``state.json`` and arrow files),
by ``DatasetDict.save_to_disk`` (``dataset_dict.json`` and one such folder per split: ``split=`` picks one,
default ``test``, ``validation``, ``val``, else the first), or a folder of ``*.parquet`` files (directly or under
``data/``; hub-style names ``<split>-00000-of-00001.parquet`` give the splits). The folder is opened with
``datasets.load_from_disk`` / ``datasets.Dataset.from_parquet`` (which converts the parquet files into arrow
files in the ``datasets`` cache once) and read by row, so a DataLoader's workers and ``torchrun``'s ranks read
their own rows, none twice.

Columns:

* the image: a ``datasets.Image`` feature, or a column named ``image`` / ``img`` (bytes, or
  ``{"bytes", "path"}``). It is read undecoded (``Image(decode=False)``) and decoded by patchcsra itself
  (the pixel limit, RGB);
* the labels: a ``ClassLabel`` (single-label) or a list of ``ClassLabel`` (multi-label) -- class names from the
  feature --, else a column named ``labels`` / ``label`` / ``tags`` of ints or lists of ints (names from a
  ``classes.txt`` in the folder, else ``0..C-1``). A ``ClassLabel`` value ``-1`` (no label) is ignored (-1).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..errors import DatasetError
from .base import BlobSource, ImageDataset, register_format, select_class_names

__all__ = ["open_hf_datasets", "detect_hf_datasets", "ArrowRows", "IMAGE_COLUMNS", "LABEL_COLUMNS"]

_logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("labels", "label", "tags", "targets")
SPLIT_ORDER = ("test", "validation", "val")
_HUB_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9]*)[-_]\d")


def _parquets(d: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(d) if e.is_file() and e.name.lower().endswith(".parquet"))
    except OSError:
        return []


def _parquet_dir(path: Path) -> Optional[Path]:
    for d in (path, path / "data"):
        if _parquets(d):
            return d
    return None


def detect_hf_datasets(path: Path) -> bool:
    """A ``save_to_disk`` folder (``state.json`` + ``dataset_info.json``, or ``dataset_dict.json``) or a folder
    holding ``*.parquet`` files (directly or under ``data/``)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file():
        return True
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return True
    return _parquet_dir(path) is not None


@contextlib.contextmanager
def _quiet(datasets) -> Iterator[None]:
    """No ``datasets`` progress bars while we open (library prints go nowhere near stdout)."""
    from datasets.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class ArrowRows(BlobSource):
    """The image cells of a ``datasets.Dataset`` (memory-mapped arrow), read by row without decoding.

    It pickles as the ``Dataset`` does (the paths of its memory-mapped arrow files), so each DataLoader worker
    maps the files itself. ``containers``/``bounds`` say which arrow or parquet file holds each row (messages
    and fingerprints).
    """

    kind = "hf-datasets"

    def __init__(self, dataset: Any, column: str, containers: Sequence[str], bounds: Sequence[int],
                 base: Path) -> None:
        self.dataset = dataset  # one column, Image(decode=False)
        self.column = column
        self.containers = tuple(str(c) for c in containers)
        self.bounds = np.asarray(bounds, dtype=np.int64)  # row where each container starts, then N
        self.base = Path(base)

    def container(self, item: int) -> str:
        k = int(np.searchsorted(self.bounds, int(item), side="right")) - 1
        return self.containers[max(0, min(k, len(self.containers) - 1))]

    def read(self, item: int) -> bytes:
        cell = self.dataset[int(item)][self.column]
        if isinstance(cell, dict):
            data, where = cell.get("bytes"), cell.get("path")
            if data is None and where:  # an image stored as a path (datasets keeps a path when it had no bytes)
                p = Path(where)
                with open(p if p.is_absolute() else self.base / p, "rb") as f:
                    return f.read()
            cell = data
        if not isinstance(cell, (bytes, bytearray, memoryview)):
            raise ValueError(f"the {self.column!r} cell holds {type(cell).__name__}, not encoded image bytes")  # noqa: TRY004
        return bytes(cell)


def _inner(feature: Any) -> Any:
    """The element feature of a list feature (``List``, ``LargeList``, ``Sequence``), else None."""
    import datasets

    kinds = tuple(getattr(datasets, n) for n in ("List", "LargeList", "Sequence") if hasattr(datasets, n))
    return feature.feature if isinstance(feature, kinds) else None


def _image_column(ds: Any, where: Path) -> str:
    import datasets

    cols = list(ds.features)
    found = [c for c in cols if isinstance(ds.features[c], datasets.Image)]
    found += [c for c in cols if c.lower() in IMAGE_COLUMNS and c not in found]
    if not found:
        raise DatasetError(f"{where}: no image column (a datasets.Image feature or a column named image/img) among "
                           f"{', '.join(cols) or 'no columns'}; cast it: ds.cast_column('image', datasets.Image())")
    return found[0]


def _label_column(ds: Any, where: Path) -> tuple[str, Optional[list[str]], bool]:
    """``(column, class names from its ClassLabel or None, multi-label)``."""
    import datasets

    feats = ds.features
    rank = {n: k for k, n in enumerate(LABEL_COLUMNS)}
    order = sorted(feats, key=lambda c: rank.get(c.lower(), len(rank)))
    for c in order:
        f = feats[c]
        if isinstance(f, datasets.ClassLabel):
            return c, list(f.names), False
        if isinstance(_inner(f), datasets.ClassLabel):
            return c, list(_inner(f).names), True
    for c in order:
        if c.lower() not in rank:
            continue
        f, inner = feats[c], _inner(feats[c])
        if isinstance(f, datasets.Value) and f.dtype.startswith(("int", "uint")):
            return c, None, False
        if isinstance(inner, datasets.Value) and inner.dtype.startswith(("int", "uint")):
            return c, None, True
    raise DatasetError(f"{where}: no label column (a ClassLabel, a list of ClassLabel, or a column named "
                       f"{'/'.join(LABEL_COLUMNS)} of ints) among {', '.join(feats)}; cast it: "
                       "ds.cast_column('label', datasets.ClassLabel(names=[...]))")


def _load(path: Path, split: Optional[str]) -> tuple[Any, Optional[str], list[str], list[int]]:
    """``(Dataset, split, container files, rows of each)`` for a save_to_disk or parquet folder."""
    import datasets

    if (path / "dataset_dict.json").is_file():
        try:
            splits = [str(s) for s in json.loads((path / "dataset_dict.json").read_text())["splits"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{path / 'dataset_dict.json'}: not a DatasetDict index ({e}); write the folder again "
                               "with DatasetDict.save_to_disk") from None
        if split is None:
            split = next((s for s in SPLIT_ORDER if s in splits), splits[0] if splits else None)
        if split not in splits:
            raise DatasetError(f"split={split!r} is not a split of {path}; choose one of {', '.join(splits)}")
        ds, _, files, rows = _load(path / split, None)
        return ds, split, files, rows
    if (path / "state.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 -- datasets raises many kinds; say it in one line
            raise DatasetError(f"{path}: datasets.load_from_disk failed ({type(e).__name__}: {str(e)[:200]}); "
                               "write the folder again with save_to_disk") from None
        if split is not None and ds.split is not None and str(ds.split) != split:
            raise DatasetError(f"split={split!r}: {path} holds the split {str(ds.split)!r} only; leave --split out")
        files = [c["filename"] for c in ds.cache_files]
        return ds, split or (str(ds.split) if ds.split is not None else None), files, _arrow_rows(files)
    d = _parquet_dir(path)
    if d is None:
        raise DatasetError(f"{path}: no dataset_dict.json, state.json or *.parquet files; give a folder written by "
                           "save_to_disk or a folder of parquet files")
    files = _parquets(d)
    groups: dict[str, list[Path]] = {}
    for f in files:
        m = _HUB_NAME.match(f.name)
        groups.setdefault(m.group(1) if m else "", []).append(f)
    if "" not in groups and len(groups) > 1 or split is not None:
        if split is None:
            split = next((s for s in SPLIT_ORDER if s in groups), None)
            if split is None:
                raise DatasetError(f"{d} holds the splits {', '.join(sorted(groups))}; pass --split one of them")
        if split not in groups:
            raise DatasetError(f"split={split!r}: {d} has no {split}-*.parquet files; choose one of "
                               f"{', '.join(sorted(k for k in groups if k)) or 'none (leave --split out)'}")
        files = groups[split]
    elif len(groups) == 1 and "" not in groups:
        split = next(iter(groups))
    import pyarrow.parquet as pq

    try:
        rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
        ds = datasets.Dataset.from_parquet([str(f) for f in files])
    except Exception as e:  # noqa: BLE001 -- pyarrow/datasets raise many kinds; say it in one line
        raise DatasetError(f"{d}: cannot read its parquet files ({type(e).__name__}: {str(e)[:200]}); write them "
                           "again (Dataset.to_parquet)") from None
    return ds, split, [str(f) for f in files], rows


def _arrow_rows(files: Sequence[str]) -> list[int]:
    import pyarrow as pa

    rows = []
    for f in files:
        with pa.memory_map(f) as src:
            rows.append(pa.ipc.open_stream(src).read_all().num_rows)
    return rows


def _targets(values: list, names: list[str], multi: bool, where: Path, col: str) -> np.ndarray:
    c = len(names)
    targets = np.zeros((len(values), c), dtype=np.int8)
    for r, v in enumerate(values):
        vs = v if multi else [v]
        if vs is None or (not multi and v is None) or (not multi and v == -1):
            targets[r] = -1  # no label: ignored
            continue
        for x in vs:
            if x is None or not 0 <= int(x) < c:
                raise DatasetError(f"{where}: row {r}: {col}={x!r} is no class index in [0, {c}); fix the label "
                                   "or the class names")
            targets[r, int(x)] = 1
    return targets


def open_hf_datasets(path: Path, split: Optional[str] = None, *, difficult: str = "ignore",
                     classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """Read a Hugging Face ``datasets`` folder (see the module doc). ``classes`` picks/reorders the classes
    found; ``difficult`` has no meaning here."""
    import datasets

    path = Path(path)
    with _quiet(datasets):
        ds, split, containers, rows = _load(path, split)
        img_col = _image_column(ds, path)
        lab_col, names, multi = _label_column(ds, path)
        values = ds.data.column(lab_col).to_pylist()
        if names is None:
            f = path / "classes.txt"
            if f.is_file():
                from .classes import load_class_names

                names = load_class_names(f, what="the class names file")
            else:
                flat = [int(x) for v in values for x in (v if multi else [v]) if x is not None] if values else []
                names = [str(k) for k in range(max(flat, default=0) + 1)]
        view = ds.select_columns([img_col])
        if isinstance(ds.features[img_col], datasets.Image):
            view = view.cast_column(img_col, datasets.Image(decode=False))
    n = len(ds)
    if sum(rows) != n:  # rows selected or reordered after the files were written: name rows by position
        containers, rows = [str(path)], [n]
    bounds = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    files, ids = [], []
    for c, lo, hi in zip(containers, bounds[:-1], bounds[1:]):
        try:
            rel = Path(c).relative_to(path).as_posix()
        except ValueError:
            rel = Path(c).name
        files += [Path(f"{c}#row={r}") for r in range(int(hi - lo))]
        ids += [f"{rel}#row={r}" for r in range(int(hi - lo))]
    targets = _targets(values, names, multi, path, lab_col)
    single_label = bool(not multi and ((targets == 1).sum(axis=1) == 1).all())
    top = path.resolve().name or "hf-datasets"
    name = top if split is None or split in top else f"{top}-{split}"
    source = ArrowRows(view, img_col, containers, bounds, path)
    _logger.info("%s: %d rows, image column %r, label column %r", path, n, img_col, lab_col)
    out = ImageDataset(name=name, format="hf-datasets", root=path, split=split, classes=tuple(names),
                       files=tuple(files), ids=tuple(ids), targets=targets, single_label=single_label, blobs=source)
    return select_class_names(out, classes, str(path))


register_format("hf-datasets", detect=detect_hf_datasets, open=open_hf_datasets, priority=45)
