"""Trainable CSRA / attention-pooling heads (patchcsra.training).

The CSRA head is checked against an independent re-derivation of the paper's eq. (2)-(13) in
*feature* space (class-specific feature vectors, then the classifier), while the module computes
in *score* space; the attention head against PatchConvNet's pooling written out by hand.
"""
from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import timm
import torch
import torchvision

import patchcsra
from patchcsra.heads.base import locations_to_map
from patchcsra.training import (TEMPERATURE_SETS, AttentionPoolHead, CSRAHead, HeadedClassifier, attach_head,
                                linear_from_split)
from patchcsra.errors import PatchCSRAError
from patchcsra.heads import discover
from patchcsra.metrics import mean_average_precision

INF = math.inf


def _feats(b=3, d=16, h=3, w=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, h, w, generator=g, dtype=dtype)


def _reference_csra(x: torch.Tensor, weight: torch.Tensor, temps, lam: float) -> torch.Tensor:
    """Eq. (2)-(6) per head and class with loops, summed over heads (eq. 13).

    x (B, d, H, W), weight (H, C, d): for class i, m_i = w_i / ||w_i||,
    s_ik = exp(T x_k·m_i) / sum_l exp(T x_l·m_i)      (2)
    a_i  = sum_k s_ik x_k                              (3)   (T = inf: a_i = x at argmax_k x_k·m_i)
    g    = mean_k x_k                                  (4)
    f_i  = g + lam a_i                                 (5)
    y_i  = m_i · f_i                                   (6)
    """
    b, d = x.shape[:2]
    xs = x.reshape(b, d, -1)  # (B, d, L)
    out = torch.zeros(b, weight.shape[1], dtype=x.dtype)
    for h, t in enumerate(temps):
        for i in range(weight.shape[1]):
            m = weight[h, i] / weight[h, i].norm()
            for n in range(b):
                proj = torch.einsum("d,dl->l", m, xs[n])
                if math.isinf(t):
                    a = xs[n][:, int(proj.argmax())]
                else:
                    e = torch.exp(t * proj - (t * proj).max())
                    a = (xs[n] * (e / e.sum())).sum(dim=1)
                g = xs[n].mean(dim=1)
                out[n, i] += m @ (g + lam * a)
    return out


@pytest.mark.parametrize("heads,temps", [(1, None), (2, None), (4, None), (6, None), (8, None), (1, (INF,)),
                                         (3, (0.5, 3.0, INF))])
def test_csra_head_equals_paper_equations(heads, temps):
    torch.manual_seed(heads)
    head = CSRAHead(16, 5, heads, lam=0.3, temperatures=temps).double()
    x = _feats()
    want_t = TEMPERATURE_SETS[heads] if temps is None else temps
    assert head.temperatures == tuple(want_t)
    assert head.weight.shape == (heads, 5, 16)
    y = head(x)
    assert y.shape == (3, 5)
    torch.testing.assert_close(y, _reference_csra(x, head.weight.detach(), want_t, 0.3), rtol=1e-10, atol=1e-10)


def test_csra_temperature_sets_are_the_papers():
    assert TEMPERATURE_SETS == {1: (1.0,), 2: (1.0, INF), 4: (1.0, 2.0, 4.0, INF),
                                6: (1.0, 2.0, 3.0, 4.0, 5.0, INF), 8: (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, INF)}


def test_csra_large_temperature_approaches_max_and_lam_zero_is_normalised_average():
    x = _feats(seed=1)
    w = torch.randn(5, 16, dtype=torch.float64)
    y_inf = CSRAHead.from_linear(w, None, 1, 0.5, temperatures=(INF,))(x)
    y_big = CSRAHead.from_linear(w, None, 1, 0.5, temperatures=(1e4,))(x)
    torch.testing.assert_close(y_big, y_inf, rtol=1e-6, atol=1e-6)
    y0 = CSRAHead.from_linear(w, None, 1, 0.0)(x)
    want = x.mean(dim=(2, 3)) @ (w / w.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(y0, want)


def test_csra_gradients_reach_every_head_and_class():
    head = CSRAHead(16, 5, 8, lam=0.2)
    x = _feats(dtype=torch.float32).requires_grad_(True)
    head(x).sum().backward()
    g = head.weight.grad
    assert g is not None and g.shape == (8, 5, 16)
    assert bool((g.abs().sum(dim=-1) > 0).all()), "some head/class got no gradient"
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_csra_forward_maps_shapes_and_consistency():
    head = CSRAHead(16, 5, 4, lam=0.2).double()
    x = _feats(h=2, w=5)
    maps = head.forward_maps(x)
    assert maps["scores"].shape == maps["attention"].shape == (3, 4, 5, 10)
    a = maps["attention"]
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 5, dtype=a.dtype))
    # the last head (T = inf) is one-hot at the argmax location
    assert torch.equal(a[:, 3].argmax(-1), maps["scores"][:, 3].argmax(-1))
    assert set(a[:, 3].unique().tolist()) == {0.0, 1.0}
    s = maps["scores"]
    y = (s.mean(-1) + 0.2 * (a * s).sum(-1)).sum(1)
    torch.testing.assert_close(y, head(x))
    torch.testing.assert_close(maps["logits"], head(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(heads=3), "heads=3"),
    (dict(heads=0), "heads=0"),
    (dict(lam=-0.1), "lam=-0.1"),
    (dict(lam=float("nan")), "lam=nan"),
    (dict(heads=1, temperatures=(1.0, INF)), "len\\(temperatures\\)=2"),
    (dict(heads=1, temperatures=(0.0,)), "temperatures"),
    (dict(heads=1, temperatures=()), "temperatures"),
])
def test_csra_bad_arguments(kwargs, match):
    with pytest.raises(PatchCSRAError, match=match):
        CSRAHead(16, 5, **kwargs)


def test_csra_bad_features_and_weights():
    head = CSRAHead(16, 5)
    with pytest.raises(PatchCSRAError, match="expects features"):
        head(torch.zeros(2, 8, 3, 3))
    with pytest.raises(PatchCSRAError, match="expects features"):
        head(torch.zeros(2, 9, 16))
    with pytest.raises(PatchCSRAError, match="weight has shape"):
        CSRAHead.from_linear(torch.zeros(5, 16, 3))
    with pytest.raises(PatchCSRAError, match="bias has 4"):
        AttentionPoolHead.from_linear(torch.zeros(5, 16), torch.zeros(4))


def test_csra_from_linear_map_equals_training_free_patch():
    """H=1, T=inf, same λ: the trained head at init ranks every class as the 4-line patch does."""
    g = torch.Generator().manual_seed(7)
    n, d, c, lam = 300, 24, 6, 0.2
    x = torch.randn(n, d, 3, 3, generator=g, dtype=torch.float64) + 0.3
    fc = torch.nn.Linear(d, c).double()
    with torch.no_grad():
        fc.weight.mul_(torch.linspace(0.5, 3.0, c, dtype=torch.float64)[:, None])  # unequal row norms
        fc.bias.normal_(generator=g)
    s = fc(x.flatten(2).transpose(1, 2)).transpose(1, 2)  # (N, C, L): s_k = W x_k + b
    patched = (s.mean(-1) + lam * s.amax(-1)).detach().numpy()  # the paper's 4 lines
    head = CSRAHead.from_linear(fc.weight, fc.bias, heads=1, lam=lam, temperatures=(INF,))
    assert head.weight.dtype == torch.float64
    ours = head(x).detach().numpy()
    # a positive per-class scale and shift apart: (patched - (1 + lam) b) / ||w||
    w, b = fc.weight.detach().numpy(), fc.bias.detach().numpy()
    np.testing.assert_allclose(ours, (patched - (1 + lam) * b) / np.linalg.norm(w, axis=1), rtol=1e-10, atol=1e-10)
    # labels correlated with the scores so AP is far from chance and differs between variants
    noise = torch.randn(n, c, generator=g, dtype=torch.float64).numpy()
    targets = (patched + 0.5 * noise * patched.std(0) > np.median(patched, 0)).astype(int)
    m_patch, ap_patch, _ = mean_average_precision(patched, targets)
    m_ours, ap_ours, _ = mean_average_precision(ours, targets)
    assert m_ours == pytest.approx(m_patch, abs=1e-9)
    np.testing.assert_allclose(ap_ours, ap_patch, atol=1e-9)
    assert (np.argsort(ours, 0, kind="stable") == np.argsort(patched, 0, kind="stable")).all()
    # teeth: another λ, or normalising the columns instead of the rows, ranks differently
    m_other = mean_average_precision(CSRAHead.from_linear(fc.weight, None, 1, 2.0, (INF,))(x).detach().numpy(),
                                     targets)[0]
    wcol = fc.weight.detach() / fc.weight.detach().norm(dim=0, keepdim=True)
    sc = torch.einsum("cd,ndl->ncl", wcol, x.flatten(2))
    m_col = mean_average_precision((sc.mean(-1) + lam * sc.amax(-1)).numpy(), targets)[0]
    assert abs(m_other - m_patch) > 1e-6 and abs(m_col - m_patch) > 1e-6


def _reference_attention_pool(x, query, weight, bias, num_heads, lam, per_class):
    """PatchConvNet pooling by hand: a = softmax_k(q·LN(x_k)/sqrt(dh)) per channel group."""
    b, d = x.shape[:2]
    xs = x.reshape(b, d, -1).transpose(1, 2)  # (B, L, d)
    L, dh = xs.shape[1], d // num_heads
    mu, var = xs.mean(-1, keepdim=True), xs.var(-1, unbiased=False, keepdim=True)
    k = (xs - mu) / torch.sqrt(var + 1e-5)
    q_count = query.shape[0]
    z = torch.zeros(b, q_count, d, dtype=x.dtype)
    att = torch.zeros(b, num_heads, q_count, L, dtype=x.dtype)
    for n in range(b):
        for q in range(q_count):
            for h in range(num_heads):
                sl = slice(h * dh, (h + 1) * dh)
                a = torch.softmax(k[n, :, sl] @ query[q, sl] / math.sqrt(dh), dim=0)
                att[n, h, q] = a
                z[n, q, sl] = ((a + lam / L) / (1 + lam)) @ xs[n, :, sl]
    if per_class:
        y = torch.einsum("ncd,cd->nc", z, weight) + bias
    else:
        y = z[:, 0] @ weight.T + bias
    return y, att


@pytest.mark.parametrize("per_class,num_heads,lam", [(True, 1, 0.0), (False, 1, 0.0), (True, 4, 0.5),
                                                     (False, 2, 0.25)])
def test_attention_pool_head_equals_reference(per_class, num_heads, lam):
    torch.manual_seed(0)
    head = AttentionPoolHead(16, 5, per_class_query=per_class, num_heads=num_heads, lam=lam).double()
    with torch.no_grad():
        head.query.normal_()  # far from uniform attention
    x = _feats(seed=3)
    want_y, want_a = _reference_attention_pool(x, head.query.detach(), head.fc.weight.detach(),
                                               head.fc.bias.detach(), num_heads, lam, per_class)
    maps = head.forward_maps(x)
    assert maps["attention"].shape == (3, num_heads, 5 if per_class else 1, 12)
    torch.testing.assert_close(maps["attention"], want_a)
    torch.testing.assert_close(head(x), want_y)
    torch.testing.assert_close(maps["logits"], want_y)
    assert float((want_a - 1 / 12).abs().max()) > 1e-3  # the check above is not a uniform-attention tautology


@pytest.mark.parametrize("per_class,num_heads,lam", [(True, 1, 0.0), (False, 1, 0.0), (True, 2, 0.3)])
def test_attention_pool_from_linear_is_the_linear_head_at_init(per_class, num_heads, lam):
    fc = torch.nn.Linear(16, 5)
    x = _feats(b=4, dtype=torch.float32, seed=5) * 3
    head = AttentionPoolHead.from_linear(fc.weight, fc.bias, per_class, num_heads=num_heads, lam=lam)
    maps = head.forward_maps(x)
    a = maps["attention"]
    assert a.shape == (4, num_heads, 5 if per_class else 1, 12)
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    torch.testing.assert_close(a, torch.full_like(a, 1 / 12))
    want = fc(x.mean(dim=(2, 3)))
    torch.testing.assert_close(head(x), want, rtol=0, atol=1e-5)
    head.query.data.normal_()  # once the queries move, it is no longer the linear head
    assert float((head(x) - want).abs().max()) > 1e-3


def test_attention_pool_bad_arguments():
    with pytest.raises(PatchCSRAError, match="num_heads=3"):
        AttentionPoolHead(16, 5, num_heads=3)
    with pytest.raises(PatchCSRAError, match="lam=-1"):
        AttentionPoolHead(16, 5, lam=-1)


def test_locations_to_map_each_layout():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(2, 8, 3, 4, generator=g)  # the reference map (B, d, H, W)
    assert locations_to_map(m, "NCHW", 0, None) is m
    torch.testing.assert_close(locations_to_map(m.permute(0, 2, 3, 1), "NHWC", 0, None), m)
    tokens = m.flatten(2).transpose(1, 2)  # (B, L, d), row-major
    prefix = torch.randn(2, 2, 8, generator=g)
    torch.testing.assert_close(locations_to_map(torch.cat([prefix, tokens], 1), "NLC", 2, (3, 4)), m)
    sq = torch.randn(2, 8, 3, 3, generator=g)
    torch.testing.assert_close(locations_to_map(torch.cat([prefix[:, :1], sq.flatten(2).transpose(1, 2)], 1),
                                                "NLC", 1, None), sq)
    with pytest.raises(PatchCSRAError, match="not a square; pass grid"):
        locations_to_map(tokens, "NLC", 0, None)
    with pytest.raises(PatchCSRAError, match="grid=\\(4, 4\\)"):
        locations_to_map(tokens, "NLC", 0, (4, 4))
    with pytest.raises(PatchCSRAError, match="layout='NWC'"):
        locations_to_map(m, "NWC", 0, None)
    with pytest.raises(PatchCSRAError, match="do not fit layout='NLC'"):
        locations_to_map(m, "NLC", 0, None)


def _roundtrip(hc: HeadedClassifier, x: torch.Tensor, tmp_path, name: str) -> torch.Tensor:
    with torch.no_grad():
        y = hc(x)
        ts = torch.jit.trace(hc, x, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(ts, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.jit.load(buf)(x), y, rtol=1e-5, atol=1e-5)
        ep = torch.export.export(hc, (x,))
        path = tmp_path / f"{name}.pt2"
        torch.export.save(ep, str(path))
        torch.testing.assert_close(torch.export.load(str(path)).module()(x), y, rtol=1e-5, atol=1e-5)
    return y


@pytest.mark.parametrize("name", ["timm-resnet10t", "timm-vit-token", "tv-resnet18"])
def test_attach_head_pretrained_linear_heads(name, tmp_path):
    torch.manual_seed(0)
    size = (3, 64, 64)
    if name == "timm-resnet10t":
        model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
        fc = model.fc
    elif name == "timm-vit-token":  # class-token head: a Linear, applied to patch tokens by the head
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64)
        fc = model.head
    else:
        model = torchvision.models.resnet18(num_classes=5)
        fc = model.fc
    with torch.no_grad():
        fc.bias.normal_()  # a non-zero bias to recover
    hc = attach_head(model, "csra", heads=8, lam=0.1, input_size=size)
    assert isinstance(hc, HeadedClassifier) and hc.init == "pretrained"
    info = hc.head_info
    assert (info["kind"], info["heads"], info["lam"], info["temperatures"][-1]) == ("csra", 8, 0.1, "inf")
    assert info["exact_linear"] == (name != "timm-vit-token")
    w, b = linear_from_split(hc.split)
    torch.testing.assert_close(w, fc.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, fc.bias.detach(), rtol=1e-5, atol=1e-6)
    for h in range(8):
        torch.testing.assert_close(hc.head.weight[h].detach(), fc.weight.detach(), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, *size)
    f = hc.forward_features(x)
    assert f.shape[:2] == (2, fc.weight.shape[1]) and f.ndim == 4
    assert _roundtrip(hc, x, tmp_path, name).shape == (2, 5)
    # the attention head starts from the model itself: its linear head on average-pooled features
    ha = HeadedClassifier(hc.split, AttentionPoolHead.from_linear(w, b))
    with torch.no_grad():
        want = model(x) if info["exact_linear"] else fc(f.mean(dim=(2, 3)))
        torch.testing.assert_close(ha(x), want, rtol=1e-5, atol=1e-5)
    # the replaced classifier is left out of the backbone parameters, nothing else
    ids = {id(p) for p in hc.backbone_parameters()}
    assert id(fc.weight) not in ids and id(fc.bias) not in ids
    assert len(ids) == sum(1 for _ in model.parameters()) - 2


def test_attach_head_attention_kind_reproduces_the_model():
    model = torchvision.models.resnet18(num_classes=5)
    ha = attach_head(model, "attention", input_size=(3, 64, 64))
    assert ha.init == "pretrained" and ha.head_info["kind"] == "attention" and ha.head_info["lam"] == 0.0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ha(x), model(x), rtol=1e-5, atol=1e-5)
        assert ha.forward_maps(x)["attention"].shape == (2, 1, 5, 4)


def test_attach_head_linear_kind_is_the_model_and_patches_like_it():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    hl = attach_head(model, "linear", input_size=(3, 64, 64))
    assert hl.init == "pretrained" and hl.head_info["kind"] == "linear"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hl(x), model(x), rtol=1e-5, atol=1e-5)
        maps = hl.forward_maps(x)
        assert maps["scores"].shape == (2, 1, 5, 4)
        torch.testing.assert_close(maps["logits"], model(x), rtol=1e-5, atol=1e-5)
        # the trained linear head is patched exactly as the original model is
        want = patchcsra.patch(model, lam=0.3)(x)
        torch.testing.assert_close(patchcsra.patch(hl, lam=0.3)(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patchcsra.patch(hl, lam=0.0)(x), model(x), rtol=0, atol=1e-5)
    fresh = attach_head(model, "linear", input_size=(3, 64, 64), num_classes=3)
    assert fresh.init == "random" and fresh(x).shape == (2, 3)
    with pytest.raises(PatchCSRAError, match="temperatures apply to kind='csra' only"):
        attach_head(model, "linear", temperatures=(1.0,), input_size=(3, 64, 64))


def test_attach_head_nonaffine_head_falls_back_to_random(caplog):
    # average pooling + fc_norm (LayerNorm) + Linear: no (W, b) to start from
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64, global_pool="avg")
    with caplog.at_level(logging.WARNING, logger="patchcsra.training.attach"):
        hc = attach_head(model, "attention", input_size=(3, 64, 64), per_class_query=False)
    assert hc.init == "random" and "not affine" in caplog.text
    x = torch.randn(2, 3, 64, 64)
    assert hc.forward_features(x).shape == (2, 192, 4, 4)
    assert hc.forward_maps(x)["attention"].shape == (2, 1, 1, 16)
    with pytest.raises(PatchCSRAError, match="not affine"):
        linear_from_split(hc.split)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="patchcsra.training.attach"):
        hr = HeadedClassifier(hc.split, CSRAHead(192, 5, 2))
    assert hr.init == "random" and not caplog.text and hr(x).shape == (2, 5)


def test_attach_head_nlc_grid_follows_the_image_aspect():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=(32, 64),
                              global_pool="avg", fc_norm=False)
    hc = attach_head(model, "csra", input_size=(3, 32, 64))
    x = torch.zeros(1, 3, 32, 64)
    x[..., :16, 48:] = 1.0  # top-right patch
    f = hc.forward_features(x)
    assert f.shape == (1, 192, 2, 4)
    tokens = hc.split.forward_features(x)[:, 1:]
    torch.testing.assert_close(f[0, :, 0, 3], tokens[0, 3])
    torch.testing.assert_close(f[0, :, 1, 0], tokens[0, 4])


def test_attach_head_bad_arguments():
    model = torchvision.models.resnet18(num_classes=5)
    with pytest.raises(PatchCSRAError, match="kind='gem'"):
        attach_head(model, "gem")
    with pytest.raises(PatchCSRAError, match="init='imagenet'"):
        attach_head(model, init="imagenet")
    with pytest.raises(PatchCSRAError, match="heads=5"):
        attach_head(model, heads=5)
    with pytest.raises(PatchCSRAError, match="temperatures apply to kind='csra'"):
        attach_head(model, "attention", temperatures=(INF,))
    with pytest.raises(PatchCSRAError, match="discovery info"):
        HeadedClassifier(torch.nn.Identity(), CSRAHead(4, 2))  # type: ignore[arg-type]
    split = discover(model, input_size=(3, 64, 64))
    assert HeadedClassifier(split, CSRAHead(512, 5)).init == "random"
