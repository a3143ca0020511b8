"""Adapter for torchvision models the generic graph adapter cannot split.

torchvision's ``VisionTransformer`` pools by taking the class token (``x[:, 0]``), which is not
a pooling op in its graph; this adapter splits it explicitly: features are the encoder tokens
``(B, 1 + L, D)``, the head is ``heads`` applied to the class token, and the single-location
head is ``heads`` applied to a patch token. Every other torchvision classifier (ResNet, RegNet,
EfficientNet, MobileNet, ConvNeXt, Swin, MaxViT, DenseNet, SqueezeNet, ...) is split by the
generic graph adapter in :mod:`patchcsra.heads.fx`.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .base import HeadSplit, is_instance_of, register_adapter, sole_affine

__all__ = ["TorchvisionViTSplit"]


def _is_tv_vit(model: nn.Module) -> bool:
    return is_instance_of(model, "torchvision.models.vision_transformer", "VisionTransformer")


class TorchvisionViTSplit(HeadSplit):
    layout = "NLC"
    num_prefix_tokens = 1
    pooling = "token"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward_features(self, x: Tensor) -> Tensor:
        m = self.model
        x = m._process_input(x)
        cls = m.class_token.expand(x.shape[0], -1, -1)
        return m.encoder(torch.cat([cls, x], dim=1))

    def forward_baseline(self, f: Tensor) -> Tensor:
        return self.model.heads(f[:, 0])

    def forward_single(self, v: Tensor) -> Tensor:
        return self.model.heads(v)

    def linear_head(self) -> Optional[nn.Module]:
        return sole_affine(self.model.heads)

    def head_kind(self) -> str:
        return "token+" + "+".join(type(m).__name__ for m in self.model.heads.children())


@register_adapter("torchvision-vit", priority=20, matches=_is_tv_vit)
def build_tv_vit(model: nn.Module, x: Tensor) -> Iterator[HeadSplit]:
    yield TorchvisionViTSplit(model)
