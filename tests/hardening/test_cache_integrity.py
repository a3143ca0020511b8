"""Hardening promise 7: nothing read from the stats cache can change a result.

Every cache part carries its entry's key, its row range and a digest of its tensors. Each attack below
tampers with a cache written by a real pass (rolled rows, a part copied from another run, truncated or
random bytes, infinities, a meta.json of the wrong shape, an image unreadable only the first time); the
next pass must give exactly what a pass without the cache gives, with one warning naming the part.
"""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from patchcsra.api import prepare
from patchcsra.cli import app
from patchcsra.data import open_dataset
from patchcsra.stats import collect

from conftest import image_folder

N_CLASSES, PER_CLASS = 4, 6  # 24 images, parts of 8
MODEL = ["--arch", "custom_nets:resnet20", "--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", "0.25"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import custom_nets

    tmp = tmp_path_factory.mktemp("cache")
    image_folder(tmp / "data", N_CLASSES, PER_CLASS, base=220, step=30)
    torch.manual_seed(0)
    models = [custom_nets.resnet20(num_classes=N_CLASSES).eval() for _ in range(2)]
    ds = open_dataset(tmp / "data", split="train")
    preps = [prepare(m, ds, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3) for m in models]
    clean = collect(preps[0].patched, ds, batch_size=4, device="cpu", workers=0)
    return {"tmp": tmp, "ds": ds, "preps": preps, "clean": clean, "models": models}


def _collect(world, cache, i=0):
    return collect(world["preps"][i].patched, world["ds"], batch_size=4, device="cpu", workers=0, cache_dir=cache,
                   save_every=8)


def _same(a, b) -> None:
    for k in ("base", "max", "att"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert (a.ok == b.ok).all()


def _parts(cache):
    [entry] = [d for d in cache.iterdir() if d.is_dir()]
    return entry, sorted(entry.glob("part-*.pt"))


def _roll(p):
    blob = torch.load(p, weights_only=True)
    blob["base"] = torch.roll(blob["base"], 1, 0)  # finite values, a valid zip: only the digest can tell
    torch.save(blob, p)


def _inf(p):
    blob = torch.load(p, weights_only=True)
    blob["max"][0, 0] = float("inf")
    torch.save(blob, p)


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _random(p):
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _unkeyed(p):  # an old-style part: the tensors alone, no key, no digest
    blob = torch.load(p, weights_only=True)
    torch.save({k: v for k, v in blob.items() if not k.startswith("_")}, p)


@pytest.mark.parametrize("attack", [_roll, _inf, _truncate, _random, _unkeyed],
                         ids=["rolled-rows", "inf", "truncated", "random-bytes", "no-digest"])
def test_a_tampered_part_is_computed_again(world, tmp_path, caplog, attack):
    cache = tmp_path / "cache"
    _same(_collect(world, cache), world["clean"])
    entry, parts = _parts(cache)
    assert len(parts) == 3
    attack(parts[1])
    with caplog.at_level(logging.WARNING, logger="patchcsra.cache"):
        again = _collect(world, cache)
    _same(again, world["clean"])
    assert again.meta["forward_images"] == 16  # the part and the one after it
    [msg] = [r.getMessage() for r in caplog.records if r.name == "patchcsra.cache"]
    assert parts[1].name in msg and "computed again" in msg
    third = _collect(world, cache)  # mended: the next pass reads it all
    assert third.meta["forward_images"] == 0
    _same(third, world["clean"])


def test_a_part_copied_from_another_run_is_not_used(world, tmp_path, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    _collect(world, a, 0)
    other = _collect(world, b, 1)
    assert not torch.equal(other.base, world["clean"].base)
    (_, pa), (_, pb) = _parts(a), _parts(b)
    shutil.copy(pb[0], pa[0])  # same file name, another model's rows
    with caplog.at_level(logging.WARNING, logger="patchcsra.cache"):
        again = _collect(world, a, 0)
    _same(again, world["clean"])
    assert any("another cache entry" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("meta", ["[]", '{"key": 1}', "{oops", '{"key": "k", "n": 3, "temperatures": "inf"}'])
def test_a_meta_file_of_the_wrong_shape_is_ignored(world, tmp_path, meta):
    cache = tmp_path / "cache"
    _collect(world, cache)
    entry, _ = _parts(cache)
    (entry / "meta.json").write_text(meta)
    _same(_collect(world, cache), world["clean"])


def test_an_image_unreadable_once_is_read_again(world, tmp_path, caplog, monkeypatch):
    import patchcsra.data.base as base

    victim = world["ds"].files[9]  # in the second part
    real = base.read_image

    def hiccup(path, max_pixels=base.DEFAULT_MAX_PIXELS):  # a network share that failed once: the file is unchanged
        if str(path) == str(victim):
            raise base.UnreadableImage(f"{path}: Input/output error")
        return real(path, max_pixels)

    monkeypatch.setattr(base, "read_image", hiccup)
    first = _collect(world, tmp_path / "c")
    assert (~first.ok).sum() == 1
    monkeypatch.setattr(base, "read_image", real)
    with caplog.at_level(logging.WARNING, logger="patchcsra.stats"):
        second = _collect(world, tmp_path / "c")  # the same files, hence the same key: only the ok flags can tell
    assert second.ok.all() and second.meta["forward_images"] == 16  # from the part holding the image on
    _same(second, world["clean"])
    assert any("read again" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- images changed under the cache
def _bmp_world(tmp, size=32):
    """An ImageFolder of uncompressed BMPs (no checksums: other pixels, the very same file size)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for c in range(N_CLASSES):
        d = tmp / "data" / "train" / f"c{c}"
        d.mkdir(parents=True)
        for j in range(PER_CLASS):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            arr[..., c % 3] = 220 - 30 * j
            Image.fromarray(arr).save(d / f"{j:02d}.bmp")
    return tmp / "data"


def _repaint(path, offset_fraction, length):
    """Overwrite ``length`` bytes at ``offset_fraction`` of the file with other bytes; size and mtime kept."""
    import os

    st = os.stat(path)
    raw = bytearray(path.read_bytes())
    at = int(len(raw) * offset_fraction)
    raw[at:at + length] = bytes(255 - b for b in raw[at:at + length])
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size


def _pass(model, data, cache, **kw):
    ds = open_dataset(data, split="train")
    prep = prepare(model, ds, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    return ds, collect(prep.patched, ds, batch_size=4, device="cpu", workers=0, cache_dir=cache, save_every=8, **kw)


def test_same_size_and_mtime_other_pixels_is_computed_again(world, tmp_path):
    """Small files are hashed whole in the cache key: an edit that keeps size and mtime is a new key."""
    data = _bmp_world(tmp_path)
    model = world["models"][0]
    ds, before = _pass(model, data, tmp_path / "c")
    key = ds.fingerprint()
    _repaint(ds.files[13], 0.5, 600)  # 32x32 BMP: 3 KiB, all of it in the key
    ds2, cached = _pass(model, data, tmp_path / "c")
    _, fresh = _pass(model, data, None)
    assert not torch.equal(before.base[13], fresh.base[13])  # the stale rows would be wrong
    assert ds2.fingerprint() != key
    assert cached.meta["forward_images"] == len(ds)
    _same(cached, fresh)


def test_verify_cache_finds_a_change_the_sampled_key_misses(world, tmp_path, caplog):
    """A large file changed away from the sampled blocks keeps its key; --verify-cache hashes every byte."""
    from patchcsra.data.base import SAMPLE_BYTES

    data = _bmp_world(tmp_path, size=160)  # 75 KiB per file: more than the sampled bytes
    model = world["models"][0]
    ds, _ = _pass(model, data, tmp_path / "c")
    assert ds.files[13].stat().st_size > SAMPLE_BYTES
    key = ds.fingerprint()
    _repaint(ds.files[13], 0.25, 2000)  # between the start and middle blocks
    ds2, stale = _pass(model, data, tmp_path / "c")
    assert ds2.fingerprint() == key  # the documented limit of the default key...
    assert stale.meta["forward_images"] == 0
    _, fresh = _pass(model, data, None)
    assert not torch.equal(stale.base[13], fresh.base[13])  # ...which the test can see
    with caplog.at_level(logging.WARNING, logger="patchcsra.stats"):
        _, verified = _pass(model, data, tmp_path / "c", verify_cache=True)
    _same(verified, fresh)
    assert verified.meta["forward_images"] == len(ds) - 8  # from the part holding the changed image on
    [msg] = [r.getMessage() for r in caplog.records if "changed since" in r.getMessage()]
    assert msg.startswith("1 image(s)") and str(ds.files[13]) in msg
    again = _pass(model, data, tmp_path / "c", verify_cache=True)[1]  # mended: verified, nothing to compute
    assert again.meta["forward_images"] == 0
    _same(again, fresh)


def test_verify_cache_refuses_an_entry_without_digests(world, tmp_path, caplog):
    from patchcsra.cache import CONTENTS_FILE

    _collect(world, tmp_path / "c")
    entry, _ = _parts(tmp_path / "c")
    (entry / CONTENTS_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="patchcsra.stats"):
        got = collect(world["preps"][0].patched, world["ds"], batch_size=4, device="cpu", workers=0,
                      cache_dir=tmp_path / "c", save_every=8, verify_cache=True)
    _same(got, world["clean"])
    assert got.meta["forward_images"] == len(world["ds"])
    assert any("cannot be verified" in r.getMessage() for r in caplog.records)


def test_cli_verify_cache_equals_no_cache(world, tmp_path):
    import custom_nets  # noqa: F401  (the --arch factory)

    data = _bmp_world(tmp_path, size=160)
    src = tmp_path / "m.pt"
    torch.save(world["models"][0].state_dict(), src)
    base = ["sweep-lambda", str(src), *MODEL, "--data", str(data), "--split", "train", "--workers", "0",
            "--device", "cpu", "--bootstrap", "20", "--folds", "2", "-b", "4", "--num-classes", "4"]
    r = CliRunner()
    assert r.invoke(app, base + ["--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o1")]).exit_code == 0
    for k in (2, 17):
        _repaint(sorted(data.rglob("*.bmp"))[k], 0.3, 3000)
    assert r.invoke(app, base + ["--no-cache", "--out", str(tmp_path / "ref")]).exit_code == 0
    res = r.invoke(app, base + ["--cache-dir", str(tmp_path / "c"), "--verify-cache", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    for f in ("results.csv", "per_class.csv", "table.md"):
        assert (tmp_path / "o2" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_cli_results_with_a_tampered_cache_equal_no_cache(world, tmp_path):
    import custom_nets  # noqa: F401  (the --arch factory)

    src = tmp_path / "m.pt"
    torch.save(world["models"][0].state_dict(), src)
    base = ["sweep-lambda", str(src), *MODEL, "--data", str(world["tmp"] / "data"), "--split", "train",
            "--workers", "0", "--device", "cpu", "--bootstrap", "20", "--folds", "2", "-b", "4", "--num-classes", "4"]
    r = CliRunner()
    assert r.invoke(app, base + ["--no-cache", "--out", str(tmp_path / "ref")]).exit_code == 0
    assert r.invoke(app, base + ["--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o1")]).exit_code == 0
    _, parts = _parts(tmp_path / "c")
    for p in parts:
        _roll(p)
    res = r.invoke(app, base + ["--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    for f in ("results.csv", "per_class.csv", "table.md"):
        assert (tmp_path / "o2" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    s = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert s["collect"]["forward_images"] == N_CLASSES * PER_CLASS
