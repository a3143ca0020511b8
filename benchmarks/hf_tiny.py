"""Tiny random-init ``transformers`` image classifiers, one per ``*ForImageClassification`` class.

Used by ``benchmarks/coverage.py --library transformers`` and ``tests/test_transformers_heads.py``.
Each config is shrunk to 1-2 layers, hidden sizes 8-64 and a 32-128 px input that leaves the
last stage a map of at least 2x2 locations, so it builds and runs in well under a second on a CPU.
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["TINY", "CANNOT_BUILD", "classifier_classes", "tiny_config", "tiny_model", "cannot_build_reason"]

_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)
_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)
_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
_STAGES4 = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
_SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)

#: model_type -> config kwargs (``image_size`` is also read by the wrapper as the input size).
TINY: dict[str, dict[str, Any]] = {
    "vit": _VIT, "deit": _VIT, "vit_msn": _VIT, "ijepa": _VIT,
    "beit": dict(_VIT, use_mean_pooling=True), "data2vec-vision": dict(_VIT, use_mean_pooling=False),
    "dinov2": dict(_VIT, mlp_ratio=2, intermediate_size=None),
    "dinov2_with_registers": dict(_VIT, mlp_ratio=2, num_register_tokens=2, intermediate_size=None),
    "clip": dict(vision_config=_VISION, text_config=_TEXT, projection_dim=16),
    "metaclip_2": dict(vision_config=_VISION, text_config=_TEXT, projection_dim=16),
    "siglip": dict(vision_config=_VISION, text_config=_TEXT),
    "siglip2": dict(vision_config=dict(_VISION, num_patches=16), text_config=_TEXT),
    "bit": dict(embedding_size=16, hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 1, 1], num_groups=8, image_size=64),
    "convnext": dict(_STAGES4, image_size=64), "convnextv2": dict(_STAGES4, image_size=64),
    "cvt": dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], image_size=64),
    "dinat": dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], kernel_size=3, dilations=[[1], [1]], image_size=32),
    "donut-swin": _SWIN, "swin": _SWIN, "swinv2": dict(_SWIN, pretrained_window_sizes=[0, 0]),
    "focalnet": dict(image_size=32, embed_dim=16, depths=[1, 1], hidden_sizes=[32, 64], focal_levels=[2, 2],
                     focal_windows=[3, 3]),
    "efficientnet": dict(image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
    "hgnet_v2": dict(image_size=64, embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                     stem_channels=[3, 8, 16], stage_in_channels=[16, 16, 32, 48],
                     stage_mid_channels=[8, 16, 16, 32], stage_out_channels=[16, 32, 48, 64],
                     stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[2, 2, 2, 2]),
    "hiera": dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=[64, 64]),
    "levit": dict(image_size=128, hidden_sizes=[16, 32, 48], num_attention_heads=[2, 4, 6], depths=[1, 1, 1],
                  key_dim=[8, 8, 8], down_ops=[["Subsample", 8, 2, 4, 2, 2], ["Subsample", 8, 4, 4, 2, 2]]),
    "mobilenet_v1": dict(depth_multiplier=0.25, image_size=64),
    "mobilenet_v2": dict(depth_multiplier=0.25, image_size=64),
    "mobilevit": dict(image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 64],
                      num_attention_heads=2),
    "mobilevitv2": dict(image_size=64, width_multiplier=0.25, n_attn_blocks=[1, 1, 1]),
    "perceiver": dict(image_size=16, num_latents=8, d_latents=32, num_self_attends_per_block=1,
                      num_self_attention_heads=1, num_cross_attention_heads=1),
    "poolformer": dict(_STAGES4, image_size=64),
    "pp_lcnet": dict(image_size=64, class_expand=64),
    "pvt": dict(_STAGES4, num_attention_heads=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], image_size=64),
    "pvt_v2": dict(_STAGES4, num_attention_heads=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], image_size=[64, 64]),
    "regnet": dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], groups_width=8,
                   image_size=64),
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic",
                   image_size=64),
    "segformer": dict(_STAGES4, num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16, image_size=64),
    "swiftformer": dict(depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], image_size=64),
    "textnet": dict(stem_out_channels=8, hidden_sizes=[8, 8, 16, 24, 32], image_size=[64, 64]),
    "imagegpt": dict(n_embd=32, n_layer=1, n_head=2, n_positions=64),  # built; the wrapper refuses it
    "timm_wrapper": dict(architecture="test_resnet", image_size=64),
}

#: model_type -> why it cannot be built on this machine (checked lazily, see :func:`cannot_build_reason`).
CANNOT_BUILD = {
    "dinat": "needs the natten package (neighbourhood-attention kernels), not installed",
    "shieldgemma2": "a Gemma-3 vision-language policy model (yes/no from LM logits): needs a text prompt with the "
                    "image, so it is not an image-tensor classifier; not built",
}


def classifier_classes() -> list[tuple[str, str]]:
    """Every ``(model_type, class name)`` in transformers' image-classification auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as m

    return [(k, c) for k, v in m.items() for c in (v if isinstance(v, (tuple, list)) else (v,))]


def cannot_build_reason(model_type: str) -> Optional[str]:
    if model_type == "dinat":
        from transformers.utils import is_natten_available

        return None if is_natten_available() else CANNOT_BUILD["dinat"]
    return CANNOT_BUILD.get(model_type)


def tiny_config(model_type: str, num_labels: int = 5, **overrides: Any):
    """A shrunk config of ``model_type`` (``KeyError`` for a type without a tiny recipe)."""
    from transformers import AutoConfig

    kw = {k: v for k, v in {**TINY[model_type], **overrides}.items() if v is not None}
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.num_labels = num_labels
    return cfg


def tiny_model(class_name: str, model_type: str, num_labels: int = 5, **overrides: Any):
    """``class_name`` built from :func:`tiny_config` with random init (seed 0; linear and conv layers
    re-initialised with PyTorch's defaults so that the logits are O(1)), eval mode, wrapped for patchcsra."""
    import torch
    import transformers

    from patchcsra.hf_models import HFImageClassifier

    cfg = tiny_config(model_type, num_labels, **overrides)
    cfg.architectures = [class_name]
    torch.manual_seed(0)
    hf = getattr(transformers, class_name)(cfg).eval()
    with torch.no_grad():  # PyTorch's default init: transformers' std=0.02 makes deep nets' logits ~1e-30
        for m in hf.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.reset_parameters()
    return HFImageClassifier(hf)
