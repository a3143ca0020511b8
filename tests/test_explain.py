"""Attention maps (patchcsra.explain) on real VOC images: CNN (NCHW), ViT (NLC), torchvision via fx."""
import dataclasses
import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import patchcsra
from conftest import shared_path
from patchcsra.data import resolve_transform
from patchcsra.errors import PatchCSRAError
from patchcsra.explain import ExplainResult, explain, explain_to_dir, location_grid, render, save_maps

INF = float("inf")


def voc(image_id: str):
    return shared_path("data", "voc2007-mini", "VOCdevkit", "VOC2007", "JPEGImages", f"{image_id}.jpg")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False).eval()
    patched = patchcsra.patch(model, lam=0.2, temperature=1.0, input_size=(3, 96, 96))
    return model, patched, resolve_transform(model, img_size=96)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    model.set_input_size(img_size=(64, 64))
    patched = patchcsra.patch(model, lam=0.2, temperature=1.0, input_size=(3, 64, 64))
    return model, patched, resolve_transform(model, img_size=64)


def _inputs(spec, paths):
    tf = spec.build()
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])


def test_cnn_maps_equal_fc_on_each_location(cnn):
    model, patched, spec = cnn
    paths = [voc("000005"), voc("000019")]
    res = explain(patched, paths, transform_spec=spec, top_k=4, temperature=1.0)
    x = _inputs(spec, paths)
    with torch.no_grad():
        f = model.forward_features(x)                                       # (B, 512, 3, 3)
        fc = model.get_classifier()
        ref_scores = torch.einsum("bdhw,cd->bchw", f, fc.weight) + fc.bias[None, :, None, None]
        y = patched(x)                                                      # patched at T=1
    assert [r.image_id for r in res] == ["000005", "000019"]
    for b, r in enumerate(res):
        assert isinstance(r, ExplainResult)
        assert r.image.shape == (96, 96, 3) and r.image.dtype == np.uint8
        assert r.scores.shape == r.attention.shape == (4, 3, 3) and r.grid == (3, 3)
        assert r.classes == torch.argsort(y[b], descending=True)[:4].tolist()
        np.testing.assert_allclose(r.logits, y[b, r.classes].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r.probs, torch.softmax(y[b], 0)[r.classes].numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(r.scores, ref_scores[b, r.classes].numpy(), rtol=1e-4, atol=1e-4)
        att = torch.softmax(torch.from_numpy(r.scores).flatten(1), dim=1).reshape(4, 3, 3).numpy()
        np.testing.assert_allclose(r.attention, att, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.attention.sum(axis=(1, 2)), 1.0, atol=1e-5)
        assert r.names[0] == patchcsra.data.model_label_names(model)[r.classes[0]]
        # the picture is the model's input crop, de-normalised
        mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]
        pic = (x[b] * std + mean).clamp(0, 1).mul(255).permute(1, 2, 0).numpy()
        assert np.abs(r.image.astype(float) - pic).max() <= 0.51


def test_temperature_inf_is_one_hot_at_argmax(cnn):
    model, patched, spec = cnn
    r = explain(patched, [voc("000044")], transform_spec=spec, classes=[3, "goldfish", 999],
                temperature=INF)[0]
    assert r.classes == [3, 1, 999] and r.names[1] == "goldfish" and math.isinf(r.temperature)
    for k in range(3):
        flat = r.attention[k].ravel()
        assert flat.sum() == 1.0 and np.count_nonzero(flat) == 1
        assert flat.argmax() == r.scores[k].ravel().argmax()
    x = _inputs(spec, [voc("000044")])
    patched.temperature = INF
    try:
        with torch.no_grad():
            y = patched(x)[0, r.classes].numpy()
    finally:
        patched.temperature = 1.0
    np.testing.assert_allclose(r.logits, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(r.logits) - np.array(r.base_logits),
                               0.2 * r.scores.reshape(3, -1).max(1), rtol=1e-4, atol=1e-5)


def test_vit_tokens_on_patch_grid(vit):
    model, patched, spec = vit
    res = explain(patched, [voc("000012"), Image.open(voc("000024"))], transform_spec=spec, top_k=3,
                  temperature=2.0)
    x = _inputs(spec, [voc("000012"), voc("000024")])
    with torch.no_grad():
        f = model.forward_features(x)                                       # (B, 1 + 16, 192)
        y = patched.split.forward_baseline(f) + 0.2 * patchcsra.residual_attention(
            patched.split.forward_locations(f), 2.0)
        # independent: the model's own head reading patch token l in the class-token slot
        per_loc = []
        for loc in range(16):
            g = f.clone()
            g[:, 0] = f[:, 1 + loc]
            per_loc.append(model.forward_head(g))
        ref = torch.stack(per_loc, dim=-1)                                  # (B, C, 16), row-major grid
    assert [r.image_id for r in res] == ["000012", "000024"]
    for b, r in enumerate(res):
        assert r.image.shape == (64, 64, 3) and r.scores.shape == (3, 4, 4)
        assert r.classes == torch.argsort(y[b], descending=True)[:3].tolist()
        np.testing.assert_allclose(r.scores.reshape(3, 16), ref[b, r.classes].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r.attention.sum(axis=(1, 2)), 1.0, atol=1e-5)
        att = torch.softmax(2.0 * ref[b, r.classes], dim=1).numpy()
        np.testing.assert_allclose(r.attention.reshape(3, 16), att, rtol=1e-4, atol=1e-6)


def test_torchvision_resnet_via_fx_non_square():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    patched = patchcsra.patch(model, lam=0.02, input_size=(3, 64, 64))
    assert patched.info.adapter == "fx"
    spec = resolve_transform(model, input_size=(3, 64, 96), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    r = explain(patched, [voc("000020")], transform_spec=spec, top_k=2, temperature=INF, prob="sigmoid")[0]
    x = _inputs(spec, [voc("000020")])
    with torch.no_grad():
        m = model
        f = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))   # (1, 512, 2, 3)
        ref = torch.einsum("bdhw,cd->bchw", f, m.fc.weight) + m.fc.bias[None, :, None, None]
    assert r.image.shape == (64, 96, 3) and r.scores.shape == (2, 2, 3)
    np.testing.assert_allclose(r.scores, ref[0, r.classes].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r.probs, 1 / (1 + np.exp(-np.array(r.logits))), rtol=1e-5)
    assert r.prob_kind == "sigmoid"


def test_location_grid_layouts_and_non_square(cnn):
    model, patched, _ = cnn
    info = patched.info                                                     # probed at 96x96: 3x3
    x = torch.zeros(1, 3, 64, 96)
    with torch.no_grad():
        f = model.forward_features(x)
    assert tuple(f.shape[2:]) == (2, 3)
    assert location_grid(info, 6, (3, 64, 96), features=f) == (2, 3)
    assert location_grid(info, 6, (3, 64, 96)) == (2, 3)                     # info.grid scaled to the input
    assert location_grid(info, 6, (3, 96, 64)) == (3, 2)
    with torch.no_grad():
        assert tuple(model.forward_features(torch.zeros(1, 3, 33, 64)).shape[2:]) == (2, 2)
    assert location_grid(info, 4, (3, 33, 64)) == (2, 2)                     # strides 16.5 x 32: scaled only
    nhwc = dataclasses.replace(info, layout="NHWC", grid=None)
    assert location_grid(nhwc, 10, (3, 64, 160), features=torch.zeros(1, 2, 5, 8)) == (2, 5)
    # NLC: a dynamic-size ViT on a non-square input, grid from patch_embed
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    nlc = dataclasses.replace(info, layout="NLC", grid=None, num_prefix_tokens=1)
    with torch.no_grad():
        n = vit.forward_features(x).shape[1] - vit.num_prefix_tokens
    assert n == 24
    assert location_grid(nlc, n, (3, 64, 96), vit) == (4, 6)
    assert location_grid(nlc, n, (3, 64, 96)) == (4, 6)                     # equal strides 16 x 16
    assert location_grid(nlc, 16, (3, 64, 64)) == (4, 4)                    # square sqrt(L)
    with pytest.raises(PatchCSRAError, match="num_locations=7"):
        location_grid(nlc, 7, (3, 64, 96))
    with pytest.raises(PatchCSRAError, match="num_locations=12"):
        location_grid(nlc, 12, (3, 64, 64))


def test_bad_arguments_name_the_argument(cnn, tmp_path):
    _, patched, spec = cnn
    img = voc("000005")
    with pytest.raises(PatchCSRAError, match="goldfish"):
        explain(patched, [img], transform_spec=spec, classes=["goldfsh"])
    with pytest.raises(PatchCSRAError, match="out of range"):
        explain(patched, [img], transform_spec=spec, classes=[1000])
    with pytest.raises(PatchCSRAError, match="class_names has 3 names"):
        explain(patched, [img], transform_spec=spec, class_names=["a", "b", "c"])
    with pytest.raises(PatchCSRAError, match="top_k"):
        explain(patched, [img], transform_spec=spec, top_k=0)
    with pytest.raises(PatchCSRAError, match="temperature"):
        explain(patched, [img], transform_spec=spec, temperature=-1.0)
    with pytest.raises(PatchCSRAError, match=r"images\[1\]"):
        explain(patched, [img, tmp_path / "missing.jpg"], transform_spec=spec)
    names = [f"c{i}" for i in range(1000)]
    r = explain(patched, [img], transform_spec=spec, classes=["C7", 2], class_names=names)[0]
    assert r.classes == [7, 2] and r.names == ["c7", "c2"]


def test_render_and_save_maps_refuse_to_overwrite(cnn, tmp_path):
    _, patched, spec = cnn
    r = explain(patched, [voc("000019")], transform_spec=spec, top_k=2)[0]
    png = render(r, tmp_path / "maps.png")
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    with pytest.raises(PatchCSRAError, match="exists; pass force=True"):
        render(r, png)
    before = png.read_bytes()
    render(r, png, force=True, alpha=0.3, cmap="viridis")
    assert png.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["maps.png"]              # no temporary left behind

    out = save_maps(r, tmp_path)
    assert out == tmp_path
    assert np.load(tmp_path / "000019_scores.npy").shape == (2, 3, 3)
    np.testing.assert_array_equal(np.load(tmp_path / "000019_attention.npy"), r.attention)
    rec = json.loads((tmp_path / "000019_classes.json").read_text())
    assert rec["classes"] == r.classes and rec["names"] == r.names and rec["grid"] == [3, 3]
    with pytest.raises(PatchCSRAError, match="000019_scores.npy exists"):
        save_maps(r, tmp_path)
    z = np.load(save_maps(r, tmp_path / "one.npz"))
    assert z["scores"].shape == (2, 3, 3) and z["classes"].tolist() == r.classes


def test_explain_to_dir_writes_four_files_per_image(vit, tmp_path):
    _, patched, spec = vit
    out = tmp_path / "maps" / "vit"
    images = [voc("000044"), voc("000044")]                                 # same stem twice: ids made unique
    paths = explain_to_dir(patched, images, out, transform_spec=spec, top_k=2, temperature=INF)
    names = sorted(p.name for p in paths)
    assert names == sorted(["000044.png", "000044_scores.npy", "000044_attention.npy", "000044_classes.json",
                            "000044_2.png", "000044_2_scores.npy", "000044_2_attention.npy",
                            "000044_2_classes.json"])
    assert all(p.is_file() for p in paths) and len(list(out.iterdir())) == 8
    with Image.open(out / "000044.png") as im:
        im.verify()
    att = np.load(out / "000044_attention.npy")
    assert att.shape == (2, 4, 4) and set(np.unique(att)) == {0.0, 1.0}
    assert json.loads((out / "000044_classes.json").read_text())["temperature"] == "inf"
    stamp = (out / "000044.png").stat().st_mtime_ns
    with pytest.raises(PatchCSRAError, match="exists; pass force=True"):
        explain_to_dir(patched, images, out, transform_spec=spec)
    assert (out / "000044.png").stat().st_mtime_ns == stamp
    assert len(explain_to_dir(patched, images[:1], out, transform_spec=spec, force=True)) == 4


def test_cli_explain_writes_grids_and_refuses_overwrite(tmp_path):
    from typer.testing import CliRunner

    from patchcsra.cli import app

    img = shared_path("data", "voc2007-mini", "VOCdevkit", "VOC2007", "JPEGImages", "000005.jpg")
    args = ["explain", "timm:resnet10t", "--no-pretrained", str(img), "--img-size", "96", "--classes",
            "tench,goldfish", "--out", str(tmp_path / "x")]
    runner = CliRunner()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [
        "000005.png", "000005_attention.npy", "000005_classes.json", "000005_scores.npy"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "exists" in r.output
    r = runner.invoke(app, args[:-1] + [str(tmp_path / "y"), "--classes", "tenchh"])
    assert r.exit_code == 2 and "tench" in r.output
