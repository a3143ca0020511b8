"""Attention maps: what the residual attention looks at (the paper's Fig. 3/6).

For an image and a few classes ``k`` (its top predictions, or classes you name):

* the per-location class score map ``s_k`` -- the model's **own** head applied to each location
  alone (:meth:`patchcsra.heads.HeadSplit.forward_locations`), on the feature grid ``(h, w)``;
* the attention ``softmax_k(T * s_k)`` over the locations (``T = inf``: a one-hot at the argmax,
  the location ``max_k s_k`` reads);
* the patched logit ``y_base + lam * y_att(T)`` and its probability.

    >>> import timm, patchcsra
    >>> from patchcsra.data import resolve_transform, model_label_names
    >>> model = timm.create_model("resnet50", pretrained=True)
    >>> patched = patchcsra.patch(model, lam=0.2)
    >>> spec = resolve_transform(model)
    >>> res = explain(patched, ["cat.jpg"], transform_spec=spec, top_k=3, temperature=1.0)
    >>> res[0].attention.shape                      # (3, 7, 7), each map sums to 1
    >>> render(res[0], "cat_maps.png")               # input | score overlay | attention overlay per class
    >>> explain_to_dir(patched, ["cat.jpg"], "maps/", transform_spec=spec)  # PNG + .npy + .json per image

Files are written atomically (a temporary sibling, then ``os.replace``) and never overwrite an
existing file unless ``force=True``.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .data.base import DEFAULT_MAX_PIXELS, UnreadableImage, check_max_pixels, read_image, to_rgb
from .data.classes import normalize_class_name
from .data.transforms import TransformSpec
from .errors import PatchCSRAError
from .heads.base import HeadInfo
from .patcher import PatchedClassifier, attention_weights, check_temperature, residual_attention, temperature_json, temperature_text

__all__ = ["ExplainResult", "location_grid", "explain", "render", "save_maps", "explain_to_dir",
           "PROB_KINDS"]

_logger = logging.getLogger(__name__)

ImageLike = Union[str, Path, Image.Image]
PathLike = Union[str, "os.PathLike[str]"]
PROB_KINDS = ("auto", "softmax", "sigmoid")
_BATCH = 16


@dataclass
class ExplainResult:
    """Attention maps of one image.

    Attributes:
        image_id: the file stem (``image<i>`` for an in-memory image without a file name).
        image: ``(H, W, 3)`` uint8 -- the model's input crop (resolved transform, de-normalised).
        classes: ``K`` output indices shown, best first when chosen by ``top_k``.
        names: ``K`` class names (``'class <i>'`` where the model carries none).
        probs: ``K`` probabilities of the patched logits (``prob_kind``: softmax over all outputs or sigmoid).
        logits: ``K`` patched logits ``y_base + lam * y_att(T)`` at this ``lam`` and ``temperature``.
        scores: ``(K, h, w)`` per-location class scores ``s_k`` on the feature grid.
        attention: ``(K, h, w)`` ``softmax_k(T * s_k)`` (sums to 1 per class); one-hot at the argmax for ``T = inf``.
        base_logits: ``K`` logits of the unpatched model.
        lam, temperature: the λ and T the logits and the attention use.
        prob_kind: ``'softmax'`` or ``'sigmoid'``.
    """

    image_id: str
    image: np.ndarray
    classes: list[int]
    names: list[str]
    probs: list[float]
    logits: list[float]
    scores: np.ndarray
    attention: np.ndarray
    base_logits: list[float] = field(default_factory=list)
    lam: float = 0.0
    temperature: float = 1.0
    prob_kind: str = "softmax"

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)`` of the feature grid."""
        return int(self.scores.shape[1]), int(self.scores.shape[2])

    def record(self) -> dict[str, Any]:
        """JSON-ready facts (everything but the arrays); ``temperature`` ``inf`` is written ``"inf"``."""
        return {"image_id": self.image_id, "classes": list(self.classes), "names": list(self.names),
                "logits": list(self.logits), "probs": list(self.probs), "base_logits": list(self.base_logits),
                "prob_kind": self.prob_kind, "lam": self.lam,
                "temperature": temperature_json(self.temperature),
                "grid": list(self.grid), "image_size": [int(self.image.shape[0]), int(self.image.shape[1])]}


# ----------------------------------------------------------------------------- feature grid
def _unwrap_model(model: Any) -> Any:
    """The user's model behind a PatchedClassifier / HeadSplit (or ``model`` itself)."""
    for _ in range(3):
        inner = getattr(getattr(model, "split", None), "model", None)
        if inner is None:
            inner = getattr(model, "model", None) if hasattr(model, "forward_locations") else None
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def _pair(v: Any) -> Optional[tuple[int, int]]:
    try:
        t = tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v, v)))
    except (TypeError, ValueError):
        return None
    return (t[0], t[1]) if len(t) == 2 and min(t) > 0 else None


def _model_grids(model: Any, hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Grid candidates read from a token model: timm ``patch_embed``, torchvision ``patch_size``."""
    model = _unwrap_model(model)
    out: list[tuple[int, int]] = []
    pe = getattr(model, "patch_embed", None)
    fn = getattr(pe, "dynamic_feat_size", None)
    if callable(fn):
        try:
            out.append(_pair(fn(hw)))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - an unusual patch embed: try the next source
            pass
    out.append(_pair(getattr(pe, "grid_size", None)))
    patch = _pair(getattr(model, "patch_size", None)) or _pair(getattr(pe, "patch_size", None))
    if patch is not None:
        out.append((hw[0] // patch[0], hw[1] // patch[1]))
    return [g for g in out if g is not None]


def _scaled_grids(info: HeadInfo, hw: tuple[int, int]) -> list[tuple[int, int]]:
    """``info.grid`` (at the probe size) scaled to ``hw`` with the stride it implies."""
    if not info.grid:
        return []
    (gh, gw), (ph, pw) = info.grid, info.probe_input_size[1:]
    sh, sw = ph / gh, pw / gw
    return [(f(hw[0] / sh), f(hw[1] / sw)) for f in (math.ceil, round, math.floor)]


def _aspect_grid(n: int, hw: tuple[int, int]) -> Optional[tuple[int, int]]:
    """The factor pair ``h * w == n`` whose strides ``H/h``, ``W/w`` agree within 25% (unique best)."""
    pairs = [(h, n // h) for h in range(1, n + 1) if n % h == 0]
    ok = [(abs(math.log((hw[0] / h) / (hw[1] / w))), (h, w)) for h, w in pairs]
    ok = sorted(t for t in ok if t[0] <= math.log(1.25))
    if not ok or (len(ok) > 1 and math.isclose(ok[0][0], ok[1][0])):
        return None
    return ok[0][1]


def location_grid(split_info: HeadInfo, num_locations: int, input_size: Sequence[int], model: Any = None,
                  *, features: Optional[Tensor] = None) -> tuple[int, int]:
    """The feature grid ``(h, w)`` with ``h * w == num_locations`` for an input of ``input_size``.

    Sources, first match wins: NCHW/NHWC ``features``' own shape ``(B, D, h, w)`` / ``(B, h, w, D)``
    (pass it when you have it); a token model's patch grid (timm ``patch_embed.dynamic_feat_size`` /
    ``grid_size``, torchvision ``patch_size``); ``split_info.grid`` scaled from the probe size to
    ``input_size``; the factor pair of ``num_locations`` with equal strides along both sides
    (``sqrt(L)`` for square inputs).

    Args:
        split_info: the :class:`HeadInfo` of the patched model (layout, probe grid).
        num_locations: ``L``, locations per image (prefix tokens excluded).
        input_size: ``(C, H, W)`` or ``(H, W)`` of the model input.
        model: optional model (plain, patched or a HeadSplit) to read a token grid from.
        features: optional feature tensor in ``split_info.layout``.

    Raises:
        PatchCSRAError: no source gives ``h * w == num_locations``.
    """
    n = int(num_locations)
    hw = (int(input_size[-2]), int(input_size[-1]))
    if n < 1:
        raise PatchCSRAError(f"num_locations={num_locations!r}: give the number of locations L >= 1")
    cands: list[tuple[int, int]] = []
    if features is not None and features.ndim == 4 and split_info.layout in ("NCHW", "NHWC"):
        shape = tuple(features.shape)
        cands.append((shape[2], shape[3]) if split_info.layout == "NCHW" else (shape[1], shape[2]))
    if model is not None:
        cands += _model_grids(model, hw)
    cands += _scaled_grids(split_info, hw)
    aspect = _aspect_grid(n, hw)
    if aspect is not None:
        cands.append(aspect)
    for h, w in cands:
        if h * w == n:
            return int(h), int(w)
    raise PatchCSRAError(
        f"num_locations={n}: cannot tell the {split_info.layout} feature grid for a {hw[0]}x{hw[1]} input; "
        "pass features= (the feature tensor) or model= (a model with patch_embed / patch_size)")


# ----------------------------------------------------------------------------- inputs
def _image_id(img: ImageLike, i: int) -> str:
    if isinstance(img, (str, os.PathLike)):
        return Path(img).stem
    name = getattr(img, "filename", "") or ""
    return Path(name).stem if name else f"image{i}"


def _image_ids(images: Sequence[ImageLike]) -> list[str]:
    """File stems, made unique within the call (``stem``, ``stem_2``, ...)."""
    seen: dict[str, int] = {}
    out = []
    for i, img in enumerate(images):
        base = _image_id(img, i)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return out


def _open_image(img: ImageLike, i: int, max_pixels: Optional[int]) -> Image.Image:
    if isinstance(img, Image.Image):
        return to_rgb(img)
    if not isinstance(img, (str, os.PathLike)):
        raise PatchCSRAError(f"images[{i}] is a {type(img).__name__}; give a file path or a PIL.Image.Image")
    p = Path(img)
    if not p.is_file():
        raise PatchCSRAError(f"images[{i}]={str(p)!r} does not exist; give an existing image file")
    try:
        return read_image(p, max_pixels)
    except UnreadableImage as e:
        raise PatchCSRAError(f"images[{i}] cannot be read as an image ({e}); give a JPEG/PNG file") from None


def _denormalize(x: Tensor, spec: TransformSpec) -> np.ndarray:
    """Normalised ``(C, H, W)`` tensor -> ``(H, W, 3)`` uint8 picture of the model input."""
    c = x.shape[0]
    mean = torch.tensor(spec.mean[:c], dtype=x.dtype).view(c, 1, 1)
    std = torch.tensor(spec.std[:c], dtype=x.dtype).view(c, 1, 1)
    img = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.repeat(img, 3, axis=2) if c == 1 else np.ascontiguousarray(img[..., :3])


def _resolve_names(patched: nn.Module, num_classes: int,
                   class_names: Optional[Union[Sequence[str], PathLike]]) -> Optional[list[str]]:
    """One name per output: ``class_names`` (a list, or a file: one name per line / a JSON list), else the
    model's own (:func:`patchcsra.data.model_label_names`), else ``None``."""
    if class_names is not None:
        from .data.classes import load_class_names

        is_file = isinstance(class_names, (str, os.PathLike))
        names = load_class_names(class_names)
        if len(names) != num_classes:
            what = f"--class-names {os.fspath(class_names)}" if is_file else "class_names"  # type: ignore[arg-type]
            raise PatchCSRAError(f"{what} has {len(names)} names but the model has {num_classes} outputs; "
                                 "give one name per output (line i names output i)")
        return names
    from .data.classes import model_label_names

    names = model_label_names(patched)
    return names if names is not None and len(names) == num_classes else None


def _class_index(c: Union[int, str], names: Optional[list[str]], num_classes: int) -> int:
    if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
        if not 0 <= int(c) < num_classes:
            raise PatchCSRAError(f"classes: index {int(c)} is out of range; give 0..{num_classes - 1} or a name")
        return int(c)
    if not isinstance(c, str):
        raise PatchCSRAError(f"classes: {c!r} is a {type(c).__name__}; give output indices or class names")
    if names is None:
        if c.strip().isdigit():
            return _class_index(int(c), names, num_classes)
        raise PatchCSRAError(f"classes (--classes): {c!r} is a name but the model carries no class names; pass "
                             "class_names=[...] (CLI --class-names FILE) or output indices")
    norm = [normalize_class_name(n) for n in names]
    key = normalize_class_name(c)
    hits = [k for k, n in enumerate(norm) if n == key] or \
        [k for k, n in enumerate(names) if "," in n and normalize_class_name(n.split(",")[0]) == key]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise PatchCSRAError(f"classes (--classes): {c!r} names several outputs ({', '.join(map(str, hits[:5]))}); "
                             "give the output index")
    if key.isdigit():
        return _class_index(int(key), names, num_classes)
    close = difflib.get_close_matches(key, norm, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(repr(names[norm.index(m)]) for m in close)}" if close \
        else "no close match; check class_names / --class-names"
    raise PatchCSRAError(f"classes (--classes): unknown class name {c!r} ({hint})")


def _prob_kind(kind: str, num_classes: int) -> str:
    if kind not in PROB_KINDS:
        raise PatchCSRAError(f"prob={kind!r}: choose one of {', '.join(PROB_KINDS)}")
    if kind == "auto":
        return "softmax" if num_classes >= 100 else "sigmoid"
    return kind


def _model_device_dtype(patched: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in patched.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    buf = getattr(patched, "_lam", None)
    return (buf.device if isinstance(buf, Tensor) else torch.device("cpu")), torch.float32


# ----------------------------------------------------------------------------- explain
def explain(patched: PatchedClassifier, images: Sequence[ImageLike], *, transform_spec: TransformSpec,
            classes: Optional[Sequence[Union[int, str]]] = None, top_k: int = 3, temperature: Optional[float] = 1.0,
            class_names: Optional[Union[Sequence[str], PathLike]] = None, prob: str = "auto",
            max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> list[ExplainResult]:
    """Per-location class scores and attention maps of ``images``.

    Args:
        patched: a :class:`PatchedClassifier` (its ``lam`` is used for the logits).
        images: file paths or PIL images; each goes through ``transform_spec`` (the model's input crop).
        transform_spec: the evaluation transform (:func:`patchcsra.data.resolve_transform`).
        classes: output indices or class names to show (same for every image); ``None``: each image's
            ``top_k`` classes by patched logit.
        top_k: how many classes when ``classes`` is None.
        temperature: T of the attention and of the logits (``inf``: max over locations, a one-hot map);
            ``None`` takes ``patched.temperature``. The logits equal ``patched(x)`` when T equals it.
        class_names: one name per output, a list or a file (one name per line, line i naming output i, as
            timm's class-map and label files such as ``imagenet_labels.txt``; or a JSON list). Default: what
            the model carries (:func:`patchcsra.data.model_label_names`). Needed to give ``classes`` by name; a
            name matches exactly after normalisation, or a label line's first comma-separated lemma.
        prob: ``'softmax'`` over all outputs, ``'sigmoid'`` per output, or ``'auto'`` (softmax for
            >= 100 outputs, e.g. ImageNet; sigmoid for multi-label-sized heads such as VOC/COCO).
        max_pixels: image files with more pixels are refused before decoding (``0``/``None``: no limit).

    Returns:
        One :class:`ExplainResult` per image, in order; maps are ``(K, h, w)``.

    Raises:
        PatchCSRAError: a bad image, class, name, ``top_k`` or ``temperature`` (one line naming it).
    """
    if not isinstance(patched, PatchedClassifier):
        raise PatchCSRAError(f"patched is a {type(patched).__name__}; give patchcsra.patch(model, lam=...)")
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    if len(images) == 0:
        raise PatchCSRAError("images is empty; give at least one image path or PIL image")
    t = patched.temperature if temperature is None else check_temperature(temperature)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise PatchCSRAError(f"top_k={top_k!r}: give a positive integer, e.g. 3")
    info = patched.info
    num_classes = int(info.num_classes)
    names = _resolve_names(patched, num_classes, class_names)
    chosen = None
    if classes is not None:
        if isinstance(classes, (str, int)):
            classes = [classes]
        chosen = list(dict.fromkeys(_class_index(c, names, num_classes) for c in classes))
        if not chosen:
            raise PatchCSRAError("classes is empty; give output indices or names, or None for the top_k")
    kind = _prob_kind(prob, num_classes)
    limit = check_max_pixels(max_pixels)
    tf = transform_spec.build()
    ids = _image_ids(images)
    device, dtype = _model_device_dtype(patched)
    inner = _unwrap_model(patched)
    results: list[ExplainResult] = []
    for start in range(0, len(images), _BATCH):
        xs = [tf(_open_image(img, start + j, limit)) for j, img in enumerate(images[start:start + _BATCH])]
        x = torch.stack(xs)
        with torch.no_grad():
            out = _forward(patched, x.to(device=device, dtype=dtype), t)
        hgrid, wgrid = location_grid(info, out["scores"].shape[-1], tuple(x.shape[1:]), inner,
                                     features=out["features"])
        for j in range(x.shape[0]):
            results.append(_result(ids[start + j], _denormalize(xs[j], transform_spec), out, j, chosen, top_k,
                                   names, kind, (hgrid, wgrid), patched.lam, t))
    return results


def _forward(patched: PatchedClassifier, x: Tensor, temperature: float) -> dict[str, Tensor]:
    """Features, base logits ``(B, C)``, scores ``(B, C, L)`` and patched logits at ``temperature``."""
    f, base, s = patched.forward_pass(x)
    base, s = base.float(), s.float()
    logits = base + patched.lam * residual_attention(s, temperature)
    return {"features": f, "base": base, "scores": s, "logits": logits}


def _result(image_id: str, image: np.ndarray, out: dict[str, Tensor], j: int, chosen: Optional[list[int]],
            top_k: int, names: Optional[list[str]], kind: str, grid: tuple[int, int], lam: float,
            temperature: float) -> ExplainResult:
    logits = out["logits"][j]
    idx = chosen if chosen is not None else \
        torch.argsort(logits, descending=True, stable=True)[: min(int(top_k), logits.numel())].tolist()
    probs = torch.softmax(logits, dim=0) if kind == "softmax" else torch.sigmoid(logits)
    s = out["scores"][j][idx]                                     # (K, L)
    att = attention_weights(s, temperature)
    sel = torch.tensor(idx, dtype=torch.long)
    return ExplainResult(
        image_id=image_id, image=image, classes=[int(i) for i in idx],
        names=[names[i] if names else f"class {i}" for i in idx],
        probs=probs[sel].tolist(), logits=logits[sel].tolist(),
        scores=s.reshape(len(idx), *grid).cpu().numpy().astype(np.float32),
        attention=att.reshape(len(idx), *grid).cpu().numpy().astype(np.float32),
        base_logits=out["base"][j][sel].tolist(), lam=float(lam), temperature=float(temperature), prob_kind=kind)


# ----------------------------------------------------------------------------- files
def _check_free(paths: Sequence[Path], force: bool) -> None:
    for p in paths:
        if p.is_dir():
            raise PatchCSRAError(f"{p} is a directory; give a file name")
        if p.exists() and not force:
            raise PatchCSRAError(f"{p} exists; pass force=True (CLI --force) to overwrite it")
        if not p.parent.is_dir():
            raise PatchCSRAError(f"{p}: folder {p.parent} does not exist; create it first")


def _atomic_write(path: Path, write: Callable[[Any], None], *, force: bool, binary: bool = True) -> Path:
    """``write(fh)`` into a temporary sibling of ``path``, then rename it onto ``path``."""
    from ._io import atomic_path

    with atomic_path(path, force=force) as tmp, open(tmp, "wb" if binary else "w") as fh:
        write(fh)
    _logger.info("wrote %s", path)
    return path


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(K, h, w)`` -> ``(K, H, W)`` bilinear (half-pixel centres: each cell covers its image region)."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()


def _title(result: ExplainResult, k: int) -> str:
    return f"{result.names[k]} (logit {result.logits[k]:.2f}, p {result.probs[k]:.3g})"


def _figure(result: ExplainResult, alpha: float, cmap: str):
    """``K`` rows: input image | score overlay | attention overlay (matplotlib Figure API, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k_count = len(result.classes)
    hw = result.image.shape[:2]
    scores, att = _upsample(result.scores, hw), _upsample(result.attention, hw)
    fig = Figure(figsize=(3 * 3.2, k_count * 3.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(k_count, 3, squeeze=False)
    t = temperature_text(result.temperature)
    for k in range(k_count):
        ax0, ax1, ax2 = axes[k]
        ax0.imshow(result.image)
        ax0.set_title(result.image_id if k == 0 else "", fontsize=9)
        for ax, maps, label in ((ax1, scores, "score $s_k$"), (ax2, att, f"attention T={t}")):
            ax.imshow(result.image)
            im = ax.imshow(maps[k], cmap=cmap, alpha=alpha)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(f"{_title(result, k)}\n{label}", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(f"λ={result.lam:g}, {result.prob_kind} probabilities", fontsize=9)
    return fig


def render(result: ExplainResult, path: PathLike, *, force: bool = False, alpha: float = 0.5,
           cmap: str = "jet") -> Path:
    """Write one PNG of ``result``: per class a row ``input | score map overlay | attention overlay``.

    Panels are titled ``"name (logit, prob)"``; maps are upsampled bilinearly to the input crop.

    Raises:
        PatchCSRAError: ``path`` exists without ``force``, its folder is missing, or ``alpha`` is not in [0, 1].
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PatchCSRAError(f"path={str(path)!r}: give a .png file name")
    if not 0.0 <= float(alpha) <= 1.0:
        raise PatchCSRAError(f"alpha={alpha!r}: give an opacity in [0, 1], e.g. 0.5")
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise PatchCSRAError(f"cmap={cmap!r}: give a matplotlib colormap name, e.g. jet or viridis")
    _check_free([path], force)
    fig = _figure(result, float(alpha), cmap)
    return _atomic_write(path, lambda fh: fig.savefig(fh, format="png"), force=force)


def _maps_paths(result: ExplainResult, path: Path) -> list[Path]:
    if path.suffix.lower() == ".npz":
        return [path]
    return [path / f"{result.image_id}_scores.npy", path / f"{result.image_id}_attention.npy",
            path / f"{result.image_id}_classes.json"]


def save_maps(result: ExplainResult, path_npz_or_dir: PathLike, *, force: bool = False) -> Path:
    """Save the raw maps of ``result``.

    A directory gets ``<id>_scores.npy`` ``(K, h, w)``, ``<id>_attention.npy`` ``(K, h, w)`` and
    ``<id>_classes.json`` (:meth:`ExplainResult.record`); a ``.npz`` path gets one archive with
    ``scores``, ``attention``, ``classes``, ``logits``, ``probs`` and ``record`` (JSON text).

    Returns:
        The directory or the ``.npz`` file.

    Raises:
        PatchCSRAError: a target exists without ``force`` (nothing is written then), or the folder is missing.
    """
    path = Path(path_npz_or_dir)
    targets = _maps_paths(result, path)
    _check_free(targets, force)
    rec = result.record()
    if path.suffix.lower() == ".npz":
        arrays = dict(scores=result.scores, attention=result.attention, classes=np.asarray(result.classes),
                      logits=np.asarray(result.logits, dtype=np.float32),
                      probs=np.asarray(result.probs, dtype=np.float32), record=np.asarray(json.dumps(rec)))
        return _atomic_write(path, lambda fh: np.savez(fh, **arrays), force=force)
    _atomic_write(targets[0], lambda fh: np.save(fh, result.scores), force=force)
    _atomic_write(targets[1], lambda fh: np.save(fh, result.attention), force=force)
    _atomic_write(targets[2], lambda fh: json.dump(rec, fh, indent=1), force=force, binary=False)
    return path


def explain_to_dir(patched: PatchedClassifier, images: Sequence[ImageLike], out_dir: PathLike, *,
                   transform_spec: TransformSpec, classes: Optional[Sequence[Union[int, str]]] = None,
                   top_k: int = 3, temperature: Optional[float] = 1.0,
                   class_names: Optional[Union[Sequence[str], PathLike]] = None,
                   force: bool = False, prob: str = "auto", max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
                   ) -> list[Path]:
    """:func:`explain`, :func:`render` and :func:`save_maps` for every image, into ``out_dir``.

    ``out_dir`` is created; per image it gets ``<id>.png``, ``<id>_scores.npy``, ``<id>_attention.npy``
    and ``<id>_classes.json``. Every target is checked before the model runs: an existing file
    without ``force`` raises and nothing is written.

    Returns:
        The files written, four per image, in image order (PNG first).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PatchCSRAError(f"out_dir={str(out)!r} is a file; give a folder")
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    ids = _image_ids(images)
    if not force:
        for image_id in ids:
            for p in [out / f"{image_id}.png"] + [out / f"{image_id}{s}" for s in
                                                  ("_scores.npy", "_attention.npy", "_classes.json")]:
                if p.exists():
                    raise PatchCSRAError(f"{p} exists; pass force=True (CLI --force) to overwrite it")
    results = explain(patched, images, transform_spec=transform_spec, classes=classes, top_k=top_k,
                      temperature=temperature, class_names=class_names, prob=prob, max_pixels=max_pixels)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for res in results:
        written.append(render(res, out / f"{res.image_id}.png", force=force))
        save_maps(res, out, force=force)
        written += _maps_paths(res, out)
    return written
