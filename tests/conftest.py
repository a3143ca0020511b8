import os
import signal
import subprocess
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # CI has no internet: a hub lookup fails at once, not after 20 s of retries

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("PATCHCSRA_SHARED", REPO.parent / "shared"))

sys.path.insert(0, str(HERE))  # custom_nets: the user's own architectures
sys.path.insert(1, str(REPO / "benchmarks"))  # cifar_resnet, mobilenet_tf: the benchmarks' architectures
warnings.filterwarnings("ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_path(*parts: str) -> Path:
    """A file in ../shared; skip only where ../shared is absent (never in CI)."""
    p = SHARED.joinpath(*parts)
    if not SHARED.exists() and not os.environ.get("CI"):
        pytest.skip(f"{SHARED} is absent")
    assert p.exists(), f"missing shared file {p}"
    return p


@pytest.fixture
def x_small():
    g = torch.Generator().manual_seed(123)
    return torch.randn(3, 3, 64, 64, generator=g)


def image_folder(root: Path, n_classes: int, per_class: int, *, base: int = 200, step: int = 40) -> Path:
    """``root/train/c<k>/<j>.png``: 32x32 random images, one channel per class set to ``base - step * j``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / "train" / f"c{c}"
        d.mkdir(parents=True)
        for j in range(per_class):
            arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            arr[..., c % 3] = base - step * j
            Image.fromarray(arr).save(d / f"{j:02d}.png")
    return root


def run_bounded(cmd: list, *, timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` for process trees (torchrun and its ranks) that can never hang the suite.

    Output goes to files, not pipes, so an orphaned grandchild holding a pipe cannot block the read; the tree is
    marked through its environment, and on a timeout every process carrying the mark is SIGKILLed (torchrun
    starts its ranks in sessions of their own, out of reach of ``killpg``) and the test fails with the output.
    """
    mark = uuid.uuid4().hex
    env = {**kw.pop("env", os.environ), "PATCHCSRA_TEST_TREE": mark}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, **kw)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        finally:
            _kill_marked(mark)  # the ranks of a killed torchrun, or those a finished one left behind
        out.seek(0), err.seek(0)
        r = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    if timed_out:
        raise AssertionError(f"timed out after {timeout:.0f} s and killed: {' '.join(map(str, cmd[:6]))} ...\n"
                             + r.stdout[-2000:] + r.stderr[-3000:])
    return r


def _kill_marked(mark: str) -> None:
    """SIGKILL every process whose environment holds ``PATCHCSRA_TEST_TREE=mark``."""
    needle = f"PATCHCSRA_TEST_TREE={mark}".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    os.kill(int(d.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
