"""The shared real ImageNet MobileNetV2 (../shared/weights/MANIFEST.md section 4), as a user brings it.

torchvision's ``mobilenet_v2(num_classes=1001)`` (output 0 is TF-Slim's background class) with TF "SAME"
padding on its five stride-2 3x3 convolutions: each becomes timm's ``Conv2dSame`` (dynamic SAME padding,
0 before / 1 after on even inputs) holding the same parameters, so the state-dict keys do not change and
the checkpoint loads with ``strict=True``. Inputs are ``(p - 128) / 128``, i.e. mean = std = 128/255::

    patchcsra sweep-lambda ../shared/weights/mobilenet_v2_1.0_224_quant_float.safetensors \\
        --arch benchmarks/mobilenet_tf.py:mobilenet_v2_tf_same --data VOCdevkit --split val ...

This file is not part of the patchcsra package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from torch import nn

SAME_STRIDE2 = ("features.0.0", "features.2.conv.1.0", "features.4.conv.1.0", "features.7.conv.1.0",
                "features.14.conv.1.0")
WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2_1.0_224_quant_float.safetensors"
TRANSFORM = dict(crop_pct=0.875, interpolation="bilinear", mean=(128 / 255,) * 3, std=(128 / 255,) * 3)


def mobilenet_v2_tf_same(num_classes: int = 1001) -> nn.Module:
    """Untrained torchvision MobileNetV2 with TF "SAME" stride-2 convolutions (same keys as torchvision's)."""
    import torchvision
    from timm.layers import Conv2dSame

    model = torchvision.models.mobilenet_v2(num_classes=num_classes)
    for name in SAME_STRIDE2:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = Conv2dSame(old.in_channels, old.out_channels, old.kernel_size, old.stride, 0, old.dilation,
                         old.groups, old.bias is not None)
        setattr(parent, child, new)
    return model.eval()


def load_mobilenet_v2(weights: Union[str, Path] = WEIGHTS, img_size: int = 224) -> nn.Module:
    """The real checkpoint through patchcsra's own loader, with its transform recorded for the sweep."""
    import patchcsra

    model = patchcsra.load(weights, arch=f"{Path(__file__).resolve()}:mobilenet_v2_tf_same")
    model.patchcsra_source = {"spec": str(weights), "input_size": (3, img_size, img_size)}
    return model.eval()
