"""Trainable heads: CSRA / multi-head CSRA and PatchConvNet-style attention pooling.

The training-free patch (:mod:`patchcsra.patcher`) reuses the model's own head. The modules here
*replace* the pooling + head of a pretrained classifier with a trainable head on its feature map
``(B, d, H, W)``, initialised from the pretrained classifier wherever its head is affine on one
location (a Linear / 1x1 conv, with or without a class token in front).

Options (one small function or ``nn.Module`` each):

* :data:`TEMPERATURE_SETS` -- the paper's fixed temperatures per number of heads
  (§3.4): H=1 {1}, 2 {1, ∞}, 4 {1, 2, 4, ∞}, 6 {1..5, ∞}, 8 {1..7, ∞}; ``inf`` is max pooling
  (the official code writes it as ``T = 99``).
* :func:`class_scores` -- per-head, per-location scores ``s^h_k = (W_h / ||rows of W_h||) x_k``
  ``(B, H, C, L)``: one bias-free 1x1 classifier per head with every class row L2-normalised (§3.4).
* :func:`attention_weights` / :func:`attention_logits` -- ``softmax_k(T s_k)`` (eq. 2) and
  ``y_att(T) = sum_k softmax_k(T s_k) s_k`` (eq. 7); ``T = inf`` gives one-hot argmax / ``max_k s_k``.
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
* :func:`locations_to_map` -- a :class:`~patchcsra.heads.HeadSplit`'s features in layout
  NCHW / NHWC / NLC -> ``(B, d, H, W)`` (NLC: prefix tokens dropped, tokens put on the grid).
* :func:`linear_from_split` -- ``(W, b)`` of an exactly linear head, read off
  ``split.forward_single`` on the identity basis (any adapter: timm, torchvision, fx).
* :class:`HeadedClassifier` -- backbone features + a trainable head, an ordinary ``nn.Module``
  ``(B, 3, H, W) -> (B, C)`` that traces and exports.
* :func:`attach_head` -- discover a model's head and put a CSRA / attention head in its place.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import PatchCSRAError
from .patcher import check_lam
from .heads.base import HeadSplit, discover, probe_input, register_adapter, set_eval, to_locations

__all__ = [
    "TEMPERATURE_SETS", "class_scores", "attention_weights", "attention_logits", "CSRAHead",
    "AttentionPoolHead", "LinearHead", "locations_to_map", "linear_from_split", "HeadedClassifier", "attach_head",
]

_logger = logging.getLogger(__name__)

INF = math.inf

#: The paper's temperature sequences (§3.4), keyed by the number of heads H.
TEMPERATURE_SETS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (1.0, INF),
    4: (1.0, 2.0, 4.0, INF),
    6: (1.0, 2.0, 3.0, 4.0, 5.0, INF),
    8: (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, INF),
}

HEAD_KINDS = ("csra", "attention", "linear")
INIT_MODES = ("pretrained", "random")
LAYOUTS = ("NCHW", "NHWC", "NLC")


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


def attention_weights(scores: Tensor, temperature: float) -> Tensor:
    """Eq. (2): ``softmax_k(T s_k)`` over the last axis; ``T = inf``: one-hot at ``argmax_k s_k``."""
    if math.isinf(temperature):
        return F.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(scores.dtype)
    return torch.softmax(scores * temperature, dim=-1)


def attention_logits(scores: Tensor, temperature: float) -> Tensor:
    """Eq. (7): ``y_att(T) = sum_k softmax_k(T s_k) s_k`` over the last axis; ``T = inf``: ``max_k s_k``."""
    if math.isinf(temperature):
        return scores.amax(dim=-1)
    return (torch.softmax(scores * temperature, dim=-1) * scores).sum(dim=-1)


def _temperature_str(t: float) -> object:
    return "inf" if math.isinf(t) else float(t)


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

    def forward_scores(self, x: Tensor) -> Tensor:
        """Features ``(B, d, H, W)`` -> per-head, per-location scores ``(B, H, C, L)``."""
        _check_features(x, self.in_dim, "CSRAHead")
        return class_scores(x, self.weight)

    def _logits(self, s: Tensor) -> Tensor:
        att = torch.stack([attention_logits(s[:, h], t) for h, t in enumerate(self.temperatures)], dim=1)
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
        return {"kind": "csra", "heads": self.heads, "temperatures": [_temperature_str(t) for t in self.temperatures],
                "lam": self.lam, "normalized": True}

    def extra_repr(self) -> str:
        ts = ", ".join("inf" if math.isinf(t) else f"{t:g}" for t in self.temperatures)
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


# ----------------------------------------------------------------------------- features and models
def _square_side(n: int) -> Optional[int]:
    r = math.isqrt(n)
    return r if r * r == n else None


def locations_to_map(f: Tensor, layout: str, num_prefix_tokens: int = 0,
                     grid: Optional[tuple[int, int]] = None) -> Tensor:
    """A split's features in its own layout -> a map ``(B, d, H, W)``.

    Args:
        f: ``(B, d, H, W)`` (NCHW), ``(B, H, W, d)`` (NHWC) or ``(B, P + L, d)`` (NLC).
        layout: ``'NCHW'``, ``'NHWC'`` or ``'NLC'``.
        num_prefix_tokens: P, the class/distillation/register tokens dropped (NLC only).
        grid: ``(H, W)`` of the L tokens (NLC only; maps carry their own); ``None``: square.
    """
    if layout not in LAYOUTS:
        raise PatchCSRAError(f"layout={layout!r} is unknown; give one of {', '.join(LAYOUTS)}")
    want = 3 if layout == "NLC" else 4
    if not isinstance(f, Tensor) or f.ndim != want:
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise PatchCSRAError(f"features of shape {shape} do not fit layout={layout!r}; expected a {want}-D tensor")
    if layout == "NCHW":
        return f
    if layout == "NHWC":
        return f.permute(0, 3, 1, 2)
    t = to_locations(f, layout, int(num_prefix_tokens))                   # (B, L, d)
    n = int(t.shape[1])
    if grid is None:
        side = _square_side(n)
        if side is None:
            raise PatchCSRAError(f"grid=None but the {n} tokens after {num_prefix_tokens} prefix token(s) are not "
                                 "a square; pass grid=(H, W)")
        grid = (side, side)
    gh, gw = int(grid[0]), int(grid[1])
    if gh * gw != n:
        raise PatchCSRAError(f"grid={tuple(grid)} holds {gh * gw} locations but the features have {n} tokens "
                             f"after {num_prefix_tokens} prefix token(s); pass the token grid (H, W)")
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)


def _token_grid(n: int, height: int, width: int) -> Optional[tuple[int, int]]:
    """The ``(h, w)`` with ``h * w == n`` closest to the image's aspect ratio (None: square)."""
    if height == width:
        return None
    gh = max(1, round(math.sqrt(n * height / width)))
    for cand in (gh, gh - 1, gh + 1):
        if cand > 0 and n % cand == 0:
            return cand, n // cand
    return None


def _first_param(module: nn.Module) -> Optional[Tensor]:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t
    return None


@torch.no_grad()
def linear_from_split(split: HeadSplit, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """``(W (C, d), b (C,))`` of an exactly linear head: ``forward_single(I_d) - forward_single(0) = W^T``.

    Works for any adapter (timm, torchvision, fx); raises PatchCSRAError if the recovered map does
    not reproduce ``forward_single`` on random features (the head is not affine).
    """
    info = split.info
    if info is None:
        raise PatchCSRAError("split has no info; get it from patchcsra.heads.discover(model)")
    d = int(info.feature_dim)
    ref = _first_param(split)
    dev = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    b = split.forward_single(torch.zeros(1, d, device=dev, dtype=dtype)).float()[0]
    eye = torch.eye(d, device=dev, dtype=dtype)
    wt = torch.cat([split.forward_single(eye[i:i + chunk]).float() - b for i in range(0, d, chunk)])
    w = wt.t().contiguous()
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4, d, generator=g).to(dev, dtype)
    got, want = v.float() @ w.t() + b, split.forward_single(v).float()
    scale = max(1.0, float(want.abs().max()))
    if float((got - want).abs().max()) > 1e-4 * scale:
        raise PatchCSRAError(f"the head of {info.model_class} ({info.kind}) is not affine; use init='random'")
    return w, b


class HeadedClassifier(nn.Module):
    """A backbone's features with a trainable head: ``x (B, 3, H, W) -> (B, C)``.

    Args:
        split: from :func:`patchcsra.heads.discover` (its model is shared, not copied; the model's
            own pooling and classifier are bypassed).
        head: any module ``(B, d, H, W) -> (B, C)``, e.g. :class:`CSRAHead`, :class:`AttentionPoolHead`.
    """

    def __init__(self, split: HeadSplit, head: nn.Module) -> None:
        super().__init__()
        if not isinstance(split, HeadSplit) or split.info is None:
            raise PatchCSRAError(f"split is a {type(split).__name__} without discovery info; "
                                 "get it from patchcsra.heads.discover(model)")
        self.split = split
        self.head = head
        self.layout = split.info.layout
        self.num_prefix_tokens = int(split.info.num_prefix_tokens)
        self.init = "random"
        self._backbone_names: Optional[tuple[str, ...]] = None

    @property
    def info(self):
        return self.split.info

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` -> feature map ``(B, d, H', W')``."""
        f = self.split.forward_features(x)
        grid = None
        if self.layout == "NLC":
            grid = _token_grid(int(f.shape[1]) - self.num_prefix_tokens, int(x.shape[-2]), int(x.shape[-1]))
        return locations_to_map(f, self.layout, self.num_prefix_tokens, grid)

    def forward_head(self, f: Tensor) -> Tensor:
        """Feature map ``(B, d, H', W')`` -> logits ``(B, C)``."""
        return self.head(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_maps(self, x: Tensor) -> dict[str, Tensor]:
        """The head's maps (see ``head.forward_maps``) plus ``'grid'``: ``(H', W')`` as a long tensor."""
        f = self.forward_features(x)
        out = dict(self.head.forward_maps(f))
        out["grid"] = torch.tensor(f.shape[-2:], dtype=torch.long)
        return out

    @property
    def head_info(self) -> dict:
        """Facts for run records: head kind, heads, temperatures, λ, init, plus the split's facts."""
        hi = getattr(self.head, "head_info", None)
        d = dict(hi) if isinstance(hi, dict) else {"kind": type(self.head).__name__, "heads": None,
                                                    "temperatures": None, "lam": None}
        info = self.split.info
        d.update(init=self.init, exact_linear=info.exact_linear, feature_dim=info.feature_dim,
                 num_classes=info.num_classes, layout=info.layout, model_class=info.model_class,
                 replaced_head=info.kind, adapter=info.adapter)
        return d

    def _backbone_parameter_names(self) -> tuple[str, ...]:
        """Names of the split's parameters that ``forward_features`` uses (one eval-mode probe backward)."""
        if self._backbone_names is None:
            params = [(n, p) for n, p in self.split.named_parameters() if p.requires_grad]
            ref = _first_param(self.split)
            x = probe_input(self.split.info.probe_input_size, batch=1)
            if ref is not None:
                x = x.to(ref.device, ref.dtype)
            modes = [(m, m.training) for m in self.split.modules()]
            set_eval(self.split)
            saved = [p.grad for _, p in params]
            for _, p in params:
                p.grad = None
            try:
                with torch.enable_grad():
                    f = self.split.forward_features(x)
                    used = torch.autograd.grad(f.float().sum(), [p for _, p in params], allow_unused=True)
            finally:
                for (_, p), g in zip(params, saved):
                    p.grad = g
                for m, mode in modes:
                    m.training = mode
            self._backbone_names = tuple(n for (n, _), g in zip(params, used) if g is not None)
        return self._backbone_names

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters the features depend on: the replaced head's are left out, so DDP
        (``find_unused_parameters=False``) and optimizers see only parameters that get gradients."""
        names = set(self._backbone_parameter_names())
        return [p for n, p in self.split.named_parameters() if n in names]

    def head_parameters(self) -> list[nn.Parameter]:
        """The new head's parameters (the paper trains them at 10x the backbone's learning rate)."""
        return list(self.head.parameters())

    def extra_repr(self) -> str:
        return f"layout={self.layout}, init={self.init}"


def attach_head(model: nn.Module, kind: str = "csra", *, heads: int = 1, lam: Optional[float] = None,
                temperatures: Optional[Sequence[float]] = None, input_size: Optional[Sequence[int]] = None,
                init: str = "pretrained", per_class_query: bool = True,
                class_index: Optional[Sequence[int]] = None, num_classes: Optional[int] = None) -> HeadedClassifier:
    """Replace ``model``'s pooling + classifier with a trainable CSRA or attention-pooling head.

    Args:
        model: any classifier :func:`patchcsra.heads.discover` can split (shared, not copied).
        kind: ``'csra'`` (:class:`CSRAHead`), ``'attention'`` (:class:`AttentionPoolHead`) or
            ``'linear'`` (:class:`LinearHead`, GAP + Linear; ``heads`` and ``lam`` do not apply).
        heads: CSRA heads H (1, 2, 4, 6, 8, or any with ``temperatures``); attention: ``num_heads``.
        lam: λ; ``None`` takes 0.1 for CSRA (the official default) and 0 for attention pooling.
        temperatures: CSRA only, one T per head (``inf`` = max); default the paper's set for H.
        input_size: ``(C, H, W)`` of the discovery probe; default from the model's config.
        init: ``'pretrained'`` starts from the model's own classifier ``(W, b)``, read off its
            single-location head (:func:`linear_from_split`), whenever that head is affine: a Linear
            / 1x1 conv after average pooling (``info.exact_linear``: the attention head then equals
            the model at init) and also a class-token ViT's Linear, applied to the patch tokens as
            the training-free patch does. Heads with a norm or non-linearity after pooling
            (ConvNeXt, MobileNetV3, ViT ``fc_norm``) fall back to random init with a logged
            warning. ``'random'``: fresh weights.
        per_class_query: attention only: one query per class, or one shared query.

    Returns:
        A :class:`HeadedClassifier` in eval mode; ``.head_info`` records kind, heads, T, λ and init.
    """
    if kind not in HEAD_KINDS:
        raise PatchCSRAError(f"kind={kind!r} is unknown; give one of {', '.join(HEAD_KINDS)}")
    if init not in INIT_MODES:
        raise PatchCSRAError(f"init={init!r} is unknown; give one of {', '.join(INIT_MODES)}")
    if kind != "csra" and temperatures is not None:
        raise PatchCSRAError(f"temperatures apply to kind='csra' only; drop temperatures for kind={kind!r}")
    lam = (0.1 if kind == "csra" else 0.0) if lam is None else check_lam(lam)
    if kind == "csra":
        _resolve_temperatures(_check_positive_int(heads, "heads"), temperatures)  # fail before discovery
    split = discover(model, input_size=input_size)
    info = split.info
    assert info is not None
    wb: Optional[tuple[Tensor, Tensor]] = None
    if init == "pretrained":
        try:
            wb = linear_from_split(split)
        except PatchCSRAError:
            _logger.warning("%s: its head (%s) is not affine on one location, so the %s head starts from random "
                            "weights (pass init='random' to silence this)", info.model_class, info.kind, kind)
    n_out = info.num_classes
    if class_index is not None:  # another label set: keep the pretrained rows of the mapped outputs
        idx = torch.as_tensor([int(i) for i in class_index], dtype=torch.long)
        if len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= info.num_classes:
            raise PatchCSRAError(f"class_index must hold output indices in [0, {info.num_classes})")
        n_out = len(idx)
        if wb is not None:
            wb = (wb[0][idx], wb[1][idx])
    elif num_classes is not None and int(num_classes) != info.num_classes:
        n_out, wb = int(num_classes), None  # a new label set with no mapping: a fresh head
    if kind == "linear":
        head: nn.Module = LinearHead.from_linear(*wb) if wb is not None else LinearHead(info.feature_dim, n_out)
    elif kind == "csra":
        head = (CSRAHead.from_linear(wb[0], wb[1], heads, lam, temperatures) if wb is not None else
                           CSRAHead(info.feature_dim, n_out, heads, lam, temperatures=temperatures))
    else:
        head = (AttentionPoolHead.from_linear(wb[0], wb[1], per_class_query, num_heads=heads, lam=lam)
                if wb is not None else
                AttentionPoolHead(info.feature_dim, n_out, per_class_query=per_class_query,
                                  num_heads=heads, lam=lam))
    ref = _first_param(split)
    if ref is not None:
        head = head.to(ref.device)
    out = HeadedClassifier(split, head)
    out.init = "pretrained" if wb is not None else "random"
    return out.eval()


# ----------------------------------------------------------------------------- discovery of trained heads
class HeadedSplit(HeadSplit):
    """A :class:`HeadedClassifier` seen as a pooling classifier, so the sweep/report code evaluates it.

    Features are its ``(B, d, H, W)`` map, the baseline is its trained head, and the single-location head
    is that head on a ``1 x 1`` map (CSRA and attention pooling are permutation-invariant pools).
    """

    layout = "NCHW"
    pooling = "trained"

    def __init__(self, model: HeadedClassifier) -> None:
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


@register_adapter("patchcsra-head", priority=1, matches=lambda m: isinstance(m, HeadedClassifier))
def _build_headed(model: nn.Module, x: Tensor):
    yield HeadedSplit(model)  # type: ignore[arg-type]
