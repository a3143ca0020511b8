"""Adapter for models with a trained head (:class:`patchcsra.training.HeadedClassifier`), so the sweep and
report code evaluate them like any classifier."""
from __future__ import annotations

from torch import Tensor, nn

from .base import HeadSplit, register_adapter


def _is_headed(model: nn.Module) -> bool:
    from ..training.attach import HeadedClassifier  # imported here: training depends on heads, not back

    return isinstance(model, HeadedClassifier)


class HeadedSplit(HeadSplit):
    """A :class:`HeadedClassifier` seen as a pooling classifier, so the sweep/report code evaluates it.

    Features are its ``(B, d, H, W)`` map, the baseline is its trained head, and the single-location head
    is that head on a ``1 x 1`` map (CSRA and attention pooling are permutation-invariant pools).
    """

    layout = "NCHW"
    pooling = "trained"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def forward_baseline(self, f: Tensor) -> Tensor:
        return self.model.forward_head(f)

    def forward_single(self, v: Tensor) -> Tensor:
        return self.model.forward_head(v[:, :, None, None])

    def head_kind(self) -> str:
        return f"trained+{type(self.model.head).__name__}"


@register_adapter("patchcsra-head", priority=1, matches=_is_headed)
def _build_headed(model: nn.Module, x: Tensor):
    yield HeadedSplit(model)  # type: ignore[arg-type]
