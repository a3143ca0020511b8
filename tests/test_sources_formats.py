"""Models as people save them (issue 16): timm training checkpoints, timm hub folders and names, the official
CSRA checkpoints, and a fixed λ that depends on what the model is, not on the file it came in.

Every file here is written the way its library writes it (timm's ``CheckpointSaver`` and ``save_for_hf``,
``torch.jit``, ``torch.export``) from random-init models; hub downloads cannot happen here, so the hub names
are checked offline: one line naming the repo, fast.
"""
from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
from torch import nn
from typer.testing import CliRunner

import patchcsra
from patchcsra.cli import app
from patchcsra.errors import SourceError
from patchcsra.patcher import default_lam

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _timm_args(**over) -> argparse.Namespace:
    """The Namespace timm's train.py parses (the fields a checkpoint reader may look at, and a few others)."""
    ns = argparse.Namespace(model="resnet10t", num_classes=5, img_size=None, input_size=None, in_chans=None,
                            mean=None, std=None, crop_pct=None, interpolation="", lr=0.1, epochs=3,
                            data_dir="/data/imagenet", model_ema=True, aa="rand-m9-mstd0.5")
    for k, v in over.items():
        setattr(ns, k, v)
    return ns


def _train_checkpoint(tmp_path, args=None, ema=True):
    """A checkpoint written by timm's own CheckpointSaver (what train.py calls), EMA weights differing."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5).eval()
    model_ema = None
    if ema:
        model_ema = ModelEmaV3(model, decay=0.9)
        with torch.no_grad():
            for p in model_ema.module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saver = CheckpointSaver(model, opt, args=args, model_ema=model_ema, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=1)
    saver.save_checkpoint(epoch=0, metric=12.5)
    [path] = list(tmp_path.glob("checkpoint-0.pth.tar"))
    return path, model, (model_ema.module.eval() if model_ema else None)


@torch.no_grad()
def _same(a: nn.Module, b: nn.Module, x=X) -> None:
    ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, atol=1e-5, rtol=1e-5), float((ya - yb).abs().max())


# ----------------------------------------------------------------------------- timm train.py checkpoints
def test_timm_training_checkpoint_loads_with_its_arch_and_args_as_data(tmp_path):
    path, model, ema = _train_checkpoint(tmp_path, _timm_args(img_size=96))
    got = patchcsra.load(path)  # no --arch, no --trust: 'arch' names it, the Namespace is read as data
    _same(got, model)
    src = got.patchcsra_source
    assert src["arch"] == "timm:resnet10t" and src["family"] == "resnet10t" and src["epoch"] == 0
    assert src["input_size"] == [3, 96, 96]  # args.img_size: the size it was trained at, recorded...
    assert patchcsra.describe(got).probe_input_size == (3, 176, 176)  # ...but the model's own config comes first
    _same(patchcsra.load(path, ema=True), ema)  # --ema takes state_dict_ema
    assert not torch.allclose(model(X), ema(X))  # ...which the test can tell apart


def test_timm_training_checkpoint_without_args_uses_arch_or_names_it(tmp_path):
    path, model, _ = _train_checkpoint(tmp_path, args=None, ema=False)
    blob = torch.load(path, weights_only=True)
    assert blob["arch"] == "resnet"  # CheckpointSaver without args: the class name, not a timm model
    with pytest.raises(SourceError) as e:
        patchcsra.load(path)
    msg = str(e.value)
    assert "'resnet' is not a timm model name" in msg and "--arch" in msg and "\n" not in msg and "\x1b" not in msg
    _same(patchcsra.load(path, arch="timm:resnet10t"), model)
    blob["arch"] = "resnet10t"
    torch.save(blob, tmp_path / "named.pth")
    _same(patchcsra.load(tmp_path / "named.pth"), model)
    with pytest.raises(SourceError, match="no EMA weights.*--ema"):
        patchcsra.load(tmp_path / "named.pth", ema=True)


def test_other_pickled_objects_are_named_in_one_plain_line(tmp_path):
    """A checkpoint holding an object outside the allow-list: refused, the global named, no escape codes."""
    import datetime

    torch.save({"state_dict": {"w": torch.ones(1)}, "when": datetime.date(2026, 1, 1)}, tmp_path / "odd.pth")
    with pytest.raises(patchcsra.errors.TrustError) as e:
        patchcsra.load(tmp_path / "odd.pth")
    msg = str(e.value)
    assert "datetime.date" in msg and "--trust" in msg and "\x1b" not in msg and "\n" not in msg


def test_cli_describes_a_training_checkpoint(tmp_path):
    path, _, _ = _train_checkpoint(tmp_path, _timm_args(img_size=64), ema=False)
    res = CliRunner().invoke(app, ["describe", str(path)])
    assert res.exit_code == 0, res.output
    assert "timm" in res.output


# ----------------------------------------------------------------------------- timm hub folders and names
def test_timm_hub_folder_and_local_dir(tmp_path):
    from timm.models import save_for_hf

    torch.manual_seed(1)
    model = timm.create_model("resnet10t", num_classes=7).eval()
    save_for_hf(model, str(tmp_path / "hub"), safe_serialization=True)
    assert (tmp_path / "hub" / "config.json").is_file() and (tmp_path / "hub" / "model.safetensors").is_file()
    for spec in (tmp_path / "hub", f"timm:local-dir:{tmp_path / 'hub'}"):
        got = patchcsra.load(spec)
        _same(got, model)
        assert got.patchcsra_source["family"] == "resnet10t"
    with pytest.raises(SourceError, match="without a model config.json"):
        patchcsra.load(tmp_path)  # a folder of something else


@pytest.mark.parametrize("spec", ["hf-hub:timm/resnet18.a1_in1k", "timm/resnet18.a1_in1k",
                                  "timm:timm/resnet18.a1_in1k", "hf:google/vit-base-patch16-224"])
def test_hub_names_offline_fail_in_one_line(spec, monkeypatch):
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(SourceError) as e:
        patchcsra.load(spec)
    assert time.perf_counter() - t0 < 20
    msg = str(e.value)
    assert spec.split(":")[-1] in msg and "\n" not in msg


# ----------------------------------------------------------------------------- the fixed λ follows the family
def _containers(tmp_path, model: nn.Module, arch: str) -> dict:
    """The same model as a state dict + arch, a whole pickle, TorchScript and a .pt2 archive."""
    x = torch.randn(1, 3, 64, 64)
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    torch.save(model, tmp_path / "whole.pt")
    torch.jit.save(torch.jit.trace(model, x), str(tmp_path / "ts.pt"))
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "ep.pt2"))
    return {"state dict": patchcsra.load(tmp_path / "sd.pth", arch=arch),
            "pickle": patchcsra.load(tmp_path / "whole.pt", trust=True),
            "TorchScript": patchcsra.load(tmp_path / "ts.pt", trust=True),
            ".pt2": patchcsra.load(tmp_path / "ep.pt2", trust=True)}


def test_default_lam_is_the_same_in_every_container(tmp_path):
    torch.manual_seed(0)
    resnet = timm.create_model("resnet10t", num_classes=4).eval()
    lams = {k: default_lam(m) for k, m in _containers(tmp_path, resnet, "timm:resnet10t").items()}
    assert lams == {k: 0.02 for k in lams}, lams
    other = timm.create_model("mobilenetv3_small_050", num_classes=4).eval()
    (tmp_path / "b").mkdir()
    lams = {k: default_lam(m) for k, m in _containers(tmp_path / "b", other, "timm:mobilenetv3_small_050").items()}
    assert lams == {k: 0.2 for k in lams}, lams


# ----------------------------------------------------------------------------- the official CSRA checkpoints
class _OfficialCSRA(nn.Module):
    """Transcribed from Kevinz-code/CSRA pipeline/csra.py (CSRA, MHA) on a torchvision ResNet (resnet_csra.py)."""

    temp_settings = {1: [1], 2: [1, 99], 4: [1, 2, 4, 99], 6: [1, 2, 3, 4, 5, 99], 8: [1, 2, 3, 4, 5, 6, 7, 99]}

    def __init__(self, num_heads: int, lam: float, num_classes: int) -> None:
        import torchvision

        super().__init__()
        r = torchvision.models.resnet18()
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        self.fc = nn.Sequential()
        self.lam, self.temps = lam, self.temp_settings[num_heads]
        self.classifier = nn.Module()
        self.classifier.multi_head = nn.ModuleList()
        for _ in self.temps:
            block = nn.Module()
            block.head = nn.Conv2d(512, num_classes, 1, bias=False)
            self.classifier.multi_head.append(block)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))))
        logit = 0.0
        for block, t in zip(self.classifier.multi_head, self.temps):
            score = block.head(x) / torch.norm(block.head.weight, dim=1, keepdim=True).transpose(0, 1)
            score = score.flatten(2)
            base = torch.mean(score, dim=2)
            att = torch.max(score, dim=2)[0] if t == 99 else torch.sum(score * torch.softmax(score * t, dim=2), dim=2)
            logit = logit + base + self.lam * att
        return logit


@pytest.mark.parametrize("heads", [1, 4])
def test_official_csra_checkpoint_is_its_model(tmp_path, heads):
    torch.manual_seed(heads)
    ref = _OfficialCSRA(heads, 0.3, 20).eval()
    for m in ref.modules():  # non-trivial BN statistics, as a trained model has
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"resnet18_voc07_head{heads}_lam0.3_94.7.pth"
    torch.save(ref.state_dict(), path)
    got = patchcsra.load(path)  # no --arch: the keys say what it is
    _same(got, ref)
    assert got.head.heads == heads and got.head.lam == 0.3
    assert got.head.temperatures[-1] == (math.inf if heads > 1 else 1.0)
    assert default_lam(got) == 0.02
    patched = patchcsra.patch(got, lam=0.0, input_size=(3, 64, 64))
    _same(patched, ref)


# ----------------------------------------------------------------------------- offline: seconds, not retries
@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18", "hf:google/vit-base-patch16-224",
                                  "google/vit-base-patch16-224"])
def test_no_network_fails_in_seconds_naming_the_way_out(spec, monkeypatch):
    import socket
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the network is what is missing

    def blocked(*a, **k):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "create_connection", blocked)
    t0 = time.perf_counter()
    with pytest.raises(SourceError) as e:
        patchcsra.load(spec)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "cannot be reached" in msg and "\n" not in msg
    if ":" in spec:
        assert "--no-pretrained" in msg and "--weights" in msg
