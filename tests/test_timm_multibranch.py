"""Multi-branch timm models (CrossViT, CoaT, EfficientViM) and CLIP attention pooling: exact at λ=0, the
per-location scores against hand-written references, and collect / sweep / explain on a multi-branch model."""
import math

import pytest
import timm
import torch
from timm.layers import AttentionPool2d, resample_abs_pos_embed

import patchcsra
from conftest import image_folder
from patchcsra.heads.base import allclose_logits

# (name, create kwargs, probe size)
CASES = [
    ("crossvit_tiny_240", {"img_size": 120}, (3, 120, 120)),
    ("crossvit_9_dagger_240", {"img_size": 120}, (3, 120, 120)),
    ("coat_tiny", {"img_size": 64}, (3, 64, 64)),
    ("efficientvim_m1", {}, (3, 128, 128)),
    ("efficientvim_m1_dist", {}, (3, 128, 128)),
]


def _model(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


@pytest.mark.parametrize("name,kwargs,size", CASES, ids=[c[0] for c in CASES])
def test_lambda_zero_is_exact_and_lambda_moves(name, kwargs, size):
    model = _model(name, **kwargs)
    patched = patchcsra.patch(model, lam=0.0, input_size=size)
    x = torch.randn(2, *size) * 0.7 + 0.2
    with torch.no_grad():
        y = model(x)
        assert allclose_logits(patched(x), y)
        s = patched.split.forward_locations(patched.split.forward_features(x))
        assert s.shape == (2, y.shape[1], patched.info.num_locations) and patched.info.num_locations > 1
        patched.lam = 0.5
        z = patched(x)
    assert float((z - y).abs().max()) > 1e-3
    torch.testing.assert_close(z, y + 0.5 * s.amax(-1), rtol=1e-4, atol=1e-4)


def test_crossvit_scores_average_the_branch_heads_at_one_place():
    model = _model("crossvit_tiny_240", img_size=120)
    patched = patchcsra.patch(model, lam=0.3, input_size=(3, 120, 120))
    info = patched.info
    assert (info.adapter, info.layout, info.kind, info.grid, info.num_locations) == \
        ("timm-multi", "multi", "multi2+token+Linear", (10, 10), 100)
    x = torch.randn(2, 3, 120, 120)
    with torch.no_grad():
        x0, x1 = model.forward_features(x)                      # (2, 1 + 10*10, 96), (2, 1 + 7*7, 192)
        h0 = model.head[0](x0[:, 1:])                           # (2, 100, C): branch 0's head at each token
        h1 = model.head[1](x1[:, 1:])                           # (2, 49, C)
        near = [math.floor((i + 0.5) * 7 / 10) for i in range(10)]  # the 7x7 cell holding each 10x10 centre
        idx = torch.tensor([near[r] * 7 + near[c] for r in range(10) for c in range(10)])
        s_ref = (h0 + h1[:, idx]) / 2                           # (2, 100, C)
        want = model(x) + 0.3 * s_ref.amax(1)
        torch.testing.assert_close(patched(x), want, rtol=1e-4, atol=1e-5)
        # one place for both branches: never above the average of each branch's own best location
        assert bool((s_ref.amax(1) <= (h0.amax(1) + h1.amax(1)) / 2 + 1e-6).all())


def test_coat_and_efficientvim_scores_combine_like_their_heads():
    coat = _model("coat_tiny", img_size=64)
    patched = patchcsra.patch(coat, lam=0.0, input_size=(3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x2, x3, x4 = coat.forward_features(x)                   # 8x8, 4x4, 2x2 token grids (+1 class token)
        rows = []
        for r in range(8):
            for c in range(8):
                cls = torch.stack([x2[:, 1 + r * 8 + c], x3[:, 1 + (r // 2) * 4 + c // 2],
                                   x4[:, 1 + (r // 4) * 2 + c // 4]], dim=1)  # (2, 3, D)
                rows.append(coat.head(coat.aggregate(cls)[:, 0]))
        torch.testing.assert_close(patched.split.forward_locations([x2, x3, x4]), torch.stack(rows, -1),
                                   rtol=1e-4, atol=1e-5)

    vim = _model("efficientvim_m1")
    patched = patchcsra.patch(vim, lam=0.0, input_size=(3, 128, 128))
    assert patched.info.num_locations == 4 and patched.info.exact_linear     # average pools and linear heads
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        fs = vim.forward_features(x)                            # three hidden states (B, D, N), final map (B, D, L)
        w = vim.weights.softmax(-1)
        fixed = sum(w[i] * vim.heads[i](fs[i].mean(-1)) for i in range(3))
        ref = fixed[:, :, None] + w[3] * vim.heads[3](fs[3].transpose(1, 2)).transpose(1, 2)
        torch.testing.assert_close(patched.split.forward_locations(fs), ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def clip():
    return _model("resnet50_clip")


def _clip_reference(head, f):
    """``proj(v(x_k + pos_k))`` by hand: positions resampled to the map as the pool does, v from q/k/v or qkv."""
    pos = resample_abs_pos_embed(head.pos_embed[None], tuple(f.shape[2:]), old_size=head.feat_size,
                                 num_prefix_tokens=1)[0, 1:]
    z = f.flatten(2).transpose(1, 2) + pos                      # (B, L, D): x_k + pos_k
    if head.qkv is None:
        v = z @ head.v.weight.t() + head.v.bias
    else:
        e = head.embed_dim
        v = z @ head.qkv.weight[2 * e:].t() + head.qkv.bias[2 * e:]
    return (v @ head.proj.weight.t() + head.proj.bias).transpose(1, 2)   # (B, C, L)


def test_clip_attention_pool_scores_are_value_path_with_positions(clip):
    patched = patchcsra.patch(clip, lam=0.02, input_size=(3, 96, 96))
    assert (patched.info.adapter, patched.info.pooling, patched.info.grid) == ("timm-attnpool", "attnpool", (3, 3))
    head = clip.head
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        f = clip.forward_features(x)                             # (2, 2048, 3, 3)
        s_ref = _clip_reference(head, f)                         # (2, 1024, 9)
        torch.testing.assert_close(patched.split.forward_locations(f), s_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(patched(x), clip(x) + 0.02 * s_ref.amax(-1), rtol=1e-4, atol=1e-5)
        v = f[:1, :, 0, 0]                                       # forward_single: no position (MaskCLIP)
        torch.testing.assert_close(patched.split.forward_single(v), head.proj(head.v(v)), rtol=1e-4, atol=1e-5)
        # at the pool's own 7x7 grid the positions are its parameters, not resampled
        f7 = torch.randn(1, 2048, 7, 7)
        want = head.proj(head.v(f7.flatten(2).transpose(1, 2) + head.pos_embed[1:])).transpose(1, 2)
        torch.testing.assert_close(patched.split.forward_locations(f7), want, rtol=1e-4, atol=1e-5)


def test_clip_fused_qkv(clip):
    own = clip.head
    torch.manual_seed(1)
    clip.head = AttentionPool2d(2048, feat_size=7, out_features=10, qkv_separate=False).eval()
    try:
        patched = patchcsra.patch(clip, lam=0.0, input_size=(3, 64, 64))
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            f = clip.forward_features(x)                         # (2, 2048, 2, 2)
            torch.testing.assert_close(patched.split.forward_locations(f), _clip_reference(clip.head, f),
                                       rtol=1e-4, atol=1e-5)
            assert allclose_logits(patched(x), clip(x))
    finally:
        clip.head = own


def test_collect_sweep_and_explain_on_a_multibranch_model(tmp_path):
    from patchcsra.data import open_dataset, resolve_transform
    from patchcsra.explain import explain
    from patchcsra.grid import sweep
    from patchcsra.stats import collect

    image_folder(tmp_path / "data", 3, 3)
    model = _model("crossvit_tiny_240", img_size=120, num_classes=3)
    spec = resolve_transform(model, img_size=120)
    ds = open_dataset(tmp_path / "data" / "train")
    ds.transform = spec.build()
    patched = patchcsra.patch(model, lam=0.0, input_size=spec.input_size)
    st = collect(patched, ds, temperatures=[0.5], batch_size=4, workers=0, cache_dir=None)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        out = patched.forward_scores(x, [0.5, math.inf])
        torch.testing.assert_close(st.base, model(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st.max, out["max"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st.att_for(0.5), out["att"][..., 0], rtol=1e-4, atol=1e-4)
    res = sweep(st, bootstrap=0, folds=0)
    assert res is not None
    paths = sorted((tmp_path / "data" / "train" / "c0").iterdir())[:1]
    maps = explain(patched, paths, transform_spec=spec, top_k=2, temperature=1.0)
    assert maps[0].grid == (10, 10) and maps[0].scores.shape == (2, 10, 10)


def test_list_features_of_an_unknown_family_are_refused_with_reason():
    class TwoBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3, 2), torch.nn.Linear(4, 5)

        def forward_features(self, x):
            f = self.a(x)
            return [f, f]

        def forward_head(self, fs):
            return self.b(sum(t.mean((2, 3)) for t in fs))

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    with pytest.raises(patchcsra.HeadNotFoundError, match=r"TwoBranch: .*multi-branch"):
        patchcsra.patch(TwoBranch(), lam=0.1, input_size=(3, 32, 32))
