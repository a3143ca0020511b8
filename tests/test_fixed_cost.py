"""The fixed cost of a run (issue 19 §2): what was rewritten to keep torchvision, timm and torch's thread pool off
a cached re-sweep must give what the libraries give."""
from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from patchcsra.data import _imagefolder as ours


def _tree(root):
    """Nested folders, upper-case and foreign extensions, a linked folder, a linked file and a link loop."""
    for cls, names in {"b": ["2.png", "1.JPG", "x.txt", "sub/3.jpeg", "sub/deeper/4.webp"],
                       "a": ["z.bmp", "y.Png", ".hidden.jpg"], "c": [], "d": ["n.tif"]}.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for n in names:
            p = root / cls / n
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
    os.symlink(root / "a", root / "b" / "linked")  # a folder reached twice
    os.symlink(root / "d" / "n.tif", root / "a" / "again.tif")  # a file reached twice
    os.symlink(".", root / "d" / "loop")  # d/loop/loop/... until the OS says ELOOP
    (root / "e.jpg").write_bytes(b"x")  # a file at the top is not a class


def test_imagefolder_listing_equals_torchvision(tmp_path):
    from torchvision.datasets import folder as tv

    _tree(tmp_path)
    assert ours.IMG_EXTENSIONS == tv.IMG_EXTENSIONS
    assert ours.find_classes(tmp_path) == tv.find_classes(tmp_path)
    _, idx = tv.find_classes(tmp_path)
    links = [False]
    got = ours.make_dataset(str(tmp_path), idx, ours.IMG_EXTENSIONS, links)
    want = tv.make_dataset(str(tmp_path), idx, extensions=tv.IMG_EXTENSIONS, allow_empty=True)
    assert got == want and len(got) > 10 and links[0]
    for name in ("a.JPEG", "a.jpg.txt", "A.WEBP", "noext"):
        assert ours.has_file_allowed_extension(name, ours.IMG_EXTENSIONS) == \
            tv.has_file_allowed_extension(name, tv.IMG_EXTENSIONS)


def test_imagefolder_without_links_is_not_resolved(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (4, 4)).save(tmp_path / cls / f"{i}.png")
    links = [False]
    assert len(ours.make_dataset(str(tmp_path), {"cat": 0, "dog": 1}, ours.IMG_EXTENSIONS, links)) == 6
    assert links == [False]


def test_clean_state_dict_equals_timm():
    from timm.models import clean_state_dict as timm_clean

    from patchcsra.sources import clean_state_dict

    sd = {k: i for i, k in enumerate(["module.a", "_orig_mod.module.b", "module._orig_mod.c", "_orig_mod.d",
                                      "e.module.f", "module.module.g", "_orig_mod._orig_mod.h", "plain"])}
    assert clean_state_dict(sd) == timm_clean(sd)


def test_scores_bit_equal_to_torch_arithmetic():
    from patchcsra.stats import Stats

    g = torch.Generator().manual_seed(0)
    n, c = 300, 7
    base, mx, att = torch.randn(n, c, generator=g) * 9, torch.randn(n, c, generator=g) * 9, torch.randn(
        n, c, 3, generator=g) * 9
    att[..., 2] = mx
    st = Stats(base, mx, att, (1.0, 2.0, math.inf), np.zeros((n, c), np.int8), np.ones(n, bool),
               tuple(map(str, range(n))), tuple(map(str, range(c))), False)
    for lam in (0.02, 0.1, 1 / 3, 0.75, 1.0, -0.5):
        for t in (1.0, 2.0, math.inf):
            want = base + float(lam) * st.att_for(t)
            got = st.scores(lam, t)
            assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
            assert torch.equal(got, want), (lam, t)
    assert st.scores(0.0) is base


def test_lazy_transform_equals_build_and_pickles():
    from patchcsra.data.transforms import TransformSpec

    spec = TransformSpec((3, 16, 16), 18, 16 / 18, "center", "bilinear", (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (23, 31, 3), dtype=np.uint8))
    lazy = spec.lazy()
    assert lazy._fn is None
    assert torch.equal(lazy(img), spec.build()(img))
    again = pickle.loads(pickle.dumps(lazy))
    assert again._fn is None and torch.equal(again(img), spec.build()(img))


@pytest.mark.parametrize("what", ["torchvision", "timm"])
def test_cached_resweep_imports_neither_torchvision_nor_timm(tmp_path, what):
    """A file source with --arch over an ImageFolder, answered from the cache: the libraries are never imported
    (each would cost ~1.5-2 s of a run meant to take a few)."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        (data / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(data / cls / f"{i}.png")
    net = tmp_path / "net.py"
    net.write_text("import torch.nn as nn\n"
                   "def tiny():\n"
                   "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), "
                   "nn.Linear(8, 3))\n")
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    torch.save(model.state_dict(), tmp_path / "w.pth")
    args = [str(tmp_path / "w.pth"), "--arch", f"{net}:tiny", "--data", str(data), "--input-size", "3,12,12",
            "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--cache-dir", str(tmp_path / "cache"), "-q",
            "--folds", "0", "--bootstrap", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    first = [sys.executable, "-m", "patchcsra", "sweep-lambda", *args, "--out", str(tmp_path / "r0")]
    subprocess.run(first, check=True, env=env, capture_output=True)
    probe = ("import sys, runpy; sys.argv = ['patchcsra', 'sweep-lambda'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('patchcsra', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             f"print('IMPORTED' if {what!r} in sys.modules else 'CLEAN', file=sys.stderr)\n")
    got = subprocess.run([sys.executable, "-c", probe, *args, "--out", str(tmp_path / "r1")],
                         env={**env, "PATCHCSRA_FULL_EXIT": "1"}, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert "pass: 0 forward" in got.stdout + got.stderr
    assert got.stderr.strip().splitlines()[-1] == "CLEAN", got.stderr
    assert (tmp_path / "r1" / "results.csv").read_bytes() == (tmp_path / "r0" / "results.csv").read_bytes()


def test_fast_exit_keeps_status_output_threads_and_atexit(tmp_path):
    """The console entry point ends through os._exit: the status, everything written to stdout/stderr (also into
    a pipe), a non-daemon thread's work and the atexit handlers all survive; ``sys.exit("msg")`` gives 1."""
    import subprocess
    from pathlib import Path

    mark = tmp_path / "atexit.txt"
    done = tmp_path / "thread.txt"
    script = (
        "import atexit, sys, threading, time, typer\n"
        "import patchcsra.cli as cli\n"
        f"atexit.register(lambda: open({str(mark)!r}, 'w').write('ran'))\n"
        "def slow():\n"
        f"    time.sleep(0.3); open({str(done)!r}, 'w').write('done')\n"
        "app = typer.Typer()\n"
        "@app.command()\n"
        "def go(code: int = 0, msg: str = ''):\n"
        "    threading.Thread(target=slow).start()\n"
        "    sys.stdout.write('x' * 200000)\n"
        "    sys.stderr.write('to stderr')\n"
        "    if msg: sys.exit(msg)\n"
        "    raise typer.Exit(code)\n"
        "cli.app = app\n"
        "cli.main()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    env.pop("PATCHCSRA_FULL_EXIT", None)
    for args, status in ((["--code", "0"], 0), (["--code", "3"], 3), (["--msg", "boom"], 1)):
        mark.unlink(missing_ok=True)
        done.unlink(missing_ok=True)
        got = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
        assert got.returncode == status, got.stderr
        assert len(got.stdout) == 200000
        assert got.stderr.startswith("to stderr")
        assert ("boom" in got.stderr) == (status == 1)
        assert mark.read_text() == "ran" and done.read_text() == "done"


def test_malloc_thresholds_set_at_cli_start_unless_the_user_chose():
    """glibc's mmap/trim thresholds are set by the command line's start-up (not by importing the library), and
    left alone under PATCHCSRA_MALLOC=system, a MALLOC_* variable or an allocator in LD_PRELOAD."""
    import platform
    import subprocess

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    probe = "from patchcsra._malloc import tune_malloc; print(tune_malloc())"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "PATCHCSRA_MALLOC"}
    for extra, want in (({}, "True"), ({"PATCHCSRA_MALLOC": "system"}, "False"), ({"MALLOC_ARENA_MAX": "2"}, "False"),
                        ({"LD_PRELOAD": "libjemalloc.so.2-not-loaded"}, "False")):
        env = {**base, **extra}
        if "LD_PRELOAD" in extra:  # only read, never loaded: the probe checks the variable's text
            env["LD_PRELOAD"] = ""
            got = subprocess.run([sys.executable, "-c", "import os; os.environ['LD_PRELOAD'] = 'libjemalloc.so.2'; "
                                  + probe], env=env, capture_output=True, text=True, check=True)
        else:
            got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert got.stdout.strip() == want, (extra, got.stdout, got.stderr)
    entry = ("import atexit, sys, patchcsra._malloc as m\n"
             "calls = []\n"
             "real = m.tune_malloc\n"
             "m.tune_malloc = lambda: calls.append(real()) or calls[-1]\n"
             "import patchcsra.cli as cli\n"
             "atexit.register(lambda: print('CALLS', calls))\n"
             "sys.argv = ['patchcsra', '--version']\n"
             "cli.main()\n")
    got = subprocess.run([sys.executable, "-c", entry], env=base, capture_output=True, text=True)
    assert got.returncode == 0 and "CALLS [True]" in got.stdout, got.stdout + got.stderr
