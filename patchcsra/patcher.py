"""The training-free CSRA patch: ``y = y_base + lam * y_att(T)``.

* :func:`residual_attention` -- ``(B, C, L)`` per-location scores -> ``(B, C)``;
  ``T = inf`` gives ``max_k s_k`` (the paper's four lines), finite ``T`` gives
  ``sum_k softmax_k(T s_k) s_k`` (eq. 5-7 of the paper).
* :class:`PatchedClassifier` -- wraps a :class:`~patchcsra.heads.HeadSplit`; ``lam`` is a buffer
  (so it survives export and can be changed after patching), ``temperature`` a plain float.
* :func:`patch` -- discover the head of any classifier and return the patched module.
* :func:`default_lam` -- the paper's fixed λ: 0.02 for ResNets, 0.2 otherwise.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import PatchCSRAError
from .heads import HeadInfo, HeadSplit, discover
from .heads.probe import resolve_input_size

__all__ = ["residual_attention", "attention_weights", "PatchedClassifier", "patch", "describe", "default_lam",
           "check_lam", "check_temperature", "check_temperatures", "temperature_text", "temperature_json"]


def check_lam(lam: float, name: str = "lam") -> float:
    """λ must be a finite number >= 0."""
    try:
        v = float(lam)
    except (TypeError, ValueError):
        raise PatchCSRAError(f"{name}={lam!r} is not a number; give a finite λ >= 0, e.g. 0.2", param=name) from None
    if not math.isfinite(v) or v < 0:
        raise PatchCSRAError(f"{name}={lam!r} is invalid; give a finite λ >= 0, e.g. 0.2", param=name)
    return v


def check_temperature(t: float, name: str = "temperature") -> float:
    """T must be > 0; ``inf`` means max pooling over locations."""
    try:
        v = float(t)
    except (TypeError, ValueError):
        raise PatchCSRAError(f"{name}={t!r} is not a number; give T > 0 or 'inf'", param=name) from None
    if math.isnan(v) or v <= 0:
        raise PatchCSRAError(f"{name}={t!r} is invalid; give T > 0 or 'inf' (max over locations)", param=name)
    return v


def check_temperatures(ts: Sequence[float], name: str = "temperatures") -> tuple[float, ...]:
    """A non-empty list of T > 0 (``inf`` allowed), checked once, as floats."""
    out = tuple(check_temperature(t, name) for t in ts)
    if not out:
        raise PatchCSRAError(f"{name} is empty; give at least one T > 0 or 'inf'", param=name)
    return out


def temperature_text(t: float) -> str:
    """``'inf'`` or ``f'{t:g}'``: how a temperature is written in messages, tables and file names."""
    return "inf" if math.isinf(t) else f"{float(t):g}"


def temperature_json(t: float) -> object:
    """``'inf'`` (JSON has no infinity) or ``float(t)``: how a temperature is stored in records."""
    return "inf" if math.isinf(t) else float(t)


def attention_weights(scores: Tensor, temperature: float) -> Tensor:
    """Eq. (2): ``softmax_k(T s_k)`` over the last axis ``(..., L)``; ``T = inf``: one-hot at the first argmax."""
    if math.isinf(temperature):
        return torch.zeros_like(scores).scatter_(-1, scores.argmax(dim=-1, keepdim=True), 1.0)
    return torch.softmax(_scaled(scores, temperature), dim=-1)


def _scaled(scores: Tensor, temperature: float) -> Tensor:
    """``T * (s - max_k s)``: the same softmax as ``T * s``, and no NaN for a huge finite T (1e308 in float32):
    T is capped at the dtype's largest number, so the max location gets ``0`` and the others ``-inf``."""
    t = min(float(temperature), float(torch.finfo(scores.dtype).max))
    return (scores - scores.amax(dim=-1, keepdim=True)) * t


def residual_attention(scores: Tensor, temperature: float = math.inf) -> Tensor:
    """Eq. (7), class-specific attention over locations: ``(..., L)`` -> ``(...)``, e.g. ``(B, C, L) -> (B, C)``.

    ``T = inf``: ``max_k s_k``; otherwise ``sum_k softmax_k(T * s_k) * s_k``.
    """
    if math.isinf(temperature):
        return scores.amax(dim=-1)
    w = torch.softmax(_scaled(scores, temperature), dim=-1)
    return (w * scores).sum(dim=-1)


def default_lam(model: nn.Module) -> float:
    """The paper's fixed λ (Table 1): 0.02 for ResNet-family models, 0.2 for every other model.

    The family is what the model is, recorded when it was loaded (``patchcsra_source['family']``: the timm /
    torchvision name, the class a TorchScript module was scripted from, the library modules of a ``.pt2``
    graph), so a ResNet gets 0.02 from a state dict, a pickle, TorchScript or ``.pt2`` alike.
    """
    from .sources import model_family

    target = model
    split = getattr(model, "split", None)
    inner = getattr(split, "model", None)
    if isinstance(inner, nn.Module):
        target = inner
    src = getattr(model, "patchcsra_source", None) or getattr(target, "patchcsra_source", None)
    family = src.get("family") if isinstance(src, dict) else None
    return 0.02 if "resne" in str(family or model_family(target)).lower() else 0.2


class PatchedClassifier(nn.Module):
    """``x (B, 3, H, W) -> y_base + lam * y_att(T)  (B, C)``; at ``lam = 0`` exactly the model.

    Args:
        split: a validated :class:`HeadSplit` (from :func:`patchcsra.heads.discover`).
        lam: residual weight λ >= 0; change it later with ``patched.lam = 0.1``.
        temperature: ``inf`` (max over locations, the 4-line patch) or a finite T > 0.
    """

    def __init__(self, split: HeadSplit, lam: float, temperature: float = math.inf) -> None:
        super().__init__()
        self.split = split
        self.register_buffer("_lam", torch.tensor(check_lam(lam), dtype=torch.float64))
        self.temperature = check_temperature(temperature)
        self.probe_guessed = False  # True when the probe size was a guess (see heads.probe.resolve_input_size)

    @property
    def lam(self) -> float:
        return float(self._lam)

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam.fill_(check_lam(value))

    @property
    def info(self) -> HeadInfo:
        assert self.split.info is not None
        return self.split.info

    def forward_pass(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The one pass every use shares: images ``(B, 3, H, W)`` -> features (the split's layout),
        the model's own logits ``(B, C)`` and the per-location scores ``(B, C, L)``."""
        f = self.split.forward_features(x)
        return f, self.split.forward_baseline(f), self.split.forward_locations(f)

    def forward(self, x: Tensor) -> Tensor:
        _, base, s = self.forward_pass(x)
        att = residual_attention(s, self.temperature)
        return base + self._lam.to(base.dtype) * att.to(base.dtype)

    def forward_scores(self, x: Tensor, temperatures: Sequence[float] = (math.inf,)) -> dict[str, Tensor]:
        """Everything a λ/T sweep needs from one forward pass.

        Returns ``{'base': (B, C), 'max': (B, C), 'att': (B, C, len(temperatures))}``.
        """
        _, base, s = self.forward_pass(x)
        att = torch.stack([residual_attention(s, float(t)) for t in temperatures], dim=-1)
        return {"base": base, "max": s.amax(dim=-1), "att": att}

    def extra_repr(self) -> str:
        i = self.split.info
        kind = f", head={i.kind}, adapter={i.adapter}" if i else ""
        return f"lam={self.lam:g}, temperature={temperature_text(self.temperature)}{kind}"


def patch(model: nn.Module, lam: Optional[float] = None, temperature: float = math.inf, *,
          input_size: Optional[Sequence[int]] = None) -> PatchedClassifier:
    """Rewrite ``model``'s head into ``model(x) + lam * y_att(T)``.

    Args:
        model: any classifier ``(B, 3, H, W) -> (B, C)`` (timm, torchvision, TorchScript, your own);
            it is put in eval mode and shared (not copied) by the result.
        lam: λ >= 0; ``None`` takes :func:`default_lam` (0.02 ResNets, 0.2 otherwise).
        temperature: ``inf`` for ``max_k s_k`` (default), or T > 0 for softmax attention.
        input_size: ``(C, H, W)`` of the probe used to find and check the head; default from the model's
            config, else ``(3, 224, 224)`` with one warning (``patched.probe_guessed`` is then True).

    Returns:
        A :class:`PatchedClassifier` with the same input and output shape as ``model``.

    Raises:
        HeadNotFoundError: the head cannot be split (message names the model class and why).
    """
    meta = getattr(model, "patchcsra_meta", None)
    if isinstance(meta, dict) and meta.get("kind") == "trained-head":
        raise PatchCSRAError("this file holds a model with a trained CSRA/attention head (patchcsra train-head); "
                             "its record is in .patchcsra_meta; evaluate the trained model in Python "
                             "(train_head(...).model) with sweep_lambda")
    if isinstance(model, PatchedClassifier) or meta:
        raise PatchCSRAError(f"{type(model).__name__} is already patched; change its .lam instead")
    check_temperature(temperature)
    lam = default_lam(model) if lam is None else check_lam(lam)
    size, guessed = resolve_input_size(model, input_size)
    split = discover(model, input_size=size)
    patched = PatchedClassifier(split, lam, temperature).eval()
    patched.probe_guessed = guessed
    return patched


def describe(model: nn.Module, *, input_size: Optional[Sequence[int]] = None) -> HeadInfo:
    """What discovery finds in ``model`` (head kind, layout, locations, linearity), without patching."""
    if isinstance(model, PatchedClassifier):
        return model.info
    meta = getattr(model, "patchcsra_meta", None)
    if meta and meta.get("kind") == "trained-head":
        raise PatchCSRAError("a model with a trained head (patchcsra train-head): its record is .patchcsra_meta "
                             "(CLI: patchcsra describe FILE prints it)")
    if meta:
        return HeadInfo.from_dict(meta["head"])
    size, _ = resolve_input_size(model, input_size)
    info = discover(model, input_size=size).info
    assert info is not None
    return info
