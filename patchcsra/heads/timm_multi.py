"""Adapter for timm models with multi-branch features: CrossViT, CoaT (parallel), EfficientViM.

``forward_features`` returns a list of per-branch tensors and ``forward_head`` combines the branches:

* CrossViT: ``mean_b head_b(cls_b)`` (two token branches of different widths and grids),
* CoaT parallel (``coat_tiny/mini/small``): ``head(aggregate([cls_2, cls_3, cls_4]))`` (a Conv1d over the
  three class tokens of the 1/8, 1/16, 1/32 token grids),
* EfficientViM: ``sum_b w_b head_b(mean(f_b))`` over the three stages' hidden states ``(B, D_b, N_b)``
  (SSM state slots, not image positions) and the final map ``(B, D, L)``.

A location is a position ``p`` of the finest branch grid (``L`` = its number of tokens). Its score is the
residual principle applied to the whole multi-branch head: the model's own ``forward_head`` on features
where every token of every spatial branch ``b`` (prefix tokens included) equals that branch's token at
``p`` -- the token of its grid whose cell holds the centre of ``p``'s cell -- and every branch without
image positions (EfficientViM's hidden states) keeps its own value::

    s_p = forward_head([const(x_{1, n_1(p)}), ..., const(x_{B, n_B(p)})])          (B, C, L)

so the branches are combined exactly as the model combines them (CrossViT: ``s_p = mean_b head_b(
x_{b, n_b(p)})``). The patched logits are ``base + lam * max_p s_p`` (or the softmax attention over ``p``);
``base`` is the model's own path, so λ=0 is the model. Why one location per image position and not
``mean_b max_k s_{b,k}`` (each branch at its own best location): a per-branch max does not fit the
``(B, C, L)`` scores that the attention (finite T), the statistics and the maps of :mod:`patchcsra.explain`
share, and it lets a class add evidence from different places; here ``max_p s_p <= mean_b max_k s_{b,k}``
with equality when the branches' maxima fall on the same place.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import HeadNotFoundError, PatchCSRAError
from .base import HeadSplit, allclose_logits, cyclic_permutation, is_instance_of, register_adapter

__all__ = ["Branch", "BranchFeatures", "MultiBranchSplit", "nearest_cells"]

_logger = logging.getLogger(__name__)

KINDS = ("NLC", "NCL", "global")


@dataclass(frozen=True)
class Branch:
    """How one branch's features are read.

    ``kind``: ``'NLC'`` tokens ``(B, P + L, D)`` with ``P = num_prefix_tokens`` class tokens first; ``'NCL'``
    ``(B, D, L)``; ``'global'``: no image positions (held at the model's own value for every location).
    ``grid``: ``(h, w)`` of the ``L`` locations at the size the model was built for (``None``: square).
    """

    kind: str
    num_prefix_tokens: int = 0
    grid: Optional[tuple[int, int]] = None


class BranchFeatures(list):
    """The model's per-branch feature tensors (a plain list to the model's ``forward_head``).

    ``ndim = 0`` tells code that reads a feature tensor's rank (e.g. the grid lookup of
    :mod:`patchcsra.explain`) that this is not a map; use ``info.grid`` instead.
    """

    ndim = 0


def nearest_cells(src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """For each cell of an ``src`` grid (row-major), the ``dst`` cell holding its centre: ``(src_h * src_w,)``."""
    def axis(n: int, m: int) -> Tensor:
        return ((torch.arange(n, dtype=torch.float64) + 0.5) * m / n).floor().long().clamp_(0, m - 1)

    iy, ix = axis(src[0], dst[0]), axis(src[1], dst[1])
    return (iy[:, None] * dst[1] + ix[None, :]).reshape(-1)


class MultiBranchSplit(HeadSplit):
    """Split of a timm model whose ``forward_features`` returns one tensor per branch (module docstring).

    Args:
        model: the timm model (shared, not copied).
        branches: one :class:`Branch` per element of ``forward_features``'s list.
        pooling: the branches' pooling (``'token'``, ``'avg'``), for ``info``.
    """

    layout = "multi"
    multi_branch = True

    def __init__(self, model: nn.Module, branches: Sequence[Branch], pooling: str) -> None:
        super().__init__()
        bad = [b.kind for b in branches if b.kind not in KINDS]
        if bad or not any(b.kind != "global" for b in branches):
            raise ValueError(f"branches need kinds in {KINDS} and one with locations, got {[b.kind for b in branches]}")
        self.model = model
        self.branches = tuple(branches)
        self.pooling = pooling

    # ------------------------------------------------------------------ the three pieces
    def forward_features(self, x: Tensor) -> BranchFeatures:
        """``(B, 3, H, W)`` -> the model's per-branch tensors (a :class:`BranchFeatures` list)."""
        return BranchFeatures(self.model.forward_features(x))

    def forward_baseline(self, f: Sequence[Tensor]) -> Tensor:
        """Per-branch tensors -> ``(B, C)``: the model's own ``forward_head``."""
        return self.model.forward_head(BranchFeatures(f))

    def forward_single(self, v: Tensor) -> Tensor:
        raise PatchCSRAError(f"{type(self.model).__name__} has multi-branch features: a location holds one token "
                             "per branch; use forward_locations")

    def head_kind(self) -> str:
        """E.g. ``'multi2+token+Linear'`` (CrossViT), ``'multi4+avg+Linear(distilled)'`` (EfficientViM dist)."""
        try:
            clf = self.model.get_classifier()
        except Exception:  # noqa: BLE001
            clf = None
        groups = clf if isinstance(clf, tuple) else (clf,)
        names = []
        for g in groups:
            mods = list(g) if isinstance(g, (nn.ModuleList, list)) else [g]
            names.append("+".join(dict.fromkeys(type(m).__name__ for m in mods if m is not None)) or "head")
        kind = names[0] + ("(distilled)" if len(names) > 1 else "")
        return f"multi{len(self.branches)}+{self.pooling}+{kind}"

    # ------------------------------------------------------------------ locations
    def _tokens(self, t: Tensor, br: Branch) -> Tensor:
        """One branch's tensor -> its locations ``(B, L_b, D_b)``."""
        return t[:, br.num_prefix_tokens:] if br.kind == "NLC" else t.transpose(1, 2)

    def grids(self, f: Sequence[Tensor]) -> list[Optional[tuple[int, int]]]:
        """``(h, w)`` of each branch's locations (``None`` for global branches and unknown grids)."""
        out: list[Optional[tuple[int, int]]] = []
        for t, br in zip(f, self.branches):
            if br.kind == "global":
                out.append(None)
                continue
            n = int(self._tokens(t, br).shape[1])
            side = math.isqrt(n)
            if br.grid is not None and br.grid[0] * br.grid[1] == n:
                out.append((int(br.grid[0]), int(br.grid[1])))
            else:
                out.append((side, side) if side * side == n else None)
        return out

    def _reference(self, f: Sequence[Tensor]) -> int:
        """Index of the branch with the most locations (the finest grid; first on ties)."""
        sizes = [int(self._tokens(t, br).shape[1]) if br.kind != "global" else -1 for t, br in zip(f, self.branches)]
        return max(range(len(sizes)), key=lambda i: (sizes[i], -i))

    def cells(self, f: Sequence[Tensor]) -> tuple[int, list[Optional[Tensor]]]:
        """``(L, [index (L,) into branch b's locations, or None for a global branch])``.

        Raises:
            PatchCSRAError: two or more spatial branches and a grid that is not known.
        """
        ref = self._reference(f)
        n = int(self._tokens(f[ref], self.branches[ref]).shape[1])
        spatial = [i for i, br in enumerate(self.branches) if br.kind != "global"]
        grids = self.grids(f)
        if len(spatial) > 1 and any(grids[i] is None for i in spatial):
            shapes = [tuple(f[i].shape) for i in spatial]
            raise PatchCSRAError(f"{type(self.model).__name__}: cannot align the branches' locations {shapes} on one "
                                 "grid (not square and no grid known); use a square input")
        idx: list[Optional[Tensor]] = []
        for i, br in enumerate(self.branches):
            if br.kind == "global":
                idx.append(None)
            elif i == ref or len(spatial) == 1:
                idx.append(torch.arange(n))
            else:
                idx.append(nearest_cells(grids[ref], grids[i]))  # type: ignore[arg-type]
        return n, idx

    def _constant(self, t: Tensor, br: Branch, idx: Optional[Tensor], n: int) -> Tensor:
        """Branch features for ``B * n`` rows: row ``(i, p)`` is branch ``b`` of image ``i`` with every token equal
        to its token at location ``p`` (``P + 1`` tokens for NLC, one column for NCL); global: the branch as is."""
        b = t.shape[0]
        if br.kind == "global":
            return t[:, None].expand(b, n, *t.shape[1:]).reshape(b * n, *t.shape[1:])
        v = self._tokens(t, br)[:, idx.to(t.device)]                      # (B, n, D_b)
        v = v.reshape(b * n, 1, v.shape[-1])
        if br.kind == "NLC":
            return v.expand(-1, br.num_prefix_tokens + 1, -1)
        return v.transpose(1, 2)                                          # (B n, D_b, 1)

    def forward_locations(self, f: Sequence[Tensor]) -> Tensor:
        """Per-branch tensors -> ``s_p`` ``(B, C, L)``: the model's head with every branch constant at ``p``."""
        n, idx = self.cells(f)
        b = f[0].shape[0]
        z = [self._constant(t, br, i, n) for t, br, i in zip(f, self.branches, idx)]
        s = self.model.forward_head(BranchFeatures(z))                    # (B n, C)
        return s.reshape(b, n, -1).transpose(1, 2)

    # ------------------------------------------------------------------ validation
    def _with_tokens(self, f: Sequence[Tensor], new: dict[int, Tensor]) -> BranchFeatures:
        """``f`` with the locations of the branches in ``new`` replaced (``(B, L_b, D_b)`` each); prefix kept."""
        out = []
        for i, (t, br) in enumerate(zip(f, self.branches)):
            if i not in new:
                out.append(t)
            elif br.kind == "NLC":
                out.append(torch.cat([t[:, : br.num_prefix_tokens], new[i]], dim=1))
            else:
                out.append(new[i].transpose(1, 2))
        return BranchFeatures(out)

    def validate_locations(self, f: Sequence[Tensor], base: Tensor) -> tuple[str, dict]:
        """Checks on the probe: ``len(f)`` branches of the declared layouts; scores ``(B, C, L)``, ``L >= 2``;
        each branch's pooling symmetric in its own locations (permuted one branch at a time); the scores'
        shortcut (``P + 1`` tokens) equal to the head on full-size constant branches."""
        name = type(self.model).__name__
        if not isinstance(f, (list, tuple)) or len(f) != len(self.branches):
            return f"{name}: features are not {len(self.branches)} branch tensors", {}
        for t, br in zip(f, self.branches):
            if not isinstance(t, Tensor) or t.ndim != 3 or (br.kind == "NLC" and t.shape[1] <= br.num_prefix_tokens):
                return f"{name}: a branch of shape {getattr(t, 'shape', None)} does not fit layout {br.kind}", {}
        try:
            n, idx = self.cells(f)
        except PatchCSRAError as e:
            return str(e), {}
        s = self.forward_locations(f)
        if n < 2 or s.shape != (base.shape[0], base.shape[1], n):
            return f"per-location scores have shape {tuple(s.shape)}, expected {(base.shape[0], base.shape[1], n)}", {}
        g = torch.Generator().manual_seed(1)
        for i, (t, br) in enumerate(zip(f, self.branches)):
            if br.kind == "global":
                continue
            tok = self._tokens(t, br)
            perm = cyclic_permutation(tok.shape[1], g)
            if not allclose_logits(self.forward_baseline(self._with_tokens(f, {i: tok[:, perm]})), base, rel=1e-4):
                return (f"branch {i} of its head is not a global pooling (logits change when that branch's locations "
                        "are permuted), so a per-location classifier is not defined"), {}
        # the shortcut equals the head on full-size branches that are constant at location 0 (prefix tokens too)
        const = []
        for t, br, j in zip(f, self.branches, idx):
            if br.kind == "global":
                const.append(t[:1])
                continue
            v = self._tokens(t[:1], br)[:, j[:1]]                          # (1, 1, D_b)
            const.append(v.expand(1, t.shape[1], -1) if br.kind == "NLC" else v.transpose(1, 2).expand(1, -1, t.shape[2]))
        if not allclose_logits(self.forward_baseline(BranchFeatures(const)), s[:1, :, 0], rel=1e-4):
            return "its head on one location per branch differs from its head on constant branches", {}
        g = torch.Generator().manual_seed(2)
        f_rnd = BranchFeatures([(torch.randn(t.shape, generator=g) * max(float(t.float().std()), 1.0)
                                 + float(t.float().mean())).to(t.dtype) for t in f])
        exact_linear = allclose_logits(s.mean(-1), base, rel=1e-4) and allclose_logits(
            self.forward_locations(f_rnd).mean(-1), self.forward_baseline(f_rnd), rel=1e-4)
        grids = self.grids(f)
        widths = [int(t.shape[-1] if br.kind == "NLC" else t.shape[1]) for t, br in zip(f, self.branches)]
        notes = tuple(f"branch {i}: {br.kind} {tuple(t.shape[1:])}" + (f" on a {g_[0]}x{g_[1]} grid" if g_ else "")
                      for i, (t, br, g_) in enumerate(zip(f, self.branches, grids)))
        return "", dict(num_locations=n, grid=grids[self._reference(f)], feature_dim=sum(widths),
                        num_classes=int(base.shape[1]), exact_linear=exact_linear,
                        notes=notes + ("locations: the finest grid; each branch's token whose cell holds the centre",))


# ---------------------------------------------------------------------------- the three families
def _pair(v) -> Optional[tuple[int, int]]:
    try:
        a, b = (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))
    except (TypeError, ValueError, IndexError):
        return None
    return (a, b) if a > 0 and b > 0 else None


def _crossvit_branches(model: nn.Module) -> list[Branch]:
    out = []
    for pe in model.patch_embed:
        img, patch = _pair(getattr(pe, "img_size", None)), _pair(getattr(pe, "patch_size", None))
        grid = (img[0] // patch[0], img[1] // patch[1]) if img and patch else None
        out.append(Branch("NLC", 1, grid))
    return out


def _coat_branches(model: nn.Module) -> list[Branch]:
    return [Branch("NLC", 1, _pair(getattr(getattr(model, f"patch_embed{k}", None), "grid_size", None)))
            for k in (2, 3, 4)]


def _efficientvim_branches(model: nn.Module) -> list[Branch]:
    return [Branch("global") for _ in model.stages] + [Branch("NCL")]


_FAMILIES = (
    ("timm.models.crossvit", "CrossVit", _crossvit_branches),
    ("timm.models.coat", "CoaT", _coat_branches),
    ("timm.models.efficientvim", "EfficientViM", _efficientvim_branches),
)


def _family(model: nn.Module):
    for module, cls, fn in _FAMILIES:
        if is_instance_of(model, module, cls):
            return fn
    return None


def _matches(model: nn.Module) -> bool:
    fn = _family(model)
    if fn is _coat_branches:
        return getattr(model, "parallel_blocks", None) is not None and getattr(model, "aggregate", None) is not None
    return fn is not None


@register_adapter("timm-multi", priority=5, matches=_matches)
def build_timm_multi(model: nn.Module, x: Tensor) -> Iterator[HeadSplit]:
    """One candidate: the family's branch layout (validated like any split)."""
    fn = _family(model)
    if fn is None:  # pragma: no cover - matches() said yes
        return
    if not getattr(model, "global_pool", "token"):
        raise HeadNotFoundError(f"{type(model).__name__} has global_pool='' (no pooling); its output is not logits")
    pool = getattr(model, "global_pool", None)
    branches = fn(model)
    _logger.debug("timm-multi: %s with branches %s", type(model).__name__, branches)
    yield MultiBranchSplit(model, branches, pool if isinstance(pool, str) and pool else "avg")
