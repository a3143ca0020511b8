"""High-level Python API: one call from a model source and a dataset to a Table-1 run.

    >>> import patchcsra
    >>> run = patchcsra.sweep_lambda("timm:resnet50", "VOCdevkit", split="test", cache_dir="~/.cache/patchcsra")
    >>> run.result.frame            # one row per (lam, temperature), every metric
    >>> run.summary["choices"]      # oracle / fixed / cross-validated λ with bootstrap CIs
    >>> run.write("runs/resnet50-voc07")

The steps are public too: :func:`patchcsra.load`, :func:`patchcsra.patch`,
:func:`patchcsra.data.open_dataset`, :func:`patchcsra.data.resolve_transform`,
:func:`patchcsra.data.align_classes`, :func:`patchcsra.collect`, :func:`patchcsra.sweep`.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from torch import nn

from .errors import DatasetError, HeadNotFoundError, PatchCSRAError
from .patcher import PatchedClassifier, default_lam, patch
from .stats import Stats, collect
from .grid import DEFAULT_LAMS, SweepResult, sweep

__all__ = ["sweep_lambda", "SweepRun", "prepare", "Prepared", "default_cache_dir"]

_logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$PATCHCSRA_CACHE``, else ``$XDG_CACHE_HOME/patchcsra``, else ``~/.cache/patchcsra``."""
    env = os.environ.get("PATCHCSRA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "patchcsra"


@dataclass
class Prepared:
    """A patched model matched to a dataset: what :func:`collect` needs."""

    model: nn.Module
    patched: PatchedClassifier
    dataset: Any
    class_index: list[int]
    transform: Any
    model_name: str
    fixed_lam: float


@dataclass
class SweepRun:
    """A finished run: the sweep result and its ``summary.json`` record."""

    result: SweepResult
    summary: dict

    @property
    def stats(self) -> Stats:
        return self.result.stats

    def write(self, out_dir: Union[str, Path], *, force: bool = False) -> Path:
        """``results.csv``, ``per_class.csv``, ``summary.json``, ``table.md``, ``table.tex``, ``curve.png``."""
        from .report import write_run

        return write_run(self.result, out_dir, self.summary, force=force)


def _model_name(source: Union[str, nn.Module]) -> str:
    if isinstance(source, nn.Module):
        return type(source).__name__
    from .sources import parse_spec

    scheme, name = parse_spec(source)
    return name if scheme is not None else Path(name).name


def prepare(source: Union[str, os.PathLike, nn.Module], data: Union[str, os.PathLike, Any], *,
            split: Optional[str] = None, data_format: Optional[str] = None, difficult: str = "ignore",
            class_map: Optional[Union[str, Path, Mapping[str, int]]] = None, img_size: Optional[int] = None,
            input_size: Optional[Sequence[int]] = None, crop_pct: Optional[float] = None,
            interpolation: Optional[str] = None, mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None, fixed_lam: Optional[float] = None,
            load_kwargs: Optional[dict] = None) -> Prepared:
    """Load and patch the model, open the dataset, resolve the transform and match the classes.

    Everything that can be wrong with the input is found here, before any forward pass over the data.
    """
    from .data import align_classes, model_label_ids, model_label_names, open_dataset, resolve_transform
    from .sources import PatchedArchive, load

    model = source if isinstance(source, nn.Module) else load(source, **(load_kwargs or {}))
    if isinstance(model, (PatchedArchive, PatchedClassifier)) or getattr(model, "patchcsra_meta", None):
        raise PatchCSRAError(f"{_model_name(source)} is already patched; sweep the original model "
                             "(its λ is what the sweep chooses)")
    if img_size is not None and input_size is None and hasattr(model, "set_input_size"):
        try:  # timm ViTs & co: interpolate position embeddings to the new grid
            model.set_input_size(img_size=(int(img_size), int(img_size)))
        except Exception as e:  # noqa: BLE001
            raise PatchCSRAError(f"img_size={img_size}: {type(model).__name__} cannot be resized "
                                 f"({type(e).__name__}: {e})") from None
    spec = resolve_transform(model, img_size=img_size, input_size=input_size, crop_pct=crop_pct,
                             interpolation=interpolation, mean=mean, std=std)
    dataset = data if not isinstance(data, (str, os.PathLike)) else open_dataset(
        data, format=data_format, split=split, difficult=difficult)
    if len(dataset) == 0:
        raise DatasetError(f"{data}: split {split!r} has no images")
    try:
        patched = patch(model, lam=0.0, input_size=spec.input_size)
    except HeadNotFoundError as e:  # name the model the user gave (a file, timm:NAME ...), not only its class
        name = _model_name(source)
        raise HeadNotFoundError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None
    index = align_classes(dataset.classes, int(patched.info.num_classes), model_names=model_label_names(model),
                          model_ids=model_label_ids(model), class_map=class_map)
    dataset.transform = spec.build()
    lam = default_lam(model) if fixed_lam is None else float(fixed_lam)
    return Prepared(model, patched, dataset, [int(i) for i in index], spec, _model_name(source), lam)


def sweep_lambda(source: Union[str, os.PathLike, nn.Module], data: Union[str, os.PathLike, Any], *,
                 split: Optional[str] = None, data_format: Optional[str] = None,
                 lams: Sequence[float] = DEFAULT_LAMS, temperatures: Sequence[float] = (math.inf,),
                 fixed_lam: Optional[float] = None, metric: Optional[str] = None, folds: int = 5,
                 bootstrap: int = 1000, seed: int = 0, difficult: str = "ignore",
                 class_map: Optional[Union[str, Path, Mapping[str, int]]] = None, skip_bad: bool = False,
                 img_size: Optional[int] = None, input_size: Optional[Sequence[int]] = None,
                 crop_pct: Optional[float] = None, interpolation: Optional[str] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 batch_size: int = 32, device: Optional[str] = None, amp: Optional[str] = "auto",
                 channels_last: Optional[bool] = None, workers: Optional[int] = None,
                 cache_dir: Optional[Union[str, Path]] = None, load_kwargs: Optional[dict] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> Optional[SweepRun]:
    """Patch ``source``, collect scores over ``data`` in one pass, and sweep the λ/T grid.

    Under ``torchrun`` (after :func:`patchcsra.dist.init_from_env`) every rank collects its shard and
    rank 0 gets the result; the other ranks get ``None``.

    Args:
        source: ``timm:NAME``, ``torchvision:NAME``, a checkpoint file, or an ``nn.Module``.
        data: a dataset path (VOC, COCO, ImageFolder, CSV/JSON manifest) or an ``ImageDataset``.
        split, data_format, difficult: passed to :func:`patchcsra.data.open_dataset`.
        lams, temperatures: the grid; ``fixed_lam`` defaults to the paper's rule (:func:`default_lam`).
        metric, folds, bootstrap, seed: see :func:`patchcsra.grid.sweep`.
        class_map: dataset class -> model output index (file or mapping) when names/counts differ.
        skip_bad: score without unreadable images instead of failing (they are counted and named).
        img_size, input_size, crop_pct, interpolation, mean, std: transform overrides.
        batch_size, device, amp, channels_last, workers, cache_dir: see :func:`patchcsra.stats.collect`.
        load_kwargs: passed to :func:`patchcsra.load` (``pretrained``, ``arch``, ``weights``, ``trust`` ...).
        progress: ``progress(done, total)`` callback during the pass.
    """
    prep = prepare(source, data, split=split, data_format=data_format, difficult=difficult, class_map=class_map,
                   img_size=img_size, input_size=input_size, crop_pct=crop_pct, interpolation=interpolation,
                   mean=mean, std=std, fixed_lam=fixed_lam, load_kwargs=load_kwargs)
    ds = prep.dataset
    where = dict(zip(ds.ids, ds.files))  # id -> file, to name images in messages
    missing = ds.missing_files()
    if missing and not skip_bad:
        raise DatasetError(f"{len(missing)} image file(s) of {ds.name} are missing (e.g. "
                           f"{', '.join(str(where[i]) for i in missing[:5])}); restore them or pass --skip-bad "
                           "to score without them")
    t0 = time.perf_counter()
    stats = collect(prep.patched, ds, temperatures=temperatures, class_index=prep.class_index,
                    batch_size=batch_size, device=device, amp=amp, channels_last=channels_last, workers=workers,
                    cache_dir=cache_dir, fingerprint={"transform": prep.transform.as_dict()}, progress=progress)
    seconds = time.perf_counter() - t0
    if stats is None:  # a non-main torchrun rank: rank 0 has the gathered stats and writes the run
        return None
    bad = [stats.ids[i] for i in range(len(stats)) if not stats.ok[i]]
    if bad and not skip_bad:
        raise DatasetError(f"{len(bad)} image(s) of {ds.name} could not be read (e.g. "
                           f"{', '.join(str(where.get(i, i)) for i in bad[:5])}); fix them or pass --skip-bad to "
                           f"score without them{' (the pass is cached)' if cache_dir is not None else ''}")
    if bad:
        _logger.warning("skipping %d unreadable image(s): %s", len(bad), ", ".join(bad[:10]))
    result = sweep(stats, lams=lams, temperatures=temperatures, fixed_lam=prep.fixed_lam, metric=metric,
                   folds=folds, bootstrap=bootstrap, seed=seed, model=prep.model_name)
    from ._version import __version__
    from .provenance import environment
    from .report import summary_record

    info = prep.patched.info
    summary = summary_record(
        result,
        model={"name": prep.model_name, "source": None if isinstance(source, nn.Module) else os.fspath(source),
               "class": info.model_class, "head": info.as_dict(), "class_index": prep.class_index},
        dataset={"name": ds.name, "format": ds.format, "root": str(ds.root), "split": ds.split,
                 "fingerprint": ds.fingerprint(), "single_label": bool(ds.single_label),
                 "difficult": difficult},
        transform=prep.transform.as_dict(),
        collect={"batch_size": batch_size, **stats.meta, "seconds": round(seconds, 3),  # meta: after OOM retries
                 "images_per_s": round(stats.meta.get("forward_images", 0) / seconds, 2) if seconds > 0 else None},
        patchcsra_version=__version__,
        environment=environment(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return SweepRun(result, summary)
