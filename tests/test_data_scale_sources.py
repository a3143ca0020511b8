"""webdataset tar shards and Hugging Face ``datasets`` folders as ``--data``: the shards and folders are written here
with those libraries themselves (``webdataset.ShardWriter``/``TarWriter``, ``Dataset.save_to_disk``/``to_parquet``)."""
import io
import json
import pickle
import tarfile

import custom_nets
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import patchcsra.dist as pdist
from patchcsra.cli import app
from patchcsra.data import list_formats, open_dataset, read_image
from patchcsra.data.base import read_image_bytes
from patchcsra.errors import DatasetError

wds = pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")

CLASSES = ("ant", "bee", "cat", "dog")


def _png(seed: int, size: int = 32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _jpg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """Dataset.from_parquet converts into the datasets cache: keep it in tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


# ----------------------------------------------------------------------------- writers
def _wds_cls(root, n=10, maxcount=4, seed=0, names=True):
    """``root/shard-00{0,1,2}.tar``: ``n`` png + .cls samples (class ``k % 4``), a classes.txt; returns the bytes."""
    root.mkdir(parents=True, exist_ok=True)
    blobs = [_png(seed + k) for k in range(n)]
    with wds.ShardWriter(str(root / "shard-%03d.tar"), maxcount=maxcount, verbose=0) as sink:
        for k, b in enumerate(blobs):
            sink.write({"__key__": f"img{k:03d}", "png": b, "cls": k % 4})
    if names:
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return blobs


def _wds_json(path, records):
    """One shard of jpg + json samples; ``records`` = [(key, json doc)]; returns the image bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blobs = []
    with wds.TarWriter(str(path)) as sink:
        for k, (key, doc) in enumerate(records):
            b = _jpg(100 + k)
            blobs.append(b)
            sink.write({"__key__": key, "jpg": b, "json": doc})
    return blobs


def _hf_dataset(n=9, multi=False, seed=0):
    from datasets import ClassLabel, Dataset, Features, Sequence
    from datasets import Image as HFImage

    blobs = [_png(seed + 50 + k) for k in range(n)]
    if multi:
        labels = [[k % 4, (k + 1) % 4] if k % 3 else [k % 4] for k in range(n)]
        feat = Sequence(ClassLabel(names=list(CLASSES)))
    else:
        labels, feat = [k % 4 for k in range(n)], ClassLabel(names=list(CLASSES))
    ds = Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs], "labels": labels},
                           features=Features({"image": HFImage(), "labels": feat}))
    return ds, blobs, labels


def _rgb(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def _pixels_equal_plain_folder(ds, blobs, tmp_path, suffix):
    """Every image decodes to the pixels of the same bytes read as a plain file."""
    d = tmp_path / "plain"
    d.mkdir(exist_ok=True)
    for k, b in enumerate(blobs):
        (d / f"{k}{suffix}").write_bytes(b)
        img, i, ok = ds[k]
        assert ok and i == k
        assert np.array_equal(np.asarray(img), np.asarray(read_image(d / f"{k}{suffix}"))), k


# ----------------------------------------------------------------------------- webdataset
def test_formats_registered_and_detected(tmp_path):
    assert {"webdataset", "hf-datasets"} <= set(list_formats())
    _wds_cls(tmp_path / "w")
    ds, _, _ = _hf_dataset()
    ds.save_to_disk(str(tmp_path / "h"))
    assert open_dataset(tmp_path / "w").format == "webdataset"
    assert open_dataset(tmp_path / "w", format="wds").format == "webdataset"
    assert open_dataset(tmp_path / "h").format == "hf-datasets"


def test_wds_cls_single_label_order_and_pixels(tmp_path):
    blobs = _wds_cls(tmp_path / "w", n=10, maxcount=4)
    ds = open_dataset(tmp_path / "w")
    assert len(ds) == 10 and ds.classes == CLASSES and ds.single_label
    assert ds.labels.tolist() == [k % 4 for k in range(10)]
    assert ds.ids[:5] == ("shard-000.tar#img000", "shard-000.tar#img001", "shard-000.tar#img002",
                          "shard-000.tar#img003", "shard-001.tar#img004")
    assert str(ds.files[4]).endswith("shard-001.tar#img004.png")
    _pixels_equal_plain_folder(ds, blobs, tmp_path, ".png")
    # the same shards as one shard, a brace pattern, reopened: the same order
    pattern = open_dataset(tmp_path / "w" / "shard-{000..002}.tar")
    assert pattern.ids == ds.ids and np.array_equal(pattern.targets, ds.targets)
    one = open_dataset(tmp_path / "w" / "shard-001.tar")
    assert one.ids == ("shard-001.tar#img004", "shard-001.tar#img005", "shard-001.tar#img006",
                       "shard-001.tar#img007") and one.classes == CLASSES
    assert open_dataset(tmp_path / "w").ids == ds.ids


def test_wds_classes_without_names_file(tmp_path):
    _wds_cls(tmp_path / "w", n=6, names=False)
    ds = open_dataset(tmp_path / "w")
    assert ds.classes == ("0", "1", "2", "3") and ds.labels.tolist() == [0, 1, 2, 3, 0, 1]


def test_wds_json_multi_label_names_and_indices(tmp_path):
    blobs = _wds_json(tmp_path / "j" / "a.tar", [("x0", {"labels": ["dog", "cat"]}), ("x1", ["bee"]),
                                                 ("x2", {"labels": [], "note": "none present"}),
                                                 ("x3", {"labels": ["ant", "bee", "dog"]})])
    ds = open_dataset(tmp_path / "j")
    assert ds.classes == ("ant", "bee", "cat", "dog") and not ds.single_label
    assert ds.targets.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]]
    _pixels_equal_plain_folder(ds, blobs, tmp_path, ".jpg")
    # indices in JSON lists, no names file: 0..C-1
    _wds_json(tmp_path / "k" / "a.tar", [("y0", [0, 2]), ("y1", {"labels": [1]})])
    k = open_dataset(tmp_path / "k" / "a.tar")
    assert k.classes == ("0", "1", "2") and k.targets.tolist() == [[1, 0, 1], [0, 1, 0]]
    # names through a classes.txt: its order, names and indices both accepted
    (tmp_path / "j" / "classes.txt").write_text("dog\ncat\nbee\nant\nemu\n")
    named = open_dataset(tmp_path / "j")
    assert named.classes == ("dog", "cat", "bee", "ant", "emu")
    assert named.targets[0].tolist() == [1, 1, 0, 0, 0] and named.positives_per_class().tolist() == [2, 1, 2, 1, 0]
    assert open_dataset(tmp_path / "j", classes=["ant", "dog"]).targets.tolist() == [[0, 1], [0, 0], [0, 0], [1, 1]]


def test_wds_fingerprint_stable_and_sees_a_changed_member(tmp_path):
    _wds_cls(tmp_path / "w", n=8)
    a = open_dataset(tmp_path / "w")
    fp = a.fingerprint()
    assert open_dataset(tmp_path / "w").fingerprint() == fp
    assert pickle.loads(pickle.dumps(a)).fingerprint() == fp
    digests = a.content_digests()
    assert digests.shape == (8, 16) and len({d.tobytes() for d in digests}) == 8
    assert np.array_equal(a.content_digests([5, 2]), digests[[5, 2]])
    # write the shards again, one image changed (same key, same label)
    for f in (tmp_path / "w").glob("*.tar"):
        f.unlink()
    with wds.ShardWriter(str(tmp_path / "w" / "shard-%03d.tar"), maxcount=4, verbose=0) as sink:
        for k in range(8):
            sink.write({"__key__": f"img{k:03d}", "png": _png(999 if k == 5 else k), "cls": k % 4})
    b = open_dataset(tmp_path / "w")
    assert b.ids == a.ids and b.fingerprint() != fp
    changed = np.flatnonzero((b.content_digests() != digests).any(axis=1)).tolist()
    assert changed == [5]
    assert b.subset([0, 1]).fingerprint() != b.fingerprint()


def test_wds_subset_sample_select_and_bad_images(tmp_path):
    _wds_cls(tmp_path / "w", n=12)
    ds = open_dataset(tmp_path / "w")
    sub = ds.subset([7, 2, 11])
    assert sub.ids == (ds.ids[7], ds.ids[2], ds.ids[11]) and sub.labels.tolist() == [3, 2, 3]
    assert np.array_equal(np.asarray(sub[0][0]), np.asarray(ds[7][0]))
    s = ds.sample(4, seed=1)
    assert len(s) == 4 and sorted(s.labels.tolist()) == [0, 1, 2, 3] and ds.sample(4, seed=1).ids == s.ids
    mask = ds.subset(np.arange(12) % 2 == 0)
    assert mask.ids == ds.ids[::2]
    sel = ds.select_classes([2, 0])
    assert sel.classes == ("cat", "ant") and sel.positives_per_class().tolist() == [3, 3]
    # the pixel limit: not decoded, ok=False, the pseudo-path named
    ds.max_pixels = 100
    img, i, ok = ds[3]
    assert not ok and i == 3 and img.size == (64, 64)
    why = ds.unreadable_reason(3)
    assert "shard-000.tar#img003.png" in why and "--max-pixels" in why
    ds.max_pixels = None
    assert ds.unreadable_reason(3) is None and ds.missing_files() == []
    # undecodable bytes in a member
    (tmp_path / "bad").mkdir()
    with wds.TarWriter(str(tmp_path / "bad" / "b.tar")) as sink:
        sink.write({"__key__": "good", "png": _png(1), "cls": 0})
        sink.write({"__key__": "broken", "png": b"\x89PNG not really", "cls": 1})
    bad = open_dataset(tmp_path / "bad")
    assert bad[0][2] and not bad[1][2] and "b.tar#broken.png" in bad.unreadable_reason(1)
    # a shard removed after opening: missing, unreadable, not a crash
    (tmp_path / "w" / "shard-002.tar").unlink()
    ds = ds.subset(range(12))
    assert ds.missing_files() == list(ds.ids[8:])
    assert not ds[9][2] and "shard-002.tar#img009.png" in ds.unreadable_reason(9)


def _rank_rows(n, world, monkeypatch):
    rows = []
    for r in range(world):
        monkeypatch.setattr(pdist, "rank", lambda r=r: r)
        monkeypatch.setattr(pdist, "world_size", lambda: world)
        rows.append(pdist.shard(n))
    return rows


@pytest.mark.parametrize("world", [2, 3])
def test_wds_rank_shards_cover_every_member_once(tmp_path, monkeypatch, world):
    _wds_cls(tmp_path / "w", n=11, maxcount=4)
    ds = open_dataset(tmp_path / "w")
    # the members as webdataset itself streams them
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in (tmp_path / "w").glob("*.tar")),
                                                 shardshuffle=False)]
    assert len(keys) == 11
    seen = []
    for rows in _rank_rows(len(ds), world, monkeypatch):
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, rows), batch_size=None,
                                             collate_fn=lambda x: x)
        seen += [ds.ids[i].split("#")[1] for _, i, ok in loader if ok]
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen)) == 11


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("kind", ["wds", "hf"])
def test_dataloader_workers_pickle_the_reader(tmp_path, kind):
    if kind == "wds":
        _wds_cls(tmp_path / "w", n=10)
        ds = open_dataset(tmp_path / "w")
    else:
        hf, _, _ = _hf_dataset(n=10)
        hf.save_to_disk(str(tmp_path / "h"))
        ds = open_dataset(tmp_path / "h")
    ds.transform = _to_tensor
    rows = list(range(1, 10, 2))

    def run(workers):
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, rows), batch_size=2, num_workers=workers)
        xs, idx, oks = zip(*loader)
        return torch.cat(xs), torch.cat(idx), torch.cat(oks)

    x0, i0, ok0 = run(0)
    x2, i2, ok2 = run(2)
    assert torch.equal(x0, x2) and i0.tolist() == i2.tolist() == rows and bool(ok0.all()) and bool(ok2.all())
    assert x0.shape == (5, 3, 32, 32)


# ----------------------------------------------------------------------------- Hugging Face datasets
def test_hf_save_to_disk_single_label(tmp_path):
    hf, blobs, labels = _hf_dataset(n=9)
    hf.save_to_disk(str(tmp_path / "h"))
    ds = open_dataset(tmp_path / "h")
    assert ds.classes == CLASSES and ds.single_label and ds.labels.tolist() == labels
    assert ds.ids[0] == "data-00000-of-00001.arrow#row=0" and str(ds.files[8]).endswith(".arrow#row=8")
    _pixels_equal_plain_folder(ds, blobs, tmp_path, ".png")
    fp = ds.fingerprint()
    assert open_dataset(tmp_path / "h").fingerprint() == fp
    assert ds.sample(4).labels.tolist() == [0, 1, 2, 3] or len(set(ds.sample(4).labels.tolist())) == 4
    sub = ds.subset([8, 0])
    assert sub.ids == (ds.ids[8], ds.ids[0]) and np.array_equal(np.asarray(sub[0][0]), _rgb(blobs[8]))
    # one image changed: the fingerprint and that row's digest change
    blobs2 = list(blobs)
    blobs2[3] = _png(777)
    changed = hf.cast_column("image", datasets.Image(decode=False)).map(
        lambda ex, i: {"image": {"bytes": blobs2[i], "path": None}}, with_indices=True)
    changed = changed.cast_column("image", datasets.Image())
    changed.save_to_disk(str(tmp_path / "h2"))
    b = open_dataset(tmp_path / "h2")
    assert b.fingerprint() != fp
    assert np.flatnonzero((b.content_digests() != ds.content_digests()).any(axis=1)).tolist() == [3]


def test_hf_dataset_dict_splits_and_multi_label(tmp_path):
    train, _, _ = _hf_dataset(n=6, seed=1)
    test, blobs, labels = _hf_dataset(n=7, multi=True, seed=2)
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "dd"))
    ds = open_dataset(tmp_path / "dd")  # default: the test split
    assert ds.split == "test" and len(ds) == 7 and not ds.single_label and ds.name == "dd-test"
    want = np.zeros((7, 4), dtype=np.int8)
    for r, ls in enumerate(labels):
        want[r, ls] = 1
    assert np.array_equal(ds.targets, want) and ds.ids[0] == "test/data-00000-of-00001.arrow#row=0"
    _pixels_equal_plain_folder(ds, blobs, tmp_path, ".png")
    tr = open_dataset(tmp_path / "dd", split="train")
    assert tr.split == "train" and len(tr) == 6 and tr.single_label
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "dd", split="val")
    assert "choose one of train, test" in _one_line(e)


def test_hf_parquet_folder(tmp_path):
    hf, blobs, labels = _hf_dataset(n=10)
    (tmp_path / "p" / "data").mkdir(parents=True)
    hf.select(range(6)).to_parquet(str(tmp_path / "p" / "data" / "test-00000-of-00002.parquet"))
    hf.select(range(6, 10)).to_parquet(str(tmp_path / "p" / "data" / "test-00001-of-00002.parquet"))
    hf.select(range(3)).to_parquet(str(tmp_path / "p" / "data" / "train-00000-of-00001.parquet"))
    ds = open_dataset(tmp_path / "p")
    assert ds.format == "hf-datasets" and ds.split == "test" and len(ds) == 10 and ds.classes == CLASSES
    assert ds.labels.tolist() == labels
    assert ds.ids[5] == "data/test-00000-of-00002.parquet#row=5" and ds.ids[6] == "data/test-00001-of-00002.parquet#row=0"
    _pixels_equal_plain_folder(ds, blobs, tmp_path, ".png")
    assert len(open_dataset(tmp_path / "p", split="train")) == 3
    assert open_dataset(tmp_path / "p").fingerprint() == ds.fingerprint()
    assert str(tmp_path / "hf-cache") in ds.blobs.dataset.cache_files[0]["filename"]


@pytest.mark.parametrize("world", [2, 3])
def test_hf_rank_shards_cover_every_row_once(tmp_path, monkeypatch, world):
    hf, _, _ = _hf_dataset(n=8)
    hf.save_to_disk(str(tmp_path / "h"), num_shards=2)
    ds = open_dataset(tmp_path / "h")
    assert {i.split("#")[0] for i in ds.ids} == {"data-00000-of-00002.arrow", "data-00001-of-00002.arrow"}
    seen = [ds.ids[i] for rows in _rank_rows(len(ds), world, monkeypatch) for i in rows]
    assert sorted(seen) == sorted(ds.ids) and len(set(seen)) == 8


# ----------------------------------------------------------------------------- bad input: one line naming the file
def test_bad_input_one_liners(tmp_path):
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "a.tar").write_bytes(b"")
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "z")
    assert "a.tar" in _one_line(e) and "empty" in str(e.value)
    (tmp_path / "z" / "a.tar").unlink()
    with tarfile.open(tmp_path / "z" / "a.tar", "w"):
        pass  # a valid tar without members
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "z")
    assert "a.tar" in _one_line(e) and "no samples" in str(e.value)

    with wds.TarWriter(str(tmp_path / "n.tar")) as sink:
        sink.write({"__key__": "ok", "png": _png(0), "cls": 0})
        sink.write({"__key__": "nolabel", "png": _png(1), "txt": "a caption"})
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "n.tar")
    assert "n.tar#nolabel" in _one_line(e) and "without a label" in str(e.value)

    (tmp_path / "u").mkdir()
    _wds_json(tmp_path / "u" / "s.tar", [("k0", {"labels": ["cat"]}), ("k1", {"labels": ["yak"]})])
    (tmp_path / "u" / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "u")
    msg = _one_line(e)
    assert "s.tar#k1" in msg and "'yak'" in msg and "classes.txt" in msg

    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "w" / "shard-{000..003}.tar")
    assert "shard-{000..003}.tar" in _one_line(e)

    from datasets import ClassLabel, Dataset, Features, Value
    Dataset.from_dict({"pixels": [b"x", b"y"], "label": [0, 1]},
                      features=Features({"pixels": Value("binary"), "label": ClassLabel(names=["a", "b"])})
                      ).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "noimg")
    msg = _one_line(e)
    assert "noimg" in msg and "no image column" in msg and "cast_column" in msg
    hf, _, _ = _hf_dataset(n=2)
    hf.remove_columns("labels").save_to_disk(str(tmp_path / "nolab"))
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "nolab")
    assert "nolab" in _one_line(e) and "no label column" in str(e.value)


def test_read_image_bytes_limit_and_garbage():
    assert np.array_equal(np.asarray(read_image_bytes(lambda: _png(3), "x#y.png")), _rgb(_png(3)))
    with pytest.raises(ValueError, match=r"^x#y.png: 32x32 = 1024 pixels is over the limit of 10 pixels"):
        read_image_bytes(lambda: _png(3), "x#y.png", 10)
    with pytest.raises(ValueError, match=r"^x#y.png: UnidentifiedImageError"):
        read_image_bytes(lambda: b"garbage", "x#y.png")


# ----------------------------------------------------------------------------- CLI end to end
@pytest.fixture(scope="module")
def r20_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "m.pt"
    torch.manual_seed(0)
    torch.save(custom_nets.resnet20(num_classes=4).state_dict(), path)
    return path


@pytest.mark.parametrize("kind", ["wds", "hf"])
def test_cli_sweep_lambda_over_scale_sources(tmp_path, r20_file, kind):
    if kind == "wds":
        _wds_cls(tmp_path / "data", n=12)
        data, fmt = tmp_path / "data" / "shard-{000..002}.tar", "webdataset"
    else:
        hf, _, _ = _hf_dataset(n=12)
        hf.save_to_disk(str(tmp_path / "data"))
        data, fmt = tmp_path / "data", "hf-datasets"
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["sweep-lambda", str(r20_file), "--arch", "custom_nets:resnet20",
                                   "--num-classes", "4", "--data", str(data), "--workers", "0", "--device", "cpu",
                                   "--no-cache", "--bootstrap", "0", "--folds", "0", "--batch-size", "8",
                                   "--lams", "0,0.5", "--input-size", "3,32,32", "--mean", "0.5,0.5,0.5",
                                   "--std", "0.25,0.25,0.25", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["format"] == fmt and summary["dataset"]["single_label"] is True
    assert (out / "results.csv").is_file()
    assert len(summary["dataset"]["fingerprint"]) == 64
