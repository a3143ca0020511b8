"""Adapter for ``transformers`` image classifiers wrapped by :class:`patchcsra.hf_models.HFImageClassifier`.

Most ``*ForImageClassification`` models are ``backbone(pixel_values) -> last_hidden_state`` followed by a
pooling and a ``classifier``. A *recipe* (one per head design, not per model) says how to take the
features ``f`` and how the model's own ``forward`` turns them into logits:

* token heads (``NLC``, ``P`` prefix tokens): class token (ViT, DeiT, PVT), class + distillation tokens
  averaged (DeiT with teacher), ``cat[CLS, mean(patches)]`` (DINOv2), the backbone's pooler (BEiT,
  Data2Vec), mean of patch tokens (CLIP), mean of all tokens (SigLIP, I-JEPA, LeViT), LayerNorm'd tokens
  average-pooled (Swin, FocalNet);
* Hiera (``NHWC``): its last tokens rerolled from mask-unit order to the map, average pool then LayerNorm;
* map heads (``NCHW``): the backbone's pooler (ResNet, RegNet, BiT, MobileNet, EfficientNet), mean then
  LayerNorm (ConvNeXt), norm then mean (PoolFormer, SwiftFormer), mean (MobileViT, PVTv2, SegFormer), pool
  then a 1x1 conv (PP-LCNet).

``forward_baseline(f)`` is the model's own pooling + head code, so the split is exact at λ=0 by
construction; ``forward_single(v)`` is the same head on a feature set where every location is ``v``
(``(N, D, 1, 1)``, or ``P + 1`` copies of the token): the residual principle, as for timm models.
A norm that the model applies after the pool (ConvNeXt, Hiera) is thus applied per location.
:func:`patchcsra.heads.base.discover` validates every candidate.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from ..errors import HeadNotFoundError
from .base import HeadSplit, constant_features, is_instance_of, register_adapter

__all__ = ["HFSplit", "Recipe", "RECIPES", "FAMILIES"]

_logger = logging.getLogger(__name__)

Features = Callable[[nn.Module, dict], Tensor]          # (hf model, its keyword inputs) -> f
Head = Callable[[nn.Module, Tensor], Tensor]            # (hf model, f) -> (B, C)


@dataclass(frozen=True)
class Recipe:
    """One head design: how to get the features and how the model pools + classifies them.

    ``prefix(hf, f, x)`` gives the number of prefix tokens (NLC only); ``modules(hf)`` the head's
    modules in order, for :meth:`HFSplit.head_kind`.
    """

    name: str
    layout: str
    pooling: str
    head: Head
    modules: Callable[[nn.Module], list]
    prefix: Optional[Callable[[nn.Module, Tensor, Tensor], int]] = None  # None: no prefix tokens
    features: Optional[Features] = None   # None: the backbone's last_hidden_state


# --------------------------------------------------------------------------- features
def backbone(hf: nn.Module) -> nn.Module:
    """The ``*Model`` inside ``hf`` (``hf.vit``, ``hf.convnext``, ``hf.vision_model`` ...)."""
    from transformers import PreTrainedModel

    m = getattr(hf, getattr(hf, "base_model_prefix", "") or "", None)
    if isinstance(m, nn.Module) and m is not hf:
        return m
    for child in hf.children():
        if isinstance(child, PreTrainedModel):
            return child
    raise HeadNotFoundError(f"{type(hf).__name__}: no backbone model found among its children")


def _last_hidden(hf: nn.Module, inputs: dict) -> Tensor:
    return backbone(hf)(**inputs, return_dict=True)[0]


def _cvt_features(hf: nn.Module, inputs: dict) -> Tensor:
    """CvT: ``(B, 1 + L, D)`` = [class token of the last stage, its map's tokens] (class-token configs)
    or the last map ``(B, D, H, W)``."""
    out = backbone(hf)(**inputs, return_dict=True)
    if hf.config.cls_token[-1]:
        return torch.cat([out[1], out[0].flatten(2).transpose(1, 2)], dim=1)
    return out[0]


def _hiera_features(hf: nn.Module, inputs: dict) -> Tensor:
    """Hiera: the last stage's tokens are in mask-unit order; rerolled to the map ``(B, H, W, D)``."""
    enc = backbone(hf).encoder
    return enc.reroll(_last_hidden(hf, inputs), stage_idx=len(hf.config.depths) - 1)


def _encoder_features(hf: nn.Module, inputs: dict) -> Tensor:
    """HGNetV2: ``encoder(embedder(x))``; PP-LCNet: ``encoder(x)`` -> the last map ``(B, D, H, W)``."""
    x = inputs["pixel_values"]
    emb = getattr(hf, "embedder", None)
    if emb is not None:
        x = emb(x)
    return hf.encoder(x, return_dict=True)[0]


# --------------------------------------------------------------------------- prefix counts
def _patch_prefix(hf: nn.Module, f: Tensor, x: Tensor) -> int:
    """Tokens in front of the patch grid: ``L_total - (H / p) * (W / p)``."""
    cfg = getattr(hf.config, "vision_config", None) or hf.config
    p = getattr(cfg, "patch_size", None)
    p = p[0] if isinstance(p, (list, tuple)) else p
    if not p or x.ndim != 4:
        return 1
    return max(0, int(f.shape[1]) - (int(x.shape[-2]) // int(p)) * (int(x.shape[-1]) // int(p)))


def _one(hf, f, x) -> int:
    return 1


def _two(hf, f, x) -> int:
    return 2


def _cvt_prefix(hf, f, x) -> int:
    return 1 if hf.config.cls_token[-1] else 0


# --------------------------------------------------------------------------- heads
def _drop(hf: nn.Module, z: Tensor) -> Tensor:
    d = getattr(hf, "dropout", None)
    return d(z) if isinstance(d, nn.Module) else z


def _head_cls(hf, f):
    return hf.classifier(f[:, 0, :])


def _head_cls_dist(hf, f):
    return (hf.cls_classifier(f[:, 0, :]) + hf.distillation_classifier(f[:, 1, :])) / 2


def _head_cls_mean(hf, f):
    p = 1 + int(getattr(hf.config, "num_register_tokens", 0) or 0)
    return hf.classifier(torch.cat([f[:, 0], f[:, p:].mean(dim=1)], dim=1))


def _head_mean_patch(hf, f):
    return hf.classifier(torch.mean(f[:, 1:, :], dim=1))


def _head_mean_all(hf, f):
    return hf.classifier(torch.mean(f, dim=1))


def _head_levit(hf, f):
    z = f.mean(1)
    if hasattr(hf, "classifier_distill"):
        return (hf.classifier(z) + hf.classifier_distill(z)) / 2
    return hf.classifier(z)


def _head_token_pooler(hf, f):
    """BEiT/Data2Vec ``pooler(tokens)``: LayerNorm(mean of the patch tokens), or the class token."""
    return hf.classifier(backbone(hf).pooler(f))


def _head_hiera(hf, f):
    """Hiera: ``pooler`` = avg over the tokens ``(B, HW, D)`` then LayerNorm (the order of the mean differs
    from the model's own mask-unit order: equal up to float round-off)."""
    return hf.classifier(backbone(hf).pooler(f.flatten(1, 2)))


def _head_avg1d(hf, f):
    """Swin/Swinv2/DonutSwin/FocalNet: ``AdaptiveAvgPool1d`` over the (normed) tokens ``(B, L, D)``."""
    return hf.classifier(torch.flatten(backbone(hf).pooler(f.transpose(1, 2)), 1))


def _head_avg1d_nhwc(hf, f):
    """DiNAT/NAT: tokens ``(B, H, W, D)``."""
    return hf.classifier(torch.flatten(backbone(hf).pooler(f.flatten(1, 2).transpose(1, 2)), 1))


def _head_map_pooler(hf, f):
    """ResNet/RegNet/BiT/MobileNet/EfficientNet: the backbone's pooler module on the map ``(B, D, H, W)``."""
    z = backbone(hf).pooler(f)
    return hf.classifier(_drop(hf, z.reshape(z.shape[:2])))


def _head_map_mean(hf, f):
    return hf.classifier(_drop(hf, torch.mean(f, dim=[-2, -1], keepdim=False)))


def _head_map_mean_ln(hf, f):
    return hf.classifier(backbone(hf).layernorm(f.mean([-2, -1])))


def _head_norm_map_mean(hf, f):
    return hf.classifier(hf.norm(f).mean([-2, -1]))


def _head_swiftformer(hf, f):
    z = hf.norm(f).flatten(2).mean(-1)
    return (hf.head(z) + hf.dist_head(z)) / 2


def _head_seq_mean(hf, f):
    """PVTv2/SegFormer: ``(B, D, H, W)`` -> ``(B, HW, D)`` -> mean."""
    b = f.shape[0]
    if f.ndim == 4:
        if getattr(hf.config, "reshape_last_stage", True):
            f = f.permute(0, 2, 3, 1)
        f = f.reshape(b, -1, hf.config.hidden_sizes[-1])
    return hf.classifier(f.mean(dim=1))


def _head_list(hf, f):
    """TextNet/HGNetV2: ``for layer in classifier: f = layer(f)`` (avg pool, flatten), then ``fc``."""
    for layer in hf.classifier:
        f = layer(f)
    return hf.fc(f)


def _head_pp_lcnet(hf, f):
    z = hf.act_fn(hf.last_convolution(hf.avg_pool(f)))
    return hf.head(hf.flatten(z * (1 - hf.hidden_dropout_prob)))


def _head_cvt(hf, f):
    if hf.config.cls_token[-1]:
        z = hf.layernorm(f[:, :1])
    else:
        b, c, h, w = f.shape
        z = hf.layernorm(f.view(b, c, h * w).permute(0, 2, 1))
    return hf.classifier(z.mean(dim=1))


# --------------------------------------------------------------------------- the recipe table
class _Mods:
    """``hf -> [modules]`` named by dotted paths (``<backbone>`` is the backbone); picklable."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def __call__(self, hf: nn.Module) -> list:
        out = []
        for n in self.names:
            obj = hf
            for part in n.split("."):
                obj = backbone(obj) if part == "<backbone>" else getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, nn.Module):
                out.append(obj)
        return out


_mods = _Mods


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("cls", "NLC", "token", _head_cls, _mods("classifier"), _patch_prefix),
    Recipe("cls-dist", "NLC", "token", _head_cls_dist, _mods("cls_classifier", "distillation_classifier"), _two),
    Recipe("cls-mean", "NLC", "token+avg", _head_cls_mean, _mods("classifier"), _patch_prefix),
    Recipe("token-pooler", "NLC", "token", _head_token_pooler, _mods("<backbone>.pooler.layernorm", "classifier"),
           _patch_prefix),
    Recipe("mean-patch", "NLC", "avg", _head_mean_patch, _mods("classifier"), _one),
    Recipe("mean-all", "NLC", "avg", _head_mean_all, _mods("classifier")),
    Recipe("levit", "NLC", "avg", _head_levit, _mods("classifier", "classifier_distill")),
    Recipe("avg1d", "NLC", "avg", _head_avg1d, _mods("classifier")),
    Recipe("hiera", "NHWC", "avg", _head_hiera, _mods("<backbone>.pooler.layernorm", "classifier"),
           features=_hiera_features),
    Recipe("avg1d-nhwc", "NHWC", "avg", _head_avg1d_nhwc, _mods("classifier")),
    Recipe("map-pooler", "NCHW", "avg", _head_map_pooler, _mods("classifier")),
    Recipe("map-mean", "NCHW", "avg", _head_map_mean, _mods("classifier")),
    Recipe("map-mean-ln", "NCHW", "avg", _head_map_mean_ln, _mods("<backbone>.layernorm", "classifier")),
    Recipe("norm-map-mean", "NCHW", "avg", _head_norm_map_mean, _mods("norm", "classifier")),
    Recipe("swiftformer", "NCHW", "avg", _head_swiftformer, _mods("norm", "head", "dist_head")),
    Recipe("seq-mean", "NCHW", "avg", _head_seq_mean, _mods("classifier")),
    Recipe("list", "NCHW", "avg", _head_list, _mods("fc")),
    Recipe("hgnet", "NCHW", "avg", _head_list, _mods("fc"), features=_encoder_features),
    Recipe("pp-lcnet", "NCHW", "avg", _head_pp_lcnet, _mods("last_convolution", "head"), features=_encoder_features),
    Recipe("cvt", "NLC", "token", _head_cvt, _mods("layernorm", "classifier"), _cvt_prefix, features=_cvt_features),
]}

#: ``config.model_type`` (and class-name overrides) -> recipe name.
FAMILIES: dict[str, str] = {
    "vit": "cls", "deit": "cls", "vit_msn": "cls", "pvt": "cls",
    "DeiTForImageClassificationWithTeacher": "cls-dist",
    "dinov2": "cls-mean", "dinov2_with_registers": "cls-mean",
    "beit": "token-pooler", "data2vec-vision": "token-pooler",
    "clip": "mean-patch", "metaclip_2": "mean-patch",
    "siglip": "mean-all", "siglip2": "mean-all", "ijepa": "mean-all",
    "levit": "levit",
    "swin": "avg1d", "swinv2": "avg1d", "donut-swin": "avg1d", "focalnet": "avg1d",
    "hiera": "hiera", "dinat": "avg1d-nhwc", "nat": "avg1d-nhwc",
    "resnet": "map-pooler", "regnet": "map-pooler", "bit": "map-pooler", "mobilenet_v1": "map-pooler",
    "mobilenet_v2": "map-pooler", "efficientnet": "map-pooler",
    "mobilevit": "map-mean", "mobilevitv2": "map-mean",
    "convnext": "map-mean-ln", "convnextv2": "map-mean-ln",
    "poolformer": "norm-map-mean", "swiftformer": "swiftformer",
    "pvt_v2": "seq-mean", "segformer": "seq-mean",
    "textnet": "list", "hgnet_v2": "hgnet", "pp_lcnet": "pp-lcnet",
    "cvt": "cvt",
}

#: model types whose logits do not come from a pooling over image locations.
REFUSED: dict[str, str] = {
    "perceiver": ("classifies a latent array through a cross-attention decoder; its latents are not image "
                  "locations, so per-location scores are not defined"),
}

#: tried in order for a model type missing from FAMILIES (validation keeps the one that reproduces it).
_FALLBACK_NLC = ("cls", "mean-all", "avg1d", "token-pooler", "cls-mean", "mean-patch")
_FALLBACK_NCHW = ("map-pooler", "map-mean", "map-mean-ln", "norm-map-mean", "list")


class HFSplit(HeadSplit):
    """Split of an :class:`~patchcsra.hf_models.HFImageClassifier` by a :class:`Recipe`.

    Features: ``(B, D, H, W)`` (NCHW), ``(B, H, W, D)`` (NHWC) or ``(B, P + L, D)`` (NLC), as the
    model's classifier reads them. ``model`` is the wrapper (shared, not copied).
    """

    def __init__(self, model: nn.Module, recipe: Recipe, num_prefix_tokens: int = 0,
                 layout: Optional[str] = None) -> None:
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.layout = layout or recipe.layout
        self.num_prefix_tokens = int(num_prefix_tokens) if self.layout == "NLC" else 0
        self.pooling = recipe.pooling

    def forward_features(self, x: Tensor) -> Tensor:
        inputs = self.model.hf_inputs(x)
        if self.recipe.features is not None:
            return self.recipe.features(self.model.hf, inputs)
        return _last_hidden(self.model.hf, inputs)

    def forward_baseline(self, f: Tensor) -> Tensor:
        return self.recipe.head(self.model.hf, f)

    def forward_single(self, v: Tensor) -> Tensor:
        return self.recipe.head(self.model.hf, constant_features(v, self.layout, self.num_prefix_tokens))

    def head_kind(self) -> str:
        parts = [self.pooling]
        for m in self.recipe.modules(self.model.hf):
            kids = [c for c in m.children()] if isinstance(m, nn.Sequential) else [m]
            for c in kids:
                if not isinstance(c, (nn.Identity, nn.Flatten, nn.Dropout)) and any(True for _ in c.parameters()):
                    parts.append(type(c).__name__)
        distilled = self.recipe.name in ("cls-dist", "swiftformer") or (
            self.recipe.name == "levit" and hasattr(self.model.hf, "classifier_distill"))
        return "+".join(parts) + ("(distilled)" if distilled else "")


def _is_hf(model: nn.Module) -> bool:
    return is_instance_of(model, "patchcsra.hf_models", "HFImageClassifier")


def _recipe_names(model: nn.Module) -> list[str]:
    hf = model.hf
    for key in (type(hf).__name__, getattr(hf.config, "model_type", None)):
        if key in FAMILIES:
            return [FAMILIES[key]]
    return []


@register_adapter("transformers", priority=3, matches=_is_hf)
def build_hf(model: nn.Module, x: Tensor) -> Iterator[HeadSplit]:
    """Candidates for a wrapped ``transformers`` classifier: its family's recipe, else generic ones."""
    hf = model.hf
    family = getattr(hf.config, "model_type", "")
    if family in REFUSED:
        raise HeadNotFoundError(f"{type(hf).__name__} {REFUSED[family]}")
    if family == "timm_wrapper":
        yield from _timm_wrapper(model, x)
        return
    names = _recipe_names(model)
    if not names:
        f = HFSplit(model, RECIPES["cls"]).forward_features(x)
        names = list(_FALLBACK_NCHW if f.ndim == 4 else _FALLBACK_NLC)
        _logger.info("%s: model type %r has no recipe; trying %s", type(hf).__name__, family, ", ".join(names))
    for name in names:
        recipe = RECIPES[name]
        if recipe.layout == "NLC":
            probe = HFSplit(model, recipe)
            f = probe.forward_features(x)
            if f.ndim != 3:
                continue
            split = HFSplit(model, recipe, recipe.prefix(hf, f, x) if recipe.prefix else 0)
            if name == "token-pooler" and getattr(hf.config, "use_mean_pooling", False):
                split.pooling = "avg"  # BEiT/Data2Vec pooler: LayerNorm(mean of the patch tokens)
            yield split
        else:
            yield HFSplit(model, recipe)


def _head_timm(hf, f):
    return hf.timm_model.forward_head(f)


def _no_modules(hf) -> list:
    return []


class _TimmWrapperSplit(HFSplit):
    """``TimmWrapperForImageClassification``: the timm model's ``forward_features``/``forward_head``."""

    def __init__(self, model: nn.Module, layout: str, num_prefix_tokens: int) -> None:
        from .timm import _pool_name

        super().__init__(model, Recipe("timm", layout, _pool_name(model.hf.timm_model), _head_timm, _no_modules),
                         num_prefix_tokens, layout)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.hf.timm_model.forward_features(x)

    def head_kind(self) -> str:
        from .timm import TimmSplit

        return TimmSplit(self.model.hf.timm_model, self.layout, self.num_prefix_tokens).head_kind()


def _timm_wrapper(model: nn.Module, x: Tensor) -> Iterator[HeadSplit]:
    from .timm import _layouts, _prefix_candidates

    tm = model.hf.timm_model
    f = tm.forward_features(x)
    if f.ndim == 4:
        for layout in _layouts(tm, f):
            yield _TimmWrapperSplit(model, layout, 0)
    elif f.ndim == 3:
        for p in _prefix_candidates(tm, f):
            yield _TimmWrapperSplit(model, "NLC", p)
