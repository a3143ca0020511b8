"""Hardening, promise 2: bad input gets one clear line and a non-zero exit, never a traceback or a wrong number.

One table of cases driven through the CLI (``typer.testing.CliRunner`` on ``patchcsra.cli.app``). Each case
builds its inputs in ``tmp_path`` (tiny PIL images, a manifest / VOC / COCO layout, a tiny state dict) and
asserts the exit code, that the message is one ``error:`` line naming the offending file or argument, and
that nothing partial is left behind (no ``--out``, no temporary siblings). The "should just work" cases
(grayscale / CMYK / 16-bit images, a class without positives, a one-point λ grid, an image smaller than the
crop) assert exit 0 and a finite, correct result instead.
"""
from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from patchcsra.cli import app

runner = CliRunner()

NETS_PY = textwrap.dedent('''
    import torch
    from torch import nn


    class Tiny(nn.Module):
        """conv -> ReLU -> global average pool -> Linear: the smallest head patchcsra can patch."""

        def __init__(self, num_classes=3):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(self.pool(self.body(x)).flatten(1))


    def tiny(num_classes=3):
        return Tiny(num_classes)


    class Other(nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.features = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))


    def other(num_classes=3):
        return Other(num_classes)
''')

VOC_CLASSES = ("aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
               "pottedplant sheep sofa train tvmonitor").split()


# ----------------------------------------------------------------------------- shared, built once
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """``nets.py`` (the architecture file) and tiny state dicts: 3, 20 and 2 classes, one with NaN weights."""
    d = tmp_path_factory.mktemp("models")
    nets = d / "nets.py"
    nets.write_text(NETS_PY)
    ns: dict = {}
    exec(compile(NETS_PY, str(nets), "exec"), ns)  # noqa: S102  (our own test source)
    paths = {"nets": str(nets)}
    for n in (2, 3, 20):
        torch.manual_seed(n)
        m = ns["tiny"](n)
        torch.save(m.state_dict(), d / f"tiny{n}.pth")
        paths[f"m{n}"] = str(d / f"tiny{n}.pth")
    m = ns["tiny"](3)
    with torch.no_grad():
        m.fc.bias.fill_(float("nan"))
    torch.save(m.state_dict(), d / "nan3.pth")
    paths["nan3"] = str(d / "nan3.pth")
    torch.save(ns["other"](3).state_dict(), d / "other3.pth")
    paths["other3"] = str(d / "other3.pth")
    return paths


# ----------------------------------------------------------------------------- input builders
def _img(path: Path, size=(40, 40), seed=0, mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return path


LABELS = ["a", "b", "a;c", "b;c", "a;b", "c", "a", "b;c"]


def _manifest(data: Path, n: int = 8, labels: Sequence[str] = LABELS, ext: str = ".png") -> Path:
    """``data/manifest.csv`` (long form ``path,labels``) over ``n`` tiny images ``img<k><ext>``."""
    rows = ["path,labels"]
    for k in range(n):
        _img(data / f"img{k}{ext}", seed=k)
        rows.append(f"img{k}{ext},{labels[k % len(labels)]}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    return data / "manifest.csv"


def _json_manifest(data: Path, records: list[dict], classes=("a", "b", "c")) -> Path:
    for k, r in enumerate(records):
        if not r["path"].startswith(("..", "/")):
            _img(data / r["path"], seed=k)
    f = data / "manifest.json"
    f.write_text(json.dumps({"classes": list(classes), "images": records}))
    return f


def _voc(data: Path, ids=("000001", "000002", "000003", "000004"), objects=None, missing=(),
         split="test") -> Path:
    """A minimal ``VOCdevkit/VOC2007`` with XML annotations and ``ImageSets/Main/<split>.txt``."""
    year = data / "VOCdevkit" / "VOC2007"
    (year / "ImageSets" / "Main").mkdir(parents=True)
    (year / "Annotations").mkdir(parents=True)
    objects = objects or {}
    for k, i in enumerate(ids):
        if i not in missing:
            _img(year / "JPEGImages" / f"{i}.jpg", seed=k)
        names = objects.get(i, [VOC_CLASSES[k % 3], VOC_CLASSES[5 + k % 2]])
        objs = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
        (year / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename>{objs}</annotation>")
    (year / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return data / "VOCdevkit"


def _coco(data: Path, dangling: bool = False) -> Path:
    (data / "annotations").mkdir(parents=True)
    images = [{"id": k + 1, "file_name": f"{k:012d}.jpg", "width": 40, "height": 40} for k in range(4)]
    for k, im in enumerate(images):
        _img(data / "val2017" / im["file_name"], seed=k)
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    anns = [{"id": k + 1, "image_id": k + 1, "category_id": 1 + k % 2} for k in range(4)]
    if dangling:
        anns.append({"id": 99, "image_id": 2, "category_id": 7})
    (data / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "categories": cats, "annotations": anns}))
    return data


def _truncate(path: Path, keep: float = 0.5) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: int(len(b) * keep)])


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], None]          # makes the inputs under tmp/"data"
    args: Sequence[str]                    # CLI args; {data} {out} {tmp} {nets} {m3} {m20} ... are filled in
    exit: int = 2
    msgs: Sequence[str] = ()               # substrings of the one-line message (after 'error:')
    check: Optional[Callable[[Path, str], None]] = None   # exit-0 cases: (out dir, output) -> asserts
    setup: Optional[Callable[[Path, pytest.MonkeyPatch], None]] = None


def SWEEP(data="{data}/manifest.csv", model="{m3}", *extra) -> list[str]:
    return ["sweep-lambda", model, "--arch", "{nets}:tiny", "--data", data, "--out", "{out}",
            "--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--lams", "0,0.5",
            "--bootstrap", "0", "--folds", "0", "--no-cache", "--workers", "0", "--device", "cpu", *extra]


def _finite_run(out: Path, images: int = 8) -> dict:
    s = json.loads((out / "summary.json").read_text())
    assert s["images"]["scored"] == images and s["images"]["bad"] == 0
    frame = pd.read_csv(out / "results.csv")
    assert np.isfinite(frame.drop(columns=["temperature"]).to_numpy(float)).all()
    assert 0.0 <= s["baseline"][s["metric"]] <= 100.0
    return s


def _ok(images: int = 8):
    def check(out: Path, output: str) -> None:
        _finite_run(out, images)
    return check


def _mode_images(mode: str):
    def build(tmp: Path) -> None:
        _manifest(tmp / "data")
        for k in range(0, 8, 2):
            p = tmp / "data" / f"img{k}.png"
            if mode == "I;16":
                arr = np.random.default_rng(k).integers(0, 256, (40, 40)).astype(np.uint16)
                Image.fromarray(arr * 257).save(p)  # 16-bit grayscale: I;16
                Image.fromarray(arr.astype(np.uint8)).save(p.with_name(f"img{k}.8bit.png"))
            elif mode == "CMYK":
                p.unlink()
                _img(p.with_suffix(".jpg"), seed=k, mode="CMYK")
                txt = (tmp / "data" / "manifest.csv").read_text().replace(f"img{k}.png", f"img{k}.jpg")
                (tmp / "data" / "manifest.csv").write_text(txt)
            else:
                _img(p, seed=k, mode=mode)
    return build


def _check_mode(mode: str):
    def check(out: Path, output: str) -> None:
        _finite_run(out)
        if mode == "I;16":  # 16-bit pixels are scaled to 8 bits, not clipped: same scores as the 8-bit files
            data = out.parent / "data"
            for f in data.glob("*.8bit.png"):
                f.replace(f.with_name(f.name.replace(".8bit", "")))
            args = [a.replace(str(out), str(out) + "8") for a in _last_args]
            res = runner.invoke(app, args)
            assert res.exit_code == 0, res.output
            a = pd.read_csv(out / "results.csv")
            b = pd.read_csv(str(out) + "8/results.csv")
            pd.testing.assert_frame_equal(a, b)
    return check


def _no_positive_check(out: Path, output: str) -> None:
    s = _finite_run(out, 4)
    assert s["classes"]["without_positives"] == ["c"]
    per_class = pd.read_csv(out / "per_class.csv")
    row = per_class[per_class["class"] == "c"].iloc[0]
    assert row["positives"] == 0 and math.isnan(row["AP_baseline"])  # policy: no AP, left out of mAP, reported
    ap = per_class[per_class["class"] != "c"]["AP_baseline"]
    assert s["baseline"]["mAP"] == pytest.approx(ap.mean(), abs=1e-4)
    assert "classes without positives (left out of mAP): c" in " ".join(output.split())


def _one_point_check(out: Path, output: str) -> None:
    s = _finite_run(out)
    frame = pd.read_csv(out / "results.csv")
    # the one grid point, plus λ=0 (the baseline) and the fixed λ that every sweep scores
    assert sorted(frame["lam"].tolist()) == [0.0, 0.2, 0.3]
    assert s["choices"]["oracle"]["lam"] in (0.0, 0.2, 0.3)
    base = frame[frame["lam"] == 0.0].iloc[0]
    assert s["baseline"]["mAP"] == pytest.approx(base["mAP"], abs=1e-4)


def _manifest_with(rows: list[str]):
    def build(tmp: Path) -> None:
        data = tmp / "data"
        for k in range(4):
            _img(data / f"img{k}.png", seed=k)
        (data / "manifest.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    return build


def _bad_image(kind: str):
    def build(tmp: Path) -> None:
        _manifest(tmp / "data", ext=".jpg" if kind == "truncated" else ".png")
        p = tmp / "data" / ("img3.jpg" if kind == "truncated" else "img3.png")
        if kind == "missing":
            p.unlink()
        elif kind == "empty":
            p.write_bytes(b"")
        elif kind == "corrupt":
            p.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        elif kind == "truncated":
            _img(p, size=(200, 200), seed=3)
            _truncate(p, 0.4)
    return build


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that only declares its size (IHDR, no pixel data): a decompression bomb in 57 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _big_image(kind: str):
    def build(tmp: Path) -> None:
        _manifest(tmp / "data")
        p = tmp / "data" / "img3.png"
        if kind == "bomb":
            png_header(p, 30000, 30000)
        else:
            _img(p, size=(200, 200), seed=3)
    return build


def _readonly(tmp: Path, mp: pytest.MonkeyPatch) -> None:
    ro = tmp / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see what a user would
        real = os.access
        mp.setattr(os, "access", lambda p, m, *a, **k: False if (m & os.W_OK and Path(p) == ro)
                   else real(p, m, *a, **k))


def _folder(tmp: Path) -> None:
    """An ImageFolder tree ``data/<class>/<k>.png``."""
    for j, c in enumerate("abc"):
        for k in range(3):
            _img(tmp / "data" / c / f"{k}.png", seed=3 * j + k)


def _small_images(tmp: Path) -> None:
    _manifest(tmp / "data")
    for k in range(8):
        _img(tmp / "data" / f"img{k}.png", size=(7 + k, 5 + k), seed=k)


def _report_run(tmp: Path) -> None:
    (tmp / "data" / "run").mkdir(parents=True)
    (tmp / "data" / "run" / "summary.json").write_text("{not json")


CASES: list[Case] = [
    # ---- images
    Case("missing-image", _bad_image("missing"), SWEEP(), 2, ("img3.png", "missing", "--skip-bad")),
    Case("empty-image", _bad_image("empty"), SWEEP(), 2, ("img3.png", "could not be read", "--skip-bad")),
    Case("corrupt-image", _bad_image("corrupt"), SWEEP(), 2, ("img3.png", "could not be read", "--skip-bad")),
    Case("truncated-jpeg", _bad_image("truncated"), SWEEP(), 2, ("img3.jpg", "could not be read", "--skip-bad")),
    Case("truncated-jpeg-skip-bad", _bad_image("truncated"), SWEEP("{data}/manifest.csv", "{m3}", "--skip-bad"), 0,
         check=lambda out, o: (json.loads((out / "summary.json").read_text())["images"]["bad_ids"] == ["img3.jpg"]
                               and "skipped 1 unreadable image(s): img3.jpg" in o) or pytest.fail(o)),
    Case("pixel-bomb", _big_image("bomb"), SWEEP(), 2,
         ("img3.png", "30000x30000 = 900000000 pixels", "limit of 89478485 pixels", "--max-pixels", "--skip-bad")),
    Case("over-max-pixels", _big_image("200x200"), SWEEP("{data}/manifest.csv", "{m3}", "--max-pixels", "10000"), 2,
         ("img3.png", "200x200 = 40000 pixels", "limit of 10000 pixels", "raise --max-pixels")),
    Case("over-max-pixels-skip-bad", _big_image("200x200"),
         SWEEP("{data}/manifest.csv", "{m3}", "--max-pixels", "10000", "--skip-bad"), 0,
         check=lambda out, o: (json.loads((out / "summary.json").read_text())["images"]["bad_ids"] == ["img3.png"]
                               and "skipped 1 unreadable image(s): img3.png" in o) or pytest.fail(o)),
    Case("max-pixels-zero-lifts-the-limit", _big_image("200x200"),
         SWEEP("{data}/manifest.csv", "{m3}", "--max-pixels", "0"), 0, check=_ok()),
    Case("max-pixels-negative", lambda t: _manifest(t / "data"),
         SWEEP("{data}/manifest.csv", "{m3}", "--max-pixels", "-1"), 2, ("--max-pixels=-1", "0: no limit")),
    Case("store-above-not-a-size", lambda t: _manifest(t / "data"),
         SWEEP("{data}/manifest.csv", "{m3}", "--store-above", "2 gallons"), 2, ("--store-above", "2GiB")),
    Case("store-above-with-no-cache", lambda t: _manifest(t / "data"),
         SWEEP("{data}/manifest.csv", "{m3}", "--store-above", "0", "--no-cache"), 2,
         ("--store-above", "--no-cache")),
    Case("grayscale-png", _mode_images("L"), SWEEP(), 0, check=_check_mode("L")),
    Case("cmyk-jpeg", _mode_images("CMYK"), SWEEP(), 0, check=_check_mode("CMYK")),
    Case("16-bit-png", _mode_images("I;16"), SWEEP(), 0, check=_check_mode("I;16")),
    Case("image-smaller-than-crop", _small_images, SWEEP(), 0, check=_ok()),
    # ---- label files
    Case("voc-list-names-missing-image", lambda t: _voc(t / "data", missing=("000003",)),
         SWEEP("{data}/VOCdevkit", "{m20}"), 2, ("000003.jpg", "missing", "--skip-bad")),
    Case("voc-xml-unknown-class", lambda t: _voc(t / "data", objects={"000002": ["dog", "unicorn"]}),
         SWEEP("{data}/VOCdevkit", "{m20}"), 2, ("000002.xml", "'unicorn'")),
    Case("coco-dangling-category", lambda t: _coco(t / "data", dangling=True),
         SWEEP("{data}", "{m2}"), 2, ("instances_val2017.json", "category id 7")),
    Case("manifest-unknown-label", lambda t: _json_manifest(
        t / "data", [{"path": "i0.png", "labels": ["a"]}, {"path": "i1.png", "labels": ["b", "zebra"]}]),
         SWEEP("{data}/manifest.json"), 2, ("manifest.json images[1]", "'zebra'")),
    Case("manifest-path-escapes-root", _manifest_with(["img0.png,a", "img1.png,b", "../../etc/passwd,c"]),
         SWEEP(), 2, ("manifest.csv:4", "../../etc/passwd", "outside")),
    Case("class-without-positives", lambda t: _json_manifest(
        t / "data", [{"path": f"i{k}.png", "labels": ["a"] if k % 2 else ["a", "b"]} for k in range(4)]),
         SWEEP("{data}/manifest.json"), 0, check=_no_positive_check),
    Case("zero-images-in-split", lambda t: _voc(t / "data", ids=()), SWEEP("{data}/VOCdevkit", "{m20}"), 2,
         ("test.txt", "lists no images", "add image ids to it")),
    Case("manifest-split-with-no-rows", _manifest_with(["img0.png,a", "img1.png,b"]),
         SWEEP("{data}/manifest.csv", "{m3}", "--split", "val"), 2, ("split='val'", "manifest.csv", "no 'split' column")),
    # ---- model
    Case("class-count-mismatch", lambda t: _manifest(t / "data"), SWEEP("{data}/manifest.csv", "{m20}"), 2,
         ("3 classes", "20", "--class-map")),
    Case("state-dict-wrong-arch", lambda t: _manifest(t / "data"), SWEEP("{data}/manifest.csv", "{other3}"), 2,
         ("other3.pth", "does not fit arch", "--arch")),
    Case("model-returns-nan", lambda t: _manifest(t / "data"), SWEEP("{data}/manifest.csv", "{nan3}"), 2,
         ("nan3.pth", "NaN")),
    Case("corrupt-checkpoint", lambda t: (t / "data").mkdir() or (t / "data" / "bad.pth").write_bytes(b"garbage"),
         ["describe", "{data}/bad.pth", "--arch", "{nets}:tiny"], 2, ("bad.pth", "not a readable")),
    # ---- arguments
    Case("lams-negative", lambda t: _manifest(t / "data"), SWEEP("{data}/manifest.csv", "{m3}", "--lams", "0,-0.1"),
         2, ("--lams", "-0.1")),
    Case("lams-nan", lambda t: _manifest(t / "data"), SWEEP("{data}/manifest.csv", "{m3}", "--lams", "0,nan"),
         2, ("--lams", "nan")),
    Case("lams-text", lambda t: _manifest(t / "data"), SWEEP("{data}/manifest.csv", "{m3}", "--lams", "0,abc"),
         2, ("--lams", "'abc'", "not a number")),
    Case("lams-one-point", lambda t: _manifest(t / "data"), SWEEP("{data}/manifest.csv", "{m3}", "--lams", "0.3"),
         0, check=_one_point_check),
    Case("batch-size-zero", lambda t: _manifest(t / "data"), SWEEP("{data}/manifest.csv", "{m3}", "--batch-size", "0"),
         2, ("--batch-size=0", ">= 1")),
    Case("batch-size-negative", lambda t: _manifest(t / "data"),
         SWEEP("{data}/manifest.csv", "{m3}", "--batch-size", "-3"), 2, ("--batch-size=-3", ">= 1")),
    Case("workers-negative", lambda t: _manifest(t / "data"), SWEEP("{data}/manifest.csv", "{m3}", "--workers", "-1"),
         2, ("--workers=-1", ">= 0")),
    Case("folds-negative", lambda t: _manifest(t / "data"), SWEEP("{data}/manifest.csv", "{m3}", "--folds", "-2"),
         2, ("--folds=-2", "0: off")),
    Case("bootstrap-negative", lambda t: _manifest(t / "data"),
         SWEEP("{data}/manifest.csv", "{m3}", "--bootstrap", "-5"), 2, ("--bootstrap=-5", "0: off")),
    Case("temperatures-nan", lambda t: _manifest(t / "data"),
         SWEEP("{data}/manifest.csv", "{m3}", "--temperatures", "inf,nan"), 2, ("--temperatures", "nan")),
    Case("std-nan", lambda t: _manifest(t / "data"), SWEEP("{data}/manifest.csv", "{m3}", "--std", "0.25,nan,0.25"),
         2, ("std=[0.25, nan, 0.25]", "finite")),
    Case("input-size-malformed", lambda t: _manifest(t / "data"),
         SWEEP("{data}/manifest.csv", "{m3}", "--input-size", "3,32"), 2, ("--input-size", "'3,32'")),
    Case("describe-input-size-text", lambda t: None, ["describe", "{m3}", "--arch", "{nets}:tiny", "--input-size",
                                                      "3,a,b"], 2, ("--input-size", "'3,a,b'")),
    # ---- outputs
    Case("out-in-missing-folder", lambda t: None,
         ["patch", "{m3}", "--arch", "{nets}:tiny", "--input-size", "3,32,32", "-o", "{tmp}/nodir/p.pt"], 2,
         ("nodir", "does not exist")),
    Case("out-under-a-file", lambda t: _manifest(t / "data"),
         SWEEP("{data}/manifest.csv", "{m3}")[:7] + ["{data}/manifest.csv/run"] + SWEEP()[8:], 2,
         ("--out", "manifest.csv", "not a directory")),
    Case("out-in-read-only-folder", lambda t: _manifest(t / "data"),
         SWEEP()[:7] + ["{tmp}/ro/run"] + SWEEP()[8:], 2, ("--out", "ro", "not writable"), setup=_readonly),
    Case("out-equals-data", _folder,
         SWEEP("{data}")[:7] + ["{data}"] + SWEEP()[8:] + ["--force"], 2, ("--out", "--data")),
    Case("out-equals-model", lambda t: _manifest(t / "data"),
         SWEEP()[:7] + ["{m3}"] + SWEEP()[8:] + ["--force"], 2, ("--out", "tiny3.pth", "model")),
    Case("train-head-out-equals-data", lambda t: _manifest(t / "data"),
         ["train-head", "{m3}", "--arch", "{nets}:tiny", "--data", "{data}/manifest.csv", "--out", "{data}", "--force",
          "--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--epochs", "1",
          "--workers", "0", "--device", "cpu"], 2, ("--out", "--data")),
    Case("report-corrupt-summary", _report_run, ["report", "{data}/run", "--out", "{out}"], 2,
         ("summary.json", "not valid JSON")),
]


_last_args: list[str] = []


def _fill(args: Sequence[str], tmp: Path, models: dict) -> list[str]:
    vals = {"data": str(tmp / "data"), "out": str(tmp / "out"), "tmp": str(tmp), **models}
    return [a.format(**vals) for a in args]


def run_case(case: Case, tmp: Path, models: dict, monkeypatch: pytest.MonkeyPatch):
    case.build(tmp)
    if case.setup is not None:
        case.setup(tmp, monkeypatch)
    args = _fill(case.args, tmp, models)
    _last_args[:] = args
    before = {p for p in tmp.rglob("*")}
    res = runner.invoke(app, args)
    return args, res, before


def _message(output: str) -> str:
    return " ".join(output.split())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    args, res, before = run_case(case, tmp_path, models, monkeypatch)
    out = res.output
    assert res.exit_code == case.exit, out
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # an uncaught exception is a traceback for the user
    assert "Traceback" not in out, out
    if case.exit == 0:
        case.check(tmp_path / "out", out)
        assert not [p for p in tmp_path.rglob(".*") if p.name.startswith(".out.")]  # no temporary siblings
        return
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, out
    msg = _message(out)
    for m in case.msgs:
        assert m in msg, f"{m!r} not in {msg!r}"
    # nothing partial: no --out, no temporary siblings, nothing new but what the case built
    assert not (tmp_path / "out").exists()
    after = {p for p in tmp_path.rglob("*")}
    assert after == before, sorted(map(str, after - before))


# ----------------------------------------------------------------------------- walking data (issue 15)
def test_a_symlink_loop_counts_each_image_once(tmp_path):
    from patchcsra.data import open_dataset

    for c in ("cat", "dog"):
        for k in range(3):
            _img(tmp_path / "d" / c / f"{k}.png", seed=k)
    (tmp_path / "d" / "cat" / "again").symlink_to(tmp_path / "d" / "cat")  # cat/again -> cat
    ds = open_dataset(tmp_path / "d")
    assert len(ds) == 6 and sorted(ds.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_manifest_paths_naming_one_file_are_duplicates(tmp_path):
    from patchcsra.data import open_dataset
    from patchcsra.errors import DatasetError

    _img(tmp_path / "cls" / "x.png", seed=0)
    _img(tmp_path / "cls" / "y.png", seed=1)
    (tmp_path / "m.csv").write_text("path,labels\ncls/x.png,a\n./cls/x.png,a\ncls/../cls/y.png,b\n")
    with pytest.raises(DatasetError, match="listed twice"):
        open_dataset(tmp_path / "m.csv")


def test_a_fifo_named_like_an_image_never_blocks(tmp_path):
    import os

    from patchcsra.data import open_dataset

    _img(tmp_path / "d" / "a" / "0.png", seed=0)
    _img(tmp_path / "d" / "b" / "0.png", seed=1)
    os.mkfifo(tmp_path / "d" / "a" / "pipe.jpg")
    ds = open_dataset(tmp_path / "d")
    assert len(ds) == 3 and ds.missing_files() == ["a/pipe.jpg"]
    i = ds.ids.index("a/pipe.jpg")
    _, _, ok = ds[i]  # returns at once (no open() on a FIFO): unreadable
    assert ok is False


@pytest.mark.parametrize("summary", [
    '{"metric": "mAP", "choices": {}}',
    '{"metric": "mAP", "baseline": {"mAP": 80.0}, "choices": {"fixed": {"lam": "x"}}}',
    '{"metric": "mAP", "baseline": {"mAP": 80.0}, "choices": [], "images": 3}',
    '{"metric": 3, "baseline": [], "choices": {}}',
], ids=["no-baseline", "bad-choice", "choices-list", "metric-number"])
def test_report_on_a_summary_of_the_wrong_shape_is_one_line(tmp_path, summary):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(summary)
    r = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert r.exit_code == 2 and "not a patchcsra sweep summary" in r.output and "Traceback" not in r.output


def test_a_huge_class_map_index_is_one_line(tmp_path):
    from patchcsra.data import align_classes
    from patchcsra.errors import DataMismatchError

    with pytest.raises(DataMismatchError, match=r"index 10{30} of class 'a' is outside \[0, 3\)"):
        align_classes(("a", "b"), 3, class_map={"a": 10 ** 30, "b": 1})


def test_temperatures_are_written_as_given_and_huge_ones_are_not_blamed_on_the_weights(tmp_path):
    import math

    import pandas as pd
    import torch

    from patchcsra.grid import sweep
    from patchcsra.patcher import residual_attention
    from patchcsra.report import summary_record, write_run

    s = torch.randn(4, 3, 6)
    assert torch.allclose(residual_attention(s, 1e308), s.amax(-1))  # no NaN: the limit T -> inf
    assert torch.allclose(residual_attention(s, 1e-30), s.mean(-1))
    import numpy as np

    from patchcsra.stats import Stats

    temps = (1e-30, 1e308, math.inf)
    scores = torch.randn(40, 3, 6, generator=torch.Generator().manual_seed(0))
    att = torch.stack([residual_attention(scores, t) for t in temps], -1)  # the library's formula, as collect does
    targets = (torch.rand(40, 3, generator=torch.Generator().manual_seed(1)) < 0.4).numpy().astype(np.int8)
    st = Stats(scores.mean(-1), scores.amax(-1), att, temps, targets, np.ones(40, bool),
               tuple(str(i) for i in range(40)), ("a", "b", "c"), False)
    res = sweep(st, lams=[0, 0.5], temperatures=[1e-30, 1e308], bootstrap=0, folds=0)
    write_run(res, tmp_path / "r", summary_record(res))
    got = pd.read_csv(tmp_path / "r" / "results.csv")["temperature"].tolist()
    assert 1e-30 in got and 1e308 in got and math.inf in got


def test_an_input_size_that_cannot_fit_is_refused_before_any_allocation(tmp_path):
    r = CliRunner().invoke(app, ["describe", "timm:resnet18", "--no-pretrained", "--input-size", "3,20000,20000"])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "--input-size=" in said and "GiB" in said and "Traceback" not in r.output


@pytest.mark.parametrize("name", ["manifest.json", "instances_val2017.json"])
def test_json_nested_100k_deep_is_one_line(tmp_path, name):
    from patchcsra.data import open_dataset
    from patchcsra.errors import DatasetError

    (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match="nested too deeply|cannot read"):
        open_dataset(tmp_path / name, format="coco" if "instances" in name else "manifest")


# ----------------------------------------------------------------------------- the pixel limit (issue 15)
def test_the_pixel_limit_is_ours_not_pils(tmp_path):
    """No raw DecompressionBombWarning; PIL's own hard stop (2x its limit) does not pre-empt a raised limit;
    PIL's global is left as it was."""
    import warnings

    from patchcsra.data import UnreadableImage, read_image

    bomb = png_header(tmp_path / "bomb.png", 30000, 30000)
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UnreadableImage, match="over the limit of 89478485 pixels"):
            read_image(bomb)
        with pytest.raises(UnreadableImage) as e:  # no limit: PIL tries to decode, and finds no pixel data
            read_image(bomb, None)
        assert "pixels is over" not in str(e.value) and "bomb.png" in str(e.value)
        big = _img(tmp_path / "big.png", size=(12000, 8))  # 96,000 pixels: at the limit is allowed, one over is not
        assert read_image(big, 96_000).size == (12000, 8)
        with pytest.raises(UnreadableImage, match="96000 pixels is over the limit of 95999"):
            read_image(big, 95_999)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == before


def test_explain_names_the_pixel_limit(tmp_path, models):
    bomb = png_header(tmp_path / "bomb.png", 30000, 30000)
    res = runner.invoke(app, ["explain", models["m3"], str(bomb), "--arch", f"{models['nets']}:tiny",
                              "--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                              "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--max-pixels" in _message(res.output) and "bomb.png" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x").exists()
