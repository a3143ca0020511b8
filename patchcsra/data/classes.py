"""Class names of a model's outputs, and the dataset-class -> model-output alignment.

:func:`model_label_names` / :func:`model_label_ids` read what a model knows about its outputs
(timm ``pretrained_cfg`` or ImageNet subset, torchvision weight categories, patchcsra records).
:func:`align_classes` turns that, or a user's class map, into one output index per dataset class;
:func:`align_class_groups` allows several outputs per dataset class (a many-to-one class map, reduced by
``max`` or ``logsumexp``, see :func:`patchcsra.collect`). :func:`load_class_names` reads a label file
(one name per line, line i names output i; timm's class-map format) or a JSON list of names.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import DataMismatchError, DatasetError

__all__ = ["model_label_names", "model_label_ids", "align_classes", "align_class_groups", "load_class_map",
           "load_class_names", "match_output_name", "normalize_class_name", "class_groups", "check_class_reduce",
           "CLASS_REDUCTIONS",
           "CLASS_MAP_HINT"]

_logger = logging.getLogger(__name__)

CLASS_MAP_HINT = "pass --class-map FILE mapping each dataset class to an output index"
_WNID_RE = re.compile(r"^n\d{8}$")
_NORM_RE = re.compile(r"[\s_\-]+")

ClassMap = Union[str, Path, Mapping[str, Union[int, Sequence[int]]]]
ClassNames = Union[str, Path, Sequence[str]]
CLASS_REDUCTIONS = ("max", "logsumexp")


def normalize_class_name(name: str) -> str:
    """Case-insensitive, ``'_'``/``'-'``/``' '`` equivalent form used for name matching."""
    return _NORM_RE.sub(" ", str(name).strip().lower()).strip()


# ----------------------------------------------------------------------------- what the model knows
def _records(model: Any, depth: int = 0) -> Iterator[dict]:
    """patchcsra record dicts of ``model`` and of the model it wraps (patched models)."""
    for attr in ("patchcsra_meta", "patchcsra_source"):
        d = getattr(model, attr, None)
        if isinstance(d, Mapping):
            yield dict(d)
            if isinstance(d.get("source"), Mapping):
                yield dict(d["source"])
    if depth < 3:
        inner = getattr(getattr(model, "split", None), "model", None)  # PatchedClassifier -> HeadSplit -> model
        if inner is not None and inner is not model:
            yield from _records(inner, depth + 1)


def _unwrap(model: Any) -> Any:
    inner = getattr(getattr(model, "split", None), "model", None)
    return inner if inner is not None else model


def _timm_cfg(model: Any) -> Optional[dict]:
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None:
        cfg = getattr(model, "default_cfg", None)
    return cfg if isinstance(cfg, Mapping) else None


def _as_list(v: Any) -> Optional[list[str]]:
    if isinstance(v, Mapping):  # {index: name} (HF id2label style)
        try:
            return [str(v[k]) for k in sorted(v, key=lambda k: int(k))]
        except (TypeError, ValueError):
            return None
    if isinstance(v, (list, tuple)) and v:
        return [str(x) for x in v]
    return None


def _imagenet_info(model: Any):
    """timm ``ImageNetInfo`` for a timm model with an ImageNet-sized head, else ``None``."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    subset = infer_imagenet_subset(model)
    return ImageNetInfo(subset) if subset else None


def _lemma(description: str) -> str:
    return description.split(",")[0].strip()


def _from_records(model: Any, keys: Sequence[str]) -> Optional[list[str]]:
    """The first non-empty list under ``keys`` in the model's patchcsra records."""
    for rec in _records(model):
        for key in keys:
            values = _as_list(rec.get(key))
            if values:
                return values
    return None


def model_label_names(model: Any) -> Optional[list[str]]:
    """Human-readable name of each model output (``(C,)`` list), or ``None`` when unknown.

    Looks at, in order: ``label_names``/``categories`` in the patchcsra records
    (``model.patchcsra_meta``, ``model.patchcsra_source``: torchvision weight categories); the
    timm ``pretrained_cfg['label_names']`` (WordNet ids there are turned into their first lemma);
    a timm model with a 1000/11k/12k/21k/22k-class head: ImageNet's first lemma per synset
    (``'tench'``, ``'goldfish'``, ...).
    """
    names = _from_records(model, ("label_names", "categories"))
    if names:
        return names
    target, cfg, names = _timm_label_names(model)
    if cfg is None:
        return None
    if names:
        if not all(_WNID_RE.match(n) for n in names):
            return names
        descs = cfg.get("label_descriptions") if isinstance(cfg.get("label_descriptions"), Mapping) else {}
        try:
            from timm.data import ImageNetInfo
            info = ImageNetInfo("imagenet-22k")
            return [_lemma(descs.get(n) or info.label_name_to_description(n)) for n in names]
        except (ImportError, KeyError, AssertionError):
            return [_lemma(descs[n]) if n in descs else n for n in names]
    info = _imagenet_info(target)
    if info is None:
        return None
    return [_lemma(d) for d in info.label_descriptions()]


def _timm_label_names(model: Any) -> tuple[Any, Optional[Mapping], Optional[list[str]]]:
    """``(the unwrapped model, its timm pretrained_cfg or None, the cfg's label_names or None)``."""
    target = _unwrap(model)
    cfg = _timm_cfg(target)
    return target, cfg, (_as_list(cfg.get("label_names")) if cfg is not None else None)


def model_label_ids(model: Any) -> Optional[list[str]]:
    """Dataset ids of the model outputs (WordNet ids such as ``'n01440764'``), or ``None`` when unknown.

    An ImageNet validation ImageFolder whose class folders are WordNet ids matches these.
    """
    ids = _from_records(model, ("label_ids",))
    if ids:
        return ids
    target, cfg, names = _timm_label_names(model)
    if cfg is None:
        return None
    if names and all(_WNID_RE.match(n) for n in names):
        return names
    if names:
        return None
    info = _imagenet_info(target)
    return list(info.label_names()) if info is not None else None


# ----------------------------------------------------------------------------- reading class files
_INT_RE = re.compile(r"[+-]?\d+")
_MAP_FIX = ("give JSON {\"class\": an index or a list of indices, ...}, CSV 'name,index' lines (a name may "
            "repeat) or a text file of one output name per line")


def check_class_reduce(reduce: Any) -> str:
    """``reduce`` if it is one of :data:`CLASS_REDUCTIONS` (``'max'``, ``'logsumexp'``), else a one-line error."""
    if not isinstance(reduce, str) or reduce not in CLASS_REDUCTIONS:
        raise DatasetError(f"class_reduce={reduce!r} (CLI --class-reduce): choose {' or '.join(CLASS_REDUCTIONS)}")
    return reduce


def _is_seq(v: Any) -> bool:
    """A list, tuple, range or 1-d+ array (not a string, not a scalar)."""
    if isinstance(v, np.ndarray):
        return v.ndim > 0
    return isinstance(v, Sequence) and not isinstance(v, (str, bytes))


def class_groups(class_index: Sequence[Any]) -> list[list[int]]:
    """``(C,)`` entries, each an output index or a list of them -> one list of output indices per class."""
    out = []
    for c, v in enumerate(class_index):
        g = [int(i) for i in v] if _is_seq(v) else [int(v)]
        if not g:
            raise DatasetError(f"class_index[{c}] is an empty list; give at least one output index per class")
        out.append(g)
    return out


def _read_text(f: Path, what: str, fix: str) -> str:
    try:
        return f.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{what} {f}: cannot read it ({type(e).__name__}); {fix}") from None


def _load_json(f: Path, text: str, what: str, fix: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise DatasetError(f"{what} {f}: the JSON is nested too deeply; {fix}") from None
    except ValueError as e:
        raise DatasetError(f"{what} {f}: bad JSON ({str(e)[:60]}); {fix}") from None


def _name_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, name)`` of the non-blank lines (each stripped): the i-th of them names output i."""
    return [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]


def _csv_rows(text: str) -> list[tuple[int, list[str]]]:
    """``(line number, stripped cells)`` of the CSV rows with content; ``#`` comment rows left out."""
    rows = []
    reader = csv.reader(io.StringIO(text))
    for row in reader:
        row = [c.strip() for c in row]
        if row and any(row) and not row[0].startswith("#"):
            rows.append((reader.line_num, row))
    return rows


def _is_pair(row: list[str]) -> bool:
    return len(row) == 2 and bool(_INT_RE.fullmatch(row[1]))


def _looks_like_pairs(rows: list[tuple[int, list[str]]]) -> bool:
    """Every row, but perhaps a first (header) row, is ``name,integer``."""
    body = rows[1:] if rows and not _is_pair(rows[0][1]) else rows
    return bool(body) and all(_is_pair(r) for _, r in body)


def _text_format(f: Path, text: str) -> str:
    """``'csv'`` (``name,index`` rows) or ``'names'`` (one output name per line) for a non-JSON file.

    A ``.csv`` is a CSV class map unless every row has one cell; any other file is one unless some row is
    not ``name,integer`` (a label file such as ``tench, Tinca tinca`` lines is names)."""
    try:
        rows = _csv_rows(text)
    except csv.Error:
        rows = None
    if f.suffix.lower() == ".csv":
        return "names" if rows and all(len(r) == 1 for _, r in rows) else "csv"
    return "csv" if rows and _looks_like_pairs(rows) else "names"


def load_class_names(source: ClassNames, *, what: str = "--class-names") -> list[str]:
    """One name per model output, ``(C,)``: from a list, a JSON file (a list of names, or ``{index: name}``)
    or a text file of one name per line (timm's class-map format and label files such as
    ``imagenet_labels.txt``: the i-th non-blank line names output i; lines are stripped, commas kept).

    Raises:
        DatasetError: the file cannot be read, is empty, or is a ``name,index`` class map (line named).
    """
    if not isinstance(source, (str, Path)) and _is_seq(source):
        names = [str(n) for n in source]
        if not names:
            raise DatasetError(f"{what}: the list of class names is empty; give one name per output")
        return names
    f = Path(source).expanduser()
    fix = "give one name per line (line i names output i) or a JSON list of names"
    text = _read_text(f, what, fix)
    if f.suffix.lower() == ".json":
        names = _as_list(_load_json(f, text, what, fix))
        if names is None:
            raise DatasetError(f"{what} {f}: expected a JSON list of names (or {{index: name}}); {fix}")
    else:
        lines = _name_lines(text)
        rows = _csv_rows(text) if _text_format(f, text) == "csv" else []
        if rows:
            n = next((n for n, r in rows if _is_pair(r)), rows[0][0])
            raise DatasetError(f"{what} {f}:{n}: a 'name,index' line (a class map); pass the file as --class-map, "
                               f"or {fix}")
        names = [ln for _, ln in lines]
    if not names:
        raise DatasetError(f"{what} {f} has no names; {fix}")
    return names


@dataclass
class _Loaded:
    """A class map, read: ``groups`` (``{class: [output, ...]}``, with the line of each class in ``lines``)
    or, for a list of names, ``names`` (output i is named ``names[i]``, read from line ``name_lines[i]``)."""

    where: str
    groups: dict[str, list[int]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    names: Optional[list[str]] = None
    name_lines: list[Optional[int]] = field(default_factory=list)

    def at(self, name: Optional[str] = None, line: Optional[int] = None) -> str:
        """``file:line`` of ``name``'s entry (or of ``line``) where known, else the file."""
        line = line if line is not None else self.lines.get(name) if name is not None else None
        return f"{self.where}:{line}" if line else self.where


def _as_index(idx: Any, name: str, at: str) -> int:
    try:
        if isinstance(idx, bool) or (isinstance(idx, float) and not idx.is_integer()):
            raise ValueError
        return int(idx)
    except (TypeError, ValueError):
        raise DatasetError(f"class map {at}: index {idx!r} of class {name!r} is not an integer; "
                           "give output indices") from None


def _grouped(items: Sequence[tuple[Any, Any, Optional[int]]], where: str) -> _Loaded:
    """``(name, index or [indices], line)`` items -> a :class:`_Loaded`; a repeated name adds its indices."""
    out = _Loaded(where)
    for name, idx, line in items:
        name = str(name)
        at = f"{where}:{line}" if line else where
        values = list(idx) if _is_seq(idx) else [idx]
        if not values:
            raise DatasetError(f"class map {at}: class {name!r} maps to an empty list; give at least one index")
        group = out.groups.setdefault(name, [])
        out.lines.setdefault(name, line)  # type: ignore[arg-type]
        for v in values:
            i = _as_index(v, name, at)
            if i not in group:
                group.append(i)
    if not out.groups:
        raise DatasetError(f"class map {where} is empty; map each dataset class to an output index")
    return out


def _read_class_map(class_map: ClassMap) -> _Loaded:
    if isinstance(class_map, Mapping):
        return _grouped([(k, v, None) for k, v in class_map.items()], "class_map")
    f = Path(class_map).expanduser()
    where = str(f)
    text = _read_text(f, "class map", _MAP_FIX)
    if f.suffix.lower() == ".json":
        data = _load_json(f, text, "class map", _MAP_FIX)
        if isinstance(data, list):
            if not data:
                raise DatasetError(f"class map {f} is empty; map each dataset class to an output index")
            return _Loaded(where, names=[str(n) for n in data], name_lines=[None] * len(data))
        if isinstance(data, dict):
            return _grouped([(k, v, None) for k, v in data.items()], where)
        raise DatasetError(f"class map {f}: expected {{\"name\": an index or a list of indices, ...}} or a list "
                          "of names")
    if _text_format(f, text) == "names":
        lines = _name_lines(text)
        if not lines:
            raise DatasetError(f"class map {f} is empty; {_MAP_FIX}")
        return _Loaded(where, names=[ln for _, ln in lines], name_lines=[n for n, _ in lines])
    items = []
    for k, (n, row) in enumerate(_csv_rows(text)):
        if len(row) != 2:
            raise DatasetError(f"class map {f}:{n}: expected 'name,index', got {','.join(row)!r}; {_MAP_FIX}")
        if k == 0 and not _INT_RE.fullmatch(row[1]):
            continue  # header
        items.append((row[0], row[1], n))
    return _grouped(items, where)


def load_class_map(class_map: ClassMap) -> dict[str, Union[int, list[int]]]:
    """``{dataset class: output index}``, or a list of indices for a class mapped to several outputs.

    From a dict (values: an index or a list of them), a JSON file (``{"dog": [151, 152], "cat": 281}``
    or a list of names in output order), a CSV file of ``name,index`` lines (a header line is skipped;
    a name on several lines maps to all its indices) or a text file of one name per line (timm's
    class-map format: the i-th non-blank line names output i).
    """
    lo = _read_class_map(class_map)
    if lo.names is not None:
        by_name: dict[str, list[int]] = {}
        for k, n in enumerate(lo.names):
            by_name.setdefault(n, []).append(k)
        groups = by_name
    else:
        groups = lo.groups
    return {n: g[0] if len(g) == 1 else list(g) for n, g in groups.items()}


# ----------------------------------------------------------------------------- alignment
def _ellipsis(names: Sequence[Any], k: int = 5) -> str:
    return ", ".join(repr(n) for n in names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


def _from_class_map(dataset_classes: Sequence[str], num_outputs: int, lo: _Loaded) -> list[list[int]]:
    """One list of output indices per dataset class from ``{class: [outputs]}`` (exact or normalised name)."""
    norm: dict[str, list[str]] = {}
    for k in lo.groups:
        norm.setdefault(normalize_class_name(k), []).append(k)
    keys: list[str] = []
    missing = []
    for c in dataset_classes:
        hit = norm.get(normalize_class_name(c), ())
        if c in lo.groups:
            keys.append(c)
        elif len(hit) == 1:
            keys.append(hit[0])
        else:
            missing.append(c)
    if missing:
        raise DataMismatchError(f"class map {lo.where} has no index for {len(missing)} dataset classes "
                                f"({_ellipsis(missing)}); add a 'name,index' entry for each")
    for c, key in zip(dataset_classes, keys):
        bad = [i for i in lo.groups[key] if not 0 <= i < num_outputs]  # Python ints: no overflow
        if bad:
            raise DataMismatchError(f"class map {lo.at(key)}: index {bad[0]} of class {c!r} is outside "
                                    f"[0, {num_outputs}) (the model outputs {num_outputs}); fix the index")
    out = [list(lo.groups[k]) for k in keys]
    flat = [i for g in out for i in g]
    if len(set(flat)) != len(flat):
        _logger.warning("class map %s sends several dataset classes to one output", lo.where)
    return out


@dataclass
class _NameIndex:
    """Output indices by exact name, by normalised name and by normalised first lemma (``'tench'`` of
    ``'tench, Tinca tinca'``), tried in that order."""

    names: list[str]
    exact: dict[str, list[int]]
    norm: dict[str, list[int]]
    lemma: dict[str, list[int]]

    @classmethod
    def of(cls, names: Sequence[str]) -> "_NameIndex":
        exact: dict[str, list[int]] = {}
        norm: dict[str, list[int]] = {}
        lemma: dict[str, list[int]] = {}
        for k, n in enumerate(names):
            n = str(n)
            exact.setdefault(n, []).append(k)
            norm.setdefault(normalize_class_name(n), []).append(k)
            if "," in n:
                lemma.setdefault(normalize_class_name(_lemma(n)), []).append(k)
        return cls([str(n) for n in names], exact, norm, lemma)

    def lookup(self, name: str) -> list[int]:
        key = normalize_class_name(name)
        return self.exact.get(name) or self.norm.get(key) or self.lemma.get(key) or []

    def close(self, name: str, n: int = 3) -> list[str]:
        """Up to ``n`` names close to ``name`` (difflib over the normalised names and lemmas)."""
        keys = {**{k: v[0] for k, v in self.lemma.items()}, **{k: v[0] for k, v in self.norm.items()}}
        hits = difflib.get_close_matches(normalize_class_name(name), list(keys), n=n, cutoff=0.6)
        return list(dict.fromkeys(self.names[keys[h]] for h in hits))


def match_output_name(name: str, names: Sequence[str], what: str) -> int:
    """The output named ``name`` among ``names`` (exact, normalised, then first lemma); ``what`` names the
    source in the one-line error (an unknown name lists close matches, an ambiguous one the outputs)."""
    ix = _NameIndex.of(names)
    hit = ix.lookup(name)
    if len(hit) == 1:
        return hit[0]
    if hit:
        raise DataMismatchError(f"{what}: class name {name!r} names several outputs ({', '.join(map(str, hit[:5]))});"
                                " give the output index")
    close = ix.close(name)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"no close match in {what}"
    raise DataMismatchError(f"{what}: unknown class name {name!r} ({hint})")


def _index(names: Optional[Sequence[str]], num_outputs: int, what: str) -> Optional[_NameIndex]:
    if not names:
        return None
    if len(names) != num_outputs:
        _logger.warning("model has %d %s for %d outputs; ignoring them", len(names), what, num_outputs)
        return None
    return _NameIndex.of(names)


def _from_names(dataset_classes: Sequence[str], num_outputs: int, lo: _Loaded) -> list[list[int]]:
    """A class map that names the outputs (one name per line, or a JSON list): each dataset class is the
    output whose name it matches (exact, normalised, then first lemma)."""
    names = lo.names or []
    if len(names) > num_outputs:
        raise DataMismatchError(f"class map {lo.at(line=lo.name_lines[num_outputs])}: {len(names)} names but the "
                                f"model outputs {num_outputs}; give one name per output (line i names output i)")
    ix = _NameIndex.of(names)
    out: list[list[int]] = []
    unmatched = []
    for c in dataset_classes:
        hit = ix.lookup(c)
        if len(hit) > 1:
            at = ", ".join(f"line {lo.name_lines[i]}" if lo.name_lines[i] else f"entry {i}" for i in hit[:5])
            raise DataMismatchError(f"class map {lo.where}: dataset class {c!r} matches several outputs "
                                    f"({', '.join(map(str, hit[:5]))}: {at}); give a JSON or 'name,index' CSV "
                                    "class map instead")
        if not hit:
            unmatched.append(c)
        else:
            out.append(hit)
    if unmatched:
        close = ix.close(unmatched[0])
        hint = f"; did you mean {' or '.join(repr(n) for n in close)} for {unmatched[0]!r}?" if close else ""
        raise DataMismatchError(f"class map {lo.where}: {len(unmatched)} of {len(dataset_classes)} dataset classes "
                                f"match no name in it ({_ellipsis(unmatched)}{hint}); fix the names, or map the "
                                "classes by index in a JSON/CSV class map")
    return out


def _from_model_names(dataset_classes: list[str], num_outputs: int, model_names: Optional[Sequence[str]],
                      model_ids: Optional[Sequence[str]]) -> np.ndarray:
    """Rules 2 and 3 of :func:`align_classes`: by the model's names or ids, else the identity."""
    cd = len(dataset_classes)
    indexes = [ix for ix in (_index(model_names, num_outputs, "label names"),
                             _index(model_ids, num_outputs, "label ids")) if ix is not None]
    if not indexes:
        if cd == num_outputs:
            return np.arange(cd, dtype=np.int64)
        raise DataMismatchError(f"dataset has {cd} classes, model outputs {num_outputs}: {CLASS_MAP_HINT}")
    out = np.empty(cd, dtype=np.int64)
    unmatched, ambiguous = [], []
    for j, c in enumerate(dataset_classes):
        hit: list[int] = []
        for ix in indexes:
            hit = ix.lookup(c)
            if hit:
                break
        if not hit:
            unmatched.append(c)
        elif len(hit) > 1:
            ambiguous.append((c, hit))
        else:
            out[j] = hit[0]
    if unmatched:
        example = ", ".join(repr(n) for n in (model_names or model_ids or [])[:3])
        close = indexes[0].close(unmatched[0])
        hint = f"; did you mean {' or '.join(repr(n) for n in close)} for {unmatched[0]!r}?" if close else ""
        raise DataMismatchError(f"{len(unmatched)} of {cd} dataset classes match no model output name "
                                f"({_ellipsis(unmatched)}{hint}; the model's are e.g. {example}): {CLASS_MAP_HINT}")
    if ambiguous:
        c, hit = ambiguous[0]
        raise DataMismatchError(f"dataset class {c!r} matches several model outputs "
                                f"({', '.join(map(str, hit[:5]))}): {CLASS_MAP_HINT}")
    if len(set(out.tolist())) != cd:
        dup = [c for c, i in zip(dataset_classes, out) if (out == i).sum() > 1]
        raise DataMismatchError(f"dataset classes {_ellipsis(dup)} match the same model output: {CLASS_MAP_HINT}")
    return out


def align_class_groups(dataset_classes: Sequence[str], num_outputs: int, *,
                       model_names: Optional[Sequence[str]] = None, model_ids: Optional[Sequence[str]] = None,
                       class_map: Optional[ClassMap] = None) -> list[list[int]]:
    """The model outputs of each dataset class: ``C_d`` lists of indices (one index each unless a class map
    sends a class to several outputs; :func:`patchcsra.collect` reduces those with ``class_reduce``).

    Rules, in order:

    1. ``class_map`` wins: a ``{name: index or [indices]}`` dict or JSON file, or a CSV of ``name,index``
       lines (a name may repeat: it maps to all its indices), must cover every dataset class with indices
       in ``[0, num_outputs)``. A class map that *names the outputs* (a text file of one name per line,
       line i naming output i, as timm's class-map and label files; or a JSON list of names) matches each
       dataset class to the one output of that name, as rule 2 does.
    2. With model names or ids known, each dataset class is matched by name (exact; case-insensitive with
       ``'_'``/``'-'``/``' '`` equivalent; then the name's first comma-separated lemma) or id; any
       permutation or subset of the outputs is fine. An unmatched or ambiguous class raises.
    3. With nothing known, ``C_d == num_outputs`` gives the identity, else it raises.

    Raises:
        DataMismatchError: the classes cannot be aligned (the message suggests ``--class-map``).
        DatasetError: the class map file cannot be read (the message names the file and line).
    """
    dataset_classes = [str(c) for c in dataset_classes]
    num_outputs = int(num_outputs)
    if num_outputs < 1:
        raise DataMismatchError(f"num_outputs={num_outputs}: the model must output at least one class")
    if class_map is not None:
        lo = _read_class_map(class_map)
        return _from_names(dataset_classes, num_outputs, lo) if lo.names is not None else \
            _from_class_map(dataset_classes, num_outputs, lo)
    return [[int(i)] for i in _from_model_names(dataset_classes, num_outputs, model_names, model_ids)]


def align_classes(dataset_classes: Sequence[str], num_outputs: int, *,
                  model_names: Optional[Sequence[str]] = None, model_ids: Optional[Sequence[str]] = None,
                  class_map: Optional[ClassMap] = None) -> np.ndarray:
    """The model output index of each dataset class: ``(C_d,)`` int64 (rules: :func:`align_class_groups`).

    Raises:
        DataMismatchError: the classes cannot be aligned, or the class map sends a class to several outputs
            (use :func:`align_class_groups` for those).
        DatasetError: the class map file cannot be read.
    """
    groups = align_class_groups(dataset_classes, num_outputs, model_names=model_names, model_ids=model_ids,
                                class_map=class_map)
    many = [(str(c), g) for c, g in zip(dataset_classes, groups) if len(g) > 1]
    if many:
        c, g = many[0]
        where = "class_map" if isinstance(class_map, Mapping) else str(class_map)
        raise DataMismatchError(f"class map {where} maps dataset class {c!r} to {len(g)} outputs "
                                f"({_ellipsis(g, 4)}), but one output per class is needed here (a trained head "
                                "starts from one classifier row per class): give --class-map one index per class")
    return np.asarray([g[0] for g in groups], dtype=np.int64)
