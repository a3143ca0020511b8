"""Put a trainable head in place of a model's own pooling + classifier.

* :func:`linear_from_split` -- ``(W, b)`` of an exactly linear head, read off ``split.forward_single`` on the
  identity basis (any adapter: timm, torchvision, fx).
* :class:`HeadedClassifier` -- backbone features + a trainable head, an ordinary ``nn.Module``
  ``(B, 3, H, W) -> (B, C)`` that traces and exports.
* :func:`attach_head` -- discover a model's head and put a :data:`~patchcsra.training.heads.HEADS` head there.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import PatchCSRAError
from ..heads.base import HeadSplit, discover, locations_to_map, probe_input, set_eval, token_grid
from ..patcher import check_lam
from .heads import HEAD_KINDS, HEADS, _check_positive_int, _resolve_temperatures

__all__ = ["HeadedClassifier", "attach_head", "linear_from_split", "INIT_MODES"]

_logger = logging.getLogger(__name__)

INIT_MODES = ("pretrained", "random")


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
            grid = token_grid(int(f.shape[1]) - self.num_prefix_tokens, int(x.shape[-2]), int(x.shape[-1]))
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
    head = HEADS[kind].create(info.feature_dim, n_out, wb, heads=heads, lam=lam, temperatures=temperatures,
                              per_class_query=per_class_query)
    ref = _first_param(split)
    if ref is not None:
        head = head.to(ref.device)
    out = HeadedClassifier(split, head)
    out.init = "pretrained" if wb is not None else "random"
    return out.eval()

