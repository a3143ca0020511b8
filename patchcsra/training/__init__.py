"""Trainable CSRA / multi-head CSRA / attention-pooling heads, and their training.

* :mod:`~patchcsra.training.heads` -- the head modules and ``HEADS``, the ``{kind: class}`` table.
* :mod:`~patchcsra.training.attach` -- :func:`attach_head` and :class:`HeadedClassifier` (backbone + head).
* :mod:`~patchcsra.training.loop` -- :func:`train_head` (frozen cached features or fine-tuning, resumable,
  DDP-aware) and :class:`TrainConfig`; imported on first use (it needs pandas and matplotlib).
"""
from __future__ import annotations

import importlib
from typing import Any

from .attach import INIT_MODES, HeadedClassifier, attach_head, linear_from_split
from .heads import (HEAD_KINDS, HEADS, TEMPERATURE_SETS, AttentionPoolHead, CSRAHead, LinearHead,
                    class_scores)

_LOOP = ("TrainConfig", "TrainResult", "train_head", "carve_validation", "lr_factor", "masked_bce")

__all__ = ["HEADS", "HEAD_KINDS", "TEMPERATURE_SETS", "INIT_MODES", "CSRAHead", "AttentionPoolHead", "LinearHead",
           "class_scores", "HeadedClassifier", "attach_head", "linear_from_split", *_LOOP]


def __getattr__(name: str) -> Any:
    if name in _LOOP:
        return getattr(importlib.import_module(".loop", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
