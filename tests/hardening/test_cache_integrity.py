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


def test_an_image_unreadable_once_is_read_again(world, tmp_path, caplog):
    import os

    data = tmp_path / "data"
    shutil.copytree(world["tmp"] / "data", data)
    victim = data / "train" / "c1" / "02.png"
    good = victim.read_bytes()
    victim.write_bytes(b"\0" * len(good))  # unreadable, same size
    st = victim.stat()
    ds = open_dataset(data, split="train")
    prep = prepare(world["models"][0], ds, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    first = collect(prep.patched, ds, batch_size=4, device="cpu", workers=0, cache_dir=tmp_path / "c", save_every=8)
    assert (~first.ok).sum() == 1
    victim.write_bytes(good)  # readable again (a network share that hiccuped); same name, size and mtime
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    ds2 = open_dataset(data, split="train")
    assert ds2.fingerprint() == ds.fingerprint()  # the same cache key: only the stored ok flags can tell
    ds2.transform = ds.transform
    with caplog.at_level(logging.WARNING, logger="patchcsra.stats"):
        second = collect(prep.patched, ds2, batch_size=4, device="cpu", workers=0, cache_dir=tmp_path / "c",
                         save_every=8)
    assert second.ok.all() and second.meta["forward_images"] == 16  # from the part holding the image on
    _same(second, world["clean"])
    assert any("read again" in r.getMessage() for r in caplog.records)


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
