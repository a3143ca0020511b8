"""Loading every kind of source, the generic fx/export adapter, and the refusal paths."""
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import custom_nets
import patchcsra
from patchcsra.heads.base import allclose_logits
from conftest import REPO, shared_path
from patchcsra.errors import SourceError

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _exact(model, size=(3, 32, 32), x=X32):
    patched = patchcsra.patch(model, lam=0.0, input_size=size)
    with torch.no_grad():
        assert allclose_logits(patched(x), model(x))
    return patched


# ------------------------------------------------------------------ fx on a user's own modules
def test_fx_finds_avg_pool2d_with_map_sized_kernel():
    model = custom_nets.resnet20().eval()
    patched = _exact(model)
    info = patched.info
    assert (info.adapter, info.kind, info.layout, info.grid, info.exact_linear) == ("fx", "avg+Linear", "NCHW", (8, 8), True)
    x = X32
    with torch.no_grad():  # independent four lines on the same features
        feat = model.layer3(model.layer2(model.layer1(torch.relu(model.bn1(model.conv1(x))))))
        score = torch.einsum("bdhw,cd->bchw", feat, model.linear.weight).flatten(2) + model.linear.bias[:, None]
        patched.lam = 0.1
        assert torch.allclose(patched(x), score.mean(2) + 0.1 * score.amax(2), atol=1e-5)


def test_fx_mean_pool_with_nonlinear_mlp_head():
    model = custom_nets.MeanPoolNet().eval()
    info = _exact(model, (3, 48, 48), torch.randn(2, 3, 48, 48)).info
    assert info.kind == "avg+Linear+tanh+Linear" and not info.exact_linear


@pytest.mark.parametrize("net,reason", [(custom_nets.FlattenNet, "flattens a 8x8x8 map"),
                                        (custom_nets.SkipHeadNet, "besides the pooled features")])
def test_fx_refuses_heads_it_cannot_split(net, reason):
    with pytest.raises(patchcsra.HeadNotFoundError, match=reason) as e:
        patchcsra.patch(net(), lam=0.2, input_size=(3, 32, 32))
    assert str(e.value).startswith(net.__name__ + ":") and "\n" not in str(e.value)


def test_torchscript_source_split_from_its_graph(tmp_path):
    model = custom_nets.resnet20().eval()
    path = tmp_path / "r20_script.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    with pytest.raises(patchcsra.TrustError, match="TorchScript archive"):
        patchcsra.load(path)
    loaded = patchcsra.load(path, trust=True)
    assert isinstance(loaded, torch.jit.ScriptModule)
    patched = patchcsra.patch(loaded, lam=0.0, input_size=(3, 32, 32))
    with torch.no_grad():
        assert allclose_logits(patched(X32), model(X32))
    assert patched.info.adapter == "fx"


def test_torch_export_source(tmp_path):
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))
    path = tmp_path / "r18.pt2"
    torch.export.save(ep, str(path))
    with pytest.raises(patchcsra.TrustError, match="torch.export archive"):
        patchcsra.load(path)
    loaded = patchcsra.load(path, trust=True)
    patched = patchcsra.patch(loaded, lam=0.0, input_size=(3, 64, 64))
    with torch.no_grad():
        assert allclose_logits(patched(x), model(x))
    assert patched.info.kind.startswith("avg") and patched.info.exact_linear


# ------------------------------------------------------------------ state dicts as people save them
def test_state_dict_nested_prefixed_other_classes(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=20).eval()
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": sd, "best": 0.5}, path)
    loaded = patchcsra.load(path, arch="torchvision:resnet18")
    assert loaded.fc.out_features == 20
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_safetensors_with_timm_arch(tmp_path):
    import timm

    model = timm.create_model("resnet18", num_classes=7).eval()
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = patchcsra.load(path, arch="timm:resnet18")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg["architecture"] == "resnet18"


def test_user_factory_arch(tmp_path):
    model = custom_nets.resnet20(num_classes=10).eval()
    path = tmp_path / "r20.pt"
    torch.save(model.state_dict(), path)
    loaded = patchcsra.load(path, arch="custom_nets:resnet20")
    with torch.no_grad():
        assert torch.equal(loaded(X32), model(X32))
    # the same architecture named by its file, as a user who never installed it would
    by_file = patchcsra.load(path, arch=f"{REPO / 'benchmarks' / 'cifar_resnet.py'}:resnet20")
    with torch.no_grad():
        assert torch.equal(by_file(X32), model(X32))
    with pytest.raises(SourceError, match="nowhere.py does not exist"):
        patchcsra.load(path, arch=f"{tmp_path / 'nowhere.py'}:resnet20")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(SourceError, match="importing .*broken.py failed .*boom"):
        patchcsra.load(path, arch=f"{broken}:resnet20")
    with pytest.raises(SourceError, match="has no callable 'resnet21'"):
        patchcsra.load(path, arch=f"{REPO / 'benchmarks' / 'cifar_resnet.py'}:resnet21")


def test_real_cifar_checkpoint_saved_on_gpu_with_dataparallel_prefix():
    """../shared/weights/resnet20-12fca82f.th: legacy pickle, {'state_dict', 'best_prec1'},
    'module.' keys, CUDA tensors, no num_batches_tracked."""
    path = shared_path("weights", "resnet20-12fca82f.th")
    model = patchcsra.load(path, arch="custom_nets:resnet20")
    patched = _exact(model)
    assert patched.info.num_classes == 10 and patched.info.num_locations == 64


def test_whole_pickle_needs_trust(tmp_path):
    model = custom_nets.MeanPoolNet().eval()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(patchcsra.TrustError, match=r"unpickling runs code.*trust=True"):
        patchcsra.load(path)
    loaded = patchcsra.load(path, trust=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_never_runs_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Marker(str(marker))}, fh)
    with pytest.raises(patchcsra.SourceError):
        patchcsra.load(path, arch="custom_nets:resnet20")
    assert not marker.exists()


def test_unknown_names_suggest_close_matches():
    with pytest.raises(patchcsra.SourceError, match=r"unknown timm model; did you mean: resnet50"):
        patchcsra.load("timm:resnet5O", pretrained=False)
    with pytest.raises(patchcsra.SourceError, match=r"did you mean: .*resnet18"):
        patchcsra.load("torchvision:resnet81", pretrained=False)
    with pytest.raises(patchcsra.SourceError, match=r"not a weights name of torchvision:resnet18; choose one of DEFAULT, IMAGENET1K_V1"):
        patchcsra.load("torchvision:resnet18", weights="IMAGENET9K")


def test_missing_file_and_bare_name(tmp_path):
    with pytest.raises(patchcsra.SourceError, match=r"nope.pt: no such file"):
        patchcsra.load(tmp_path / "nope.pt")
    with pytest.raises(patchcsra.SourceError, match=r"write timm:resnet50 or torchvision:resnet50"):
        patchcsra.load("resnet50")


def test_state_dict_that_does_not_fit(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(patchcsra.SourceError, match=r"does not fit arch torchvision:resnet34: \d+ missing"):
        patchcsra.load(path, arch="torchvision:resnet34")
    with pytest.raises(patchcsra.SourceError, match=r"holds a state dict .* pass arch="):
        patchcsra.load(path)


def test_patch_refuses_bad_lambda_and_double_patch():
    model = custom_nets.resnet20()
    for bad in (-0.1, float("nan"), "abc"):
        with pytest.raises(patchcsra.PatchCSRAError, match="lam="):
            patchcsra.patch(model, lam=bad, input_size=(3, 32, 32))
    p = patchcsra.patch(model, lam=0.1, input_size=(3, 32, 32))
    with pytest.raises(patchcsra.PatchCSRAError, match="already patched"):
        patchcsra.patch(p, lam=0.1)
    with pytest.raises(patchcsra.PatchCSRAError, match="lam="):
        p.lam = -1


def test_default_lambda_follows_the_paper():
    assert patchcsra.patch(custom_nets.resnet20(), input_size=(3, 32, 32)).lam == 0.02
    assert patchcsra.patch(custom_nets.MeanPoolNet(), input_size=(3, 32, 32)).lam == 0.2


def test_forward_scores_one_pass():
    p = patchcsra.patch(custom_nets.resnet20(), lam=0.3, input_size=(3, 32, 32))
    with torch.no_grad():
        out = p.forward_scores(X32, temperatures=(1.0, float("inf")))
        assert out["att"].shape == (2, 10, 2)
        assert torch.allclose(out["att"][..., 1], out["max"])
        assert torch.allclose(p(X32), out["base"] + 0.3 * out["max"], atol=1e-6)
