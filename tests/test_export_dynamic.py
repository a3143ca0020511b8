"""Written files run at every size the model accepts (dynamic batch, height, width), .onnx, the probe-size rule."""
from __future__ import annotations

import json
import logging
import zipfile

import pytest
import timm
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import custom_nets
import patchcsra
from patchcsra.cli import app
from patchcsra.errors import ExportError
from patchcsra.export import check_sizes, read_onnx_metadata, save_module, save_patched
from patchcsra.heads.base import allclose_logits
from patchcsra.heads.probe import resolve_input_size
from patchcsra.sources import META_FILE

runner = CliRunner()


def _meta(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(next(n for n in z.namelist() if n.endswith(META_FILE))))


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()


def test_readme_448_example_pt2_runs_at_448_and_non_square(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=20).eval()
    patched = patchcsra.patch(model, lam=0.2, input_size=(3, 224, 224))
    p = save_patched(patched, tmp_path / "voc-csra.pt2")
    m = torch.export.load(str(p)).module()
    with torch.no_grad():
        for shape in [(2, 3, 448, 448), (1, 3, 320, 448), (3, 3, 224, 224)]:
            x = torch.randn(shape)
            assert allclose_logits(m(x), patched(x), rel=1e-5), shape
    meta = _meta(p)
    assert meta["dynamic"] == {"batch": True, "height": True, "width": True} and meta["probe_guessed"] is False
    assert meta["checked_sizes"][0] == [3, 224, 224] and [3, 160, 192] in meta["checked_sizes"]


def test_cifar_resnet20_without_input_size_warns_once_and_works_at_32_and_224(tmp_path):
    model = custom_nets.resnet20().eval()
    src = tmp_path / "r20.pth"
    torch.save(model.state_dict(), src)
    out = tmp_path / "r20-csra.pt"
    res = runner.invoke(app, ["patch", str(src), "--arch", "custom_nets:resnet20", "--lam", "0.2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.count("is a guess") == 1 and "--input-size" in res.output
    m = torch.jit.load(str(out))  # tracing bakes avg_pool2d(x, x.size(3)): the file is scripted
    ref = patchcsra.patch(model, lam=0.2, input_size=(3, 32, 32))
    with torch.no_grad():
        for shape in [(4, 3, 32, 32), (1, 3, 224, 224)]:
            x = torch.randn(shape)
            assert allclose_logits(m(x), ref(x), rel=1e-5), shape
    meta = _meta(out)
    assert meta["probe_guessed"] is True and meta["dynamic"]["height"] is True
    res = runner.invoke(app, ["describe", str(src), "--arch", "custom_nets:resnet20", "--json", "--input-size", "3,32,32"])
    rec = json.loads(res.output)
    assert rec["probe_guessed"] is False and rec["num_locations"] == 64


def test_describe_says_the_probe_was_guessed(tmp_path):
    src = tmp_path / "tiny.pt"
    torch.save(_tiny(), src)
    res = runner.invoke(app, ["describe", str(src), "--trust", "--json"])
    assert res.exit_code == 0, res.output
    assert res.output.count("is a guess") == 1
    rec = json.loads(res.output[res.output.index("{"):])
    assert rec["probe_guessed"] is True and rec["num_locations"] == 112 * 112


def test_probe_size_rule(caplog):
    with caplog.at_level(logging.WARNING, logger="patchcsra"):
        assert resolve_input_size(timm.create_model("test_resnet")) == ((3, 160, 160), False)
        assert resolve_input_size(_tiny(), (3, 16, 16)) == ((3, 16, 16), False)
        assert not caplog.records
        assert resolve_input_size(_tiny()) == ((3, 224, 224), True)
    assert len(caplog.records) == 1 and "is a guess" in caplog.records[0].getMessage()


onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def test_onnx_through_the_cli_matches_with_onnxruntime_at_three_sizes(tmp_path):
    model = _tiny()
    src = tmp_path / "tiny.pt"
    torch.save(model, src)
    out = tmp_path / "m.onnx"
    res = runner.invoke(app, ["patch", str(src), "--trust", "--lam", "0.3", "--input-size", "3,32,32", "-o", str(out)])
    assert res.exit_code == 0, res.output
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref = patchcsra.patch(model, lam=0.3, input_size=(3, 32, 32))
    with torch.no_grad():
        for shape in [(2, 3, 32, 32), (1, 3, 24, 40), (3, 3, 64, 48)]:
            x = torch.randn(shape)
            got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
            assert allclose_logits(got, ref(x), rel=1e-4), shape
    meta = read_onnx_metadata(out)
    assert meta["lam"] == 0.3 and meta["format"] == "onnx" and meta["dynamic"]["width"] is True
    proto = onnx.load(str(out))
    assert any(i.name == "_lam" for i in proto.graph.initializer)  # λ stays changeable


def test_fixed_size_vit_exports_and_records_checked_sizes(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                            embed_dim=32, num_heads=2, num_classes=4).eval()
    patched = patchcsra.patch(vit, lam=0.2, input_size=(3, 32, 32))
    assert check_sizes(patched, (3, 32, 32), 8) == [(3, 32, 32)]  # it refuses every other size
    p = save_patched(patched, tmp_path / "vit.pt2")
    meta = _meta(p)
    assert meta["checked_sizes"] == [[3, 32, 32]] and meta["dynamic"] == {"batch": True, "height": False, "width": False}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert allclose_logits(torch.export.load(str(p)).module()(x), patched(x), rel=1e-5)


class _Baked(torch.nn.Module):
    """Pools with a kernel read from the map's size: tracing freezes it (16 at a 16x16 probe)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        f = self.conv(x)
        return self.fc(F.avg_pool2d(f, int(f.shape[-1])).flatten(1))


def test_tracing_that_bakes_a_shape_is_caught(tmp_path):
    path = tmp_path / "baked.pt"
    with pytest.raises(ExportError, match=r"baked\.pt: the torchscript file does not reproduce.*\.pt2"):
        save_module(_Baked().eval(), path, {"kind": "test"}, (3, 16, 16))
    assert not path.exists() and not list(tmp_path.glob(".*tmp*"))


def test_missing_onnx_extra_is_one_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime", name="onnxruntime")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ExportError, match=r"m\.onnx: writing \.onnx needs the onnx extra.*patchcsra\[onnx\]"):
        save_patched(patchcsra.patch(_tiny(), lam=0.1, input_size=(3, 16, 16)), tmp_path / "m.onnx")
