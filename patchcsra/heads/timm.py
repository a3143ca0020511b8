"""Adapter for timm-style models: ``forward_features`` + ``forward_head``.

timm guarantees ``model(x) == forward_head(forward_features(x))``. The single-location head is
``forward_head`` applied to a feature tensor that holds one location only:

* NCHW maps: ``(N, D, 1, 1)`` (every timm pool type is the identity on a 1x1 map),
* NHWC maps (Swin, MambaOut, ...): ``(N, 1, 1, D)``,
* tokens ``(B, P + L, D)``: ``(N, P + 1, D)`` with every token equal to ``x_k`` -- class-token,
  average, max and attention (``global_pool='map'``) pooling all return the head of ``x_k``.

The layout and the number of prefix tokens are read from the model and confirmed by
validation (see :func:`patchcsra.heads.base.discover`); wrong guesses fail validation.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from .base import HeadSplit, is_instance_of, register_adapter

__all__ = ["TimmSplit"]


def _is_timm_style(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


def _pool_name(model: nn.Module) -> str:
    if getattr(model, "attn_pool", None) is not None:
        return "map"
    gp = getattr(model, "global_pool", None)
    if isinstance(gp, str) and gp:
        return gp
    for obj in (gp, getattr(getattr(model, "head", None), "global_pool", None)):
        pt = getattr(obj, "pool_type", None)
        if isinstance(pt, str) and pt:
            return pt
    return "pool"


def _classifier_name(model: nn.Module) -> str:
    try:
        clf = model.get_classifier()
    except Exception:  # noqa: BLE001
        return "head"
    if isinstance(clf, (tuple, list)):
        return "+".join(type(c).__name__ for c in clf) + "(distilled)"
    return type(clf).__name__


class TimmSplit(HeadSplit):
    """Split of a timm-style model; see module docstring. ``model`` is shared, not copied."""

    def __init__(self, model: nn.Module, layout: str, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.pooling = _pool_name(model)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def forward_baseline(self, f: Tensor) -> Tensor:
        return self.model.forward_head(f)

    def forward_single(self, v: Tensor) -> Tensor:
        if self.layout == "NCHW":
            z = v[:, :, None, None]
        elif self.layout == "NHWC":
            z = v[:, None, None, :]
        else:
            z = v[:, None, :].expand(-1, self.num_prefix_tokens + 1, -1)
        return self.model.forward_head(z)

    def head_kind(self) -> str:
        parts = [self.pooling]
        for name in ("norm_pre", "head_norm", "fc_norm", "conv_head", "pre_logits"):
            m = getattr(self.model, name, None)
            if isinstance(m, nn.Module) and not isinstance(m, nn.Identity) and any(True for _ in m.parameters()):
                parts.append(type(m).__name__)
        parts.append(_classifier_name(self.model))
        return "+".join(parts)


def _layouts(model: nn.Module, f: Tensor) -> list[str]:
    fmt = getattr(model, "output_fmt", None)
    fmt = getattr(fmt, "value", fmt)
    order: list[str] = []
    if isinstance(fmt, str) and fmt.upper() in ("NCHW", "NHWC"):
        order.append(fmt.upper())
    d = getattr(model, "num_features", None)
    if d is not None and f.shape[-1] == d and f.shape[1] != d:
        order.append("NHWC")
    order += ["NCHW", "NHWC"]
    return list(dict.fromkeys(order))


def _prefix_candidates(model: nn.Module, f: Tensor) -> list[int]:
    n = int(f.shape[1])
    cands: list[int] = []
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None:
        try:
            p = n - int(torch.tensor(grid).prod())
            if 0 <= p < n:
                cands.append(p)
        except Exception:  # noqa: BLE001
            pass
    p_attr = getattr(model, "num_prefix_tokens", None)
    if isinstance(p_attr, int):
        cands.append(p_attr)
    counted = 0
    for name in ("cls_token", "dist_token"):
        if isinstance(getattr(model, name, None), Tensor):
            counted += 1
    reg = getattr(model, "reg_token", None)
    if isinstance(reg, Tensor):
        counted += int(reg.shape[1]) if reg.ndim == 3 else 1
    cands += [counted, 0, 1]
    return [p for p in dict.fromkeys(cands) if 0 <= p < n]


@register_adapter("timm", priority=10, matches=_is_timm_style)
def build_timm(model: nn.Module, x: Tensor) -> Iterator[HeadSplit]:
    """Candidates for a timm-style model, most likely first."""
    f = model.forward_features(x)
    if not isinstance(f, Tensor):
        from ..errors import HeadNotFoundError

        raise HeadNotFoundError(
            f"forward_features returns a {type(f).__name__} of {len(f) if hasattr(f, '__len__') else '?'} "
            "branches (multi-branch model); per-location scores are not defined across branches")
    if f.ndim == 4:
        for layout in _layouts(model, f):
            yield TimmSplit(model, layout)
    elif f.ndim == 3:
        for p in _prefix_candidates(model, f):
            yield TimmSplit(model, "NLC", p)
    else:
        from ..errors import HeadNotFoundError

        raise HeadNotFoundError(f"forward_features returns shape {tuple(f.shape)}, not a map or tokens")


def _is_timm_pit(model: nn.Module) -> bool:
    return is_instance_of(model, "timm.models.pit", "PoolingVisionTransformer")


class TimmPitSplit(TimmSplit):
    """PiT: ``forward_features`` keeps only the class token(s); here the last stage's patch
    tokens are kept too, ``(B, P + L, D)`` after the final norm, and the head reads tokens ``[:P]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, "NLC", int(model.cls_token.shape[1]))

    def forward_features(self, x: Tensor) -> Tensor:
        m = self.model
        x = m.pos_drop(m.patch_embed(x) + m.pos_embed)
        cls_tokens = m.cls_token.expand(x.shape[0], -1, -1)
        x, cls_tokens = m.transformers((x, cls_tokens))
        return m.norm(torch.cat([cls_tokens, x.flatten(2).transpose(1, 2)], dim=1))

    def forward_baseline(self, f: Tensor) -> Tensor:
        return self.model.forward_head(f[:, : self.num_prefix_tokens])

    def forward_single(self, v: Tensor) -> Tensor:
        return self.model.forward_head(v[:, None, :].expand(-1, self.num_prefix_tokens, -1))


@register_adapter("timm-pit", priority=5, matches=_is_timm_pit)
def build_timm_pit(model: nn.Module, x: Tensor) -> Iterator[HeadSplit]:
    yield TimmPitSplit(model)
