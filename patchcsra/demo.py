"""The embedded default: the whole pipeline on data that ships with the install, offline, on a CPU.

* :func:`digit_canvases` -- a multi-label set built deterministically from scikit-learn's bundled real
  handwritten digits (1,797 8x8 scans): 1-4 digits per canvas, each at a random size and place, so
  objects are several and small -- the case the paper is about. Train and test canvases use disjoint
  digit scans.
* :class:`DigitNet` -- a small CNN whose head is global average pooling + one Linear (like ResNets).
* :func:`train_digit_net` -- trained the ordinary way (BCE, Adam, seeded; repeatable on one machine).
* :func:`shipped_digit_net` -- the DigitNet trained once with :data:`RECIPE`, shipped with the package, so
  the embedded default gives the same figures on every machine (training itself does not: see there).
* :func:`run_demo` -- writes the canvases as PNGs with a CSV manifest, takes the shipped model (or trains
  one), then runs the real :func:`patchcsra.sweep_lambda` on the test manifest and writes a Table-1 run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import PatchCSRAError
from ._io import atomic_path

__all__ = ["digit_canvases", "canvases_digest", "DigitNet", "train_digit_net", "shipped_digit_net",
           "write_shipped_weights", "run_demo", "DIGIT_CLASSES", "RECIPE", "WEIGHTS_FILE"]

_logger = logging.getLogger(__name__)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
_MEAN, _STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _bilinear_weights(size: int, src: int = 8) -> tuple[np.ndarray, int]:
    """Integer bilinear weights ``(size, src)`` (``align_corners=False``, edges clamped) and their row sum.

    Source coordinate of output pixel ``i`` is ``(i + 0.5) * src / size - 0.5 = num / den`` with
    ``den = 2 * size``; every weight is an integer numerator over ``den``, so the resize is exact integer
    arithmetic: the same bytes on every machine and every numpy / Pillow version.
    """
    den = 2 * size
    w = np.zeros((size, src), np.int64)
    for i in range(size):
        x0, r = divmod(max((2 * i + 1) * src - size, 0), den)
        w[i, x0] += den - r
        w[i, min(x0 + 1, src - 1)] += r
    return w, den


def _resize_glyph(levels: np.ndarray, size: int) -> np.ndarray:
    """A ``(8, 8)`` scan of 0-16 ink levels -> ``(size, size)`` uint8 (0-255), bilinear, rounded half up."""
    w, den = _bilinear_weights(size, levels.shape[0])
    v = w @ levels.astype(np.int64) @ w.T  # ink levels x den^2
    q = 16 * den * den  # 16 ink levels -> 255
    return ((2 * 255 * v + q) // (2 * q)).astype(np.uint8)


def digit_canvases(n: int, *, size: int = 48, max_digits: int = 4, part: str = "train",
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canvases ``(n, size, size)`` uint8 and targets ``(n, 10)`` int8 (1 = the digit appears).

    ``part='train'`` draws digit scans from the first 1,200 of sklearn's 1,797, ``'test'`` from the rest.
    Built with integer arithmetic only (:func:`_resize_glyph`, ``np.maximum`` on uint8) from numpy's
    PCG64 stream: bit-identical across machines, CPU kernel sets and numpy / Pillow versions.
    """
    from sklearn.datasets import load_digits

    if part not in ("train", "test"):
        raise PatchCSRAError(f"part={part!r}: choose train or test")
    d = load_digits()
    levels = np.rint(d.images).astype(np.int64)  # 0..16 ink levels, as scanned
    pool = np.arange(0, 1200) if part == "train" else np.arange(1200, len(d.images))
    rng = np.random.default_rng(seed + (0 if part == "train" else 10_000))
    imgs = np.zeros((n, size, size), np.uint8)
    targets = np.zeros((n, 10), np.int8)
    for i in range(n):
        for _ in range(int(rng.integers(1, max_digits + 1))):
            j = int(rng.choice(pool))
            s = int(rng.integers(10, size // 2 + 1))
            y, x = (int(v) for v in rng.integers(0, size - s + 1, 2))
            window = imgs[i, y:y + s, x:x + s]
            np.maximum(window, _resize_glyph(levels[j], s), out=window)
            targets[i, int(d.target[j])] = 1
    return imgs, targets


def canvases_digest(imgs: np.ndarray, targets: np.ndarray) -> str:
    """sha256 of canvases and targets (what the shipped weights were trained on)."""
    h = hashlib.sha256()
    for a in (imgs, targets):
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class DigitNet(nn.Module):
    """``(B, 3, H, W) -> (B, 10)``: four conv blocks to a ``(B, 64, H/4, W/4)`` map, then GAP + Linear."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(3, width, 1), block(width, width, 2), block(width, 2 * width, 1),
                                      block(2 * width, 2 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _to_input(imgs: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(imgs, dtype=torch.float32).div(255).sub(0.5).div(0.5)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def train_digit_net(imgs: np.ndarray, targets: np.ndarray, *, epochs: int = 8, batch_size: int = 64,
                    lr: float = 3e-3, seed: int = 0,
                    progress: Optional[Callable[[int, int, float], None]] = None) -> DigitNet:
    """Train :class:`DigitNet` with BCE + Adam on ``(n, H, W)`` uint8 canvases; deterministic for a seed."""
    torch.manual_seed(seed)
    model = DigitNet()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all, y_all = _to_input(imgs), torch.as_tensor(targets, dtype=torch.float32)
    steps = math.ceil(len(x_all) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=g)
        total = 0.0
        for k in range(steps):
            idx = order[k * batch_size:(k + 1) * batch_size]
            x = x_all[idx]
            if torch.rand((), generator=g) < 0.5:  # small shifts (flips would change what a digit is)
                x = torch.roll(x, shifts=int(torch.randint(-3, 4, (), generator=g)), dims=-1)
            loss = F.binary_cross_entropy_with_logits(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if progress is not None:
            progress(epoch + 1, epochs, total / len(x_all))
    return model.eval()


def _write_split(root: Path, name: str, imgs: np.ndarray, targets: np.ndarray) -> Path:
    """PNG files plus a wide-form manifest ``path,0,1,...,9``; returns the manifest path."""
    from PIL import Image

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path," + ",".join(DIGIT_CLASSES)]
    for i, (img, t) in enumerate(zip(imgs, targets)):
        rel = f"{name}/{i:05d}.png"
        Image.fromarray(img).save(root / rel)
        lines.append(rel + "," + ",".join(str(int(v)) for v in t))
    manifest = root / f"{name}.csv"
    with atomic_path(manifest, force=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return manifest


#: the recipe the shipped weights were trained with: ``train_digit_net(*digit_canvases(n_train, part='train',
#: seed=seed), epochs=epochs, seed=seed)``.
RECIPE = {"n_train": 4000, "epochs": 8, "seed": 0}
#: DigitNet trained once with :data:`RECIPE` (``benchmarks/train_demo_weights.py``), shipped in the wheel.
WEIGHTS_FILE = Path(__file__).with_name("assets") / "digitnet.safetensors"


def shipped_digit_net(path: Union[str, Path] = WEIGHTS_FILE) -> tuple[DigitNet, dict]:
    """The shipped :class:`DigitNet` (eval mode) and its record (recipe, canvases digest, where it was trained).

    Training a network is chaotic: a float32 round-off difference (another CPU kernel set, another thread
    count) grows into another model within a few hundred steps (test mAP 76.16 / 76.44 / 76.79 were seen for
    the same recipe and package versions on three machines). Shipping the trained weights is what makes the
    embedded default give the same figures everywhere; ``patchcsra demo --retrain`` trains here instead.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("patchcsra", "{}"))
        state = load_file(str(p))
    except (OSError, ValueError, RuntimeError) as e:
        raise PatchCSRAError(f"{p}: cannot read the shipped DigitNet weights ({type(e).__name__}: {e}); "
                             "reinstall patchcsra or run 'patchcsra demo --retrain'") from None
    model = DigitNet()
    model.load_state_dict(state)
    return model.eval(), meta


def write_shipped_weights(path: Union[str, Path] = WEIGHTS_FILE, *, force: bool = False,
                          progress: Optional[Callable[[int, int, float], None]] = None) -> dict:
    """Train :class:`DigitNet` with :data:`RECIPE` and write it to ``path`` (safetensors); returns its record."""
    from safetensors.torch import save_file

    from .provenance import environment

    x, y = digit_canvases(RECIPE["n_train"], part="train", seed=RECIPE["seed"])
    model = train_digit_net(x, y, epochs=RECIPE["epochs"], seed=RECIPE["seed"], progress=progress)
    record = {"recipe": dict(RECIPE), "train_canvases_sha256": canvases_digest(x, y),
              "trained_with": environment()}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path, force=force) as tmp:
        save_file(state, str(tmp), metadata={"patchcsra": json.dumps(record, sort_keys=True)})
    return record


def run_demo(out_dir: Union[str, Path], *, n_train: int = RECIPE["n_train"], n_test: int = 1000,
             epochs: int = RECIPE["epochs"], seed: int = RECIPE["seed"], retrain: Optional[bool] = None,
             workers: Optional[int] = 0, force: bool = False,
             progress: Optional[Callable[[str, int, int], None]] = None):
    """Build the digit canvases, take the shipped :class:`DigitNet` (or train one), and sweep λ on the test canvases.

    ``retrain=None`` trains only when ``n_train`` / ``epochs`` / ``seed`` differ from :data:`RECIPE`; the
    shipped weights are used otherwise, so the figures are the same on every machine. A model trained here
    depends on the CPU's kernel set and thread count (see :func:`shipped_digit_net`).

    Writes ``out_dir/data/{train,test}/*.png`` + ``{train,test}.csv``, ``out_dir/digitnet.pt`` (state dict)
    and the run directory ``out_dir/run`` (results.csv, summary.json, table.md/.tex, curve.png).
    Returns the :class:`patchcsra.api.SweepRun`.
    """
    from .api import sweep_lambda

    out = Path(out_dir)
    if (out / "run").exists() and not force:
        raise PatchCSRAError(f"{out / 'run'} exists; pass --force to run the demo again")
    recipe = {"n_train": n_train, "epochs": epochs, "seed": seed}
    if retrain is None:
        retrain = recipe != RECIPE
    elif not retrain and recipe != RECIPE:
        raise PatchCSRAError(f"the shipped weights were trained with {RECIPE}, not {recipe}; "
                             "drop --n-train/--epochs/--seed or pass --retrain")
    out.mkdir(parents=True, exist_ok=True)
    tr_x, tr_y = digit_canvases(n_train, part="train", seed=seed)
    te_x, te_y = digit_canvases(n_test, part="test", seed=seed)
    _write_split(out / "data", "train", tr_x, tr_y)
    manifest = _write_split(out / "data", "test", te_x, te_y)

    def cb(epoch: int, total: int, loss: float) -> None:
        if progress is not None:
            progress(f"training DigitNet (loss {loss:.3f})", epoch, total)

    if retrain:
        model, weights = train_digit_net(tr_x, tr_y, epochs=epochs, seed=seed, progress=cb), "trained here"
    else:
        model, record = shipped_digit_net()
        weights = f"shipped ({WEIGHTS_FILE.name}, trained with {RECIPE})"
        if record.get("train_canvases_sha256") != canvases_digest(tr_x, tr_y):
            _logger.warning("the training canvases differ from the ones the shipped DigitNet was trained on; "
                            "the figures will differ from the reference ones")
    with atomic_path(out / "digitnet.pt", force=True) as tmp:
        torch.save(model.state_dict(), tmp)
    run = sweep_lambda(model, manifest, input_size=(3, tr_x.shape[1], tr_x.shape[2]), mean=_MEAN, std=_STD,
                       crop_pct=1.0, workers=workers, device="cpu", amp="none", cache_dir=None,
                       temperatures=(1.0, 2.0, 4.0, math.inf), bootstrap=1000, fixed_lam=0.2,
                       model_name="DigitNet (GAP + Linear)",
                       progress=(lambda d, t: progress("collecting", d, t)) if progress is not None else None)
    run.summary["model"]["weights"] = weights
    run.summary["dataset"]["name"] = "sklearn-digits canvases (test)"
    run.write(out / "run", force=force)
    return run
