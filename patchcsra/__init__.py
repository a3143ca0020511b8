"""patchcsra: training-free residual attention (CSRA) for any pretrained image classifier.

    >>> import patchcsra
    >>> model = patchcsra.load("timm:resnet50")          # or torchvision:NAME, or a file
    >>> patched = patchcsra.patch(model, lam=0.2)        # model(x) + 0.2 * max_k head(x_k)
    >>> patchcsra.describe(model)                        # what head was found
    >>> run = patchcsra.sweep_lambda(model, "VOCdevkit")  # one pass, λ/T grid, Table-1 record
"""
from .errors import ExportError, HeadNotFoundError, PatchCSRAError, SourceError, TrustError
from .heads import HeadInfo, HeadSplit, discover, list_adapters, register_adapter
from .patcher import PatchedClassifier, default_lam, describe, patch, residual_attention
from .sources import PatchedArchive, load
from .export import save_patched
from .stats import Stats, collect
from .sweep import DEFAULT_LAMS, SweepResult, evaluate_grid, sweep
from .api import SweepRun, prepare, sweep_lambda
from .errors import DataMismatchError, DatasetError
from .csra import AttentionPoolHead, CSRAHead, HeadedClassifier, attach_head
from .train import TrainConfig, train_head

from ._version import __version__

__all__ = [
    "load", "patch", "describe", "save_patched", "PatchedClassifier", "PatchedArchive", "residual_attention",
    "default_lam", "discover", "HeadInfo", "HeadSplit", "list_adapters", "register_adapter",
    "Stats", "collect", "DEFAULT_LAMS", "SweepResult", "evaluate_grid", "sweep", "SweepRun", "prepare",
    "sweep_lambda", "PatchCSRAError", "SourceError", "TrustError", "HeadNotFoundError", "ExportError",
    "DatasetError", "DataMismatchError", "CSRAHead", "AttentionPoolHead", "HeadedClassifier", "attach_head",
    "TrainConfig", "train_head",
]
