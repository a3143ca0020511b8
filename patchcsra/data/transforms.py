"""Evaluation transforms resolved from the model's own pretrained config.

* :class:`TransformSpec` -- the resolved preprocessing as data (input size, resize, crop, interpolation,
  mean/std); written into every run's ``summary.json`` and part of the stats fingerprint.
* :func:`resolve_transform` -- model (+ overrides) -> :class:`TransformSpec`. Sources, in order:
  timm ``pretrained_cfg`` (as timm's ``validate.py`` resolves it, test size when the config has one),
  torchvision weights ``transforms()`` (resize/crop sizes kept exactly), a patched file's record, then
  explicit timm-style overrides (``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``). A
  model that carries no config and gets no overrides is refused with the list of missing flags.
* :meth:`TransformSpec.build` -- the PIL -> ``(C, H, W)`` float tensor transform.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional, Sequence

from torch import nn

from ..errors import PatchCSRAError

__all__ = ["TransformSpec", "LazyTransform", "resolve_transform", "model_config_source", "INTERPOLATIONS"]

_logger = logging.getLogger(__name__)

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class TransformSpec:
    """Evaluation preprocessing: resize the short side, center-crop ``input_size``, normalise.

    Attributes:
        input_size: ``(C, H, W)`` of the tensor fed to the model (C=1 converts to grayscale).
        resize_size: short-side resize before the crop; ``floor(H / crop_pct)`` when taken from ``crop_pct``.
        crop_pct: ``H / resize_size`` (timm convention; 1.0 = no crop margin).
        crop_mode: ``center`` (resize + center crop), ``squash`` (resize to ``resize`` square, crop),
            ``border`` (timm's fixed-border crop).
        interpolation: one of :data:`INTERPOLATIONS`.
        mean, std: per-channel normalisation of ``[0, 1]`` pixels.
        source: where the values came from (``timm pretrained_cfg``, ``torchvision weights ...``, ``flags``).
    """

    input_size: tuple[int, int, int]
    resize_size: int
    crop_pct: float
    crop_mode: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = "flags"

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def build(self) -> Callable:
        """PIL RGB image -> normalised float tensor ``(C, H, W)``."""
        from torchvision import transforms as T
        from torchvision.transforms import InterpolationMode

        c, h, w = self.input_size
        interp = InterpolationMode(self.interpolation)
        steps: list[Callable] = []
        if c == 1:
            steps.append(T.Grayscale(num_output_channels=1))
        if self.crop_mode == "center":
            steps += [T.Resize(self.resize_size, interpolation=interp), T.CenterCrop((h, w))]
        else:  # squash / border: timm's own implementation of its crop modes
            from timm.data import create_transform

            tt = create_transform(input_size=(c, h, w), is_training=False, interpolation=self.interpolation,
                                  crop_pct=self.crop_pct, crop_mode=self.crop_mode, mean=self.mean, std=self.std)
            return T.Compose(steps + [tt]) if steps else tt
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def lazy(self) -> "LazyTransform":
        """The same transform as :meth:`build`, built only when first called (:class:`LazyTransform`)."""
        return LazyTransform(self)


class LazyTransform:
    """:meth:`TransformSpec.build`'s transform, built at its first call (in the process that calls it: a DataLoader
    worker builds its own), so that a pass answered from the stats cache never imports torchvision (~1.4 s).
    Picklable; ``LazyTransform(spec)(img)`` equals ``spec.build()(img)``."""

    def __init__(self, spec: "TransformSpec") -> None:
        self.spec = spec
        self._fn: Optional[Callable] = None

    def __call__(self, img: Any) -> Any:
        if self._fn is None:
            self._fn = self.spec.build()
        return self._fn(img)

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "_fn": None}

    def __repr__(self) -> str:
        return f"LazyTransform({self.spec!r})"


def model_config_source(model: nn.Module) -> Optional[str]:
    """Which config :func:`resolve_transform` would read from ``model`` (None: it carries none)."""
    return _from_model(model)[1] if _from_model(model)[0] is not None else None


def resolve_transform(model: nn.Module, *, img_size: Optional[int] = None,
                      input_size: Optional[Sequence[int]] = None, crop_pct: Optional[float] = None,
                      crop_mode: Optional[str] = None, interpolation: Optional[str] = None,
                      mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> TransformSpec:
    """The evaluation transform of ``model``, with overrides.

    Args:
        model: a loaded classifier (timm, torchvision, a file); its config is read when it has one.
        img_size: evaluate at ``img_size x img_size`` (keeps the model's crop_pct).
        input_size: ``(C, H, W)``; overrides the config (and ``img_size``).
        crop_pct, crop_mode, interpolation, mean, std: timm-style overrides.

    Raises:
        PatchCSRAError: the model carries no config and ``input_size``/``mean``/``std`` are missing, or a
            value is invalid.
    """
    cfg, source = _from_model(model)
    if cfg is None:
        missing = [flag for flag, v in (("--input-size", input_size), ("--mean", mean), ("--std", std))
                   if v is None]
        if missing:
            raise PatchCSRAError(f"{type(model).__name__} carries no preprocessing config; pass "
                                 f"{', '.join(missing)} (and optionally --crop-pct, --interpolation), "
                                 "e.g. --input-size 3,32,32 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225")
        cfg = {"input_size": tuple(input_size), "crop_pct": 1.0, "crop_mode": "center",  # type: ignore[arg-type]
               "interpolation": "bilinear", "mean": tuple(mean), "std": tuple(std)}  # type: ignore[arg-type]
        source = "flags"
    spec = _spec(cfg, source)
    changed = False
    if img_size is not None and input_size is None:
        _positive(img_size, "img_size")
        spec = replace(spec, input_size=(spec.input_size[0], int(img_size), int(img_size)),
                       resize_size=math.floor(int(img_size) / spec.crop_pct))
        changed = True
    if input_size is not None:
        size = tuple(int(v) for v in input_size)
        if len(size) != 3 or min(size) < 1:
            raise PatchCSRAError(f"input_size={input_size!r}: give (C, H, W), e.g. 3,224,224")
        spec = replace(spec, input_size=size, resize_size=math.floor(min(size[1:]) / spec.crop_pct))  # type: ignore[arg-type]
        changed = True
    if crop_pct is not None:
        if not 0 < float(crop_pct) <= 2:
            raise PatchCSRAError(f"crop_pct={crop_pct!r}: give a fraction in (0, 2], e.g. 0.875")
        spec = replace(spec, crop_pct=float(crop_pct),
                       resize_size=math.floor(min(spec.input_size[1:]) / float(crop_pct)))
        changed = True
    if crop_mode is not None:
        if crop_mode not in CROP_MODES:
            raise PatchCSRAError(f"crop_mode={crop_mode!r}: choose one of {', '.join(CROP_MODES)}")
        spec = replace(spec, crop_mode=crop_mode)
        changed = True
    if interpolation is not None:
        spec = replace(spec, interpolation=_interp(interpolation))
        changed = True
    for name, v in (("mean", mean), ("std", std)):
        if v is not None:
            vals = tuple(float(x) for x in v)
            if (len(vals) not in (1, spec.input_size[0]) or not all(math.isfinite(x) for x in vals)
                    or (name == "std" and min(vals) <= 0)):
                raise PatchCSRAError(f"{name}={v!r}: give {spec.input_size[0]} finite values"
                                     + (" > 0" if name == "std" else ""))
            spec = replace(spec, **{name: vals * (spec.input_size[0] // len(vals))})
            changed = True
    if changed and spec.source != "flags":
        spec = replace(spec, source=spec.source + " + flags")
    return spec


# ----------------------------------------------------------------------------- helpers
def _positive(v: Any, name: str) -> None:
    if not isinstance(v, int) or v < 1:
        raise PatchCSRAError(f"{name}={v!r}: give a positive integer number of pixels, e.g. 448")


def _interp(name: str) -> str:
    n = str(name).lower().replace("interpolationmode.", "")
    if n == "random":
        n = "bilinear"
    if n not in INTERPOLATIONS:
        raise PatchCSRAError(f"interpolation={name!r}: choose one of {', '.join(INTERPOLATIONS)}")
    return n


def _spec(cfg: dict, source: str) -> TransformSpec:
    size = tuple(int(v) for v in cfg["input_size"])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    resize = int(cfg.get("resize_size") or math.floor(min(size[1:]) / crop_pct))
    c = size[0]
    mean = tuple(float(v) for v in cfg["mean"])
    std = tuple(float(v) for v in cfg["std"])
    if len(mean) == 1:
        mean, std = mean * c, std * c
    return TransformSpec(input_size=size, resize_size=resize, crop_pct=crop_pct,  # type: ignore[arg-type]
                         crop_mode=str(cfg.get("crop_mode") or "center"),
                         interpolation=_interp(cfg.get("interpolation") or "bilinear"),
                         mean=mean, std=std, source=source)


def _inner(model: nn.Module) -> nn.Module:
    """The original model behind a PatchedClassifier."""
    split = getattr(model, "split", None)
    inner = getattr(split, "model", None)
    return inner if isinstance(inner, nn.Module) else model


def _from_model(model: nn.Module) -> tuple[Optional[dict], str]:
    own = getattr(model, "patchcsra_source", None)
    if isinstance(own, dict) and isinstance(own.get("transform"), dict):  # e.g. a trained-head model's record
        return dict(own["transform"]), "model record"
    m = _inner(model)
    cfg = getattr(m, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("mean") and cfg.get("input_size"):
        from timm.data import resolve_data_config

        d = resolve_data_config(pretrained_cfg=cfg, use_test_size=True)
        return d, f"timm pretrained_cfg ({cfg.get('architecture', type(m).__name__)}"\
                  f"{'.' + cfg['tag'] if cfg.get('tag') else ''})"
    src = getattr(m, "patchcsra_source", None) or {}
    meta = getattr(m, "patchcsra_meta", None) or {}
    if isinstance(meta, dict) and isinstance(meta.get("transform"), dict):
        return dict(meta["transform"]), "patched file record"
    if isinstance(src, dict):
        if isinstance(src.get("transform"), dict):
            return dict(src["transform"]), "model record"
        tv = _torchvision_name(src)
        if tv is not None:
            return _torchvision_cfg(*tv)
    return None, ""


def _torchvision_name(src: dict) -> Optional[tuple[str, Optional[str]]]:
    from ..sources import parse_spec

    for key in ("spec", "arch"):
        v = src.get(key)
        scheme, name = parse_spec(v) if isinstance(v, str) else (None, "")
        if scheme == "torchvision":
            return name, src.get("weights") if key == "spec" else None
    return None


def _torchvision_cfg(name: str, weights: Optional[str]) -> tuple[Optional[dict], str]:
    import torchvision

    try:
        enum_cls = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None, ""
    key = (weights or "DEFAULT").split(".")[-1]
    w = enum_cls.DEFAULT if key == "DEFAULT" or key not in enum_cls.__members__ else enum_cls[key]
    t = w.transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0])
    cfg = {"input_size": (3, crop, crop), "resize_size": resize, "crop_pct": crop / resize, "crop_mode": "center",
           "interpolation": t.interpolation.value, "mean": tuple(t.mean), "std": tuple(t.std)}
    return cfg, f"torchvision weights {w}"
