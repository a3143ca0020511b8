"""Adapter for timm-style models: ``forward_features`` + ``forward_head``.

timm guarantees ``model(x) == forward_head(forward_features(x))``. The single-location head is
``forward_head`` applied to a feature tensor that holds one location only:

* NCHW maps: ``(N, D, 1, 1)`` (every timm pool type is the identity on a 1x1 map),
* NHWC maps (Swin, MambaOut, ...): ``(N, 1, 1, D)``,
* tokens ``(B, P + L, D)``: ``(N, P + 1, D)`` with every token equal to ``x_k`` -- class-token,
  average, max and attention (``global_pool='map'``) pooling all return the head of ``x_k``.

The layout and the number of prefix tokens are read from the model and confirmed by
validation (see :func:`patchcsra.heads.base.discover`); wrong guesses fail validation.

CLIP ResNets (``AttentionPool2d`` head with a positional embedding; not symmetric in the locations) get
:class:`TimmAttentionPoolSplit` (adapter ``timm-attnpool``): ``s_k = proj(v(x_k + pos_k))``. ViTs with
``global_pool='map'`` (``AttentionPoolLatent``, a learned query and no positions) are symmetric and need
nothing more. Multi-branch models: :mod:`patchcsra.heads.timm_multi`.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .base import HeadSplit, constant_features, is_instance_of, register_adapter

__all__ = ["TimmSplit", "TimmPitSplit", "TimmAttentionPoolSplit"]


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
        return self.model.forward_head(constant_features(v, self.layout, self.num_prefix_tokens))

    def linear_head(self) -> Optional[nn.Module]:
        """timm's ``get_classifier()`` (checked by discovery before the fast path is used)."""
        try:
            clf = self.model.get_classifier()
        except Exception:  # noqa: BLE001
            return None
        return clf if isinstance(clf, nn.Module) else None

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


# ---------------------------------------------------------------------------- CLIP attention pooling
def _is_timm_attnpool(model: nn.Module) -> bool:
    return _is_timm_style(model) and is_instance_of(getattr(model, "head", None), "timm.layers", "AttentionPool2d")


class TimmAttentionPoolSplit(TimmSplit):
    """A timm model whose head is CLIP's ``AttentionPool2d`` (``resnet50_clip``, ``resnet101_clip``, ...).

    The pool adds a learned positional embedding ``pos`` (resampled to the map, as the model does) and lets
    the query of the mean token (or class token) ``x_0 + pos_0`` attend over ``z_j = x_j + pos_j``; its logits
    are ``proj(sum_j a_j v(z_j))`` -- not symmetric in the locations. The score of location ``k`` is the
    pool's value path at that location with the query-key attention skipped (MaskCLIP)::

        s_k = proj(v(x_k + pos_k))                               (B, C, L)

    The positional embedding is kept: with it, the model's own logits are an attention average of exactly
    these scores (plus the query token's), ``proj`` and ``v`` being affine; ``forward_single`` is the same
    value path without a position (MaskCLIP's dense head). ``base`` stays the model's own path (λ=0 exact).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, "NCHW", 0)
        self.pooling = "attnpool"

    def _value(self, z: Tensor) -> Tensor:
        head = self.model.head
        if head.qkv is None:
            return head.v(z)
        e = head.embed_dim
        b = head.qkv.bias[2 * e:] if head.qkv.bias is not None else None
        return nn.functional.linear(z, head.qkv.weight[2 * e:], b)

    def _pos(self, h: int, w: int) -> Tensor:
        from timm.layers import resample_abs_pos_embed

        head = self.model.head
        return resample_abs_pos_embed(head.pos_embed.unsqueeze(0), (h, w), old_size=head.feat_size,
                                      num_prefix_tokens=1)[0]            # (1 + L, D)

    def forward_single(self, v: Tensor) -> Tensor:
        """``(N, D)`` -> ``(N, C)``: ``proj(v(x))``, the value path without a positional embedding."""
        head = self.model.head
        return head.proj(head.drop(self._value(v)))

    def forward_locations(self, f: Tensor) -> Tensor:
        """``(B, D, H, W)`` -> ``s_k = proj(v(x_k + pos_k))`` ``(B, C, L)``."""
        head = self.model.head
        z = f.flatten(2).transpose(1, 2) + self._pos(f.shape[2], f.shape[3])[1:].to(f.dtype)
        return head.proj(head.drop(self._value(z))).transpose(1, 2)

    def head_kind(self) -> str:
        return f"attnpool+AttentionPool2d(pos)+{type(self.model.head.proj).__name__}"

    def validate_locations(self, f: Tensor, base: Tensor) -> tuple[str, dict]:
        """Checks on the probe: ``L >= 2`` locations and scores ``(B, C, L)``; with the query zeroed (uniform
        attention) the model's pool equals the mean of the scores over the locations and the query token --
        the value path, positions and output projection used here are the model's own."""
        from torch.func import functional_call

        from .base import allclose_logits

        head = self.model.head
        if f.ndim != 4 or f.shape[2] * f.shape[3] < 2:
            return f"features of shape {tuple(f.shape)} hold fewer than 2 locations (try a larger input_size)", {}
        b, d, h, w = f.shape
        n = h * w
        s = self.forward_locations(f)
        if s.shape != (b, base.shape[1], n):
            return f"per-location scores have shape {tuple(s.shape)}, expected {(b, base.shape[1], n)}", {}
        if head.qkv is None:
            zero = {"q.weight": torch.zeros_like(head.q.weight)}
            if head.q.bias is not None:
                zero["q.bias"] = torch.zeros_like(head.q.bias)
        else:
            e = head.embed_dim
            wq = head.qkv.weight.clone()
            wq[:e] = 0
            zero = {"qkv.weight": wq}
            if head.qkv.bias is not None:
                bq = head.qkv.bias.clone()
                bq[:e] = 0
                zero["qkv.bias"] = bq
        uniform = functional_call(head, zero, (f,))
        t = f.flatten(2).transpose(1, 2)
        first = t.mean(1) if head.cls_token is None else head.cls_token.expand(b, -1)
        s0 = head.proj(head.drop(self._value(first + self._pos(h, w)[0].to(f.dtype))))
        if not allclose_logits(uniform, (s0 + s.sum(-1)) / (n + 1), rel=1e-4):
            return "its attention pool's value path differs from proj(v(x_k + pos_k))", {}
        exact_linear = allclose_logits(s.mean(-1), base, rel=1e-4)
        return "", dict(num_locations=n, grid=(h, w), feature_dim=d, num_classes=int(base.shape[1]),
                        exact_linear=exact_linear)


@register_adapter("timm-attnpool", priority=5, matches=_is_timm_attnpool)
def build_timm_attnpool(model: nn.Module, x: Tensor) -> Iterator[HeadSplit]:
    if getattr(model.head, "pool_type", "token") != "token":
        from ..errors import HeadNotFoundError

        raise HeadNotFoundError(f"{type(model).__name__}: its AttentionPool2d does not pool (pool_type='')")
    yield TimmAttentionPoolSplit(model)
