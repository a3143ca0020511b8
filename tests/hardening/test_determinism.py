"""Promise 6: the same command twice gives byte-identical results on CPU.

Three separate processes run one ``sweep-lambda`` command (bootstrap intervals and cross-validated λ
on): without the stats cache, filling the cache, and reading it back. results.csv, per_class.csv,
table.md and table.tex must be byte-identical, and summary.json identical apart from timings, paths and how the stats were obtained.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
ARCH = f"{REPO / 'benchmarks' / 'cifar_resnet.py'}:resnet20"
VOLATILE = {"seconds", "created", "cache", "out", "run_dir", "started", "finished", "wall_s",
            "command"}  # environment.command: the three command lines differ (--no-cache, --cache-dir) by design


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, c in enumerate(("cat", "dog", "ship", "truck")):
        (root / c).mkdir(parents=True)
        for j in range(10):
            arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            arr[..., i % 3] = np.clip(arr[..., i % 3].astype(int) + 60 * (i + 1) % 255, 0, 255)
            Image.fromarray(arr).save(root / c / f"{j:02d}.png")
    return root


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def test_same_command_twice_is_byte_identical(tmp_path):
    import cifar_resnet

    torch.manual_seed(0)
    ckpt = tmp_path / "r20.pth"
    torch.save(cifar_resnet.resnet20(num_classes=4).state_dict(), ckpt)
    data = _folder(tmp_path / "data")
    base = [sys.executable, "-m", "patchcsra", "sweep-lambda", str(ckpt), "--arch", ARCH, "--data", str(data),
            "--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--workers", "0",
            "--device", "cpu", "--bootstrap", "200", "--folds", "3", "--temperatures", "inf,1,2",
            "--lams", "0,0.05,0.1,0.3,1", "--batch-size", "7"]
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    runs = {"no-cache": ["--no-cache"], "fill-cache": ["--cache-dir", str(tmp_path / "cache")],
            "read-cache": ["--cache-dir", str(tmp_path / "cache")]}
    for name, extra in runs.items():
        out = subprocess.run(base + extra + ["--out", str(tmp_path / name)], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    read = json.loads((tmp_path / "read-cache" / "summary.json").read_text())
    assert read["collect"]["forward_images"] == 0  # the third run really came from the cache
    for f in ("results.csv", "per_class.csv", "table.md", "table.tex"):
        hashes = {name: _sha(tmp_path / name / f) for name in runs}
        assert len(set(hashes.values())) == 1, (f, hashes)
    summaries = [_strip(json.loads((tmp_path / name / "summary.json").read_text())) for name in runs]
    # how the stats were obtained differs by design (forward pass or cache); what they are does not
    collects = [s.pop("collect") for s in summaries]
    assert len({c["key"] for c in collects}) == 1
    assert summaries[0] == summaries[1] == summaries[2]
