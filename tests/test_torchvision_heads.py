"""λ=0 exactness for every torchvision classification family; VGG/AlexNet refused with the reason."""
import pytest
import torch
import torchvision

import patchcsra
from patchcsra.heads.base import allclose_logits

FAMILIES = [  # (name, probe size): one model per family of torchvision.models.list_models
    ("convnext_tiny", 64), ("densenet121", 64), ("efficientnet_b0", 64), ("efficientnet_v2_s", 64),
    ("googlenet", 64), ("inception_v3", 160), ("maxvit_t", 224), ("mnasnet0_5", 64), ("mobilenet_v2", 64),
    ("mobilenet_v3_small", 64), ("regnet_x_400mf", 64), ("regnet_y_400mf", 64), ("resnet18", 64),
    ("resnext50_32x4d", 64), ("wide_resnet50_2", 64), ("shufflenet_v2_x0_5", 64), ("squeezenet1_0", 64),
    ("squeezenet1_1", 64), ("swin_t", 64), ("swin_v2_t", 64), ("vit_b_32", 224),
]


def _family(name: str) -> str:
    return name.rstrip("0123456789_").split("_")[0].rstrip("0123456789")


def test_every_family_is_listed():
    listed = {_family(n) for n in torchvision.models.list_models(module=torchvision.models)}
    covered = {_family(n) for n, _ in FAMILIES} | {"vgg", "alexnet"}
    assert listed <= covered, listed - covered


@pytest.mark.parametrize("name,size", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_lambda_zero_is_exact(name, size):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    for p in model.parameters():  # zero-initialised heads (ViT) would make the test vacuous
        if p.ndim >= 1 and p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.02)
    patched = patchcsra.patch(model, lam=0.0, input_size=(3, size, size))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = model(x)
        assert allclose_logits(patched(x), y)
        patched.lam = 1.0
        assert not torch.allclose(patched(x), y)
    assert patched.info.num_locations > 1


@pytest.mark.parametrize("name", ["vgg11", "alexnet"])
def test_flattening_heads_are_refused(name):
    model = torchvision.models.get_model(name, weights=None)
    with pytest.raises(patchcsra.HeadNotFoundError, match=r"flattens a \d+x\d+x\d+ map"):
        patchcsra.patch(model, lam=0.2)


def test_squeezenet_uses_its_per_location_class_maps():
    model = torchvision.models.squeezenet1_1(weights=None).eval()
    patched = patchcsra.patch(model, lam=0.5, input_size=(3, 96, 96))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        maps = model.classifier[:3](model.features(x))  # dropout, final conv, relu: (B, C, H, W)
        expected = maps.mean((2, 3)) + 0.5 * maps.amax((2, 3))
        assert torch.allclose(patched(x), expected, atol=1e-5)
    assert patched.info.feature_dim == 1000 and patched.info.exact_linear
