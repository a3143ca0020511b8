"""patchcsra.export: patched models as TorchScript / torch.export files that load in plain PyTorch."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch

import patchcsra
from patchcsra.errors import ExportError, OutputError
from patchcsra.export import export_format, patched_metadata, save_patched
from patchcsra.sources import META_FILE


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()


def test_export_format_by_suffix_and_flag():
    assert export_format("a.pt2") == "export" and export_format("a.pt") == "torchscript"
    assert export_format("a.pt2", "torchscript") == "torchscript" and export_format("a.onnx") == "onnx"
    with pytest.raises(ExportError, match="format='tflite'"):
        export_format("a.pt", "tflite")


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_saved_file_reproduces_the_patch_and_carries_its_record(tmp_path, suffix):
    model = _model()
    patched = patchcsra.patch(model, lam=0.3, input_size=(3, 16, 16))
    p = save_patched(patched, tmp_path / f"m{suffix}", source={"spec": "mine"})
    x = torch.randn(4, 3, 16, 16)
    loaded = torch.jit.load(str(p)) if suffix == ".pt" else torch.export.load(str(p)).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), patched(x), rtol=1e-5, atol=1e-5)
    with zipfile.ZipFile(p) as z:
        name = next(n for n in z.namelist() if n.endswith(META_FILE))
        meta = json.loads(z.read(name))
    assert meta["lam"] == 0.3 and meta["temperature"] == "inf" and meta["source"] == {"spec": "mine"}
    assert meta["format"] == ("torchscript" if suffix == ".pt" else "export") and meta["input_size"] == [3, 16, 16]
    assert meta["head"]["num_classes"] == 5


def test_lam_buffer_zero_gives_the_original_model(tmp_path):
    model = _model()
    p = save_patched(patchcsra.patch(model, lam=0.5, input_size=(3, 16, 16)), tmp_path / "m.pt")
    m = torch.jit.load(str(p))
    m._lam.fill_(0.0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), model(x), rtol=0, atol=1e-6)


def test_an_existing_file_is_kept_without_force(tmp_path):
    p = tmp_path / "m.pt"
    p.write_text("keep me")
    patched = patchcsra.patch(_model(), lam=0.1, input_size=(3, 16, 16))
    with pytest.raises(OutputError, match="exists"):
        save_patched(patched, p)
    assert p.read_text() == "keep me"
    save_patched(patched, p, force=True)
    assert torch.jit.load(str(p)) is not None


def test_metadata_names_versions_and_formula():
    meta = patched_metadata(patchcsra.patch(_model(), lam=0.2, temperature=2.0, input_size=(3, 16, 16)), fmt="export")
    assert meta["temperature"] == 2.0 and meta["torch"] == torch.__version__ and "lam" in meta["formula"]
