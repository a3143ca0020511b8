"""Many-to-one class maps (max / logsumexp over the mapped outputs, for the logits and the per-location scores),
timm's one-name-per-line class maps and label files, ``--class-names`` for sweep-lambda and explain."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import patchcsra
from patchcsra.cli import app
from patchcsra.data import align_class_groups, align_classes, load_class_map, load_class_names
from patchcsra.errors import DataMismatchError, DatasetError
from patchcsra.patcher import residual_attention
from patchcsra.stats import collect

from conftest import shared_path

runner = CliRunner()
GROUPS = {"cat": [0, 2, 4], "dog": 1, "eel": [5, 3]}  # 6 outputs -> 3 dataset classes


def _folder(root: Path, classes=("cat", "dog", "eel"), n=2, size=32) -> Path:
    rng = np.random.default_rng(0)
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(n):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            arr[..., i % 3] = 250 - 30 * j
            Image.fromarray(arr).save(root / c / f"{j}.png")
    return root


def _model(num_classes=6):
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes).eval()


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 6-output model over 3 dataset classes, its images and its own (b, C_m) logits / (b, C_m, L) scores."""
    root = _folder(tmp_path_factory.mktemp("d") / "data")
    model = _model()
    prep = patchcsra.prepare(model, root, class_map=GROUPS, img_size=64)
    x = torch.stack([prep.dataset[i][0] for i in range(len(prep.dataset))])
    with torch.no_grad():
        _, base, s = prep.patched.forward_pass(x)
        logits = model(x)
    return prep, base.float(), s.float(), logits


def _reduced(t: torch.Tensor, how: str) -> torch.Tensor:
    """Hand-computed: R_j over the outputs mapped to each class (dim 1), class order cat, dog, eel."""
    out = []
    for c in ("cat", "dog", "eel"):
        g = GROUPS[c] if isinstance(GROUPS[c], list) else [GROUPS[c]]
        part = t[:, g]
        out.append(part.amax(1) if how == "max" else torch.logsumexp(part, 1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("how", ["max", "logsumexp"])
def test_many_to_one_reduces_logits_and_location_scores(prepared, how):
    prep, base, s, logits = prepared
    assert prep.class_index == [[0, 2, 4], 1, [5, 3]] and prep.class_map_kind == "many-to-one"
    st = collect(prep.patched, prep.dataset, temperatures=[1.0], class_index=prep.class_index, class_reduce=how,
                 batch_size=len(prep.dataset), workers=0)
    # lambda = 0 is exactly R_j of the model's own logits
    assert torch.equal(st.scores(0.0), _reduced(base, how))
    assert torch.allclose(st.scores(0.0), _reduced(logits, how), atol=1e-5)
    # lambda > 0: the residual attention of the reduced per-location scores s_{c,k} = R_j s_{j,k}
    s_c = _reduced(s, how)  # (b, C, L)
    assert torch.allclose(st.max, s_c.amax(-1), atol=1e-6)
    for t in (1.0, math.inf):
        want = _reduced(base, how) + 0.3 * residual_attention(s_c, t)
        assert torch.allclose(st.scores(0.3, t), want, atol=1e-5)
    if how == "max":  # max over classes then locations == max over locations then classes
        assert torch.allclose(st.max, _reduced(s.amax(-1), "max"), atol=1e-6)


def test_one_to_one_path_and_cache_keys(prepared, tmp_path):
    prep, base, _, _ = prepared
    ds, cache = prep.dataset, tmp_path / "cache"
    kw = dict(temperatures=[1.0], batch_size=len(ds), workers=0, cache_dir=cache)
    one = collect(prep.patched, ds, class_index=[4, 1, 3], **kw)
    assert torch.equal(one.base, base[:, [4, 1, 3]])
    again = collect(prep.patched, ds, class_index=[[4], 1, [3]], class_reduce="logsumexp", **kw)
    assert again.meta["key"] == one.meta["key"] and again.meta["forward_images"] == 0  # reduce unused, same key
    mx = collect(prep.patched, ds, class_index=prep.class_index, **kw)
    lse = collect(prep.patched, ds, class_index=prep.class_index, class_reduce="logsumexp", **kw)
    other = collect(prep.patched, ds, class_index=[[0, 2], 1, [5, 3]], **kw)
    assert len({one.meta["key"], mx.meta["key"], lse.meta["key"], other.meta["key"]}) == 4
    assert collect(prep.patched, ds, class_index=prep.class_index, **kw).meta["forward_images"] == 0
    with pytest.raises(DatasetError, match="--class-reduce"):
        collect(prep.patched, ds, class_index=prep.class_index, class_reduce="mean", **kw)


def test_json_csv_and_dict_forms_agree(tmp_path):
    classes = ["dog", "cat", "eel"]
    want = [[1], [0, 2, 4], [5, 3]]
    (tmp_path / "m.json").write_text(json.dumps(GROUPS))
    (tmp_path / "m.csv").write_text("class,index\ncat,0\ndog,1\ncat,2\n# a comment\neel,5\ncat,4\neel,3\ncat,2\n")
    for cmap in (GROUPS, tmp_path / "m.json", tmp_path / "m.csv"):
        assert align_class_groups(classes, 6, class_map=cmap) == want
    assert load_class_map(tmp_path / "m.csv") == {"cat": [0, 2, 4], "dog": 1, "eel": [5, 3]}
    # one output per class is still the int64 array; train-head's path refuses a many-to-one map in one line
    assert align_classes(["dog"], 6, class_map=tmp_path / "m.csv").tolist() == [1]
    with pytest.raises(DataMismatchError) as e:
        align_classes(classes, 6, class_map=tmp_path / "m.json")
    msg = _one_line(e)
    assert "'cat' to 3 outputs" in msg and "--class-map" in msg and "m.json" in msg


def test_timm_class_map_and_label_files(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("zero\n\nCat\nhot_dog\n\n")  # blank lines name no output
    assert align_class_groups(["hot dog", "cat"], 4, class_map=f) == [[2], [1]]
    assert load_class_names(f) == ["zero", "Cat", "hot_dog"]
    (tmp_path / "names.json").write_text(json.dumps(["zero", "Cat", "hot_dog"]))
    assert load_class_names(tmp_path / "names.json") == ["zero", "Cat", "hot_dog"]
    with pytest.raises(DataMismatchError) as e:
        align_class_groups(["cat", "emu"], 4, class_map=f)
    assert "classes.txt" in _one_line(e) and "'emu'" in str(e.value)
    with pytest.raises(DataMismatchError) as e:
        align_class_groups(["cat"], 2, class_map=f)
    assert "classes.txt:4" in _one_line(e) and "outputs 2" in str(e.value)
    # a real label file (1001 lines, 'tench, Tinca tinca'): a class matches the line or its first lemma
    labels = shared_path("weights", "imagenet_labels.txt")
    if not labels.is_file():
        pytest.skip("shared imagenet_labels.txt not present")
    assert align_class_groups(["goldfish", "tench", "Labrador retriever"], 1001, class_map=labels) == [[2], [1],
                                                                                                        [209]]
    with pytest.raises(DataMismatchError) as e:
        align_class_groups(["crane"], 1001, class_map=labels)
    assert "line 136" in _one_line(e) and "line 519" in str(e.value) and "135, 518" in str(e.value)
    with pytest.raises(DataMismatchError, match="did you mean 'goldfish"):
        align_class_groups(["goldfisj"], 1001, class_map=labels)


def test_bad_files_give_one_line_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("class,index\ncat,1\ndog\n")
    with pytest.raises(DatasetError) as e:
        load_class_map(bad)
    assert "bad.csv:3" in _one_line(e) and "'name,index'" in str(e.value)
    bad.write_text("cat,1\ndog,x\ncat,2\n")
    with pytest.raises(DatasetError) as e:
        load_class_map(bad)
    assert "bad.csv:2" in _one_line(e)
    big = tmp_path / "big.csv"
    big.write_text("cat,1\ndog,2\ndog,99\n")
    with pytest.raises(DataMismatchError) as e:
        align_class_groups(["cat", "dog"], 6, class_map=big)
    assert "big.csv:2" in _one_line(e) and "99" in str(e.value)
    (tmp_path / "e.json").write_text(json.dumps({"cat": [], "dog": 1}))
    with pytest.raises(DatasetError, match="empty list"):
        load_class_map(tmp_path / "e.json")
    (tmp_path / "n.json").write_text(json.dumps({"cat": [1, "x"]}))
    with pytest.raises(DatasetError, match="'x' of class 'cat' is not an integer"):
        load_class_map(tmp_path / "n.json")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("cat,1\ndog,2\n")
    with pytest.raises(DatasetError) as e:
        load_class_names(pairs)
    assert "pairs.txt:1" in _one_line(e) and "--class-map" in str(e.value)
    assert load_class_map(pairs) == {"cat": 1, "dog": 2}  # as a class map a .txt of pairs is a CSV map
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="empty.txt has no names"):
        load_class_names(tmp_path / "empty.txt")


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "r10t-6.pth"
    torch.save(_model().state_dict(), path)
    return path


def _sweep(model_file, data, out, *extra):
    return runner.invoke(app, ["sweep-lambda", str(model_file), "--arch", "timm:resnet10t", "--num-classes", "6",
                               "--data", str(data), "--out", str(out), "--no-cache", "--workers", "0",
                               "--img-size", "64", "--bootstrap", "0", "--folds", "0", "--lams", "0,0.5", *extra])


def test_cli_sweep_class_names_and_many_to_one(model_file, tmp_path):
    data = _folder(tmp_path / "data")
    names = tmp_path / "labels.txt"
    names.write_text("bird\neel\ndog\nx\nCat\ny\n")
    r = _sweep(model_file, data, tmp_path / "r1", "--class-names", str(names))
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "r1" / "summary.json").read_text())["model"]
    assert s["class_index"] == [4, 2, 1] and s["class_map_kind"] == "one-to-one" and s["class_reduce"] is None
    cmap = tmp_path / "m.json"
    cmap.write_text(json.dumps(GROUPS))
    r = _sweep(model_file, data, tmp_path / "r2", "--class-map", str(cmap), "--class-reduce", "logsumexp")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "r2" / "summary.json").read_text())["model"]
    assert s["class_index"] == [[0, 2, 4], 1, [5, 3]] and s["class_map_kind"] == "many-to-one"
    assert s["class_reduce"] == "logsumexp"
    # one line naming the flag: a bad reduction, a names file of the wrong length
    r = _sweep(model_file, data, tmp_path / "r3", "--class-map", str(cmap), "--class-reduce", "mean")
    assert r.exit_code == 2 and "--class-reduce" in r.output and not (tmp_path / "r3").exists()
    names.write_text("cat\ndog\neel\n")
    r = _sweep(model_file, data, tmp_path / "r4", "--class-names", str(names))
    assert r.exit_code == 2 and "--class-names" in r.output and "3 names" in r.output and "outputs 6" in r.output


def test_cli_explain_class_names_file(tmp_path):
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(img)
    names = tmp_path / "labels.txt"
    names.write_text("tench, Tinca tinca\nLabrador retriever\ngoldfish\nx\n")
    base = ["explain", "timm:resnet10t", "--no-pretrained", "--num-classes", "4", str(img), "--img-size", "64"]
    r = runner.invoke(app, base + ["--classes", "Labrador retriever", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--class-names" in r.output  # the model carries no names
    r = runner.invoke(app, base + ["--class-names", str(names), "--classes", "labrador_retriever,tench,3",
                                   "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "b" / "img_classes.json").read_text())
    assert rec["classes"] == [1, 0, 3] and rec["names"] == ["Labrador retriever", "tench, Tinca tinca", "x"]
    r = runner.invoke(app, base + ["--class-names", str(names), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output  # top-k shown by the file's names, not "class k"
    shown = json.loads((tmp_path / "c" / "img_classes.json").read_text())["names"]
    assert not any(n.startswith("class ") for n in shown)
    r = runner.invoke(app, base + ["--class-names", str(names), "--classes", "goldfisj", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "goldfish" in r.output and "--classes" in r.output
    names.write_text("a\nb\n")
    r = runner.invoke(app, base + ["--class-names", str(names), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "--class-names" in r.output and "labels.txt" in r.output


def test_cli_train_head_refuses_a_many_to_one_map(model_file, tmp_path):
    data = _folder(tmp_path / "data" / "train")
    cmap = tmp_path / "m.json"
    cmap.write_text(json.dumps(GROUPS))
    r = runner.invoke(app, ["train-head", str(model_file), "--arch", "timm:resnet10t", "--num-classes", "6",
                            "--data", str(data.parent), "--split", "train", "--class-map", str(cmap),
                            "--out", str(tmp_path / "t"), "--img-size", "64", "--workers", "0"])
    assert r.exit_code == 2, r.output
    line = " ".join(r.output.split())
    assert "--class-map" in line and "'cat' to 3 outputs" in line
