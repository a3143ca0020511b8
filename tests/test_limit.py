"""``--limit N``: a seeded, class-stratified subset, the same for the same seed, recorded in the summary."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from patchcsra.cli import app
from patchcsra.data import ImageDataset
from patchcsra.errors import DatasetError

from conftest import image_folder


def _ds(targets) -> ImageDataset:
    n, c = np.asarray(targets).shape
    return ImageDataset(name="t", format="manifest", root=".", split=None, classes=[f"c{k}" for k in range(c)],
                        files=[f"{i}.png" for i in range(n)], ids=[str(i) for i in range(n)], targets=targets,
                        single_label=False)


def test_single_label_subset_keeps_the_class_shares():
    t = np.repeat(np.eye(10, dtype=np.int8), [20] * 5 + [40] * 5, axis=0)  # 300 images, two class sizes
    sub = _ds(t).sample(30, seed=0)
    assert len(sub) == 30
    per = (sub.targets == 1).sum(axis=0)
    assert per.tolist() == [2] * 5 + [4] * 5  # 30 * 20/300 and 30 * 40/300
    again = _ds(t).sample(30, seed=0)
    assert again.ids == sub.ids and list(sub.ids) == sorted(sub.ids, key=int)  # seeded; dataset order kept
    assert _ds(t).sample(30, seed=1).ids != sub.ids


def test_multi_label_and_rare_classes_are_not_lost():
    rng = np.random.default_rng(0)
    t = (rng.random((200, 6)) < 0.3).astype(np.int8)
    t[:, 5] = 0
    t[7, 5] = 1  # one image holds the rare class
    t[t.sum(axis=1) == 0, 0] = 1
    sub = _ds(t).sample(12, seed=3)
    assert len(sub) == 12 and "7" in sub.ids  # its stratum gets at least one image


def test_limit_bounds():
    t = np.eye(3, dtype=np.int8)
    ds = _ds(t)
    assert ds.sample(10) is ds
    for bad in (0, -2, 1.5, True):
        with pytest.raises(DatasetError, match="limit="):
            ds.sample(bad)


def test_cli_limit_scores_n_images_and_records_it(tmp_path):
    import custom_nets

    image_folder(tmp_path / "data", 4, 6)
    torch.manual_seed(0)
    torch.save(custom_nets.resnet20(num_classes=4).state_dict(), tmp_path / "m.pt")
    args = ["sweep-lambda", str(tmp_path / "m.pt"), "--arch", "custom_nets:resnet20", "--num-classes", "4",
            "--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", "0.25", "--data", str(tmp_path / "data"),
            "--split", "train", "--workers", "0", "--device", "cpu", "--no-cache", "--bootstrap", "0", "--folds", "0",
            "--limit", "8", "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["images"]["total"] == 8 and s["dataset"]["limit"] == {"n": 8, "seed": 0, "of": 24}
    res = CliRunner().invoke(app, args[:-4] + ["--limit", "0", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "--limit=0" in res.output


def test_train_head_limit_applies_to_each_split(tmp_path):
    import custom_nets

    from patchcsra.api import train_and_evaluate
    from patchcsra.options import TransformOverrides
    from patchcsra.training.loop import TrainConfig

    image_folder(tmp_path / "data", 4, 6)
    torch.manual_seed(0)
    model = custom_nets.resnet20(num_classes=4).eval()
    run = train_and_evaluate(model, tmp_path / "data", tmp_path / "t", split="train", eval_split="train",
                             config=TrainConfig(kind="linear", epochs=1, batch_size=4, val_fraction=0.25),
                             transform=TransformOverrides(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3),
                             device="cpu", workers=0, limit=12)
    s = run.evaluated.summary
    assert s["images"]["total"] == 12 and s["dataset"]["limit"] == {"n": 12, "seed": 0, "of": 24}


def test_bench_case_limit(tmp_path, monkeypatch):
    """A bench case's "limit" scores that many images of its data."""
    import custom_nets

    import patchcsra.bench as B

    image_folder(tmp_path / "data", 4, 6)
    torch.manual_seed(0)
    model = custom_nets.resnet20(num_classes=4).eval()
    ctx = B._Context(suite=None, work=tmp_path / "w", workers=0, progress=None)
    case = {"name": "c", "data": str(tmp_path / "data"), "split": "train", "limit": 8, "bootstrap": 0, "folds": 0,
            "transform": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}, "temperatures": ["inf"]}
    rec = B._evaluate(model, tmp_path / "data", "train", case, ctx, "r20")
    assert rec["images"] == 8
