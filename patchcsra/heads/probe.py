"""The probe size discovery runs on: from the model, from the caller, or a guess that says so.

:func:`resolve_input_size` returns ``((C, H, W), guessed)``. Order: the caller's ``input_size``; the
model's own config (timm ``pretrained_cfg['input_size']``, ``patchcsra_source['input_size']``, the crop
size of the torchvision weights it was built with, a patched file's record); else ``(3, 224, 224)``,
``guessed=True``, logged once as a warning naming ``--input-size``. The probe only finds and checks the
head: files written by :func:`patchcsra.save_patched` keep height and width dynamic where the model allows.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from torch import nn

__all__ = ["resolve_input_size", "GUESSED_SIZE"]

_logger = logging.getLogger(__name__)

GUESSED_SIZE = (3, 224, 224)


def _from_model(model: nn.Module) -> Optional[tuple[int, int, int]]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        c, h, w = cfg["input_size"][-3:]
        return int(c), int(h), int(w)
    src = getattr(model, "patchcsra_source", None)
    if isinstance(src, dict):
        if src.get("input_size"):
            return tuple(int(v) for v in src["input_size"])  # type: ignore[return-value]
        if src.get("weights"):
            side = _torchvision_crop(str(src["weights"]))
            if side:
                return 3, side, side
    meta = getattr(model, "patchcsra_meta", None)
    if isinstance(meta, dict) and meta.get("input_size"):
        return tuple(int(v) for v in meta["input_size"])  # type: ignore[return-value]
    return None


def _torchvision_crop(weights: str) -> Optional[int]:
    """``'ResNet50_Weights.IMAGENET1K_V2'`` -> 224 (the crop of its eval transform), None when unknown."""
    try:
        import torchvision

        crop = torchvision.models.get_weight(weights).transforms().crop_size
        return int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    except Exception:  # noqa: BLE001 - no torchvision, a name it does not know, a file path
        return None


def resolve_input_size(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> tuple[tuple[int, int, int], bool]:
    """``((C, H, W), guessed)`` of the probe for ``model``; a guess is logged once (module logger warning)."""
    if input_size:
        return tuple(int(v) for v in input_size), False  # type: ignore[return-value]
    size = _from_model(model)
    if size is not None:
        return size, False
    c, h, w = GUESSED_SIZE
    _logger.warning("probe size %dx%dx%d is a guess (the model carries no input size): pass --input-size C,H,W "
                    "(input_size=) if %s expects another; written files still accept any size the model does",
                    c, h, w, type(model).__name__)
    return GUESSED_SIZE, True
