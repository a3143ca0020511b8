"""A ``torch.jit.script``-able copy of a patched model whose head was split by the graph adapter.

Used by :mod:`patchcsra.export` when tracing bakes the input size into a TorchScript file (a model that
reads ``x.size()`` into an op argument, e.g. ``F.avg_pool2d(x, x.size(3))``): the scripted copy keeps
every size symbolic. This module has no ``from __future__ import annotations`` on purpose: TorchScript
reads the annotations below as types.
"""
import math
from typing import List

import torch
from torch import Tensor, nn

__all__ = ["scriptable"]


class _ScriptableGraphPatched(nn.Module):
    """``x (B, C, H, W) -> base + _lam * y_att(T)  (B, K)`` from the graph split's three modules."""

    def __init__(self, features: nn.Module, pool: nn.Module, post: nn.Module, layout: str,
                 pooled_shape: List[int], lam: Tensor, temperature: float) -> None:
        super().__init__()
        self.features = features
        self.pool = pool
        self.post = post
        self.layout = layout
        self.pooled_shape = pooled_shape
        self.register_buffer("_lam", lam.detach().clone())
        self.is_max = bool(math.isinf(temperature))
        self.scale = 1.0 if math.isinf(temperature) else min(float(temperature), float(torch.finfo(torch.float32).max))

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        base = self.post(self.pool(f))
        if self.layout == "NCHW":
            t = f.flatten(2).transpose(1, 2)
        elif self.layout == "NHWC":
            t = f.flatten(1, 2)
        else:
            t = f
        b, n, d = t.shape[0], t.shape[1], t.shape[2]
        v = t.reshape(b * n, d)
        if self.layout == "NHWC" and len(self.pooled_shape) == 4:
            z = v[:, None, None, :]
        else:
            z = v.reshape([b * n] + self.pooled_shape[1:])
        s = self.post(z).reshape(b, n, -1).transpose(1, 2)
        if self.is_max:
            att = s.amax(dim=-1)
        else:
            w = torch.softmax((s - s.amax(dim=-1, keepdim=True)) * self.scale, dim=-1)
            att = (w * s).sum(dim=-1)
        return base + self._lam.to(base.dtype) * att.to(base.dtype)


def scriptable(module: nn.Module):
    """A module ``torch.jit.script`` can compile that computes what ``module`` (a PatchedClassifier) does,
    or None when its split is not the graph adapter's."""
    split = getattr(module, "split", None)
    if type(split).__name__ != "GraphSplit" or not hasattr(module, "_lam"):
        return None
    return _ScriptableGraphPatched(split.features, split.pool, split.post, str(split.layout),
                                   [int(v) for v in split.pooled_shape], module._lam, float(module.temperature))
