"""Dataset readers (VOC, COCO, ImageFolder, manifests), ImageDataset behaviour and class alignment.

Counts checked against ../shared/data/MANIFEST.md; edge cases on small synthetic sets in tmp_path.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_path
from patchcsra.data import (VOC_CLASSES, ImageDataset, align_classes, list_formats, load_class_map,
                            model_label_ids, model_label_names, open_dataset, register_format)
from patchcsra.data import base as data_base
from patchcsra.errors import DataMismatchError, DatasetError


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


def _jpg(path: Path, color=(200, 30, 30), size=(24, 16), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)
    return path


@pytest.fixture
def voc_copy(tmp_path):
    """A writable copy of voc2007-mini (ImageSets lists and XML)."""
    dst = tmp_path / "voc" / "VOCdevkit"
    shutil.copytree(shared_path("data", "voc2007-mini", "VOCdevkit"), dst)
    return dst


def _make_voc(root: Path, objects: dict, split_ids: dict, lists: bool) -> Path:
    """Synthetic VOC2012 tree: objects = {id: [(class, difficult)]}."""
    year = root / "VOCdevkit" / "VOC2012"
    main = year / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (year / "Annotations").mkdir()
    for i, objs in objects.items():
        _jpg(year / "JPEGImages" / f"{i}.jpg")
        body = "".join(f"<object><name>{c}</name><difficult>{int(d)}</difficult></object>" for c, d in objs)
        (year / "Annotations" / f"{i}.xml").write_text(f"<annotation><filename>{i}.jpg</filename>{body}</annotation>")
    for split, ids in split_ids.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        if lists:
            for c in VOC_CLASSES:
                lines = []
                for i in ids:
                    objs = [d for n, d in objects[i] if n == c]
                    v = -1 if not objs else (1 if not all(objs) else 0)
                    lines.append(f"{i} {v:2d}\n")
                (main / f"{c}_{split}.txt").write_text("".join(lines))
    return year


# ----------------------------------------------------------------------------- VOC
VOC_MINI_POS = {
    "trainval": dict(bicycle=1, bird=3, boat=1, car=9, cat=4, chair=5, dog=5, person=1, pottedplant=1, sofa=1, train=2),
    "test": dict(car=1, chair=3, diningtable=1, pottedplant=1, sofa=1, train=1),
}


@pytest.mark.parametrize("split", ["trainval", "test"])
def test_voc_mini_counts_match_manifest(split):
    ds = open_dataset(shared_path("data", "voc2007-mini"), split=split)
    assert ds.format == "voc" and ds.classes == VOC_CLASSES and ds.name == f"voc2007-{split}"
    assert ds.targets.shape == (28 if split == "trainval" else 5, 20) and ds.targets.dtype == np.int8
    expected = [VOC_MINI_POS[split].get(c, 0) for c in VOC_CLASSES]
    assert ds.positives_per_class().tolist() == expected
    assert ds.missing_files() == []


def test_voc_mini_default_split_is_test_and_path_forms_agree():
    base = shared_path("data", "voc2007-mini")
    forms = [base, base / "VOCdevkit", base / "VOCdevkit" / "VOC2007"]
    sets = [open_dataset(p) for p in forms]
    assert {d.split for d in sets} == {"test"}
    assert sets[0].ids == ("000002", "000003", "000004", "000006", "000008")
    assert len({d.fingerprint() for d in sets}) == 1
    assert sets[0].files[0].name == "000002.jpg" and sets[0].root.name == "VOC2007"


def test_voc_mini_xml_and_imagesets_give_identical_targets(voc_copy):
    shared = shared_path("data", "voc2007-mini")
    for f in (voc_copy / "VOC2007" / "ImageSets" / "Main").glob("*_*.txt"):
        f.unlink()  # only the id lists remain: labels come from Annotations/*.xml
    for split in ("trainval", "test", "train", "val"):
        a, b = open_dataset(shared, split=split), open_dataset(voc_copy, split=split)
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.targets, b.targets)


# MANIFEST section 2: positives per class, train / val / trainval
VOC_RF_POS = dict(
    aeroplane=(70, 80, 150), bicycle=(71, 71, 142), bird=(98, 90, 188), boat=(53, 59, 112), bottle=(87, 59, 146),
    bus=(63, 49, 112), car=(199, 186, 385), cat=(91, 95, 186), chair=(130, 138, 268), cow=(51, 49, 100),
    diningtable=(60, 68, 128), dog=(110, 117, 227), horse=(82, 91, 173), motorbike=(67, 73, 140),
    person=(596, 569, 1165), pottedplant=(77, 67, 144), sheep=(29, 30, 59), sofa=(70, 76, 146),
    train=(69, 83, 152), tvmonitor=(81, 80, 161))


def test_voc_trainval_rf_counts_match_manifest():
    root = shared_path("data", "voc2007-trainval-rf")
    val = open_dataset(root)  # no test split: default is val
    assert val.split == "val" and val.name == "voc2007-val" and len(val) == 1450
    assert dict(zip(val.classes, val.positives_per_class().tolist()))["sheep"] == 30
    for k, split in enumerate(("train", "val", "trainval")):
        ds = open_dataset(root, "voc", split)
        assert len(ds) == (2900 if split == "trainval" else 1450)
        assert ds.positives_per_class().tolist() == [VOC_RF_POS[c][k] for c in VOC_CLASSES]
    ignored = {"train": 201, "val": 150}
    for split, n in ignored.items():
        ign = open_dataset(root, split=split)
        pos = open_dataset(root, split=split, difficult="positive")
        assert int((ign.targets == -1).sum()) == n and int((pos.targets == -1).sum()) == 0
        assert int((pos.targets == 1).sum()) == int((ign.targets == 1).sum()) + n
    assert val.missing_files() == []


@pytest.mark.parametrize("lists", [True, False])
def test_voc_difficult_only_is_ignored_or_positive(tmp_path, lists):
    objects = {"a1": [("cat", 0), ("dog", 1)], "a2": [("dog", 1), ("dog", 0)], "a3": [("person", 1), ("person", 1)]}
    _make_voc(tmp_path, objects, {"val": ["a1", "a2", "a3"], "train": ["a1"]}, lists=lists)
    ds = open_dataset(tmp_path)
    assert ds.split == "val" and ds.name == "voc2012-val"
    c = {n: j for j, n in enumerate(VOC_CLASSES)}
    t = ds.targets
    assert (t[0, c["cat"]], t[0, c["dog"]], t[1, c["dog"]], t[2, c["person"]], t[2, c["cat"]]) == (1, -1, 1, -1, 0)
    pos = open_dataset(tmp_path, difficult="positive").targets
    assert (pos[0, c["dog"]], pos[2, c["person"]]) == (1, 1) and (pos == -1).sum() == 0


def test_voc_errors(tmp_path):
    _make_voc(tmp_path, {"a1": [("cat", 0)]}, {"val": ["a1"], "test": []}, lists=True)
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path, split="test")
    assert "test" in _one_line(e) and "no images" in str(e.value)
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path, split="train")
    assert "available splits: test, val" in _one_line(e)
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path, difficult="drop")
    assert "ignore, positive" in _one_line(e)
    # a broken class list names file and line
    f = tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "cat_val.txt"
    f.write_text("a1 2\n")
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path, split="val")
    assert "cat_val.txt:1" in _one_line(e)
    f.write_text("a1  1\n")
    # two years in one devkit: ask for one
    shutil.copytree(tmp_path / "VOCdevkit" / "VOC2012", tmp_path / "VOCdevkit" / "VOC2007")
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "VOCdevkit")
    assert "VOC2007, VOC2012" in _one_line(e)
    assert open_dataset(tmp_path / "VOCdevkit" / "VOC2007", split="val").name == "voc2007-val"


def test_voc_split_with_missing_images_opens_and_reports_them():
    ds = open_dataset(shared_path("data", "voc2007-imagesets-official"))  # labels only, no JPEGs
    assert ds.split == "test" and len(ds) == 4952
    pos = dict(zip(ds.classes, ds.positives_per_class().tolist()))
    assert pos["aeroplane"] == 204 and pos["person"] == 2007  # published VOC2007 test statistics
    missing = ds.missing_files()
    assert len(missing) == 4952 and missing[0] == ds.ids[0]
    img, i, ok = ds[3]
    assert (img.size, i, ok) == ((64, 64), 3, False)


# ----------------------------------------------------------------------------- COCO
def test_coco_val2017_classes_in_id_order_and_counts():
    root = shared_path("data", "coco2017-mini")
    ds = open_dataset(root)
    assert (ds.format, ds.split, ds.name, len(ds)) == ("coco", "val2017", "coco-val2017", 158)
    assert len(ds.classes) == 80 and ds.classes[0] == "person" and ds.classes[79] == "toothbrush"
    cats = json.loads((root / "annotations" / "instances_val2017.json").read_text())["categories"]
    by_id = sorted(cats, key=lambda c: c["id"])
    assert [c["name"] for c in by_id] == list(ds.classes) and by_id[-1]["id"] == 90
    pos = dict(zip(ds.classes, ds.positives_per_class().tolist()))
    assert (pos["person"], pos["dining table"], pos["cup"], pos["bottle"], pos["bowl"], pos["chair"]) == \
        (87, 28, 25, 25, 21, 19)
    assert pos["cow"] == 1 and pos["hot dog"] == 1 and min(pos.values()) >= 1  # all 80 appear
    assert (ds.targets >= 0).all() and (ds.targets.sum(1) >= 1).all()
    assert round(float(ds.targets.sum(1).mean()), 2) == 3.82  # MANIFEST: mean 3.82 labels per image
    assert ds.missing_files() == [] and ds.ids[0].endswith(".jpg") and ds.files[0].parent.name == "val2017"


def test_coco_train2017_from_json_file_and_grayscale_to_rgb():
    root = shared_path("data", "coco2017-mini")
    ds = open_dataset(root / "annotations" / "instances_train2017.json")
    assert (ds.format, ds.split, len(ds)) == ("coco", "train2017", 128)
    assert int((ds.targets.sum(1) == 0).sum()) == 2  # two images without instances
    assert int((ds.positives_per_class() > 0).sum()) == 71
    pos = dict(zip(ds.classes, ds.positives_per_class().tolist()))
    assert (pos["person"], pos["car"]) == (61, 12)
    assert np.array_equal(ds.targets, open_dataset(root, split="train2017").targets)
    k = ds.ids.index("000000000086.jpg")
    with Image.open(ds.files[k]) as im:
        assert im.mode == "L"
    img, i, ok = ds[k]
    assert ok and i == k and img.mode == "RGB"


def test_coco_noncontiguous_ids_crowd_and_errors(tmp_path):
    root = tmp_path / "mycoco"
    for n in ("b.jpg", "a.jpg", "c.jpg"):
        _jpg(root / "val2014" / n)
    data = {"images": [{"id": 7, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"}, {"id": 9, "file_name": "c.jpg"}],
            "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 44, "name": "bottle"}],
            "annotations": [{"image_id": 3, "category_id": 90, "iscrowd": 1}, {"image_id": 7, "category_id": 1},
                            {"image_id": 7, "category_id": 1}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(data))
    ds = open_dataset(root)  # val2014 preferred over train2014
    assert ds.split == "val2014" and ds.classes == ("person", "bottle", "toothbrush")
    assert ds.ids == ("a.jpg", "b.jpg", "c.jpg")  # image id order
    assert ds.targets.tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 0]]  # crowd counts; c.jpg has none
    sub = open_dataset(root, classes=["toothbrush", "person"])
    assert sub.classes == ("toothbrush", "person") and sub.targets.tolist() == [[1, 0], [0, 1], [0, 0]]
    with pytest.raises(DatasetError) as e:
        open_dataset(root, classes=["tooth brush"])
    assert "tooth brush" in _one_line(e)
    with pytest.raises(DatasetError) as e:
        open_dataset(root, split="val2017")
    assert "available splits: val2014, train2014" in _one_line(e)


# ----------------------------------------------------------------------------- ImageFolder
def test_folder_cifar10_subset():
    root = shared_path("data", "cifar10-test-subset")
    ds = open_dataset(root)  # root holds one split dir, test/
    assert (ds.format, ds.split, ds.name, len(ds)) == ("folder", "test", "cifar10-test-subset", 2000)
    assert ds.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert ds.single_label and ds.labels.dtype == np.int64
    assert np.bincount(ds.labels).tolist() == [200] * 10 and ds.positives_per_class().tolist() == [200] * 10
    assert ds.ids[0] == "airplane/0000.jpg" and ds.labels[-1] == 9
    direct = open_dataset(root / "test", "folder")
    assert direct.split is None and direct.ids == ds.ids and np.array_equal(direct.targets, ds.targets)
    img, i, ok = ds[1999]
    assert ok and img.size == (32, 32) and img.mode == "RGB"


def test_folder_splits_class_order_and_errors(tmp_path):
    for split in ("train", "val"):
        for c in ("b_cls", "a_cls"):
            _jpg(tmp_path / "d" / split / c / "x1.png")
    _jpg(tmp_path / "d" / "val" / "a_cls" / "x2.JPG")
    (tmp_path / "d" / "val" / "a_cls" / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path / "d")
    assert ds.split == "val" and ds.name == "d-val" and ds.classes == ("a_cls", "b_cls") and len(ds) == 3
    assert ds.labels.tolist() == [0, 0, 1]
    ordered = open_dataset(tmp_path / "d", split="train", classes=["b_cls", "a_cls", "c_cls"])
    assert ordered.classes == ("b_cls", "a_cls", "c_cls") and ordered.labels.tolist() == [1, 0]
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "d", split="train", classes=["a_cls"])
    assert "b_cls" in _one_line(e)
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "d", split="test")
    assert "train, val" in _one_line(e)
    _jpg(tmp_path / "d" / "test" / "a_cls" / "y.jpg")
    assert open_dataset(tmp_path / "d").split == "test"  # test preferred among several split dirs
    _jpg(tmp_path / "e" / "train" / "a" / "1.jpg")
    _jpg(tmp_path / "e" / "train2" / "a" / "1.jpg")
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "e")
    assert "several splits" in _one_line(e)


# ----------------------------------------------------------------------------- manifests
def test_manifest_csv_long_form(tmp_path):
    for n in ("i1.jpg", "sub/i2.jpg", "i3.jpg"):
        _jpg(tmp_path / n)
    f = tmp_path / "m.csv"
    f.write_text("path,labels\ni1.jpg,dog;cat\nsub/i2.jpg,cat\ni3.jpg,\n")
    ds = open_dataset(f)
    assert (ds.format, ds.name, ds.split) == ("manifest", "m", None)
    assert ds.classes == ("cat", "dog") and ds.targets.tolist() == [[1, 1], [1, 0], [0, 0]]
    assert ds.ids[1] == "sub/i2.jpg" and ds.files[1] == tmp_path / "sub" / "i2.jpg" and not ds.single_label
    f.write_text("path,labels\ni1.jpg,dog|cat\ni3.jpg,horse\n")
    with pytest.raises(DatasetError) as e:
        open_dataset(f, classes=["cat", "dog"])
    msg = _one_line(e)
    assert "m.csv:3" in msg and "'horse'" in msg
    f.write_text("path,labels\ni1.jpg,dog\ni3.jpg,cat\n")
    single = open_dataset(f)
    assert single.single_label and single.labels.tolist() == [1, 0]
    ordered = open_dataset(f, classes=["dog", "cat", "bird"])
    assert ordered.classes == ("dog", "cat", "bird") and ordered.labels.tolist() == [0, 1]


def test_manifest_csv_wide_form_blank_and_minus_one_are_ignored(tmp_path):
    f = tmp_path / "attrs.csv"
    f.write_text("path,male,hat,glasses,split\na.jpg,1,0,,test\nb.jpg,-1,1,0,test\nc.jpg,0,0,1,train\n")
    ds = open_dataset(f)
    assert ds.classes == ("male", "hat", "glasses") and not ds.single_label
    assert ds.targets.tolist() == [[1, 0, -1], [-1, 1, 0], [0, 0, 1]]
    assert ds.positives_per_class().tolist() == [1, 1, 1]
    assert ds.missing_files() == ["a.jpg", "b.jpg", "c.jpg"]
    test = open_dataset(f, split="test")
    assert test.name == "attrs-test" and test.ids == ("a.jpg", "b.jpg")
    sel = open_dataset(f, classes=["glasses", "male"])
    assert sel.targets.tolist() == [[-1, 1], [0, -1], [1, 0]]
    f.write_text("path,male\na.jpg,2\n")
    with pytest.raises(DatasetError) as e:
        open_dataset(f)
    assert "attrs.csv:2" in _one_line(e) and "'male'" in str(e.value)


def test_manifest_json_forms(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"classes": ["dog", "cat"], "images": [
        {"path": "a.jpg", "labels": ["cat", "dog"]}, {"path": "b.jpg", "labels": {"cat": 1, "dog": -1}},
        {"path": "c.jpg", "labels": []}]}))
    ds = open_dataset(f)
    assert ds.format == "manifest" and ds.classes == ("dog", "cat")
    assert ds.targets.tolist() == [[1, 1], [-1, 1], [0, 0]]
    g = tmp_path / "bare.json"
    g.write_text(json.dumps([{"path": "a.jpg", "labels": ["zebra"]}, {"path": "b.jpg", "labels": ["ant"]}]))
    bare = open_dataset(g)
    assert bare.classes == ("ant", "zebra") and bare.single_label and bare.labels.tolist() == [1, 0]
    f.write_text(json.dumps({"classes": ["dog"], "images": [{"path": "a.jpg", "labels": ["dog", "emu"]}]}))
    with pytest.raises(DatasetError) as e:
        open_dataset(f)
    assert "images[0]" in _one_line(e) and "'emu'" in str(e.value)
    f.write_text(json.dumps([{"path": "a.jpg", "labels": ["dog"]}, {"path": "a.jpg", "labels": ["dog"]}]))
    with pytest.raises(DatasetError) as e:
        open_dataset(f)
    assert "twice" in _one_line(e)


# ----------------------------------------------------------------------------- images, errors, registry
def test_bad_and_missing_images_do_not_raise(tmp_path):
    good = _jpg(tmp_path / "good.jpg", size=(40, 30))
    full = tmp_path / "full.jpg"
    Image.new("RGB", (200, 200), (1, 2, 3)).save(full, quality=95)
    (tmp_path / "trunc.jpg").write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    _jpg(tmp_path / "gray.png", mode="L")
    f = tmp_path / "m.csv"
    f.write_text("path,labels\ngood.jpg,a\ntrunc.jpg,a\ngarbage.jpg,b\nnope.jpg,b\ngray.png,a\n")
    ds = open_dataset(f)
    assert ds.missing_files() == ["nope.jpg"]
    got = [ds[i] for i in range(len(ds))]
    assert [ok for _, _, ok in got] == [True, False, False, False, True]
    assert [i for _, i, _ in got] == list(range(5))
    assert got[0][0].size == (40, 30) and got[1][0].size == (64, 64) and got[4][0].mode == "RGB"
    assert good.exists()
    import torchvision.transforms as T
    ds.transform = T.Compose([T.Resize((8, 8)), T.ToTensor()])
    x, _, ok = ds[2]
    assert x.shape == (3, 8, 8) and not ok and float(x.abs().sum()) == 0.0


def test_open_dataset_errors(tmp_path):
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "absent")
    assert "absent" in _one_line(e)
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path, format="tfrecord")
    msg = _one_line(e)
    assert "tfrecord" in msg and all(f in msg for f in ("voc", "coco", "folder", "manifest"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "empty")
    assert "format=" in _one_line(e)
    f = tmp_path / "m.csv"
    f.write_text("path,labels\n")
    with pytest.raises(DatasetError) as e:
        open_dataset(f)
    assert "no images" in _one_line(e)
    f.write_text("image,labels,split\na.jpg,x,train\n")
    with pytest.raises(DatasetError) as e:
        open_dataset(f, split="test")
    assert "available splits: train" in _one_line(e)
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("x")
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "noimg", "folder")
    _one_line(e)
    assert issubclass(DatasetError, ValueError) and issubclass(DataMismatchError, DatasetError)


def test_register_format_and_list_formats(tmp_path, monkeypatch):
    assert list_formats()[:2] == ["coco", "voc"] and set(list_formats()) == {"coco", "voc", "manifest", "folder", "hf-datasets", "webdataset"}
    monkeypatch.setattr(data_base, "_FORMATS", dict(data_base._FORMATS))
    (tmp_path / "x.lst").write_text("a.jpg\n")

    def _open(path, split, *, difficult, classes):
        return ImageDataset(name="lst", format="lst", root=path.parent, split=split, classes=("only",),
                            files=(path.parent / "a.jpg",), ids=("a.jpg",), targets=np.ones((1, 1)),
                            single_label=True)

    register_format("lst", detect=lambda p: p.suffix == ".lst", open=_open, priority=5)
    assert list_formats()[0] == "lst"
    ds = open_dataset(tmp_path / "x.lst")
    assert ds.format == "lst" and ds.labels.tolist() == [0]


# ----------------------------------------------------------------------------- ImageDataset behaviour
def test_fingerprint_changes_with_labels_and_images(voc_copy):
    a = open_dataset(voc_copy, split="trainval")
    assert a.fingerprint() == open_dataset(voc_copy, split="trainval").fingerprint()
    f = voc_copy / "VOC2007" / "ImageSets" / "Main" / "cat_trainval.txt"
    lines = f.read_text().splitlines()
    i, v = lines[0].split()
    lines[0] = f"{i} {'1' if v == '-1' else '-1'}"
    f.write_text("\n".join(lines) + "\n")
    b = open_dataset(voc_copy, split="trainval")
    fp_b = b.fingerprint()  # computed from the files as they are now
    assert fp_b != a.fingerprint()
    img = voc_copy / "VOC2007" / "JPEGImages" / f"{b.ids[0]}.jpg"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert open_dataset(voc_copy, split="trainval").fingerprint() != fp_b
    assert b.subset([0, 1]).fingerprint() != b.fingerprint()


def test_subset_select_classes_labels():
    ds = open_dataset(shared_path("data", "voc2007-mini"), split="trainval")
    sub = ds.subset(np.arange(len(ds)) % 2 == 0)
    assert len(sub) == 14 and sub.ids == ds.ids[::2] and np.array_equal(sub.targets, ds.targets[::2])
    sel = ds.select_classes([7, 6])
    assert sel.classes == ("cat", "car") and sel.positives_per_class().tolist() == [4, 9]
    with pytest.raises(DatasetError) as e:
        ds.labels
    assert "single-label" in _one_line(e)
    with pytest.raises(DatasetError):
        ds.select_classes([0, 0])
    with pytest.raises(DatasetError):
        ds.subset([28])
    assert "voc2007-trainval" in repr(ds) and len(repr(ds)) < 300


def test_dataloader_over_voc_subset_with_torchvision_transform():
    import torchvision.transforms as T
    ds = open_dataset(shared_path("data", "voc2007-mini"), split="trainval").subset(range(6))
    ds.transform = T.Compose([T.Resize((48, 40)), T.ToTensor()])
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)
    batches = list(dl)
    assert [b[0].shape for b in batches] == [(4, 3, 48, 40), (2, 3, 48, 40)]
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(6))
    assert bool(torch.cat([b[2] for b in batches]).all())
    assert batches[0][0].dtype == torch.float32 and 0 <= float(batches[0][0].min()) <= float(batches[0][0].max()) <= 1


# ----------------------------------------------------------------------------- classes
def test_align_classes_rules(tmp_path):
    # nothing known: identity on equal counts, else the count message
    assert align_classes(["a", "b", "c"], 3).tolist() == [0, 1, 2]
    with pytest.raises(DataMismatchError) as e:
        align_classes(list(VOC_CLASSES), 1000)
    assert _one_line(e) == ("dataset has 20 classes, model outputs 1000: pass --class-map FILE mapping each "
                            "dataset class to an output index")
    # names known: permutation/subset, normalised names, ids
    names = ["Great_White shark", "tench", "goldfish", "sea-lion"]
    ids = ["n01484850", "n01440764", "n01443537", "n02077923"]
    assert align_classes(["goldfish", "great white shark", "Sea Lion"], 4, model_names=names).tolist() == [2, 0, 3]
    assert align_classes(["n01440764", "goldfish"], 4, model_names=names, model_ids=ids).tolist() == [1, 2]
    # names known but not matching: no identity even with equal counts
    with pytest.raises(DataMismatchError) as e:
        align_classes(["cat", "dog", "tench", "eel"], 4, model_names=names)
    msg = _one_line(e)
    assert "3 of 4" in msg and "('cat', 'dog', 'eel';" in msg and "--class-map" in msg
    with pytest.raises(DataMismatchError) as e:
        align_classes([f"c{k}" for k in range(8)], 4, model_names=names)
    assert "(+3 more)" in _one_line(e)
    with pytest.raises(DataMismatchError) as e:
        align_classes(["crane"], 3, model_names=["crane", "x", "crane"])
    assert "several model outputs (0, 2)" in _one_line(e)
    # class maps win: dict, JSON, CSV with header
    assert align_classes(["cat", "dog"], 10, model_names=names, class_map={"dog": 3, "cat": 7}).tolist() == [7, 3]
    (tmp_path / "m.json").write_text(json.dumps({"cat": 5, "dog": 0}))
    assert align_classes(["dog", "cat"], 10, class_map=tmp_path / "m.json").tolist() == [0, 5]
    (tmp_path / "m.csv").write_text("name,index\ncat,4\n# comment\nhot_dog,9\n")
    assert align_classes(["hot dog", "cat"], 10, class_map=str(tmp_path / "m.csv")).tolist() == [9, 4]
    assert load_class_map(tmp_path / "m.csv") == {"cat": 4, "hot_dog": 9}
    with pytest.raises(DataMismatchError) as e:
        align_classes(["cat", "emu"], 10, class_map=tmp_path / "m.csv")
    assert "'emu'" in _one_line(e) and "m.csv" in str(e.value)
    with pytest.raises(DataMismatchError) as e:
        align_classes(["cat"], 4, class_map={"cat": 4})
    assert "[0, 4)" in _one_line(e)
    with pytest.raises(DatasetError) as e:
        align_classes(["cat"], 4, class_map=tmp_path / "absent.csv")
    assert "absent.csv" in _one_line(e)


def test_model_label_names_and_ids():
    import timm
    import torchvision
    m = timm.create_model("resnet18", pretrained=False)
    names, ids = model_label_names(m), model_label_ids(m)
    assert len(names) == len(ids) == 1000 and names[:2] == ["tench", "goldfish"] and ids[0] == "n01440764"
    assert align_classes(["n01443537", "tench"], 1000, model_names=names, model_ids=ids).tolist() == [1, 0]
    with pytest.raises(DataMismatchError) as e:
        align_classes(list(VOC_CLASSES), 1000, model_names=names, model_ids=ids)
    assert "--class-map" in _one_line(e)
    small = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert model_label_names(small) is None and model_label_ids(small) is None
    tv = torchvision.models.resnet18(num_classes=3)
    assert model_label_names(tv) is None
    tv.patchcsra_source = {"categories": ["a", "b", "c"], "weights": "X"}
    assert model_label_names(tv) == ["a", "b", "c"] and model_label_ids(tv) is None
    m.pretrained_cfg = {**m.pretrained_cfg, "label_names": ("n01440764", "n01443537")}
    assert model_label_names(m) == ["tench", "goldfish"] and model_label_ids(m) == ["n01440764", "n01443537"]
