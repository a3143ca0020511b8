"""The one-GEMM path of ``HeadSplit.forward_locations`` (issue 19 §1): taken for a plain avg+Linear CNN head,
exact at λ=0, equal to the per-location head module at λ>0, and not taken where the head is not one layer."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import patchcsra
from patchcsra.heads.base import HeadSplit, enable_fast_path


def _cnn(num_classes: int = 7) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes).eval()


def _general(patched, x: torch.Tensor) -> torch.Tensor:
    """``patched(x)`` through the head module on every location (the fast path switched off)."""
    split = patched.split
    keep, split._fast_head = split._fast_head, ()
    try:
        assert not split.fast_path
        return patched(x)
    finally:
        split._fast_head = keep


@pytest.mark.parametrize("batch", [2, 40])  # 40 x 16 locations >= 1024 rows: the 1x1-convolution form on CPU
def test_fast_path_taken_exact_at_zero_and_equal_to_general(batch, monkeypatch):
    model = _cnn()
    patched = patchcsra.patch(model, lam=0.0, input_size=(3, 128, 128))
    assert patched.info.kind == "avg+Linear" and patched.info.exact_linear
    assert patched.split.fast_path and patched.split._fast_head[0] is model.fc
    x = torch.randn(batch, 3, 128, 128)
    calls = []
    real = type(patched.split).forward_single
    monkeypatch.setattr(type(patched.split), "forward_single", lambda self, v: calls.append(v.shape) or real(self, v))
    with torch.no_grad():
        y = model(x)
        assert torch.equal(patched(x), y)                         # λ=0: bit-exact
        assert calls == []                                        # the head module never ran per location
        patched.lam = 0.3
        for t in (math.inf, 1.0):
            patched.temperature = t
            fast = patched(x)
            n = len(calls)
            general = _general(patched, x)
            assert len(calls) == n + 1                            # the general path does call it
            assert not torch.equal(fast, y)                       # λ>0 moves the logits
            torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)
        s = patched.split.forward_locations(patched.split.forward_features(x))
        assert s.shape == (batch, 7, 16)


def test_fast_path_follows_the_classifier():
    """A replaced classifier (or training mode) falls back to the head module, so results stay right."""
    model = _cnn()
    patched = patchcsra.patch(model, lam=0.2, input_size=(3, 64, 64))
    assert patched.split.fast_path
    model.reset_classifier(5)
    assert not patched.split.fast_path
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = patched.split.forward_features(x)
        assert patched.split.forward_locations(f).shape == (2, 5, 4)
    patched2 = patchcsra.patch(_cnn(), lam=0.2, input_size=(3, 64, 64))
    patched2.split.train()
    assert not patched2.split.fast_path


class _NormHead(nn.Module):
    """avg pool -> LayerNorm -> Linear: the classifier is a Linear, but the head on one location is not it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.norm(self.pool(self.body(x)).flatten(1)))


def test_fast_path_refused_for_a_head_that_is_not_one_layer():
    torch.manual_seed(0)
    patched = patchcsra.patch(_NormHead().eval(), lam=0.0, input_size=(3, 64, 64))
    assert not patched.split.fast_path
    # and for timm's ConvNeXt-style norm head, and a ViT with fc_norm (avg pool + LayerNorm + Linear)
    cnx = timm.create_model("convnext_atto", pretrained=False, num_classes=3).eval()
    assert not patchcsra.patch(cnx, lam=0.0, input_size=(3, 64, 64)).split.fast_path


def test_enable_fast_path_checks_the_layer_against_the_head():
    """A split that names a layer its head does not compute is refused by the numerical check."""
    model = _cnn()
    patched = patchcsra.patch(model, lam=0.2, input_size=(3, 64, 64))
    split = patched.split
    wrong = nn.Linear(model.fc.in_features, model.fc.out_features)
    split.linear_head = lambda: wrong  # type: ignore[method-assign]
    with torch.no_grad():
        f = split.forward_features(torch.randn(2, 3, 64, 64))
        assert not enable_fast_path(split, f)
    assert split._fast_head == () and not split.fast_path


def test_fast_path_on_tokens_and_nhwc():
    for name, size in (("vit_tiny_patch16_224", 64), ("swin_tiny_patch4_window7_224", 224)):
        kw = {"img_size": size} if "vit" in name else {}
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=5, **kw).eval()
        patched = patchcsra.patch(model, lam=0.0, input_size=(3, size, size))
        assert patched.split.fast_path, name
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(patched(x), model(x))
            patched.lam = 0.2
            torch.testing.assert_close(patched(x), _general(patched, x), rtol=1e-5, atol=1e-5)


def test_state_dict_unchanged_by_fast_path():
    model = _cnn()
    patched = patchcsra.patch(model, lam=0.2, input_size=(3, 64, 64))
    assert set(patched.state_dict()) == {"_lam"} | {f"split.model.{k}" for k in model.state_dict()}
    assert isinstance(patched.split, HeadSplit)
