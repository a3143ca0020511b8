"""λ=0 exactness over timm models covering every head kind (random init, small inputs)."""
import math

import pytest
import timm
import torch

import patchcsra
from patchcsra.heads.base import allclose_logits

S64 = (3, 64, 64)
S96 = (3, 96, 96)
# (name, create kwargs, probe input size or None for the model's own) -- grouped by head kind
CASES = [
    # CNN, avg pool + Linear
    ("resnet18", {}, S64), ("resnet50d", {}, S64), ("resnext26ts", {}, S64), ("seresnet18", {}, S64),
    ("skresnet18", {}, S64), ("resnest14d", {}, S64), ("ecaresnet26t", {}, S64), ("regnetx_002", {}, S64),
    ("regnety_002", {}, S64), ("densenet121", {}, S64), ("dla46_c", {}, S64), ("gernet_s", {}, S64),
    ("cspresnet50", {}, S64), ("ese_vovnet19b_dw", {}, S64), ("repvgg_a0", {}, S64), ("mobileone_s0", {}, S64),
    ("selecsls42b", {}, (3, 128, 128)), ("nf_resnet26", {}, S64), ("efficientnet_b0", {}, S64),
    ("efficientnet_lite0", {}, S64), ("mobilenetv2_050", {}, S64), ("tinynet_e", {}, S64), ("mixnet_s", {}, S64),
    ("fbnetc_100", {}, S64), ("semnasnet_050", {}, S64), ("rexnet_100", {}, S64), ("rexnetr_100", {}, S64),
    ("inception_v3", {}, (3, 160, 160)), ("xception41", {}, S96), ("hgnet_tiny", {}, S64), ("hgnetv2_b0", {}, S64),
    ("botnet26t_256", {"img_size": 64}, S64), ("lambda_resnet26t", {"img_size": 64}, S64),
    ("test_resnet", {}, None), ("test_byobnet", {}, None), ("test_nfnet", {}, None),
    ("test_efficientnet", {}, None), ("test_efficientnet_gn", {}, None), ("test_efficientnet_ln", {}, None),
    # CNN, pooling then conv_head (+act) then Linear (non-linear head after pooling)
    ("mobilenetv3_small_050", {}, S64), ("tf_mobilenetv3_small_minimal_100", {}, S64),
    ("mobilenetv4_conv_small", {}, S64), ("lcnet_050", {}, S64), ("ghostnet_100", {}, S64),
    ("ghostnetv2_100", {}, S64), ("hardcorenas_a", {}, S64), ("test_efficientnet_evos", {}, None),
    # CNN, classifier is a 1x1 conv after pooling
    ("dpn68", {}, S64),
    # CNN/hybrid, norm (+MLP) after pooling
    ("convnext_atto", {}, S64), ("convnextv2_atto", {}, S64), ("test_convnext", {}, None),
    ("test_convnext2", {}, None), ("test_convnext3", {}, None), ("poolformerv2_s12", {}, S64),
    ("edgenext_xx_small", {}, S64), ("efficientformerv2_s0", {}, None), ("starnet_s1", {}, S64),
    ("fastvit_t8", {}, S64), ("mobilevit_xxs", {}, S64), ("mobilevitv2_050", {}, S64),
    ("coatnet_nano_rw_224", {"img_size": 64}, S64), ("maxvit_nano_rw_256", {"img_size": 64}, S64),
    ("test_coatnet", {}, None), ("test_maxvit", {}, None), ("efficientvit_b0", {}, S64),
    ("tiny_vit_5m_224", {}, None), ("repvit_m1", {}, S64),
    # NHWC maps
    ("swin_tiny_patch4_window7_224", {}, None), ("mambaout_femto", {}, S64), ("test_mambaout", {}, None),
    # tokens: class token
    ("vit_tiny_patch16_224", {"img_size": 64}, S64), ("deit3_small_patch16_224", {"img_size": 64}, S64),
    ("cait_xxs24_224", {"img_size": 64}, S64), ("xcit_nano_12_p16_224", {"img_size": 64}, S64),
    ("convit_tiny", {"img_size": 64}, S64), ("coat_lite_tiny", {}, None), ("test_vit", {}, None),
    ("test_vit_relpos", {}, None), ("pit_ti_224", {"img_size": 64}, S64),
    # tokens: distillation token
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, S64), ("pit_ti_distilled_224", {"img_size": 64}, S64),
    ("levit_128s", {}, None), ("efficientvit_m0", {}, None),
    # tokens: register tokens
    ("vit_small_patch14_reg4_dinov2", {"img_size": 56}, (3, 56, 56)),
    ("vit_little_patch16_reg1_gap_256", {"img_size": 64}, S64),
    # tokens: average pooling (no prefix, or prefix dropped) and attention pooling
    ("vit_tiny_patch16_224", {"img_size": 64, "global_pool": "avg"}, S64),
    ("vit_tiny_patch16_224", {"img_size": 64, "global_pool": "map"}, S64),
    ("test_vit2", {}, None), ("test_vit3", {}, None), ("test_vit4", {}, None),
    ("eva02_tiny_patch14_224", {"img_size": 56}, (3, 56, 56)), ("mixer_s16_224", {"img_size": 64}, S64),
    ("resmlp_12_224", {"img_size": 64}, S64), ("gmlp_ti16_224", {"img_size": 64}, S64),
    ("twins_svt_small", {}, S64), ("pvt_v2_b0", {}, S64), ("mvitv2_tiny", {}, None),
    ("hiera_tiny_224", {}, None), ("efficientformer_l1", {}, None),
    # hybrids (CNN stem + transformer)
    ("vit_tiny_r_s16_p8_224", {"img_size": 64}, S64),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" if kw else n for n, kw, _ in CASES]


@pytest.mark.parametrize("name,kwargs,size", CASES, ids=IDS)
def test_lambda_zero_is_exact(name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    patched = patchcsra.patch(model, lam=0.0, input_size=size)
    size = patched.info.probe_input_size
    x = torch.randn(2, *size) * 0.7 + 0.2
    with torch.no_grad():
        y = model(x)
        z = patched(x)
        assert allclose_logits(z, y), float((z - y).abs().max())
        assert patched.info.num_locations > 1
        patched.lam = 0.5  # λ takes effect after patching
        z2 = patched(x)
        s = patched.split.forward_locations(patched.split.forward_features(x))
        assert torch.allclose(z2, y + 0.5 * s.amax(-1), atol=1e-4, rtol=1e-4)


def test_case_list_covers_every_head_kind():
    assert len(CASES) >= 60
    assert len({n for n, _, _ in CASES}) >= 60


@pytest.mark.parametrize("name,kind", [("resnet18", "avg+Linear"), ("vit_tiny_patch16_224", "token+Linear"),
                                       ("mobilenetv3_small_050", "avg+Conv2d+Linear")])
def test_describe_reports_head(name, kind):
    kw = {"img_size": 64} if "vit" in name else {}
    info = patchcsra.describe(timm.create_model(name, **kw), input_size=S64)
    assert info.kind == kind
    assert info.adapter == "timm"
    assert info.exact_linear is (name == "resnet18")
    assert info.layout == ("NLC" if "vit" in name else "NCHW")
    assert info.num_locations == (16 if "vit" in name else 4)


def test_multibranch_models_go_to_their_adapter_single_branch_coat_does_not():
    # CrossViT / CoaT parallel / EfficientViM: tests/test_timm_multibranch.py; CoaT-Lite has one branch
    info = patchcsra.describe(timm.create_model("crossvit_tiny_240", img_size=120), input_size=(3, 120, 120))
    assert (info.adapter, info.layout) == ("timm-multi", "multi")
    info = patchcsra.describe(timm.create_model("coat_lite_tiny", img_size=64), input_size=S64)
    assert (info.adapter, info.layout, info.num_prefix_tokens) == ("timm", "NLC", 1)


def test_finite_temperature_is_softmax_attention():
    model = timm.create_model("resnet18").eval()
    patched = patchcsra.patch(model, lam=0.3, temperature=2.0, input_size=S64)
    x = torch.randn(2, *S64)
    with torch.no_grad():
        f = patched.split.forward_features(x)
        s = patched.split.forward_locations(f)
        att = (torch.softmax(2.0 * s, -1) * s).sum(-1)
        assert torch.allclose(patched(x), model(x) + 0.3 * att, atol=1e-5)
    patched.temperature = math.inf
    with torch.no_grad():
        assert torch.allclose(patched(x), model(x) + 0.3 * s.amax(-1), atol=1e-5)
