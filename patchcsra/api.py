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
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
from torch import nn

from .errors import DatasetError, HeadNotFoundError, PatchCSRAError
from .grid import SweepResult, sweep
from .options import CollectOptions, ModelSource, SweepOptions, TransformOverrides, split_options
from .patcher import PatchedClassifier, default_lam, patch
from .stats import Stats, collect

__all__ = ["sweep_lambda", "SweepRun", "prepare", "Prepared", "train_and_evaluate", "TrainRun", "default_cache_dir"]

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
    class_index: list[Any]  # model output per dataset class; a list of outputs for a many-to-one class
    transform: Any
    model_name: str
    fixed_lam: float
    limit: Optional[dict] = None  # {"n", "seed", "of"} when a subset is scored
    class_reduce: Optional[str] = None  # "max" / "logsumexp" of a many-to-one map's outputs; None: one-to-one

    @property
    def class_map_kind(self) -> str:
        """``'identity'``, ``'one-to-one'`` (a permutation or subset of the outputs) or ``'many-to-one'``."""
        if any(isinstance(i, list) for i in self.class_index):
            return "many-to-one"
        n = int(self.patched.info.num_classes)
        return "identity" if self.class_index == list(range(n)) else "one-to-one"


@dataclass
class SweepRun:
    """A finished run: the sweep result and its ``summary.json`` record."""

    result: SweepResult
    summary: dict

    @property
    def stats(self) -> Stats:
        return self.result.stats

    def write(self, out_dir: Union[str, Path], *, force: bool = False, formats: Sequence[str] = ("png",),
              plotter: Any = None) -> Path:
        """``results.csv``, ``per_class.csv``, ``summary.json``, ``table.md``, ``table.tex``, ``curve.png`` (and
        ``curve.pdf`` / ``curve.svg`` when in ``formats``); ``plotter``: a started
        :class:`~patchcsra.plot_worker.PlotWorker` that draws the curve in parallel (None: in this process)."""
        from .report import write_run

        return write_run(self.result, out_dir, self.summary, force=force, formats=formats, plotter=plotter)


def _model_name(source: Union[str, os.PathLike, nn.Module, ModelSource]) -> str:
    if isinstance(source, nn.Module):
        return type(source).__name__
    return (source if isinstance(source, ModelSource) else ModelSource(source)).name


def _load(source: Union[str, os.PathLike, nn.Module, ModelSource], load_kwargs: Optional[dict]) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    if isinstance(source, ModelSource):
        return source.load()
    from .sources import load

    return load(source, **(load_kwargs or {}))


def prepare(source: Union[str, os.PathLike, nn.Module, ModelSource], data: Union[str, os.PathLike, Any], *,
            split: Optional[str] = None, data_format: Optional[str] = None, difficult: str = "ignore",
            class_map: Optional[Union[str, Path, Mapping[str, Any]]] = None, class_reduce: str = "max",
            class_names: Optional[Union[str, Path, Sequence[str]]] = None,
            transform: Optional[TransformOverrides] = None, fixed_lam: Optional[float] = None,
            load_kwargs: Optional[dict] = None, model_name: Optional[str] = None, max_pixels: Optional[int] = None,
            limit: Optional[int] = None, limit_seed: int = 0, **transform_kwargs: Any) -> Prepared:
    """Load and patch the model, open the dataset, resolve the transform and match the classes.

    ``transform`` (a :class:`~patchcsra.options.TransformOverrides`) or its fields as keywords (``img_size=``,
    ``input_size=``, ``crop_pct=``, ``interpolation=``, ``mean=``, ``std=``) override the model's preprocessing;
    ``model_name`` is what tables call the model (default: the library name, file name or class);
    ``max_pixels`` is the dataset's pixel limit (``None``: the dataset's own, by default
    :data:`~patchcsra.data.DEFAULT_MAX_PIXELS`; ``0``: no limit); ``limit`` keeps a seeded, class-stratified
    subset of that many images (:meth:`~patchcsra.data.ImageDataset.sample` with ``limit_seed``).
    ``class_map`` may send a dataset class to several outputs (``{"dog": [151, 152], "cat": 281}``), reduced
    by ``class_reduce`` (``'max'`` or ``'logsumexp'``, see :func:`patchcsra.collect`); ``class_names`` (a list,
    a JSON list or a file of one name per line) names the model's outputs, for matching the dataset's classes
    when there is no ``class_map`` (default: the names the model carries).
    Everything that can be wrong with the input is found here, before any forward pass over the data.
    """
    from .data import open_dataset
    from .data.base import check_max_pixels
    from .data.classes import check_class_reduce
    from .sources import PatchedArchive

    reduce = check_class_reduce(class_reduce)
    tf = split_options(transform_kwargs, transform=transform, allowed=(TransformOverrides,))[0]
    pixel_limit = check_max_pixels(max_pixels) if max_pixels is not None else None
    model = _load(source, load_kwargs)
    name = model_name or _model_name(source)
    if isinstance(model, (PatchedArchive, PatchedClassifier)) or getattr(model, "patchcsra_meta", None):
        raise PatchCSRAError(f"{name} is already patched; sweep the original model (its λ is what the sweep chooses)")
    tf.apply_to(model)
    spec = tf.resolve(model)
    dataset = data if not isinstance(data, (str, os.PathLike)) else open_dataset(
        data, format=data_format, split=split, difficult=difficult)
    if len(dataset) == 0:
        raise DatasetError(f"{data}: split {split!r} has no images")
    if max_pixels is not None:
        dataset.max_pixels = pixel_limit
    limited = None
    if limit is not None:
        limited = {"n": int(limit), "seed": int(limit_seed), "of": len(dataset)}
        dataset = dataset.sample(limit, limit_seed)
    try:
        patched = patch(model, lam=0.0, input_size=spec.input_size)
    except HeadNotFoundError as e:  # name the model the user gave (a file, timm:NAME ...), not only its class
        raise HeadNotFoundError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None
    index = _class_groups(model, dataset, int(patched.info.num_classes), class_map, class_names)
    dataset.transform = spec.lazy()  # built at the first image: a cached pass never pays for torchvision
    lam = default_lam(model) if fixed_lam is None else float(fixed_lam)
    many = any(isinstance(i, list) for i in index)
    return Prepared(model, patched, dataset, index, spec, name, lam, limited, reduce if many else None)


def _class_groups(model: nn.Module, dataset, n_out: int, class_map, class_names) -> list[Any]:
    """Model output per dataset class (a list of outputs for a class a many-to-one ``class_map`` sends to
    several); ``class_names`` (a list or a file) names the outputs instead of what the model carries."""
    from .data import align_class_groups, load_class_names, model_label_ids, model_label_names
    from .errors import DataMismatchError

    names, ids = model_label_names(model), model_label_ids(model)
    if class_names is not None:
        names, ids = load_class_names(class_names), None
        if len(names) != n_out:
            what = "class_names" if not isinstance(class_names, (str, os.PathLike)) else f"--class-names {class_names}"
            raise DataMismatchError(f"{what} has {len(names)} names but the model outputs {n_out}; give one name per "
                                    "output (line i names output i)")
    groups = align_class_groups(dataset.classes, n_out, model_names=names, model_ids=ids, class_map=class_map)
    return [g[0] if len(g) == 1 else list(g) for g in groups]


def sweep_lambda(source: Union[str, os.PathLike, nn.Module, ModelSource], data: Union[str, os.PathLike, Any], *,
                 split: Optional[str] = None, data_format: Optional[str] = None, difficult: str = "ignore",
                 class_map: Optional[Union[str, Path, Mapping[str, Any]]] = None, skip_bad: bool = False,
                 class_reduce: str = "max", class_names: Optional[Union[str, Path, Sequence[str]]] = None,
                 grid: Optional[SweepOptions] = None, transform: Optional[TransformOverrides] = None,
                 options: Optional[CollectOptions] = None, load_kwargs: Optional[dict] = None,
                 model_name: Optional[str] = None, progress: Optional[Callable[[int, int], None]] = None,
                 max_pixels: Optional[int] = None, limit: Optional[int] = None, protocol: Optional[str] = None,
                 scores: str = "auto", **option_kwargs: Any) -> Optional[SweepRun]:
    """Patch ``source``, collect scores over ``data`` in one pass, and sweep the λ/T grid.

    Under ``torchrun`` (after :func:`patchcsra.dist.init_from_env`) every rank collects its shard and
    rank 0 gets the result; the other ranks get ``None``.

    Args:
        source: ``timm:NAME``, ``torchvision:NAME``, a checkpoint file, a :class:`~patchcsra.options.ModelSource`,
            or an ``nn.Module``.
        data: a dataset path (VOC, COCO, ImageFolder, CSV/JSON manifest) or an ``ImageDataset``.
        split, data_format, difficult: passed to :func:`patchcsra.data.open_dataset`.
        class_map: dataset class -> model output index (file or mapping) when names/counts differ; a class may
            map to a list of outputs (many-to-one), or the file may name the outputs (one name per line).
        class_reduce: ``'max'`` (default) or ``'logsumexp'`` of a many-to-one class's outputs, applied to the
            logits and to the per-location scores before the residual attention (λ=0 is ``R_j model(x)_j``).
        class_names: names of the model's outputs (a list, a JSON list, or a file of one name per line) for
            matching the dataset's classes by name (default: the names the model carries).
        skip_bad: score without unreadable images instead of failing (they are counted and named).
        grid: a :class:`~patchcsra.options.SweepOptions` (``lams``, ``temperatures``, ``fixed_lam`` -- default
            the paper's rule, :func:`~patchcsra.patcher.default_lam` -- ``metric``, ``folds``, ``bootstrap``,
            ``seed``; see :func:`patchcsra.sweep`).
        transform: a :class:`~patchcsra.options.TransformOverrides` (``img_size``, ``input_size``, ``crop_pct``,
            ``interpolation``, ``mean``, ``std``).
        options: a :class:`~patchcsra.options.CollectOptions` (``batch_size``, ``device``, ``amp``,
            ``channels_last``, ``workers``, ``cache_dir``, ``save_every``; see :func:`patchcsra.collect`).
        load_kwargs: passed to :func:`patchcsra.load` (``pretrained``, ``arch``, ``weights``, ``trust`` ...).
        model_name: what tables call the model (default: the library name, file name or class).
        progress: ``progress(done, total)`` callback during the pass.
        max_pixels: images with more pixels are not decoded but unreadable, naming the limit (``None``: the
            dataset's own, :data:`~patchcsra.data.DEFAULT_MAX_PIXELS` for a path; ``0``: no limit).
        limit: score a seeded (the grid's ``seed``), class-stratified subset of this many images; recorded in
            ``summary.json`` under ``dataset.limit``.
        protocol: metric conventions (:data:`patchcsra.protocols.PROTOCOLS`; default ``patchcsra``), recorded in
            ``summary.json`` (``settings.protocol``, ``settings.conventions``) and under the tables.
        scores: ``auto`` (default), ``logit`` or ``prob``: whether thresholds apply to the sigmoid of the scores or
            to the scores themselves (``auto``: probabilities when every baseline score is in [0, 1]).
        **option_kwargs: any field of the three option classes, e.g. ``lams=[0, 0.1]``, ``img_size=448``,
            ``workers=0``: merged into them once, here.
    """
    tf, opts, so = split_options(option_kwargs, transform=transform, collect=options, sweep=grid)
    protocol = _check_protocol(protocol, scores)
    prep = prepare(source, data, split=split, data_format=data_format, difficult=difficult, class_map=class_map,
                   class_reduce=class_reduce, class_names=class_names, transform=tf, fixed_lam=so.fixed_lam,
                   load_kwargs=load_kwargs, model_name=model_name, max_pixels=max_pixels, limit=limit,
                   limit_seed=so.seed)
    ds = prep.dataset
    where = dict(zip(ds.ids, ds.files))  # id -> file, to name images in messages
    missing = ds.missing_files()
    if missing and not skip_bad:
        raise DatasetError(f"{len(missing)} image file(s) of {ds.name} are missing (e.g. "
                           f"{', '.join(str(where[i]) for i in missing[:5])}); restore them or pass --skip-bad "
                           "to score without them")
    t0 = time.perf_counter()
    stats = collect(prep.patched, ds, temperatures=so.temperatures, class_index=prep.class_index,
                    class_reduce=prep.class_reduce or "max", options=opts,
                    fingerprint={"transform": prep.transform.as_dict()}, progress=progress)
    seconds = time.perf_counter() - t0
    if stats is None:  # a non-main torchrun rank: rank 0 has the gathered stats and writes the run
        return None
    bad_rows = np.flatnonzero(~np.asarray(stats.ok, dtype=bool))
    bad = [stats.ids[i] for i in bad_rows]
    if len(bad) and not skip_bad:
        raise DatasetError(f"{len(bad)} image(s) of {ds.name} could not be read ({_why_unreadable(ds, bad_rows)}); "
                           "fix them or pass --skip-bad to score without them"
                           f"{' (the pass is cached)' if opts.cache_dir is not None else ''}")
    if bad:
        _logger.warning("skipping %d unreadable image(s): %s (%s)", len(bad), ", ".join(bad[:10]),
                        _why_unreadable(ds, bad_rows))
    result = sweep(stats, **{**so.as_kwargs(), "fixed_lam": prep.fixed_lam}, model=prep.model_name,
                   exact_linear=bool(prep.patched.info.exact_linear), protocol=protocol, scores=scores)
    return SweepRun(result, _summary(result, prep, source, ds, difficult, opts, stats, seconds))


def _check_protocol(protocol: Optional[str], scores: str) -> str:
    """The protocol's name, refusing an unknown protocol or score kind before any work (one line naming the flag)."""
    from .protocols import SCORE_KINDS, get_protocol

    if scores not in SCORE_KINDS:
        raise PatchCSRAError(f"--scores {scores!r}: choose one of {', '.join(SCORE_KINDS)}")
    return get_protocol(protocol, "--protocol").name


def _why_unreadable(ds, rows: np.ndarray, show: int = 3) -> str:
    """``e.g. <path>: <why>; ...`` for the first ``show`` of ``rows`` (each opened again, here, to say why)."""
    reasons = []
    for i in rows[:show]:
        why = ds.unreadable_reason(int(i)) if hasattr(ds, "unreadable_reason") else None
        reasons.append(why or f"{ds.files[int(i)]}: readable now, rerun")
    return "e.g. " + "; ".join(reasons)


def _summary(result: SweepResult, prep: Prepared, source, ds, difficult: str, opts: CollectOptions, stats: Stats,
             seconds: float) -> dict:
    """The run's ``summary.json`` record."""
    from ._version import __version__
    from .provenance import environment
    from .report import summary_record

    info = prep.patched.info
    src = None if isinstance(source, nn.Module) else os.fspath(source.spec if isinstance(source, ModelSource)
                                                               else source)
    return summary_record(
        result,
        model={"name": prep.model_name, "source": src, "class": info.model_class, "head": info.as_dict(),
               "class_index": prep.class_index, "class_map_kind": prep.class_map_kind,
               "class_reduce": prep.class_reduce},
        dataset={"name": ds.name, "format": ds.format, "root": str(ds.root), "split": ds.split,
                 "fingerprint": stats.meta.get("data_fingerprint") or ds.fingerprint(),  # the pass computed it
                 "single_label": bool(ds.single_label), "difficult": difficult,
                 **({"limit": prep.limit} if prep.limit else {})},
        transform=prep.transform.as_dict(),
        collect={"batch_size": opts.batch_size, **{k: v for k, v in stats.meta.items() if k != "data_fingerprint"},
                 "seconds": round(seconds, 3),  # meta: after OOM retries
                 "images_per_s": round(stats.meta.get("forward_images", 0) / seconds, 2) if seconds > 0 else None},
        patchcsra_version=__version__,
        environment=environment(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


# ----------------------------------------------------------------------------- train a head, then evaluate it
@dataclass
class TrainRun:
    """A trained head (:class:`~patchcsra.training.loop.TrainResult`) and, with ``eval_split``, its Table-1 run."""

    train: Any
    evaluated: Optional[SweepRun] = None


def train_and_evaluate(source: Union[str, os.PathLike, nn.Module, ModelSource], data: Union[str, os.PathLike],
                       out_dir: Union[str, Path], *, split: Optional[str] = "train", eval_split: Optional[str] = None,
                       data_format: Optional[str] = None, difficult: str = "ignore",
                       class_map: Optional[Union[str, Path, Mapping[str, int]]] = None, config: Any = None,
                       transform: Optional[TransformOverrides] = None, resume: bool = False, force: bool = False,
                       device: Optional[str] = None, workers: Optional[int] = None,
                       progress: Optional[Callable[[dict], None]] = None,
                       max_pixels: Optional[int] = None, limit: Optional[int] = None) -> TrainRun:
    """What ``patchcsra train-head`` does: train a head on ``split``, then (``eval_split``) sweep it.

    The dataset's classes are matched to the model's outputs where they can be (names, count or
    ``class_map``): the head then starts from those rows of the pretrained classifier. Another label set
    (no match and no ``class_map``) gets a fresh head with one output per dataset class. The evaluation is
    a Table-1 run in ``out_dir/eval`` (on rank 0 under torchrun).

    Args:
        source: ``timm:NAME``, ``torchvision:NAME``, a file, a :class:`~patchcsra.options.ModelSource` or a module.
        config: a :class:`~patchcsra.training.TrainConfig` (default: the paper's recipe, CSRA H=1).
        transform: preprocessing overrides (:class:`~patchcsra.options.TransformOverrides`).
        resume, force, device, workers, progress: see :func:`patchcsra.train_head`.
        max_pixels: the pixel limit of the images read (``None``: :data:`~patchcsra.data.DEFAULT_MAX_PIXELS`;
            ``0``: no limit).
        limit: at most this many images of each split, a class-stratified subset seeded by ``config.seed``
            (:meth:`~patchcsra.data.ImageDataset.sample`); the evaluation records it in its ``summary.json``.
    """
    from . import dist
    from .data import open_dataset
    from .sources import PatchedArchive
    from .training.loop import TrainConfig, train_head

    cfg = (config or TrainConfig()).check()
    tf = transform or TransformOverrides()
    from .data import DEFAULT_MAX_PIXELS

    pixel_limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    ds = open_dataset(data, format=data_format, split=split, difficult=difficult, max_pixels=pixel_limit)
    if limit is not None:
        ds = ds.sample(limit, cfg.seed)
    model = _load(source, None)
    if isinstance(model, PatchedArchive):
        raise PatchCSRAError(f"{_model_name(source)} is a patched file; train on the original model")
    tf.apply_to(model)
    spec = tf.resolve(model)
    spec_name = None if isinstance(source, nn.Module) else os.fspath(
        source.spec if isinstance(source, ModelSource) else source)
    result = train_head(model, ds, out_dir, config=cfg, transform=spec, resume=resume, force=force, device=device,
                        workers=workers, source=spec_name, class_index=_class_index(model, ds, spec, class_map),
                        progress=progress)
    evaluated = None
    if eval_split is not None:
        name = f"{_model_name(source)} + {cfg.kind}" + (f" H={cfg.heads}" if cfg.kind == "csra" else "")
        evaluated = sweep_lambda(result.model, data, split=eval_split, data_format=data_format, difficult=difficult,
                                 workers=workers, device=device, cache_dir=None, bootstrap=1000, model_name=name,
                                 max_pixels=pixel_limit, limit=limit, seed=cfg.seed)
        if evaluated is not None and dist.is_main():
            evaluated.write(Path(out_dir) / "eval", force=True)
    return TrainRun(result, evaluated)


def _class_index(model: nn.Module, ds, spec, class_map) -> Optional[list[int]]:
    """Model output per dataset class where the two match; None for another label set (a fresh head)."""
    from .data import align_classes, model_label_ids, model_label_names
    from .errors import DataMismatchError
    from .patcher import describe

    n_out = describe(model, input_size=spec.input_size).num_classes
    names = model_label_names(model)
    if class_map is None and len(ds.classes) != n_out and not names:
        return None
    try:
        return align_classes(ds.classes, n_out, model_names=names, model_ids=model_label_ids(model),
                             class_map=class_map).tolist()
    except DataMismatchError:
        if class_map is not None:
            raise
        _logger.info("the dataset's %d classes match no outputs of the model: the head starts fresh",
                     len(ds.classes))
        return None
