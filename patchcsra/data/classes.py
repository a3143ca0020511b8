"""Class names of a model's outputs, and the dataset-class -> model-output alignment.

:func:`model_label_names` / :func:`model_label_ids` read what a model knows about its outputs
(timm ``pretrained_cfg`` or ImageNet subset, torchvision weight categories, patchcsra records).
:func:`align_classes` turns that, or a user's class map, into one output index per dataset class.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import DataMismatchError, DatasetError

__all__ = ["model_label_names", "model_label_ids", "align_classes", "load_class_map", "normalize_class_name",
           "CLASS_MAP_HINT"]

_logger = logging.getLogger(__name__)

CLASS_MAP_HINT = "pass --class-map FILE mapping each dataset class to an output index"
_WNID_RE = re.compile(r"^n\d{8}$")
_NORM_RE = re.compile(r"[\s_\-]+")

ClassMap = Union[str, Path, Mapping[str, int]]


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


# ----------------------------------------------------------------------------- class maps
def load_class_map(class_map: ClassMap) -> dict[str, int]:
    """``{dataset class: output index}`` from a dict, a JSON file (``{"name": index}`` or a list of
    names in output order) or a CSV file of ``name,index`` lines (a header line is skipped)."""
    if isinstance(class_map, Mapping):
        items, where = list(class_map.items()), "class_map"
    else:
        f = Path(class_map).expanduser()
        where = str(f)
        try:
            text = f.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"class map {f}: cannot read it ({type(e).__name__}); give a JSON or CSV "
                               "file of name,index lines") from None
        if f.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except RecursionError:
                raise DatasetError(f"class map {f}: the JSON is nested too deeply; give {{\"name\": index, ...}}") from None
            except ValueError as e:
                raise DatasetError(f"class map {f}: bad JSON ({str(e)[:60]}); give {{\"name\": index, ...}}") from None
            if isinstance(data, list):
                items = [(str(n), k) for k, n in enumerate(data)]
            elif isinstance(data, dict):
                items = list(data.items())
            else:
                raise DatasetError(f"class map {f}: expected {{\"name\": index, ...}} or a list of names")
        else:
            items = []
            for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
                row = [c.strip() for c in row]
                if not row or not any(row) or row[0].startswith("#"):
                    continue
                if len(row) != 2:
                    raise DatasetError(f"class map {f}:{n}: expected 'name,index', got {','.join(row)!r}")
                if n == 1 and not re.fullmatch(r"[+-]?\d+", row[1]):
                    continue  # header
                items.append((row[0], row[1]))
    out: dict[str, int] = {}
    for name, idx in items:
        try:
            if isinstance(idx, bool) or (isinstance(idx, float) and not idx.is_integer()):
                raise ValueError
            out[str(name)] = int(idx)
        except (TypeError, ValueError):
            raise DatasetError(f"class map {where}: index {idx!r} of class {name!r} is not an integer; "
                               "give output indices") from None
    if not out:
        raise DatasetError(f"class map {where} is empty; map each dataset class to an output index")
    return out


def _ellipsis(names: Sequence[str], k: int = 5) -> str:
    return ", ".join(repr(n) for n in names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


def _from_class_map(dataset_classes: Sequence[str], num_outputs: int, class_map: ClassMap) -> np.ndarray:
    cmap = load_class_map(class_map)
    where = "class_map" if isinstance(class_map, Mapping) else str(class_map)
    norm: dict[str, list[str]] = {}
    for k in cmap:
        norm.setdefault(normalize_class_name(k), []).append(k)
    picked: list[int] = []
    missing = []
    for c in dataset_classes:
        if c in cmap:
            picked.append(int(cmap[c]))
        elif len(norm.get(normalize_class_name(c), ())) == 1:
            picked.append(int(cmap[norm[normalize_class_name(c)][0]]))
        else:
            missing.append(c)
    if missing:
        raise DataMismatchError(f"class map {where} has no index for {len(missing)} dataset classes "
                                f"({_ellipsis(missing)}); add a 'name,index' entry for each")
    bad = [(c, i) for c, i in zip(dataset_classes, picked) if not 0 <= i < num_outputs]  # Python ints: no overflow
    if bad:
        raise DataMismatchError(f"class map {where}: index {bad[0][1]} of class {bad[0][0]!r} is outside "
                                f"[0, {num_outputs}) (the model outputs {num_outputs}); fix the index")
    out = np.asarray(picked, dtype=np.int64)
    if len(set(out.tolist())) != len(out):
        _logger.warning("class map %s sends several dataset classes to one output", where)
    return out


def _index(names: Optional[Sequence[str]], num_outputs: int, what: str) -> Optional[tuple[dict, dict]]:
    if not names:
        return None
    if len(names) != num_outputs:
        _logger.warning("model has %d %s for %d outputs; ignoring them", len(names), what, num_outputs)
        return None
    exact: dict[str, list[int]] = {}
    norm: dict[str, list[int]] = {}
    for k, n in enumerate(names):
        exact.setdefault(str(n), []).append(k)
        norm.setdefault(normalize_class_name(n), []).append(k)
    return exact, norm


def align_classes(dataset_classes: Sequence[str], num_outputs: int, *,
                  model_names: Optional[Sequence[str]] = None, model_ids: Optional[Sequence[str]] = None,
                  class_map: Optional[ClassMap] = None) -> np.ndarray:
    """The model output index of each dataset class: ``(C_d,)`` int64.

    Rules, in order:

    1. ``class_map`` (a ``{name: index}`` dict, a JSON file or a CSV of ``name,index`` lines) wins;
       it must cover every dataset class with indices in ``[0, num_outputs)``.
    2. With model names or ids known, each dataset class is matched by name (case-insensitive,
       ``'_'``/``'-'``/``' '`` equivalent) or id; any permutation or subset of the outputs is fine.
       An unmatched or ambiguous class raises.
    3. With nothing known, ``C_d == num_outputs`` gives the identity, else it raises.

    Raises:
        DataMismatchError: the classes cannot be aligned (the message suggests ``--class-map``).
        DatasetError: the class map file cannot be read.
    """
    dataset_classes = [str(c) for c in dataset_classes]
    num_outputs = int(num_outputs)
    cd = len(dataset_classes)
    if num_outputs < 1:
        raise DataMismatchError(f"num_outputs={num_outputs}: the model must output at least one class")
    if class_map is not None:
        return _from_class_map(dataset_classes, num_outputs, class_map)
    indexes = [ix for ix in (_index(model_names, num_outputs, "label names"),
                             _index(model_ids, num_outputs, "label ids")) if ix is not None]
    if not indexes:
        if cd == num_outputs:
            return np.arange(cd, dtype=np.int64)
        raise DataMismatchError(f"dataset has {cd} classes, model outputs {num_outputs}: {CLASS_MAP_HINT}")
    out = np.empty(cd, dtype=np.int64)
    unmatched, ambiguous = [], []
    for j, c in enumerate(dataset_classes):
        hit: Optional[list[int]] = None
        for exact, norm in indexes:
            hit = exact.get(c) or norm.get(normalize_class_name(c))
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
        raise DataMismatchError(f"{len(unmatched)} of {cd} dataset classes match no model output name "
                                f"({_ellipsis(unmatched)}; the model's are e.g. {example}): {CLASS_MAP_HINT}")
    if ambiguous:
        c, hit = ambiguous[0]
        raise DataMismatchError(f"dataset class {c!r} matches several model outputs "
                                f"({', '.join(map(str, hit[:5]))}): {CLASS_MAP_HINT}")
    if len(set(out.tolist())) != cd:
        dup = [c for c, i in zip(dataset_classes, out) if (out == i).sum() > 1]
        raise DataMismatchError(f"dataset classes {_ellipsis(dup)} match the same model output: {CLASS_MAP_HINT}")
    return out
