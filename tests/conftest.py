import os
import sys
import warnings
from pathlib import Path

import pytest
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
