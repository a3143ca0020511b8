"""Comparator rows beside the λ choices (test-time pooling, the paper's multi-head CSRA), from the one-pass
stats, against an independent computation from a real CIFAR ResNet-20's features and timm's own
``TestTimePoolHead`` / ``adaptive_avgmax_pool2d``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import patchcsra
from patchcsra.data import open_dataset, resolve_transform
from patchcsra.grid import MULTI_HEAD_TEMPERATURES, comparator_scores, sweep
from patchcsra.report import display_frame, summary_record, table_frame, to_latex, to_markdown
from patchcsra.stats import collect

from conftest import image_folder
from custom_nets import resnet20


def _features(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CIFAR ResNet's last feature map (B, 64, h, w), written out from its layers."""
    out = F.relu(m.bn1(m.conv1(x)))
    return m.layer3(m.layer2(m.layer1(out)))


class _TimmFace(nn.Module):
    """What timm's ``TestTimePoolHead`` asks of a model: forward_features, get_classifier, reset_classifier."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m, self.num_features, self.num_classes = m, 64, m.linear.out_features
        self.fc = m.linear

    def forward_features(self, x):
        return _features(self.m, x)

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, n):
        self.fc = nn.Identity()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = resnet20(num_classes=4).eval()
    with torch.no_grad():  # a random-init net's logits are near-constant; spread them so the metrics move
        model.linear.weight.mul_(20.0)
    root = image_folder(tmp_path_factory.mktemp("cmp"), n_classes=4, per_class=5)
    ds = open_dataset(root / "train")
    spec = resolve_transform(model, input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ds.transform = spec.build()
    patched = patchcsra.patch(model, lam=0.0, input_size=spec.input_size)
    st = collect(patched, ds, batch_size=8, workers=0)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    return model, patched, st, x


def test_test_time_pool_row_equals_timm_and_features_by_hand(run):
    model, patched, st, x = run
    assert patched.info.exact_linear
    with torch.no_grad():
        f = _features(model, x)
        s = torch.einsum("cd,bdhw->bchw", model.linear.weight, f) + model.linear.bias[None, :, None, None]
        by_hand = 0.5 * (s.mean((2, 3)) + s.amax((2, 3)))
        timm_pool = __import__("timm").layers.adaptive_avgmax_pool2d(s, 1).flatten(1)
        from timm.layers import TestTimePoolHead

        ttp = TestTimePoolHead(_TimmFace(model), original_pool=1).eval()(x)
    got = comparator_scores(st, 0.2)["ttp"]
    scale = float(by_hand.abs().max())
    assert float((got - by_hand).abs().max()) <= 1e-5 * scale
    assert float((got - timm_pool).abs().max()) <= 1e-5 * scale
    assert float((got - ttp).abs().max()) <= 1e-5 * scale


def test_multihead_row_is_the_papers_eq13_by_hand(run):
    model, _, st, x = run
    assert set(MULTI_HEAD_TEMPERATURES) <= set(st.temperatures) | {math.inf}
    lam = 0.3
    with torch.no_grad():
        f = _features(model, x).flatten(2)  # (B, 64, L)
        s = torch.einsum("cd,bdl->bcl", model.linear.weight, f) + model.linear.bias[None, :, None]
        base = model(x)
        heads = []
        for t in MULTI_HEAD_TEMPERATURES:
            att = s.amax(-1) if math.isinf(t) else (torch.softmax(t * s, dim=-1) * s).sum(-1)
            heads.append(base + lam * att)
        by_hand = torch.stack(heads).sum(0)
    got = comparator_scores(st, lam)["multihead"]
    assert float((got - by_hand).abs().max()) <= 1e-4 * float(by_hand.abs().max())


def test_feature_avgmax_row_equals_timm_select_adaptive_pool_then_the_head(run):
    model, _, st, x = run
    from timm.layers import SelectAdaptivePool2d

    with torch.no_grad():
        f = _features(model, x)
        by_hand = model.linear(0.5 * (f.mean((2, 3)) + f.amax((2, 3))))
        timm_head = model.linear(SelectAdaptivePool2d(pool_type="avgmax", flatten=True)(f))
    assert st.avgmax is not None and st.avgmax.shape == st.base.shape
    got = comparator_scores(st, 0.2)["avgmax"]
    scale = float(by_hand.abs().max())
    assert float((got - by_hand).abs().max()) <= 1e-5 * scale
    assert float((got - timm_head).abs().max()) <= 1e-5 * scale
    assert float((got - st.base).abs().max()) > 1e-3 * scale  # not the model's own (average-pooled) logit
    sub = st.select(np.array([0, 2, 3]))
    assert torch.equal(sub.avgmax, st.avgmax[[0, 2, 3]])


def test_sweep_rows_scores_deltas_and_intervals(run):
    _, _, st, _ = run
    res = sweep(st, lams=[0, 0.1, 0.5], bootstrap=200, folds=0, fixed_lam=0.2, exact_linear=True)
    assert set(res.comparators) == {"ttp", "multihead", "avgmax"} and res.metric == "top1"
    labels = st.labels()
    for name, s in comparator_scores(st, 0.2).items():
        c = res.comparators[name]
        top1 = 100.0 * float(np.mean(s.numpy().argmax(1) == labels))  # independent top-1
        assert c.score == pytest.approx(top1, abs=1e-9)
        assert c.delta == pytest.approx(top1 - res.baseline["top1"], abs=1e-9)
        assert c.ci[0] <= c.ci[1] and np.isfinite(c.ci).all()
    assert "exact" in res.comparators["ttp"].note and math.isnan(res.comparators["ttp"].lam)
    assert res.comparators["multihead"].lam == 0.2
    # without a bootstrap: no interval, the same score
    res0 = sweep(st, lams=[0, 0.1], bootstrap=0, folds=0, fixed_lam=0.2)
    assert math.isnan(res0.comparators["ttp"].ci[0])
    assert res0.comparators["ttp"].score == res.comparators["ttp"].score
    assert "exact only for a linear head" in res0.comparators["ttp"].note

    s = summary_record(res, model={"name": "r20"}, dataset={"name": "folder"})
    assert s["comparators"]["ttp"]["lam"] is None and s["comparators"]["multihead"]["lam"] == 0.2
    row = table_frame([s]).iloc[0]
    assert row["ttp_score"] == pytest.approx(res.comparators["ttp"].score)
    assert row["multihead_delta"] == pytest.approx(res.comparators["multihead"].delta)
    disp = display_frame(table_frame([s]))
    md, tex = to_markdown(disp), to_latex(disp)
    assert "Test-time pool (avg+max)/2" in md and "Multi-head CSRA (H=8)" in md and "Feature avg+max pool" in md
    assert row["avgmax_score"] == pytest.approx(res.comparators["avgmax"].score)
    assert f"{res.comparators['ttp'].score:.2f}" in md and f"{res.comparators['multihead'].score:.2f}" in tex


def test_multihead_row_left_out_when_the_temperatures_were_not_collected(run):
    _, _, st, _ = run
    small = type(st)(st.base, st.max, st.att[..., -1:], (math.inf,), st.targets, st.ok, st.ids, st.classes,
                     st.single_label, {})
    res = sweep(small, lams=[0, 0.1], bootstrap=0, folds=0)
    assert set(res.comparators) == {"ttp"}
    disp = display_frame(table_frame([summary_record(res)]))
    assert "Multi-head CSRA (H=8)" not in to_markdown(disp)


def test_avgmax_is_cached_and_reloaded_with_the_rest(run, tmp_path):
    _, patched, st, _ = run
    from patchcsra.data import open_dataset as _open

    root = image_folder(tmp_path / "d", n_classes=4, per_class=5)
    ds = _open(root / "train")
    ds.transform = resolve_transform(patched, input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5),
                                     std=(0.25, 0.25, 0.25)).build()
    a = collect(patched, ds, batch_size=8, workers=0, cache_dir=tmp_path / "cache")
    b = collect(patched, ds, batch_size=8, workers=0, cache_dir=tmp_path / "cache")
    assert a.meta["forward_images"] == 20 and b.meta["forward_images"] == 0
    assert torch.equal(a.avgmax, b.avgmax) and torch.isfinite(b.avgmax).all()
    assert torch.allclose(b.avgmax, st.avgmax, atol=1e-5)
