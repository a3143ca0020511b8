"""Trainable heads: CSRA / multi-head CSRA, PatchConvNet-style attention pooling, GAP + Linear.

The training-free patch (:mod:`patchcsra.patcher`) reuses the model's own head. The modules here
*replace* the pooling + head of a pretrained classifier with a trainable head on its feature map
``(B, d, H, W)``; :data:`HEADS` maps each kind to its class (``{kind: class}``), and every class builds
itself with ``create(in_dim, num_classes, wb, **options)`` (from the pretrained ``(W, b)`` when given).

* :data:`TEMPERATURE_SETS` -- the paper's fixed temperatures per number of heads
  (§3.4): H=1 {1}, 2 {1, ∞}, 4 {1, 2, 4, ∞}, 6 {1..5, ∞}, 8 {1..7, ∞}; ``inf`` is max pooling
  (the official code writes it as ``T = 99``).
* :func:`class_scores` -- per-head, per-location scores ``s^h_k = (W_h / ||rows of W_h||) x_k``
  ``(B, H, C, L)``: one bias-free 1x1 classifier per head with every class row L2-normalised (§3.4).
* eq. (2) and (7), ``softmax_k(T s_k)`` and ``y_att(T)``, are :func:`patchcsra.patcher.attention_weights`
  and :func:`patchcsra.patcher.residual_attention` (one formula for the patch and the trained heads).
* :class:`CSRAHead` -- ``y = sum_h (mean_k s^h_k + lam * y_att^h(T_h))`` (eq. 5-8, 13).
  ``CSRAHead.from_linear(W, b)`` starts every head from the pretrained FC weight (the bias is
  dropped: with normalised rows the class-``c`` logit at init is the 4-line patch's
  ``base + lam * max`` divided by ``||w_c||`` and shifted by ``(1 + lam) b_c``, so the per-class
  ranking, hence AP, equals the training-free patch at the same λ for H=1, T=∞).
* :class:`AttentionPoolHead` -- PatchConvNet's attention-based pooling: a learned query per class
  (or one shared query) attends over the locations in one block (single head by default), its
  softmax weights are the attention map, then a linear classifier. Details chosen here:

  - keys are ``LayerNorm(x_k)`` without affine parameters (an affine LN or a key projection is
    redundant with a learned query for a single query per head: ``q·(W_k x) = (W_k^T q)·x``);
    the logit scale is ``1/sqrt(d / num_heads)``;
  - values are the raw features ``x_k`` (no value / output projection: both would compose with the
    linear classifier into one linear map), so a zero query gives uniform attention and the head
    is exactly the linear classifier on average-pooled features -- training starts from the model;
  - ``num_heads > 1`` splits the channels into groups, one query part and one softmax per group;
  - per-class queries: class ``c``'s logit is ``w_c · z_c + b_c`` from its own pooled vector
    ``z_c`` (computed as ``sum_k a_ck (w_c · x_k)``, never materialising ``(B, C, d)``); a shared
    query: ``Linear(z)``;
  - ``lam >= 0`` mixes in class-agnostic average pooling as in the paper's eq. (12):
    ``z_c = sum_k (a_ck + lam / L) / (1 + lam) x_k`` (0 = pure attention pooling, the default).
* :class:`LinearHead` -- GAP + Linear, the baseline the paper patches.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PatchCSRAError
from ..patcher import attention_weights, check_lam, residual_attention, temperature_json, temperature_text

__all__ = ["TEMPERATURE_SETS", "HEADS", "HEAD_KINDS", "class_scores", "CSRAHead", "AttentionPoolHead", "LinearHead"]
INF = math.inf

#: The paper's temperature sequences (§3.4), keyed by the number of heads H.
TEMPERATURE_SETS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (1.0, INF),
    4: (1.0, 2.0, 4.0, INF),
    6: (1.0, 2.0, 3.0, 4.0, 5.0, INF),
    8: (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, INF),
}


# ----------------------------------------------------------------------------- argument checks
def _check_positive_int(v: int, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise PatchCSRAError(f"{name}={v!r} is invalid; give a positive integer")
    return v


def _resolve_temperatures(heads: int, temperatures: Optional[Sequence[float]]) -> tuple[float, ...]:
    """The per-head temperatures: ``temperatures`` if given (one per head), else the paper's set."""
    if temperatures is None:
        if heads not in TEMPERATURE_SETS:
            raise PatchCSRAError(f"heads={heads!r} has no paper temperature set; use one of "
                                 f"{sorted(TEMPERATURE_SETS)} or pass temperatures=(T_1, ..., T_H)")
        return TEMPERATURE_SETS[heads]
    try:
        ts = tuple(float(t) for t in temperatures)
    except (TypeError, ValueError):
        raise PatchCSRAError(f"temperatures={temperatures!r} are not numbers; give T > 0 or inf per head") from None
    if not ts:
        raise PatchCSRAError("temperatures=() is empty; give one T > 0 (or inf) per head, e.g. (inf,)")
    for t in ts:
        if math.isnan(t) or t <= 0:
            raise PatchCSRAError(f"temperatures={temperatures!r} holds {t!r}; every T must be > 0 or inf")
    if len(ts) != heads:
        raise PatchCSRAError(f"heads={heads} does not match len(temperatures)={len(ts)}; pass heads={len(ts)}")
    return ts


def _check_features(x: Tensor, in_dim: int, who: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != in_dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise PatchCSRAError(f"{who} expects features (B, {in_dim}, H, W), got {shape}; "
                             "convert token features with locations_to_map")


def _linear_weight(weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Accept a Linear ``(C, d)`` or 1x1 conv ``(C, d, 1, 1)`` weight; check the bias is ``(C,)``."""
    if not isinstance(weight, Tensor):
        raise PatchCSRAError(f"weight is a {type(weight).__name__}; give the classifier weight tensor (C, d)")
    w = weight.detach()
    if not w.is_floating_point():
        raise PatchCSRAError(f"weight has dtype {w.dtype}; give a floating-point classifier weight (C, d)")
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]
    if w.ndim != 2:
        raise PatchCSRAError(f"weight has shape {tuple(weight.shape)}; give a Linear weight (C, d) or 1x1 conv "
                             "weight (C, d, 1, 1)")
    b = None
    if bias is not None:
        b = bias.detach().reshape(-1)
        if b.shape[0] != w.shape[0]:
            raise PatchCSRAError(f"bias has {b.shape[0]} entries for a weight of {w.shape[0]} classes; "
                                 "give bias of shape (C,) or None")
    return w, b


# ----------------------------------------------------------------------------- CSRA pieces
def class_scores(x: Tensor, weight: Tensor) -> Tensor:
    """Per-head, per-location class scores with L2-normalised class rows.

    Args:
        x: features ``(B, d, H, W)``.
        weight: ``(H, C, d)``, one bias-free classifier per head.

    Returns:
        ``(B, H, C, L)`` with ``L = H * W``: ``s^h_{c,k} = w^h_c · x_k / ||w^h_c||``.
    """
    nh, c, d = weight.shape
    w = F.normalize(weight, dim=-1).reshape(nh * c, d)
    s = torch.matmul(w.to(x.dtype), x.flatten(2))  # (B, H*C, L)
    return s.reshape(x.shape[0], nh, c, -1)



class CSRAHead(nn.Module):
    """(Multi-head) class-specific residual attention: ``(B, d, H, W) -> (B, C)``.

    ``y = sum_h ( mean_k s^h_k + lam * y_att(s^h, T_h) )`` with ``s^h_k`` from :func:`class_scores`.
    The classifiers are one ``(H, C, d)`` parameter ``weight``: head ``h`` is ``weight[h]``, the
    official code's ``multi_head.{h}.head.weight[:, :, 0, 0]``.

    Args:
        in_dim: feature channels d.
        num_classes: C.
        heads: H; without ``temperatures`` one of 1, 2, 4, 6, 8 (:data:`TEMPERATURE_SETS`).
        lam: residual weight λ >= 0 (the official default 0.1).
        temperatures: one T > 0 or ``inf`` per head, overriding the paper's set,
            e.g. ``(inf,)`` for the single max head of the 4-line patch.
    """

    def __init__(self, in_dim: int, num_classes: int, heads: int = 1, lam: float = 0.1, *,
                 temperatures: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.in_dim = _check_positive_int(in_dim, "in_dim")
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.heads = _check_positive_int(heads, "heads")
        self.lam = check_lam(lam)
        self.temperatures = _resolve_temperatures(heads, temperatures)
        self.weight = nn.Parameter(torch.empty(heads, num_classes, in_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each head as ``nn.Conv2d(d, C, 1, bias=False)`` (the official code) initialises it."""
        bound = 1.0 / math.sqrt(self.in_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    @classmethod
    def from_linear(cls, weight: Tensor, bias: Optional[Tensor] = None, heads: int = 1, lam: float = 0.1,
                    temperatures: Optional[Sequence[float]] = None) -> "CSRAHead":
        """Every head's classifier from a pretrained FC ``weight`` ``(C, d)``; ``bias`` is dropped.

        With H=1 and ``temperatures=(inf,)`` the logits at init are
        ``(base_c + lam * max_c - (1 + lam) b_c) / ||w_c||`` of the training-free patch: same
        per-class ranking, same AP.
        """
        w, _ = _linear_weight(weight, bias)
        head = cls(int(w.shape[1]), int(w.shape[0]), heads, lam, temperatures=temperatures).to(w.device, w.dtype)
        with torch.no_grad():
            head.weight.copy_(w.expand_as(head.weight))
        return head

    @classmethod
    def create(cls, in_dim: int, num_classes: int, wb: Optional[tuple[Tensor, Tensor]] = None, *, heads: int = 1,
               lam: float = 0.1, temperatures: Optional[Sequence[float]] = None, **_: object) -> "CSRAHead":
        """:func:`~patchcsra.training.attach_head`'s builder: from the pretrained ``wb = (W, b)`` when given."""
        if wb is not None:
            return cls.from_linear(wb[0], wb[1], heads, lam, temperatures)
        return cls(in_dim, num_classes, heads, lam, temperatures=temperatures)

    def forward_scores(self, x: Tensor) -> Tensor:
        """Features ``(B, d, H, W)`` -> per-head, per-location scores ``(B, H, C, L)``."""
        _check_features(x, self.in_dim, "CSRAHead")
        return class_scores(x, self.weight)

    def _logits(self, s: Tensor) -> Tensor:
        att = torch.stack([residual_attention(s[:, h], t) for h, t in enumerate(self.temperatures)], dim=1)
        return (s.mean(dim=-1) + self.lam * att).sum(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(B, d, H, W)`` -> logits ``(B, C)``."""
        return self._logits(self.forward_scores(x))

    def forward_maps(self, x: Tensor) -> dict[str, Tensor]:
        """Maps for explanations, from features ``(B, d, H, W)``, locations ``L = H * W`` row-major.

        Returns ``{'scores': (B, H, C, L), 'attention': (B, H, C, L), 'logits': (B, C)}``: per-head
        per-location scores, their softmax weights (one-hot argmax for T = inf), and the logits.
        """
        s = self.forward_scores(x)
        a = torch.stack([attention_weights(s[:, h], t) for h, t in enumerate(self.temperatures)], dim=1)
        return {"scores": s, "attention": a, "logits": self._logits(s)}

    @property
    def head_info(self) -> dict:
        return {"kind": "csra", "heads": self.heads, "temperatures": [temperature_json(t) for t in self.temperatures],
                "lam": self.lam, "normalized": True}

    def extra_repr(self) -> str:
        ts = ", ".join(temperature_text(t) for t in self.temperatures)
        return f"in_dim={self.in_dim}, num_classes={self.num_classes}, heads={self.heads}, lam={self.lam:g}, T=({ts})"


# ----------------------------------------------------------------------------- attention pooling
class AttentionPoolHead(nn.Module):
    """PatchConvNet-style attention pooling + linear classifier: ``(B, d, H, W) -> (B, C)``.

    Logits of query ``q`` (per class, or one shared) at location ``k`` and channel group ``g``:
    ``q_g · LN(x_k)_g / sqrt(d / num_heads)``; ``a = softmax_k``; pooled
    ``z = sum_k (a_k + lam / L) / (1 + lam) x_k``; logits ``w_c · z_c + b_c`` (per class) or
    ``fc(z)`` (shared). See the module docstring for why there are no k/v/out projections.

    Args:
        in_dim: feature channels d.
        num_classes: C.
        per_class_query: one query per class (class-specific maps) or one shared query.
        num_heads: channel groups with their own softmax (PatchConvNet: 1); must divide ``in_dim``.
        lam: weight λ >= 0 of class-agnostic average pooling mixed into the pooled vector.
    """

    def __init__(self, in_dim: int, num_classes: int, *, per_class_query: bool = True, num_heads: int = 1,
                 lam: float = 0.0) -> None:
        super().__init__()
        self.in_dim = _check_positive_int(in_dim, "in_dim")
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.num_heads = _check_positive_int(num_heads, "num_heads")
        if in_dim % num_heads:
            raise PatchCSRAError(f"num_heads={num_heads} does not divide in_dim={in_dim}; pick a divisor, e.g. 1")
        self.per_class_query = bool(per_class_query)
        self.lam = check_lam(lam)
        self.head_dim = in_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.query = nn.Parameter(torch.zeros(num_classes if self.per_class_query else 1, in_dim))
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)

    @classmethod
    def from_linear(cls, weight: Tensor, bias: Optional[Tensor] = None, per_class_query: bool = True, *,
                    num_heads: int = 1, lam: float = 0.0) -> "AttentionPoolHead":
        """Classifier from a pretrained FC, queries zero: uniform attention, so the head equals
        ``weight @ mean_k x_k + bias`` exactly at init."""
        w, b = _linear_weight(weight, bias)
        head = cls(int(w.shape[1]), int(w.shape[0]), per_class_query=per_class_query, num_heads=num_heads,
                   lam=lam).to(w.device, w.dtype)
        with torch.no_grad():
            head.query.zero_()
            head.fc.weight.copy_(w)
            if b is None:
                head.fc.bias.zero_()
            else:
                head.fc.bias.copy_(b)
        return head

    @classmethod
    def create(cls, in_dim: int, num_classes: int, wb: Optional[tuple[Tensor, Tensor]] = None, *, heads: int = 1,
               lam: float = 0.0, per_class_query: bool = True, **_: object) -> "AttentionPoolHead":
        """:func:`~patchcsra.training.attach_head`'s builder (``heads`` is ``num_heads``)."""
        if wb is not None:
            return cls.from_linear(wb[0], wb[1], per_class_query, num_heads=heads, lam=lam)
        return cls(in_dim, num_classes, per_class_query=per_class_query, num_heads=heads, lam=lam)

    def forward_attention(self, x: Tensor) -> Tensor:
        """Features ``(B, d, H, W)`` -> softmax weights ``(B, num_heads, Q, L)``, Q = C or 1."""
        _check_features(x, self.in_dim, "AttentionPoolHead")
        b, nh, dh = x.shape[0], self.num_heads, self.head_dim
        k = self.norm(x.flatten(2).transpose(1, 2))                       # (B, L, d)
        k = k.reshape(b, -1, nh, dh).permute(0, 2, 3, 1)                  # (B, nh, dh, L)
        q = self.query.to(k.dtype).reshape(-1, nh, dh).transpose(0, 1)    # (nh, Q, dh)
        return torch.softmax(torch.matmul(q, k) * self.scale, dim=-1)     # (B, nh, Q, L)

    def _pool_weights(self, a: Tensor) -> Tensor:
        if self.lam == 0.0:
            return a
        return (a + self.lam / a.shape[-1]) / (1.0 + self.lam)

    def _logits(self, x: Tensor, a: Tensor) -> Tensor:
        b, nh, dh = x.shape[0], self.num_heads, self.head_dim
        v = x.flatten(2).reshape(b, nh, dh, -1)                            # (B, nh, dh, L)
        w = self._pool_weights(a)                                          # (B, nh, Q, L)
        if self.per_class_query:
            wc = self.fc.weight.to(x.dtype).reshape(-1, nh, dh).transpose(0, 1)  # (nh, C, dh)
            s = torch.matmul(wc, v)                                        # (B, nh, C, L)
            return (w * s).sum(dim=(1, 3)) + self.fc.bias.to(x.dtype)
        z = torch.matmul(v, w.transpose(-1, -2))                           # (B, nh, dh, 1)
        return self.fc(z.reshape(b, self.in_dim))

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(B, d, H, W)`` -> logits ``(B, C)``."""
        return self._logits(x, self.forward_attention(x))

    def forward_maps(self, x: Tensor) -> dict[str, Tensor]:
        """``{'attention': (B, num_heads, Q, L), 'logits': (B, C)}``; Q = C (per class) or 1."""
        a = self.forward_attention(x)
        return {"attention": a, "logits": self._logits(x, a)}

    @property
    def head_info(self) -> dict:
        return {"kind": "attention", "heads": self.num_heads, "temperatures": None, "lam": self.lam,
                "per_class_query": self.per_class_query}

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, num_classes={self.num_classes}, per_class_query={self.per_class_query}, "
                f"num_heads={self.num_heads}, lam={self.lam:g}")


class LinearHead(nn.Module):
    """The plain head of a ResNet-style classifier: global average pooling + Linear, ``(B, d, H, W) -> (B, C)``.

    Trained with :func:`patchcsra.train.train_head` (``kind='linear'``) it is the baseline the paper
    patches: the 4-line residual patch then applies its ``fc`` at every location.
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.in_dim, self.num_classes = _check_positive_int(in_dim, "in_dim"), _check_positive_int(num_classes, "num_classes")
        self.fc = nn.Linear(in_dim, num_classes)

    @classmethod
    def from_linear(cls, weight: Tensor, bias: Optional[Tensor] = None) -> "LinearHead":
        """The pretrained FC as is: the head equals ``weight @ mean_k x_k + bias`` exactly."""
        w, b = _linear_weight(weight, bias)
        head = cls(int(w.shape[1]), int(w.shape[0])).to(w.device, w.dtype)
        with torch.no_grad():
            head.fc.weight.copy_(w)
            head.fc.bias.copy_(b if b is not None else torch.zeros_like(head.fc.bias))
        return head

    @classmethod
    def create(cls, in_dim: int, num_classes: int, wb: Optional[tuple[Tensor, Tensor]] = None,
               **_: object) -> "LinearHead":
        """:func:`~patchcsra.training.attach_head`'s builder (``heads``, ``lam`` do not apply)."""
        return cls.from_linear(*wb) if wb is not None else cls(in_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(B, d, H, W)`` -> logits ``(B, C)``."""
        _check_features(x, self.in_dim, "LinearHead")
        return self.fc(x.mean(dim=(2, 3)))

    def forward_maps(self, x: Tensor) -> dict[str, Tensor]:
        """``{'scores': (B, 1, C, L), 'logits': (B, C)}``: the classifier at every location."""
        _check_features(x, self.in_dim, "LinearHead")
        s = torch.einsum("cd,bdl->bcl", self.fc.weight.to(x.dtype), x.flatten(2)) + self.fc.bias.to(x.dtype)[:, None]
        return {"scores": s[:, None], "logits": s.mean(dim=-1)}

    @property
    def head_info(self) -> dict:
        return {"kind": "linear", "heads": 1, "temperatures": None, "lam": None}

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_classes={self.num_classes}"



#: every trainable head kind and its class
HEADS: dict[str, type[nn.Module]] = {"csra": CSRAHead, "attention": AttentionPoolHead, "linear": LinearHead}
HEAD_KINDS = tuple(HEADS)
