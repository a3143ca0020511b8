"""Hugging Face ``transformers`` image classifiers as plain ``(B, 3, H, W) -> (B, C)`` modules.

``transformers`` models return an ``ImageClassifierOutput``; :class:`HFImageClassifier` wraps one so
that ``wrapper(x)`` is the logits tensor ``(B, C)``, and carries what the rest of patchcsra reads:

* ``patchcsra_source``: ``{"categories": [...], "family": config.model_type, "input_size": [3, H, W]}``
  (``categories`` only when ``id2label`` holds real names, not ``LABEL_0 ...``);
* ``pretrained_cfg``: a timm-style preprocessing record (``input_size``, ``mean``, ``std``, ``crop_pct``,
  ``crop_mode``, ``interpolation``) read from the folder's ``preprocessor_config.json`` when present, so
  :func:`patchcsra.data.transforms.resolve_transform` resolves the model's own preprocessing.

The head adapters for these wrappers live in :mod:`patchcsra.heads.hf`. ``transformers`` is imported
lazily: this module imports without it, and :func:`load_transformers` then raises a one-line
:class:`~patchcsra.errors.SourceError` naming the extra to install.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .errors import SourceError

__all__ = ["HFImageClassifier", "load_transformers", "is_transformers_folder", "preprocessing_cfg"]

_logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
_INSTALL = "pip install patchcsra[hf]"
_HUB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LABEL_RE = re.compile(r"^LABEL_\d+$")
#: PIL resample codes (``preprocessor_config.json`` ``resample``) -> interpolation names.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
#: model types whose ``*ForImageClassification`` does not classify an image tensor.
NOT_IMAGE_MODELS = {
    "imagegpt": "classifies colour-cluster token ids (input_ids from ImageGPTImageProcessor), not pixel_values",
    "shieldgemma2": "is a vision-language policy model that needs a text prompt (input_ids) with the image",
}


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise SourceError(f"transformers models need the transformers library ({e}); "
                          f"install it with `{_INSTALL}`") from None
    return transformers


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def is_transformers_folder(path: Any) -> bool:
    """True for a folder written by ``save_pretrained`` of a ``transformers`` image classifier.

    Its ``config.json`` names a ``*ForImageClassification*`` class in ``architectures``; without
    ``architectures``, its ``model_type`` must be in ``transformers``' image-classification mapping.
    A timm ``save_for_hf`` folder (``"architecture"``, singular, no ``model_type``) is not one.
    """
    try:
        p = Path(os.fspath(path))
    except TypeError:
        return False
    if not p.is_dir():
        return False
    cfg = _read_json(p / CONFIG_FILE)
    if cfg is None:
        return False
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs:
        return any(isinstance(a, str) and "ForImageClassification" in a for a in archs)
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or not mt:
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    except ImportError:
        return False
    return mt in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES


def _size_hw(v: Any) -> Optional[tuple[int, int]]:
    """``size``/``crop_size`` of a preprocessor config -> ``(H, W)`` (a square for ``shortest_edge``)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return int(v), int(v)
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return int(v[0]), int(v[1])
    if isinstance(v, dict):
        if v.get("height") and v.get("width"):
            return int(v["height"]), int(v["width"])
        if v.get("shortest_edge"):
            s = int(v["shortest_edge"])
            return s, s
    return None


def preprocessing_cfg(pre: dict, channels: int = 3) -> Optional[dict]:
    """A ``preprocessor_config.json`` dict -> timm-style ``pretrained_cfg`` (None if it has no mean/std).

    ``input_size`` is the crop (``do_center_crop``) else the resize size; ``crop_pct`` is the processor's
    own, else crop / resize; ``crop_mode`` is ``'squash'`` when the processor resizes to a fixed
    ``(height, width)`` without a crop (ViT style), else ``'center'``.
    """
    mean, std = pre.get("image_mean"), pre.get("image_std")
    if not isinstance(mean, (list, tuple)) or not isinstance(std, (list, tuple)) or not mean or not std:
        return None
    size = _size_hw(pre.get("size"))
    crop = _size_hw(pre.get("crop_size")) if pre.get("do_center_crop", pre.get("crop_size") is not None) else None
    hw = crop or size or (224, 224)
    fixed = isinstance(pre.get("size"), dict) and "height" in pre["size"]
    if pre.get("crop_pct"):
        crop_pct, mode = float(pre["crop_pct"]), "center"
    elif crop and size:
        crop_pct, mode = min(crop) / max(1, min(size)), "center"
    else:
        crop_pct, mode = 1.0, ("squash" if fixed else "center")
    interp = _RESAMPLE.get(pre.get("resample"), "bilinear") if not isinstance(pre.get("resample"), str) \
        else str(pre["resample"]).lower()
    return {"input_size": (int(channels), int(hw[0]), int(hw[1])), "mean": tuple(float(v) for v in mean),
            "std": tuple(float(v) for v in std), "crop_pct": crop_pct, "crop_mode": mode,
            "interpolation": interp}


def _config_size(config: Any) -> Optional[tuple[int, int]]:
    for obj in (config, getattr(config, "vision_config", None)):
        v = getattr(obj, "image_size", None) if obj is not None else None
        if isinstance(v, (list, tuple)) and len(v) >= 2:
            return int(v[-2]), int(v[-1])
        if isinstance(v, int) and v > 0:
            return v, v
    return None


def _categories(config: Any, n: int) -> Optional[list[str]]:
    id2label = getattr(config, "id2label", None) or {}
    try:
        names = [str(id2label[i]) for i in range(n)]
    except (KeyError, TypeError):
        return None
    return None if not names or all(_LABEL_RE.match(s) for s in names) else names


class HFImageClassifier(nn.Module):
    """A ``transformers`` image classifier as ``forward(x: (B, 3, H, W)) -> logits (B, C)``.

    Attributes:
        hf: the ``*ForImageClassification`` model (eval mode).
        family: ``config.model_type`` (``'vit'``, ``'convnext'``, ...).
        patchcsra_source: ``categories`` (real ``id2label`` names only), ``family``, ``input_size``.
        pretrained_cfg: timm-style preprocessing from ``preprocessor_config.json`` (absent without one).
    """

    def __init__(self, hf: nn.Module, preprocessor: Optional[dict] = None) -> None:
        super().__init__()
        config = hf.config
        self.family = str(getattr(config, "model_type", "") or type(hf).__name__)
        if self.family in NOT_IMAGE_MODELS:
            raise SourceError(f"{type(hf).__name__} {NOT_IMAGE_MODELS[self.family]}; patchcsra needs a classifier "
                              "of image tensors (B, 3, H, W)")
        self.hf = hf.eval()
        self._input_key = self._find_input_key(hf)
        channels = int(getattr(config, "num_channels", 3) or 3)
        cfg = preprocessing_cfg(preprocessor, channels) if preprocessor else None
        hw = _config_size(config) or (cfg["input_size"][1:] if cfg else None) or (224, 224)
        if cfg is not None:
            # positional embeddings are fixed to config.image_size: evaluate at that size
            cfg["input_size"] = (channels, int(hw[0]), int(hw[1]))
            cfg["architecture"] = f"transformers:{type(hf).__name__}"
            self.pretrained_cfg = cfg
        n = int(getattr(config, "num_labels", 0) or 0)
        src: dict = {"family": self.family, "input_size": [channels, int(hw[0]), int(hw[1])]}
        cats = _categories(config, n)
        if cats:
            src["categories"] = cats
        self.patchcsra_source = src
        self.eval()

    @staticmethod
    def _find_input_key(hf: nn.Module) -> str:
        import inspect

        params = inspect.signature(hf.forward).parameters
        for key in ("pixel_values", "inputs"):  # Perceiver names its image input ``inputs``
            if key in params:
                return key
        raise SourceError(f"{type(hf).__name__}.forward takes no pixel_values; patchcsra needs a classifier of "
                          "image tensors (B, 3, H, W)")

    def hf_inputs(self, x: Tensor) -> dict:
        """Images ``(B, C, H, W)`` -> the keyword arguments of ``self.hf`` (Siglip2: patches + shapes)."""
        if self.family == "siglip2":
            p = int(self.hf.config.vision_config.patch_size)
            b, c, h, w = x.shape
            gh, gw = h // p, w // p
            patches = (x[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p)
                       .permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c))
            shapes = torch.tensor([[gh, gw]] * b, dtype=torch.long, device=x.device)
            mask = torch.ones(b, gh * gw, dtype=torch.long, device=x.device)
            return {"pixel_values": patches, "spatial_shapes": shapes, "pixel_attention_mask": mask}
        return {self._input_key: x}

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> logits ``(B, num_labels)``."""
        out = self.hf(**self.hf_inputs(x), return_dict=True)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out[0]  # PP-LCNet returns its logits as last_hidden_state

    def extra_repr(self) -> str:
        return f"family={self.family!r}"


def _model_class(tf: Any, config: Any):
    """The ``*ForImageClassification*`` class a config names, else the auto class's choice."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(tf, arch, None) if isinstance(arch, str) and "ForImageClassification" in arch else None
        if cls is not None:
            return cls
    return None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:200]}" if s else type(e).__name__


def load_transformers(spec: str, *, pretrained: bool = True, num_classes: Optional[int] = None) -> nn.Module:
    """A ``transformers`` image classifier from a hub name or a ``save_pretrained`` folder.

    Args:
        spec: ``ORG/NAME`` on the Hugging Face hub, or a local folder (``config.json`` + safetensors
            weights, optionally ``preprocessor_config.json``).
        pretrained: load the weights; ``False`` builds the model from its config with random init.
        num_classes: another number of classes: the head is re-initialised (weights of other layers kept).

    Returns:
        :class:`HFImageClassifier` in eval mode: ``(B, 3, H, W) -> (B, C)``.

    Raises:
        SourceError: transformers is missing, the folder/name cannot be read or fetched, or the model
            does not classify image tensors.
    """
    s = os.fspath(spec)
    if s.startswith("hf:"):
        s = s[3:]
    p = Path(s).expanduser()
    local = p.is_dir()
    if not local:
        if p.exists():
            raise SourceError(f"{s}: a transformers model is a folder written by save_pretrained (config.json + "
                              "weights), not a file")
        if not _HUB_RE.match(s) or s.startswith((".", "/", "~")):
            raise SourceError(f"{s}: no such folder; give a folder written by save_pretrained or a hub name ORG/NAME")
    tf = _transformers()
    where = f"{s}" if local else f"hf:{s}"
    try:
        config = tf.AutoConfig.from_pretrained(s)
    except Exception as e:  # noqa: BLE001 - hub/network/json errors all become one line
        if local:
            raise SourceError(f"{where}: cannot read {CONFIG_FILE} ({_first_line(e)}); give a folder written by "
                              "save_pretrained") from None
        raise SourceError(f"{where}: could not be fetched from the Hugging Face hub ({_first_line(e)}); check the name "
                          "and the network, or download it and pass the folder") from None
    if getattr(config, "model_type", None) in NOT_IMAGE_MODELS:
        raise SourceError(f"{where}: {config.model_type} {NOT_IMAGE_MODELS[config.model_type]}; patchcsra needs a "
                          "classifier of image tensors (B, 3, H, W)")
    cls = _model_class(tf, config) or tf.AutoModelForImageClassification
    kwargs: dict = {}
    if num_classes is not None and int(num_classes) != int(getattr(config, "num_labels", 0) or 0):
        config.num_labels = int(num_classes)  # resets id2label to LABEL_i
        kwargs["ignore_mismatched_sizes"] = True
    try:
        if pretrained:
            hf = cls.from_pretrained(s, config=config, **kwargs)
        else:
            hf = cls.from_config(config) if cls is tf.AutoModelForImageClassification else cls._from_config(config)
    except Exception as e:  # noqa: BLE001
        what = "load the weights of" if pretrained else "build"
        raise SourceError(f"{where}: cannot {what} {cls.__name__} ({_first_line(e)}); "
                          + ("pass pretrained=False to build it from its config" if pretrained
                             else "check the config") ) from None
    pre = _read_json(p / PREPROCESSOR_FILE) if local else _hub_preprocessor(tf, s)
    model = HFImageClassifier(hf, pre)
    _logger.info("loaded %s as %s (%s)", where, type(hf).__name__, model.family)
    return model


def _hub_preprocessor(tf: Any, name: str) -> Optional[dict]:
    try:
        path = tf.utils.cached_file(name, PREPROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - preprocessing is optional
        return None
    return _read_json(Path(path)) if path else None
