"""Promise 1: untrusted files never run code.

Each file here would create a marker file if anything executed the code it carries. Without the trust
flag the marker never appears and the refusal says why; with it, the same file does run (so the test
can fail: the marker is real).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import patchcsra
from patchcsra.cli import app

runner = CliRunner()


class _Payload:
    """Unpickling this calls ``os.system('touch MARKER')``, as a hostile checkpoint would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _evil_pickle(path, marker, nested: bool) -> None:
    obj = {"state_dict": {"w": torch.zeros(2)}, "extra": _Payload(marker)} if nested else _Payload(marker)
    with open(path, "wb") as f:
        if path.suffix in (".pt", ".pth"):
            torch.save(obj, f)
        else:
            pickle.dump(obj, f)


@pytest.mark.parametrize("name,nested", [("whole.pt", False), ("ckpt.pth", True), ("legacy.pkl", False)])
def test_pickle_payload_never_runs_without_trust(tmp_path, name, nested):
    marker = tmp_path / "MARKER"
    path = tmp_path / name
    _evil_pickle(path, marker, nested)
    with pytest.raises(patchcsra.TrustError, match="unpickling runs code|pickled Python objects"):
        patchcsra.load(path, arch="custom_nets:resnet20")
    with pytest.raises(patchcsra.TrustError):
        patchcsra.sources.load_state_dict_file(path)
    for cmd in (["describe", str(path)], ["patch", str(path), "-o", str(tmp_path / "p.pt")],
                ["describe", str(path), "--arch", "custom_nets:resnet20"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2, r.output
        line = " ".join(r.output.split())
        assert str(path.name) in line and "--trust" in line and "Traceback" not in r.output
    assert not marker.exists(), "the payload ran without --trust"
    assert not (tmp_path / "p.pt").exists()
    # the same file with trust does run its code: the test above can fail
    with pytest.raises(patchcsra.PatchCSRAError):
        patchcsra.load(path, trust=True)  # it holds no model, but unpickling already ran
    assert marker.exists()


def test_safetensors_and_state_dicts_load_without_trust(tmp_path):
    from safetensors.torch import save_file

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"model": net.state_dict(), "epoch": 3, "args": {"lr": 0.1}}, tmp_path / "ckpt.pth")
    for f in ("w.safetensors", "ckpt.pth"):
        sd = patchcsra.sources.load_state_dict_file(tmp_path / f)
        assert set(sd) == set(net.state_dict())


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_archives_need_trust(tmp_path, suffix):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    path = tmp_path / f"model{suffix}"
    x = torch.randn(2, 3, 16, 16)
    if suffix == ".pt":
        torch.jit.save(torch.jit.trace(net, x), str(path))
    else:
        torch.export.save(torch.export.export(net, (x,)), str(path))
    kind = "TorchScript" if suffix == ".pt" else "torch.export"
    with pytest.raises(patchcsra.TrustError, match=f"{kind} archive.*trust=True"):
        patchcsra.load(path)
    r = runner.invoke(app, ["describe", str(path), "--input-size", "3,16,16"])
    assert r.exit_code == 2 and "--trust" in r.output and path.name in " ".join(r.output.split())
    r = runner.invoke(app, ["describe", str(path), "--input-size", "3,16,16", "--trust", "--json"])
    assert r.exit_code == 0, r.output


def test_refusal_happens_before_any_unpickling(tmp_path):
    """A fresh interpreter: loading without trust imports nothing the payload names and runs nothing."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "whole.pt"
    _evil_pickle(path, marker, nested=False)
    code = ("import sys, patchcsra\n"
            "try:\n"
            f"    patchcsra.load(r'{path}')\n"
            "except patchcsra.TrustError as e:\n"
            "    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused:") and "--trust" in out.stdout
    assert not marker.exists()


def test_a_payload_planted_as_the_resume_checkpoint_never_runs(tmp_path):
    """train-head --resume reads OUT/checkpoint.pt as tensors and numbers only."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data" / "train"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((32, 32, 3), 60 * j, np.uint8)).save(data / c / f"{j}.png")
    torch.manual_seed(0)
    import custom_nets

    src = tmp_path / "r.pt"
    torch.save(custom_nets.resnet20(num_classes=2).state_dict(), src)
    out, marker = tmp_path / "run", tmp_path / "MARKER"
    out.mkdir()
    torch.save({"key": "x", "epoch": 1, "payload": _Payload(marker)}, out / "checkpoint.pt")
    r = runner.invoke(app, ["train-head", str(src), "--arch", "custom_nets:resnet20", "--num-classes", "2",
                            "--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                            "--data", str(tmp_path / "data"), "--split", "train", "--epochs", "1", "--workers", "0",
                            "--device", "cpu", "--out", str(out), "--resume"])
    assert r.exit_code == 2 and "not a checkpoint train-head wrote" in " ".join(r.output.split())
    assert not marker.exists()


def test_the_package_unpickles_in_one_trusted_place_only():
    """Every ``weights_only=False`` in patchcsra sits in ``sources._torch_load``, behind ``trust``."""
    import ast
    from pathlib import Path

    root = Path(patchcsra.__file__).parent
    found = []
    for p in root.rglob("*.py"):
        tree = ast.parse(p.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            for node in ast.walk(fn):
                if isinstance(node, ast.keyword) and node.arg == "weights_only" and \
                        isinstance(node.value, ast.Constant) and node.value.value is False:
                    found.append((p.relative_to(root).as_posix(), fn.name))
    assert sorted(set(found)) == [("sources.py", "_torch_load")]


def test_arch_module_lookup_never_shadows_a_library_later(tmp_path, monkeypatch):
    """``--arch mod:fn`` looks in the working directory last, and only for that import."""
    import sys

    (tmp_path / "my_arch_mod.py").write_text("import torch\ndef net():\n    return torch.nn.Linear(2, 2)\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    from patchcsra.sources import build_arch

    m = build_arch("my_arch_mod:net")
    assert isinstance(m, nn.Linear)
    assert sys.path == before  # the working directory was searched (last) for this import only
