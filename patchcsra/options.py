"""Options as data: what a run needs, as a few frozen dataclasses checked once when they are built.

* :class:`ModelSource` -- where a model comes from (``spec``, ``arch``, ``weights``, ``num_classes``,
  ``pretrained``, ``trust``); ``load()`` builds it.
* :class:`TransformOverrides` -- timm-style preprocessing overrides (``img_size``, ``input_size``,
  ``crop_pct``, ``interpolation``, ``mean``, ``std``); ``resolve(model)`` gives the run's ``TransformSpec``.
* :class:`CollectOptions` -- how the one pass runs (``batch_size``, ``device``, ``amp``, ``channels_last``,
  ``workers``, ``cache_dir``, ``save_every``, ``save_interval``, ``verify_cache``).
* :class:`SweepOptions` -- the λ/T grid and how λ is chosen (``lams``, ``temperatures``, ``fixed_lam``,
  ``metric``, ``folds``, ``bootstrap``, ``seed``).

:func:`split_options` turns the flat keywords the public functions accept (``sweep_lambda(...,
img_size=448, workers=0)``) into these, once, at the API boundary; below it only dataclasses travel.
A bad value raises :class:`~patchcsra.errors.PatchCSRAError` whose ``param`` names the field, so the
CLI can name its flag instead.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .errors import PatchCSRAError

__all__ = ["ModelSource", "TransformOverrides", "CollectOptions", "SweepOptions", "split_options", "DEFAULT_LAMS",
           "DEFAULT_MAX_PIXELS"]

#: images with more pixels are not decoded (a decompression-bomb guard; ``--max-pixels``): PIL's own
#: warning threshold, 1024**3 / 4 / 3 ~ 89.5 megapixels (256 MiB as 8-bit RGB).
DEFAULT_MAX_PIXELS = 89_478_485

#: 21 points; the paper's values (0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.4, 0.8) are all on it.
DEFAULT_LAMS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35,
                                   0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _bad(param: str, value: Any, why: str) -> PatchCSRAError:
    return PatchCSRAError(f"{param}={value!r}: {why}", param=param)


@dataclass(frozen=True)
class ModelSource:
    """A model as the user names it: ``spec`` (``timm:NAME``, ``torchvision:NAME``, ``hf:ORG/NAME``, a file or
    folder) and how to read it (``ema``: a training checkpoint's EMA weights)."""

    spec: Union[str, os.PathLike]
    arch: Optional[str] = None
    weights: Optional[str] = None
    num_classes: Optional[int] = None
    pretrained: bool = True
    trust: bool = False
    ema: bool = False

    def load(self):
        """The model, in eval mode (see :func:`patchcsra.load`)."""
        from .sources import load

        return load(self.spec, arch=self.arch, weights=self.weights, num_classes=self.num_classes,
                    pretrained=self.pretrained, trust=self.trust, ema=self.ema)

    @property
    def name(self) -> str:
        """What tables call the model: the library name, else the file name."""
        from .sources import parse_spec

        scheme, name = parse_spec(self.spec)
        return name if scheme is not None else Path(name).name

    @property
    def is_file(self) -> bool:
        from .sources import parse_spec

        return parse_spec(self.spec)[0] is None and Path(self.spec).exists()


@dataclass(frozen=True)
class TransformOverrides:
    """timm-style overrides of a model's evaluation transform; ``None`` keeps the model's own value.

    ``img_size`` evaluates at ``img_size x img_size`` (ViTs get interpolated position embeddings);
    ``input_size`` is ``(C, H, W)`` and wins over ``img_size``. The values are checked where they are
    applied, once: :func:`patchcsra.data.resolve_transform`.
    """

    img_size: Optional[int] = None
    input_size: Optional[Sequence[int]] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def apply_to(self, model, name: str = "") -> None:
        """``img_size`` on a model that can be resized (timm ViTs & co: position embeddings interpolated)."""
        if self.img_size is None or self.input_size is not None or not hasattr(model, "set_input_size"):
            return
        try:
            model.set_input_size(img_size=(int(self.img_size), int(self.img_size)))
        except Exception as e:  # noqa: BLE001
            raise PatchCSRAError(f"img_size={self.img_size}: {name or type(model).__name__} cannot be resized "
                                 f"({type(e).__name__}: {e})") from None

    def resolve(self, model):
        """The :class:`~patchcsra.data.TransformSpec` of ``model`` with these overrides."""
        from .data import resolve_transform

        return resolve_transform(model, **self.as_kwargs())


@dataclass(frozen=True)
class CollectOptions:
    """How the one pass over a dataset runs (see :func:`patchcsra.collect`)."""

    batch_size: int = 32
    device: Optional[str] = None
    amp: Optional[str] = "auto"
    channels_last: Optional[bool] = None
    workers: Optional[int] = None
    cache_dir: Optional[Union[str, Path]] = None
    save_every: int = 1024
    save_interval: float = 30.0
    verify_cache: bool = False
    store_above: Optional[int] = None  # bytes of statistics above which a cached pass keeps them on disk

    def __post_init__(self) -> None:
        if self.store_above is not None and (isinstance(self.store_above, bool) or
                                             not isinstance(self.store_above, int) or self.store_above < 0):
            raise _bad("store_above", self.store_above, "give bytes >= 0 (None: patchcsra.stats_disk's 2 GiB)")
        if not isinstance(self.verify_cache, bool):
            raise _bad("verify_cache", self.verify_cache, "give True or False")
        try:
            ok = float(self.save_interval) > 0 and not math.isnan(float(self.save_interval))
        except (TypeError, ValueError):
            ok = False
        if isinstance(self.save_interval, bool) or not ok:
            raise _bad("save_interval", self.save_interval, "give seconds > 0 (inf: by image count only)")
        for name in ("batch_size", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(name, v, "give an integer >= 1")
        if self.workers is not None and (isinstance(self.workers, bool) or int(self.workers) < 0):
            raise _bad("workers", self.workers, "give an integer >= 0")  # device and amp: runtime.resolve_*

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SweepOptions:
    """The λ/T grid and how λ is chosen (see :func:`patchcsra.sweep`): checked once, stored sorted."""

    lams: tuple[float, ...] = DEFAULT_LAMS
    temperatures: tuple[float, ...] = (math.inf,)
    fixed_lam: Optional[float] = None
    metric: Optional[str] = None
    folds: int = 5
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        from .patcher import check_lam, check_temperatures

        lams = tuple(check_lam(v, "lams") for v in self.lams)
        if not lams:
            raise PatchCSRAError("lams is empty; give at least one λ, e.g. 0,0.1,0.2", param="lams")
        object.__setattr__(self, "lams", lams)
        object.__setattr__(self, "temperatures", check_temperatures(self.temperatures, "temperatures"))
        if self.fixed_lam is not None:
            object.__setattr__(self, "fixed_lam", check_lam(self.fixed_lam, "fixed_lam"))
        for name in ("folds", "bootstrap"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) < 0:
                raise _bad(name, v, "give an integer >= 0 (0: off)")

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_GROUPS = {cls: {f.name for f in fields(cls)} for cls in (TransformOverrides, CollectOptions, SweepOptions)}


def split_options(flat: Mapping[str, Any], *, transform: Optional[TransformOverrides] = None,
                  collect: Optional[CollectOptions] = None, sweep: Optional[SweepOptions] = None,
                  allowed: Sequence[type] = (TransformOverrides, CollectOptions, SweepOptions)
                  ) -> tuple[TransformOverrides, CollectOptions, SweepOptions]:
    """Flat keywords (``img_size=448, workers=0, lams=[...]``) merged into the given dataclasses (or defaults).

    Raises:
        TypeError: a keyword no allowed dataclass has (as Python would for an unknown keyword argument).
        PatchCSRAError: a bad value (``param`` names the field).
    """
    given = {TransformOverrides: transform or TransformOverrides(), CollectOptions: collect or CollectOptions(),
             SweepOptions: sweep or SweepOptions()}
    per: dict[type, dict[str, Any]] = {cls: {} for cls in given}
    for k, v in flat.items():
        cls = next((c for c in allowed if k in _GROUPS[c]), None)
        if cls is None:
            raise TypeError(f"unexpected keyword argument {k!r}")
        per[cls][k] = v
    out = [replace(given[cls], **per[cls]) if per[cls] else given[cls] for cls in given]
    return out[0], out[1], out[2]  # type: ignore[return-value]
