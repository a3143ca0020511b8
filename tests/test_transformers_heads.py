"""transformers image classifiers: λ=0 exactness per head recipe, loading save_pretrained folders.

Tiny random-init configs from ``benchmarks/hf_tiny.py`` (1-2 layers, 32-128 px); no hub downloads.
"""
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_tiny  # noqa: E402  (benchmarks/ is on sys.path, see conftest.py)

import patchcsra  # noqa: E402
from patchcsra.errors import HeadNotFoundError, SourceError  # noqa: E402
from patchcsra.heads.base import allclose_logits, probe_input  # noqa: E402
from patchcsra.hf_models import HFImageClassifier, is_transformers_folder, load_transformers  # noqa: E402

transformers.logging.set_verbosity_error()

# (class, model_type, config overrides, layout, prefix tokens, locations, head kind)
CASES = [
    ("ViTForImageClassification", "vit", {}, "NLC", 1, 16, "token+Linear"),
    ("DeiTForImageClassification", "deit", {}, "NLC", 2, 16, "token+Linear"),
    ("DeiTForImageClassificationWithTeacher", "deit", {}, "NLC", 2, 16, "token+Linear+Linear(distilled)"),
    ("BeitForImageClassification", "beit", {}, "NLC", 1, 16, "avg+LayerNorm+Linear"),
    ("BeitForImageClassification", "beit", {"use_mean_pooling": False}, "NLC", 1, 16, "token+Linear"),
    ("Data2VecVisionForImageClassification", "data2vec-vision", {}, "NLC", 1, 16, "token+Linear"),
    ("Dinov2ForImageClassification", "dinov2", {}, "NLC", 1, 16, "token+avg+Linear"),
    ("Dinov2WithRegistersForImageClassification", "dinov2_with_registers", {}, "NLC", 3, 16, "token+avg+Linear"),
    ("CLIPForImageClassification", "clip", {}, "NLC", 1, 16, "avg+Linear"),
    ("SiglipForImageClassification", "siglip", {}, "NLC", 0, 16, "avg+Linear"),
    ("ConvNextForImageClassification", "convnext", {}, "NCHW", 0, 4, "avg+LayerNorm+Linear"),
    ("SwinForImageClassification", "swin", {}, "NLC", 0, 16, "avg+Linear"),
    ("Swinv2ForImageClassification", "swinv2", {}, "NLC", 0, 16, "avg+Linear"),
    ("ResNetForImageClassification", "resnet", {}, "NCHW", 0, 4, "avg+Linear"),
    ("RegNetForImageClassification", "regnet", {}, "NCHW", 0, 4, "avg+Linear"),
    ("EfficientNetForImageClassification", "efficientnet", {}, "NCHW", 0, 4, "avg+Linear"),
    ("MobileNetV2ForImageClassification", "mobilenet_v2", {}, "NCHW", 0, 4, "avg+Linear"),
    ("MobileViTForImageClassification", "mobilevit", {}, "NCHW", 0, 4, "avg+Linear"),
    ("LevitForImageClassificationWithTeacher", "levit", {}, "NLC", 0, 4,
     "avg+LevitClassificationLayer+LevitClassificationLayer(distilled)"),
    ("PvtForImageClassification", "pvt", {}, "NLC", 1, 4, "token+Linear"),
    ("PvtV2ForImageClassification", "pvt_v2", {}, "NCHW", 0, 4, "avg+Linear"),
    ("SegformerForImageClassification", "segformer", {}, "NCHW", 0, 4, "avg+Linear"),
    ("PoolFormerForImageClassification", "poolformer", {}, "NCHW", 0, 4, "avg+PoolFormerGroupNorm+Linear"),
    ("HieraForImageClassification", "hiera", {}, "NHWC", 0, 4, "avg+LayerNorm+Linear"),
    ("CvtForImageClassification", "cvt", {}, "NLC", 1, 16, "token+LayerNorm+Linear"),
    ("FocalNetForImageClassification", "focalnet", {}, "NLC", 0, 16, "avg+Linear"),
    ("SwiftFormerForImageClassification", "swiftformer", {}, "NCHW", 0, 4,
     "avg+BatchNorm2d+Linear+Linear(distilled)"),
    ("TimmWrapperForImageClassification", "timm_wrapper", {}, "NCHW", 0, 4, "avg+Linear"),
]


def _exact_and_moves(model):
    with torch.no_grad():
        patched = patchcsra.patch(model, lam=0.0)
        x = probe_input(patched.info.probe_input_size, batch=2) * 0.5 + 0.1
        y = model(x)
        assert isinstance(y, torch.Tensor) and y.shape == (2, 5)
        assert allclose_logits(patched(x), y), float((patched(x) - y).abs().max())
        patched.lam = 0.5
        moved = float((patched(x) - y).abs().max())
    assert moved > 1e-4 * max(1.0, float(y.abs().max()))
    return patched.info


@pytest.mark.parametrize("cls,mt,over,layout,prefix,locs,kind", CASES, ids=[f"{c[0]}{'-' + '-'.join(c[2]) if c[2] else ''}"
                                                                         for c in CASES])
def test_exact_at_lambda_zero_and_moves(cls, mt, over, layout, prefix, locs, kind):
    info = _exact_and_moves(hf_tiny.tiny_model(cls, mt, **over))
    assert info.adapter == "transformers"
    assert (info.layout, info.num_prefix_tokens, info.num_locations, info.kind) == (layout, prefix, locs, kind)


@pytest.mark.parametrize("cls,mt", [("ViTForImageClassification", "vit"), ("ConvNextForImageClassification", "convnext"),
                                    ("SwinForImageClassification", "swin")])
def test_a_model_type_without_recipe_is_split_by_the_generic_candidates(monkeypatch, cls, mt):
    from patchcsra.heads import hf as hf_heads

    monkeypatch.delitem(hf_heads.FAMILIES, mt)
    info = _exact_and_moves(hf_tiny.tiny_model(cls, mt))
    assert info.adapter == "transformers"


def test_perceiver_is_refused_with_its_reason():
    model = hf_tiny.tiny_model("PerceiverForImageClassificationLearned", "perceiver")
    with pytest.raises(HeadNotFoundError, match="latent array"):
        patchcsra.patch(model, lam=0.0)


def test_a_model_that_does_not_take_images_is_refused_by_the_wrapper():
    with pytest.raises(SourceError, match="input_ids"):
        hf_tiny.tiny_model("ImageGPTForImageClassification", "imagegpt")


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny-vit"
    labels = {0: "cat", 1: "dog", 2: "bird"}
    cfg = hf_tiny.tiny_config("vit", 3, id2label=labels, label2id={v: k for k, v in labels.items()})
    cfg.architectures = ["ViTForImageClassification"]
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(cfg).eval()
    hf.save_pretrained(d)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
                                   image_std=[0.2, 0.25, 0.3], resample=3).save_pretrained(d)
    return d, hf


def test_load_a_save_pretrained_folder(vit_folder):
    from patchcsra.data.classes import model_label_names
    from patchcsra.data.transforms import resolve_transform

    d, hf = vit_folder
    assert is_transformers_folder(d)
    model = load_transformers(str(d))
    assert isinstance(model, HFImageClassifier) and not model.training and not model.hf.training
    assert model.patchcsra_source == {"family": "vit", "input_size": [3, 32, 32], "categories": ["cat", "dog", "bird"]}
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.5, 0.4, 0.3) and cfg["std"] == (0.2, 0.25, 0.3)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0 and cfg["crop_mode"] == "squash"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), hf(pixel_values=x).logits)
        patched = patchcsra.patch(model, lam=0.0)
        assert allclose_logits(patched(x), model(x))
    spec = resolve_transform(patched)
    assert spec.input_size == (3, 32, 32) and spec.mean == (0.5, 0.4, 0.3) and spec.interpolation == "bicubic"
    assert model_label_names(patched) == ["cat", "dog", "bird"]


def test_load_random_init_and_another_number_of_classes(vit_folder):
    d, hf = vit_folder
    fresh = load_transformers(str(d), pretrained=False)
    assert not torch.equal(fresh.hf.classifier.weight, hf.classifier.weight)
    seven = load_transformers(f"hf:{d}", num_classes=7)
    assert seven(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert "categories" not in seven.patchcsra_source  # LABEL_0..6 are not names
    assert torch.equal(seven.hf.vit.embeddings.cls_token, hf.vit.embeddings.cls_token)


def test_is_transformers_folder_is_false_for_timm_and_random_folders(tmp_path):
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3,
                                                       "pretrained_cfg": {"input_size": [3, 224, 224]}}))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    (tmp_path / "text_model").mkdir()
    (tmp_path / "text_model" / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"],
                                                                     "model_type": "bert"}))
    assert not is_transformers_folder(timm_dir)
    assert not is_transformers_folder(other)
    assert not is_transformers_folder(tmp_path / "text_model")
    assert not is_transformers_folder(tmp_path / "missing")
    (other / "config.json").write_text(json.dumps({"model_type": "convnext"}))  # no architectures: by model type
    assert is_transformers_folder(other)


def test_hub_name_offline_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError) as e:
        load_transformers("no-such-org/no-such-model")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("hf:no-such-org/no-such-model: could not be fetched")


def test_bad_paths_are_one_line(tmp_path):
    with pytest.raises(SourceError, match="no such folder"):
        load_transformers(str(tmp_path / "missing" / "x" / "y"))
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"0")
    with pytest.raises(SourceError, match="not a file"):
        load_transformers(str(f))


def test_missing_transformers_names_the_extra(monkeypatch):
    from patchcsra import hf_models

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SourceError, match=r"pip install patchcsra\[hf\]"):
        hf_models._transformers()


def test_the_adapters_do_not_import_transformers():
    code = "import sys, patchcsra.heads, patchcsra.hf_models; print('transformers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
