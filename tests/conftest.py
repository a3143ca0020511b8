import os
import sys
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
