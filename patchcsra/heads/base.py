"""HeadSplit: the one abstraction every classifier is reduced to, and the adapter registry.

A classifier is ``features -> pooling -> head``. A :class:`HeadSplit` exposes three pieces:

* ``forward_features(x)``  image batch ``(B, 3, H, W)`` -> feature tensor ``f`` in the model's
  own layout: ``(B, D, H', W')`` (NCHW), ``(B, H', W', D)`` (NHWC) or ``(B, P + L, D)`` (NLC,
  ``P`` prefix tokens such as class/distillation/register tokens, then ``L`` patch tokens).
* ``forward_baseline(f)``  -> ``(B, C)``: the model's own logits (its pooling and head).
* ``forward_single(v)``    ``(N, D)`` -> ``(N, C)``: the model's own head applied to a feature
  set that holds one location only (the residual principle, DESIGN.md section 1).

From these, ``forward_locations(f)`` gives the per-location class scores ``(B, C, L)``. A split may
override ``forward_locations`` and ``validate_locations`` when its locations are not one symmetric map:
multi-branch features (a list of per-branch tensors, ``multi_branch = True``, layout ``'multi'``:
:mod:`patchcsra.heads.timm_multi`) and positional attention pooling (CLIP ResNets:
:class:`patchcsra.heads.timm.TimmAttentionPoolSplit`). Layout helpers:
:func:`to_locations` / :func:`from_locations` (``(B, L, D)``), :func:`locations_to_map` (``(B, D, H, W)``).

Adapters register themselves with :func:`register_adapter`; :func:`discover` walks them in
priority order and keeps the first split that passes validation (outputs equal to the model's
own, pooling symmetric in the locations, single-location head consistent with a constant map).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import HeadNotFoundError, PatchCSRAError

__all__ = [
    "HeadInfo", "HeadSplit", "Adapter", "register_adapter", "list_adapters", "discover",
    "to_locations", "from_locations", "locations_to_map", "token_grid", "LAYOUTS", "validate_single_map",
    "cyclic_permutation", "set_eval", "probe_input", "default_input_size", "allclose_logits", "sole_affine",
]

_logger = logging.getLogger(__name__)

LAYOUTS = ("NCHW", "NHWC", "NLC")


@dataclass(frozen=True)
class HeadInfo:
    """What discovery found. Shapes refer to the probe input ``(2, *probe_input_size)``."""

    adapter: str                      # adapter that split the model ('timm', 'fx', ...)
    model_class: str                  # e.g. 'timm.models.resnet.ResNet'
    kind: str                         # pooling + head modules, e.g. 'avg+Linear'
    pooling: str                      # 'avg', 'max', 'avgmax', 'token', 'map', ...
    layout: str                       # 'NCHW' | 'NHWC' | 'NLC' | 'multi' (per-branch tensors)
    num_prefix_tokens: int            # class/distillation/register tokens (NLC only)
    num_locations: int                # L at the probe size
    grid: Optional[tuple[int, int]]   # (H', W') of the feature map when known
    feature_dim: int                  # D
    num_classes: int                  # C
    exact_linear: bool                # baseline == mean_k s_k (the paper's y_avg identity)
    probe_input_size: tuple[int, int, int]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid) if self.grid else None
        d["probe_input_size"] = list(self.probe_input_size)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadInfo":
        d = dict(d)
        d["grid"] = tuple(d["grid"]) if d.get("grid") else None
        d["probe_input_size"] = tuple(d["probe_input_size"])
        d["notes"] = tuple(d.get("notes", ()))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def constant_features(v: Tensor, layout: str, num_prefix_tokens: int = 0) -> Tensor:
    """One location ``v (N, D)`` as a feature set of that layout where every location (and prefix token) is ``v``:
    ``(N, D, 1, 1)`` NCHW, ``(N, 1, 1, D)`` NHWC, ``(N, P + 1, D)`` NLC -- what a single-location head runs on."""
    if layout == "NCHW":
        return v[:, :, None, None]
    if layout == "NHWC":
        return v[:, None, None, :]
    return v[:, None, :].expand(-1, num_prefix_tokens + 1, -1)


def to_locations(f: Tensor, layout: str, num_prefix_tokens: int = 0) -> Tensor:
    """Feature tensor in ``layout`` -> locations ``(B, L, D)`` (prefix tokens dropped)."""
    if layout == "NCHW":
        return f.flatten(2).transpose(1, 2)
    if layout == "NHWC":
        return f.flatten(1, 2)
    if layout == "NLC":
        return f[:, num_prefix_tokens:]
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def from_locations(t: Tensor, like: Tensor, layout: str, prefix: Optional[Tensor] = None) -> Tensor:
    """Inverse of :func:`to_locations`: locations ``(B, L, D)`` -> tensor shaped like ``like``.

    For NLC, ``prefix`` ``(B, P, D)`` is put back in front of the locations.
    """
    if layout == "NCHW":
        return t.transpose(1, 2).reshape(like.shape)
    if layout == "NHWC":
        return t.reshape(like.shape)
    if layout == "NLC":
        return t if prefix is None or prefix.shape[1] == 0 else torch.cat([prefix, t], dim=1)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _affine_weights(layer: nn.Module) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """``(W (C, D), b (C,) or None)`` of an ``nn.Linear`` or of a 1x1, ungrouped, unpadded ``nn.Conv2d`` (what
    that layer computes on one location), else None. Views of the layer's own parameters, read at call time."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias
    if (isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1) and layer.groups == 1
            and not isinstance(layer.padding, str) and tuple(layer.padding) == (0, 0)):
        return layer.weight.flatten(1), layer.bias
    return None


# On CPU, oneDNN's 1x1 convolution on an NCHW map beats the copy + MKL GEMM from about this many rows (B·L) on
# (measured in benchmarks/overhead.py's notes: 1.25-1.4x faster at B=32, 7x7; slower at B <= 8)
_CONV_MIN_ROWS = 1024


def _tracing() -> bool:
    """Whether this forward is being traced (TorchScript) or compiled / exported (dynamo, torch.export): the
    shape-dependent CPU choice below stays out of graphs, which get the one F.linear."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting())


def _layer_locations(layer: nn.Module, t: Tensor, f: Optional[Tensor] = None) -> Tensor:
    """Locations ``t (B, L, D)`` -> ``layer`` on each ``(B, C, L)``: one ``F.linear`` over the ``B·L`` rows
    (``t`` of an NCHW map is a transposed view, copied once into a ``(B·L, D)`` block). On CPU, for an NCHW
    map ``f`` of at least ``_CONV_MIN_ROWS`` locations in all, the same layer as a 1x1 convolution on ``f``."""
    w, bias = _affine_weights(layer)  # type: ignore[misc]
    b, n, d = t.shape
    # the tracing test comes first, so an exported graph holds no guard on the shape test
    if f is not None and not _tracing() and f.ndim == 4 and f.is_cpu and b * n >= _CONV_MIN_ROWS:
        return nn.functional.conv2d(f, w[:, :, None, None], bias).flatten(2)
    return nn.functional.linear(t.reshape(b * n, d), w, bias).view(b, n, -1).transpose(1, 2)


def sole_affine(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """The one layer of ``module`` that holds parameters when it is an ``nn.Linear`` or a 1x1 ``nn.Conv2d``
    (``module`` itself, or a container whose other parts are parameter-free: flatten, dropout, identity), else
    None. Only a candidate: :func:`discover` checks that the single-location head computes exactly that layer."""
    if not isinstance(module, nn.Module):
        return None
    holders = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    if len(holders) != 1 or _affine_weights(holders[0]) is None:
        return None
    if any(True for _ in module.buffers()):  # e.g. a frozen norm's running statistics
        return None
    return holders[0]


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



def token_grid(n: int, height: int, width: int) -> Optional[tuple[int, int]]:
    """The ``(h, w)`` with ``h * w == n`` closest to the image's aspect ratio (None: square)."""
    if height == width:
        return None
    gh = max(1, round(math.sqrt(n * height / width)))
    for cand in (gh, gh - 1, gh + 1):
        if cand > 0 and n % cand == 0:
            return cand, n // cand
    return None




class HeadSplit(nn.Module):
    """A classifier split into features, its own pooling head, and a single-location head.

    Subclasses implement ``forward_features``, ``forward_baseline`` and ``forward_single``.
    ``info`` is filled in by :func:`discover` after validation.
    """

    layout: str = "NCHW"
    num_prefix_tokens: int = 0
    pooling: str = "avg"
    multi_branch: bool = False        # features are a list of per-branch tensors (see heads.timm_multi)

    def __init__(self) -> None:
        super().__init__()
        self.info: Optional[HeadInfo] = None
        # (layer,) when discover() verified that forward_single IS that affine layer (see linear_head): then
        # forward_locations runs it once on all locations; a plain tuple, so no second copy in state_dict
        self._fast_head: tuple = ()

    def forward_features(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> f
        raise NotImplementedError

    def forward_baseline(self, f: Tensor) -> Tensor:  # f -> (B, C)
        raise NotImplementedError

    def forward_single(self, v: Tensor) -> Tensor:  # (N, D) -> (N, C)
        raise NotImplementedError

    def head_kind(self) -> str:
        return self.pooling

    def linear_head(self) -> Optional[nn.Module]:
        """The model's own classifier layer (``nn.Linear`` or 1x1 ``nn.Conv2d``) when the single-location head
        may be just that layer, else None (default). A candidate only: :func:`discover` turns the fast path of
        :meth:`forward_locations` on after checking ``forward_single(v) == layer(v)`` on random features, and
        the path is left again if the model's classifier is later replaced (``linear_head()`` is another one)."""
        return None

    @property
    def fast_path(self) -> bool:
        """Whether :meth:`forward_locations` runs the classifier layer once on all locations now (in eval mode,
        after :func:`discover` verified the layer, while ``linear_head()`` is still that layer)."""
        fast = self.__dict__.get("_fast_head", ())
        return bool(fast) and not self.training and self.linear_head() is fast[0]

    def forward_locations(self, f: Tensor) -> Tensor:
        """Per-location class scores ``s_k = head(x_k)``: f -> ``(B, C, L)``.

        When the head on one location is exactly one affine layer ``W v + b`` (:attr:`fast_path`), the scores
        are that layer applied once to the ``(B, L, D)`` locations -- one GEMM over ``B·L`` rows -- instead of
        the model's head module called on ``B·L`` one-location maps; the values are the same matmul."""
        t = to_locations(f, self.layout, self.num_prefix_tokens)
        if self.fast_path:
            return _layer_locations(self._fast_head[0], t, f if self.layout == "NCHW" else None)
        b, n, d = t.shape
        s = self.forward_single(t.reshape(b * n, d))
        return s.reshape(b, n, -1).transpose(1, 2)

    def validate_locations(self, f: Tensor, base: Tensor) -> tuple[str, dict]:
        """Checks of the per-location scores on the probe's features ``f`` and logits ``base`` ``(B, C)``.

        Returns ``('', facts)`` (``num_locations``, ``grid``, ``feature_dim``, ``num_classes``,
        ``exact_linear``) or ``(reason, {})``. Default: :func:`validate_single_map`; a split whose
        locations are not one symmetric map (multi-branch, positional attention pooling) overrides it.
        """
        return validate_single_map(self, f, base)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_baseline(self.forward_features(x))


@dataclass(frozen=True)
class Adapter:
    """A way to split one family of models. ``build`` raises HeadNotFoundError with a reason."""

    name: str
    priority: int
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module, Tensor], Iterable[HeadSplit]]


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str, *, priority: int, matches: Callable[[nn.Module], bool]):
    """Decorator: register ``build(model, probe) -> iterable of candidate HeadSplits``.

    Candidates are validated in order; the first that passes wins. Lower priority runs first.
    """

    def deco(build: Callable[[nn.Module, Tensor], Iterable[HeadSplit]]):
        if name in _ADAPTERS:
            raise ValueError(f"adapter {name!r} is already registered; choose another name")
        _ADAPTERS[name] = Adapter(name, priority, matches, build)
        return build

    return deco


def is_instance_of(model: nn.Module, module: str, name: str) -> bool:
    """``isinstance(model, module.name)`` without importing anything: a model made from a class of ``module`` means
    that module is loaded already, so an unloaded (or absent) one answers False (and ``import timm``, about 2 s
    with torchvision, is never paid to learn it)."""
    import sys

    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(model, cls)


def list_adapters() -> list[Adapter]:
    """Registered adapters in the order discovery tries them (the package face, :mod:`patchcsra.heads`,
    imports the built-in ones; this registry knows none of them)."""
    return sorted(_ADAPTERS.values(), key=lambda a: (a.priority, a.name))


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(3, H, W)`` from the model's pretrained config (timm style), else ``(3, 224, 224)``."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        c, h, w = cfg["input_size"][-3:]
        return int(c), int(h), int(w)
    src = getattr(model, "patchcsra_source", None)
    if isinstance(src, dict) and src.get("input_size"):
        return tuple(int(v) for v in src["input_size"])  # type: ignore[return-value]
    return 3, 224, 224


def probe_input(input_size: Sequence[int], batch: int = 2, dtype: torch.dtype = torch.float32) -> Tensor:
    """A deterministic probe batch ``(batch, C, H, W)`` (seeded normal noise).

    Raises:
        PatchCSRAError: the probe would not fit: a forward pass needs on the order of 64x its input in
            activations, and more than the machine's memory is refused before anything is allocated.
    """
    need = 64 * batch * int(torch.tensor(list(input_size)).prod()) * torch.finfo(dtype).bits // 8
    have = _memory_bytes()
    if have and need > have:
        raise PatchCSRAError(f"input_size={tuple(input_size)}: a forward pass at this size needs about "
                             f"{need / 2 ** 30:.0f} GiB (64x the input), more than this machine's {have / 2 ** 30:.0f} "
                             "GiB; choose a smaller --img-size / --input-size", param="input_size")
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_size, generator=g, dtype=dtype)


def _memory_bytes() -> int:
    """Physical memory of this machine (0 when unknown)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def allclose_logits(a: Tensor, b: Tensor, rel: float = 1e-5) -> bool:
    """The λ=0 contract: ``max|a-b| <= rel * max(1, max|b|)``."""
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return float((a.float() - b.float()).abs().max()) <= rel * scale if a.numel() else True


def set_eval(model: nn.Module) -> nn.Module:
    """``model.eval()``, tolerating modules that refuse mode changes (``torch.export`` modules)."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


def _model_output(model: nn.Module, x: Tensor) -> Tensor:
    y = model(x)
    if isinstance(y, (tuple, list)) and len(y) >= 1 and all(isinstance(t, Tensor) for t in y):
        y = y[0]  # e.g. torchvision GoogLeNet/Inception named tuples in eval return a tensor
    if not isinstance(y, Tensor):
        raise HeadNotFoundError(
            f"{type(model).__name__} returns {type(y).__name__}, not a logits tensor (B, C)")
    return y


def _validate(split: HeadSplit, model: nn.Module, x: Tensor, y: Tensor) -> tuple[bool, str, dict]:
    """Check a candidate split on the probe. Returns (ok, reason, facts).

    Common to every split: its baseline reproduces ``model(x)`` and the logits are ``(B, C)``; the
    per-location checks are the split's own (:meth:`HeadSplit.validate_locations`)."""
    f = split.forward_features(x)
    if not isinstance(f, Tensor) and not split.multi_branch:
        return False, f"features are a {type(f).__name__}, not one tensor (multi-branch model)", {}
    base = split.forward_baseline(f)
    if not allclose_logits(base, y):
        return False, "its pooling head applied to its features does not reproduce model(x)", {}
    if y.ndim != 2:
        return False, f"logits have shape {tuple(y.shape)}, expected (B, C)", {}
    reason, facts = split.validate_locations(f, base)
    if not reason:
        enable_fast_path(split, f)
    return (not reason), reason, facts


def enable_fast_path(split: HeadSplit, f: Tensor) -> bool:
    """Turn on the one-GEMM path of :meth:`HeadSplit.forward_locations` when ``split.linear_head()`` is a layer
    that computes exactly what ``forward_single`` does -- checked on random features at two scales and on the
    probe's features ``f`` (same values as the module path, to ``1e-5``) -- else leave it off. Splits that
    override ``forward_locations`` (multi-branch, positional attention pooling) keep their own."""
    split._fast_head = ()
    if split.multi_branch or type(split).forward_locations is not HeadSplit.forward_locations:
        return False
    layer = split.linear_head()
    wb = _affine_weights(layer) if isinstance(layer, nn.Module) else None
    if wb is None or not isinstance(f, Tensor):
        return False
    t = to_locations(f, split.layout, split.num_prefix_tokens)
    if t.ndim != 3 or t.shape[-1] != wb[0].shape[1]:
        return False
    g = torch.Generator().manual_seed(3)
    scale = max(float(t.float().std()), 1.0)
    for k in (1.0, 100.0):
        v = (torch.randn((8, t.shape[-1]), generator=g) * (k * scale)).to(t.dtype)
        if not allclose_logits(nn.functional.linear(v, *wb), split.forward_single(v)):
            return False
    if not allclose_logits(_layer_locations(layer, t), split.forward_locations(f)):
        return False
    if split.layout == "NCHW" and f.is_cpu:  # the 1x1-convolution form too, on enough copies of the probe
        big = f.repeat(-(-_CONV_MIN_ROWS // max(1, t.shape[0] * t.shape[1])), 1, 1, 1)
        if not allclose_logits(_layer_locations(layer, to_locations(big, "NCHW"), big), split.forward_locations(big)):
            return False
    split._fast_head = (layer,)
    return True


def cyclic_permutation(n: int, generator: torch.Generator) -> Tensor:
    """A random permutation of ``n`` locations that moves every one of them (one n-cycle, ``n >= 2``), so a head
    that reads a fixed position (a class token taken for a location) cannot pass the symmetry check by luck."""
    p = torch.randperm(n, generator=generator)
    q = torch.empty_like(p)
    q[p] = p.roll(-1)
    return q


def validate_single_map(split: HeadSplit, f: Tensor, base: Tensor) -> tuple[str, dict]:
    """The checks of a split whose features are one map or token tensor ``f`` and whose baseline is ``base``
    ``(B, C)``: at least two locations, scores ``(B, C, L)``, pooling symmetric in the locations, single-location
    head equal to the head on a constant map. Returns ``('', facts)`` or ``(reason, {})``."""
    t = to_locations(f, split.layout, split.num_prefix_tokens)
    if t.ndim != 3 or t.shape[1] < 2:
        return (f"features of shape {tuple(f.shape)} hold {t.shape[1] if t.ndim == 3 else 0} "
                "spatial location(s); the patch needs a map (try a larger input_size)"), {}
    b, n, d = t.shape
    s = split.forward_locations(f)
    if s.shape != (b, base.shape[1], n):
        return f"per-location scores have shape {tuple(s.shape)}, expected {(b, base.shape[1], n)}", {}
    prefix = f[:, : split.num_prefix_tokens] if split.layout == "NLC" else None
    if n > 1:
        # (a) global pooling is symmetric: permuting locations leaves the logits unchanged.
        perm = cyclic_permutation(n, torch.Generator().manual_seed(1))
        f_perm = from_locations(t[:, perm], f, split.layout, prefix)
        if not allclose_logits(split.forward_baseline(f_perm), base, rel=1e-4):
            return ("its head is not a global pooling (logits change when locations are "
                    "permuted), so a per-location classifier is not defined"), {}
        # (b) the single-location head equals the head on a map where every location is x_0.
        v = t[:1, :1]
        f_const = from_locations(v.expand(1, n, d), f[:1], split.layout,
                                 v.expand(1, prefix.shape[1], d) if prefix is not None else None)
        if not allclose_logits(split.forward_single(v[0]), split.forward_baseline(f_const), rel=1e-4):
            return "its head on one location differs from its head on a constant map", {}
    # linearity is a property of the head, not of the probe: test it on varied random features
    g = torch.Generator().manual_seed(2)
    t_rnd = (torch.randn(t.shape, generator=g, dtype=torch.float32) * max(float(t.float().std()), 1.0)
             + t.float().mean()).to(t.dtype)
    f_rnd = from_locations(t_rnd, f, split.layout, prefix)
    exact_linear = allclose_logits(s.mean(-1), base, rel=1e-4) and allclose_logits(
        split.forward_locations(f_rnd).mean(-1), split.forward_baseline(f_rnd), rel=1e-4)
    grid = None
    if split.layout == "NCHW":
        grid = (int(f.shape[2]), int(f.shape[3]))
    elif split.layout == "NHWC":
        grid = (int(f.shape[1]), int(f.shape[2]))
    return "", dict(num_locations=n, grid=grid, feature_dim=d, num_classes=int(base.shape[1]),
                    exact_linear=exact_linear)


def discover(model: nn.Module, *, input_size: Optional[Sequence[int]] = None) -> HeadSplit:
    """Split ``model`` into features and head; raise HeadNotFoundError naming why if impossible.

    Args:
        model: any classifier ``(B, 3, H, W) -> (B, C)``; it is put in eval mode.
        input_size: ``(C, H, W)`` of the probe used for validation; default from the model's
            pretrained config, else ``(3, 224, 224)``.
    """
    set_eval(model)
    size = tuple(int(v) for v in (input_size or default_input_size(model)))
    x = probe_input(size)
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    reasons: list[str] = []
    with torch.no_grad():
        try:
            y = _model_output(model, x)
        except HeadNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the user's model on the probe
            raise HeadNotFoundError(
                f"{type(model).__name__}: forward on a probe of shape {tuple(x.shape)} failed "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "pass input_size=(C, H, W) that the model accepts") from e
        if isinstance(y, Tensor) and y.is_floating_point() and not bool(torch.isfinite(y).all()):
            bad = [n for n, p in model.named_parameters()
                   if p.is_floating_point() and not bool(torch.isfinite(p).all())]
            where = f"its parameters {', '.join(bad[:3])} hold NaN/inf" if bad else "check its weights and layers"
            raise HeadNotFoundError(f"{type(model).__name__}: the model returns NaN/inf logits on a finite probe "
                                    f"input ({where}); fix or re-export the weights")
        for adapter in list_adapters():
            if not adapter.matches(model):
                continue
            try:
                for cand in adapter.build(model, x):
                    try:
                        ok, reason, facts = _validate(cand, model, x, y)
                    except Exception as e:  # noqa: BLE001 - a candidate that cannot run is rejected
                        ok, reason, facts = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", {}
                    if ok:
                        set_eval(cand)
                        cand.info = HeadInfo(
                            adapter=adapter.name, model_class=name, kind=cand.head_kind(),
                            pooling=cand.pooling, layout=cand.layout,
                            num_prefix_tokens=cand.num_prefix_tokens,
                            probe_input_size=size, **facts)  # type: ignore[arg-type]
                        _logger.debug("adapter %s split %s: %s", adapter.name, name, cand.info)
                        return cand
                    reasons.append(f"{adapter.name}: {reason}")
            except HeadNotFoundError as e:
                reasons.append(f"{adapter.name}: {e}")
    uniq = list(dict.fromkeys(reasons)) or ["no adapter matches this model"]
    raise HeadNotFoundError(f"{type(model).__name__}: cannot split into features and a pooling "
                            f"classifier head: {'; '.join(uniq)}")


