"""A synthetic multi-label problem for the memory benchmarks: images made in ``__getitem__`` (no files) and a
small GAP + Linear CNN with 8x8 locations at 32x32."""
from __future__ import annotations


def synthetic_problem(n: int, c: int, *, positives: float, name: str = "synthetic"):
    """``(dataset, model)``: ``n`` random ``(3, 32, 32)`` images (seeded by index) with Bernoulli(``positives``)
    labels over ``c`` classes, and a seeded ``(B, 3, 32, 32) -> (B, c)`` CNN in eval mode."""
    import numpy as np
    import torch
    from torch import nn

    from patchcsra.data.base import ImageDataset

    class Synthetic(ImageDataset):
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.randn(3, 32, 32, generator=g), i, True

        def fingerprint(self) -> str:
            return f"{name}-{len(self)}-{c}"

    targets = (np.random.default_rng(0).random((n, c)) < positives).astype(np.int8)
    ds = Synthetic(name=name, format="manifest", root=".", split=None, classes=tuple(f"c{j}" for j in range(c)),
                   files=tuple(f"{i}.jpg" for i in range(n)), ids=tuple(str(i) for i in range(n)), targets=targets,
                   single_label=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, c)).eval()
    return ds, model
