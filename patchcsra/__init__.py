"""patchcsra: training-free residual attention (CSRA) for any pretrained image classifier.

    >>> import patchcsra
    >>> model = patchcsra.load("timm:resnet50")          # or torchvision:NAME, or a file
    >>> patched = patchcsra.patch(model, lam=0.2)        # model(x) + 0.2 * max_k head(x_k)
    >>> patchcsra.describe(model)                        # what head was found
    >>> run = patchcsra.sweep_lambda(model, "VOCdevkit")  # one pass, λ/T grid, Table-1 record

The root holds the public API only. Names resolve on first use (PEP 562), so ``import patchcsra`` and
``patchcsra --help`` do not import torch; everything else lives in its module (``patchcsra.heads``,
``patchcsra.data``, ``patchcsra.metrics``, ``patchcsra.report`` ...).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the module that defines it
_API = {
    "load": "sources", "patch": "patcher", "describe": "patcher", "residual_attention": "patcher",
    "save_patched": "export", "prepare": "api", "sweep_lambda": "api", "collect": "stats", "sweep": "grid",
    "train_head": "training.loop", "TrainConfig": "training.loop", "attach_head": "training.attach",
    "CSRAHead": "training.heads", "AttentionPoolHead": "training.heads",
    "PatchCSRAError": "errors", "SourceError": "errors", "TrustError": "errors", "HeadNotFoundError": "errors",
    "DatasetError": "errors",
}

__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load lazily
    from .api import prepare, sweep_lambda  # noqa: F401
    from .training import AttentionPoolHead, CSRAHead, attach_head  # noqa: F401
    from .errors import DatasetError, HeadNotFoundError, PatchCSRAError, SourceError, TrustError  # noqa: F401
    from .export import save_patched  # noqa: F401
    from .grid import sweep  # noqa: F401
    from .patcher import describe, patch, residual_attention  # noqa: F401
    from .sources import load  # noqa: F401
    from .stats import collect  # noqa: F401
    from .training import TrainConfig, train_head  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'patchcsra' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
