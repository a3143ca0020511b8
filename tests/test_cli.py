"""CLI end to end: patch -> file that plain PyTorch loads; describe; refusals with exit 2."""
import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import custom_nets
import patchcsra
from patchcsra.cli import app
from patchcsra.heads.base import allclose_logits

runner = CliRunner()


@pytest.fixture(scope="module")
def r20_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    model = custom_nets.resnet20().eval()
    path = d / "r20.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return model, path


def _plain_torch(code: str) -> str:
    """Run code in a fresh interpreter that must not import patchcsra."""
    code = code + "\nimport sys\nassert not any(m.startswith('patchcsra') for m in sys.modules)\n"
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_patch_writes_a_plain_pytorch_model(r20_file, tmp_path, suffix):
    model, src = r20_file
    out = tmp_path / f"patched{suffix}"
    res = runner.invoke(app, ["patch", str(src), "--arch", "custom_nets:resnet20", "--lam", "0.25",
                              "--input-size", "3,32,32", "-o", str(out)])
    assert res.exit_code == 0, res.output
    x = torch.randn(4, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    load = (f"m = torch.jit.load(r'{out}')" if suffix == ".pt" else f"m = torch.export.load(r'{out}').module()")
    _plain_torch(f"import torch\n{load}\nx = torch.load(r'{tmp_path / 'x.pt'}')\n"
                 f"torch.save(m(x), r'{tmp_path / 'y.pt'}')\nm._lam.fill_(0.0)\n"
                 f"torch.save(m(x), r'{tmp_path / 'y0.pt'}')")
    ref = patchcsra.patch(model, lam=0.25, input_size=(3, 32, 32))
    with torch.no_grad():
        assert allclose_logits(torch.load(tmp_path / "y.pt"), ref(x), rel=1e-4)
        assert allclose_logits(torch.load(tmp_path / "y0.pt"), model(x))
    back = patchcsra.load(out, trust=True)  # patchcsra reads its own record back
    assert isinstance(back, patchcsra.sources.PatchedArchive)
    meta = back.patchcsra_meta
    assert meta["lam"] == 0.25 and meta["head"]["kind"] == "avg+Linear"
    assert meta["source"]["spec"] == str(src) and meta["source"]["arch"] == "custom_nets:resnet20"
    back.lam = 0.0
    with torch.no_grad():
        assert allclose_logits(back(x), model(x))
    res = runner.invoke(app, ["describe", str(out), "--json", "--trust"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["patched"] is True


def test_refuses_overwrite_without_force(r20_file, tmp_path):
    _, src = r20_file
    out = tmp_path / "p.pt"
    out.write_text("keep me")
    args = ["patch", str(src), "--arch", "custom_nets:resnet20", "--input-size", "3,32,32", "-o", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "exists; pass --force" in res.output
    assert out.read_text() == "keep me"
    res = runner.invoke(app, args + ["--force"])
    assert res.exit_code == 0, res.output
    assert patchcsra.load(out, trust=True).patchcsra_meta["lam"] == 0.02  # paper's default λ for ResNets


@pytest.mark.parametrize("args,msg", [
    (["patch", "timm:resnt18", "-o", "{tmp}/a.pt"], "did you mean: resnet18"),
    (["patch", "{tmp}/missing.pth", "-o", "{tmp}/a.pt"], "missing.pth: no such file"),
    (["patch", "{src}", "-o", "{tmp}/a.pt"], "pass --arch"),
    (["patch", "{src}", "--arch", "custom_nets:resnet20", "--lam", "-1", "-o", "{tmp}/a.pt"], "lam=-1.0 is invalid"),
    (["patch", "{src}", "--arch", "custom_nets:resnet20", "--lam", "abc", "-o", "{tmp}/a.pt"], "--lam 'abc' is not a number"),
    (["patch", "{src}", "--arch", "custom_nets:resnet20", "--input-size", "3,32", "-o", "{tmp}/a.pt"], "--input-size"),
    (["patch", "{src}", "--arch", "custom_nets:resnet20", "-o", "{tmp}/nodir/a.pt"], "does not exist"),
    (["patch", "torchvision:vgg11", "--no-pretrained", "-o", "{tmp}/a.pt"], "VGG: cannot split"),
    (["describe", "{src}", "--arch", "torchvision:resnet18"], "does not fit arch"),
])
def test_bad_input_one_line_exit_2(r20_file, tmp_path, args, msg):
    _, src = r20_file
    args = [a.format(tmp=tmp_path, src=src) for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert msg in " ".join(res.output.split())
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob(".*tmp*"))


def test_describe_table(r20_file):
    _, src = r20_file
    res = runner.invoke(app, ["describe", str(src), "--arch", "custom_nets:resnet20", "--input-size", "3,32,32"])
    assert res.exit_code == 0, res.output
    assert "avg+Linear" in res.output and "exact_linear" in res.output
