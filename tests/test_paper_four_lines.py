"""For linear heads, the patch equals an independent implementation of the paper's four lines:

    score = torch.flatten(conv1x1(x, W, b), 2)        # (B, C, HW)
    base_logit = torch.mean(score, dim=2)
    att_logit = torch.max(score, dim=2)[0]
    score = base_logit + lam * att_logit
"""
import timm
import torch
import torch.nn.functional as F
import torchvision

import patchcsra


def four_lines(feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lam: float) -> torch.Tensor:
    score = F.conv2d(feat, weight[:, :, None, None], bias).flatten(2)
    return score.mean(2) + lam * score.max(2)[0]


def test_torchvision_resnet18():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 96, 96)
    body = torch.nn.Sequential(*list(model.children())[:-2])
    patched = patchcsra.patch(model, lam=0.2, input_size=(3, 96, 96))
    with torch.no_grad():
        ref = four_lines(body(x), model.fc.weight, model.fc.bias, 0.2)
        assert torch.allclose(patched(x), ref, atol=1e-5)


def test_timm_efficientnet_and_mobilenet_v2():
    for name in ("efficientnet_b0", "mobilenetv2_050"):
        model = timm.create_model(name).eval()
        x = torch.randn(2, 3, 96, 96)
        patched = patchcsra.patch(model, lam=0.02, input_size=(3, 96, 96))
        with torch.no_grad():
            clf = model.get_classifier()
            ref = four_lines(model.forward_features(x), clf.weight, clf.bias, 0.02)
            assert torch.allclose(patched(x), ref, atol=1e-5), name


def test_shared_mobilenet_v2_real_weights():
    """The real ImageNet MobileNetV2 from ../shared/weights: GAP + Linear(1280, 1001)."""
    from conftest import shared_path

    path = shared_path("weights", "mobilenet_v2_1.0_224_quant_float.safetensors")
    model = patchcsra.load(path, arch="torchvision:mobilenet_v2")
    assert model.classifier[1].out_features == 1001  # inferred from the checkpoint
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    patched = patchcsra.patch(model, lam=0.2)
    with torch.no_grad():
        ref = four_lines(model.features(x), model.classifier[1].weight, model.classifier[1].bias, 0.2)
        assert torch.allclose(patched(x), ref, atol=1e-4)
        patched.lam = 0.0
        assert patchcsra.heads.base.allclose_logits(patched(x), model(x))
