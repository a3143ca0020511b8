"""Train a CSRA / attention-pooling head on a pretrained backbone (frozen or fine-tuned).

* :class:`TrainConfig` -- every number of the recipe, defaults from the paper (§4): SGD momentum 0.9,
  weight decay 1e-4, lr 0.1 head / 0.01 backbone, linear warm-up, step decay, 30 epochs, BCE for
  multi-label (ignored entries masked) / CE for single-label, flip + random resized crop when fine-tuning.
* :func:`train_head` -- ``frozen`` (default): the backbone's feature maps are computed once and cached
  in the run directory, so every epoch costs only the head; ``finetune``: the whole model trains with
  augmentation. The best epoch is chosen on a validation part carved (seeded) from the *training*
  data -- never on the test split. A checkpoint is written atomically after every epoch; ``resume``
  continues an interrupted run and ends with the same weights as an uninterrupted one.
* Under ``torchrun`` the trainable module is wrapped in ``DistributedDataParallel``; every rank takes a
  strided shard of each epoch's (seeded) batch order, and rank 0 writes the files.

Run directory: ``checkpoint.pt``, ``features.pt`` (frozen), ``history.csv``, ``curve.png``,
``model.pt`` (TorchScript of the best model, reloads in plain PyTorch) and ``summary.json``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dist
from .. import metrics as M
from .._io import atomic_path, replaceable_dir, torch_save, write_text
from ..errors import PatchCSRAError
from ..patcher import temperature_json
from .attach import HeadedClassifier, attach_head
from .heads import HEAD_KINDS

__all__ = ["TrainConfig", "TrainResult", "train_head", "carve_validation", "lr_factor", "masked_bce"]

_logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
#: everything train-head writes into its run directory (``--force`` replaces a folder holding only these)
RUN_DIR_FILES = ("checkpoint.pt", "features.pt", "history.csv", "curve.png", "model.pt", "summary.json", "eval")
FEATURES = "features.pt"

Progress = Callable[[dict], None]


@dataclass(frozen=True)
class TrainConfig:
    """The recipe. ``mode``: ``frozen`` (cached features, head only) or ``finetune`` (everything)."""

    kind: str = "csra"
    heads: int = 1
    lam: float = 0.1
    temperatures: Optional[tuple[float, ...]] = None
    mode: str = "frozen"
    epochs: int = 30
    batch_size: int = 16
    lr_head: float = 0.1
    lr_backbone: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    lr_step: int = 10
    lr_gamma: float = 0.1
    val_fraction: float = 0.1
    seed: int = 0
    init: str = "pretrained"

    def check(self) -> "TrainConfig":
        if self.kind not in HEAD_KINDS:
            raise PatchCSRAError(f"kind={self.kind!r}: choose {', '.join(HEAD_KINDS)}")
        if self.mode not in ("frozen", "finetune"):
            raise PatchCSRAError(f"mode={self.mode!r}: choose frozen or finetune")
        for name in ("epochs", "batch_size", "lr_step"):
            if int(getattr(self, name)) < 1:
                raise PatchCSRAError(f"{name}={getattr(self, name)!r}: give an integer >= 1")
        for name in ("lr_head", "lr_backbone", "weight_decay", "warmup_epochs", "lam"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise PatchCSRAError(f"{name}={getattr(self, name)!r}: give a finite number >= 0")
        if not 0 < self.val_fraction < 1:
            raise PatchCSRAError(f"val_fraction={self.val_fraction!r}: give a fraction in (0, 1), e.g. 0.1")
        return self

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.temperatures is not None:
            d["temperatures"] = [temperature_json(t) for t in self.temperatures]
        return d


@dataclass
class TrainResult:
    """The best model (eval mode, on CPU), its history and the run's record."""

    model: HeadedClassifier
    history: pd.DataFrame
    best_epoch: int
    best_metric: float
    metric: str
    summary: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- small parts
def carve_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (train, val) index arrays; val has ``max(1, round(f n))`` images."""
    if n < 2:
        raise PatchCSRAError(f"{n} training image(s): need at least 2 to carve a validation part")
    k = min(n - 1, max(1, int(round(fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def lr_factor(it: int, iters_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_epochs``, then ``lr_gamma`` every ``lr_step`` epochs."""
    warm = cfg.warmup_epochs * iters_per_epoch
    if warm > 0 and it < warm:
        return (it + 1) / warm
    return cfg.lr_gamma ** ((it // max(1, iters_per_epoch)) // cfg.lr_step)


def masked_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy over entries with target 0/1; -1 (ignored/difficult) entries are masked out."""
    mask = (targets >= 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).to(logits.dtype), reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def _loss(logits: Tensor, targets: Tensor, single_label: bool) -> Tensor:
    if single_label:
        return F.cross_entropy(logits, targets.argmax(dim=1))
    return masked_bce(logits, targets)


def _metric(scores: np.ndarray, targets: np.ndarray, single_label: bool) -> float:
    if single_label:
        return float(M.topk_accuracy(scores, targets.argmax(1), ks=(1,))["top1"])
    return float(M.mean_average_precision(scores, targets)[0])


# ----------------------------------------------------------------------------- data
def _train_transform(spec) -> Callable:
    """Random resized crop + horizontal flip at the model's input size, then the model's normalisation."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    c, h, w = spec.input_size
    steps: list[Callable] = [T.Grayscale(1)] if c == 1 else []
    steps += [T.RandomResizedCrop((h, w), interpolation=InterpolationMode(spec.interpolation)),
              T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(steps)


def _features(model: HeadedClassifier, dataset, rows: list[int], batch_size: int, workers: int,
              dev: torch.device) -> tuple[Tensor, Tensor]:
    """Feature maps ``(n, d, h, w)`` (float16, CPU) and ok flags of ``rows``."""
    from torch.utils.data import DataLoader, Subset

    feats, oks = [], []
    model.to(dev).eval()
    with torch.inference_mode():
        for x, _, ok in DataLoader(Subset(dataset, rows), batch_size=batch_size, num_workers=workers,
                                   pin_memory=dev.type == "cuda"):
            feats.append(model.forward_features(x.to(dev, non_blocking=True)).half().cpu())
            oks.append(ok.bool())
    return torch.cat(feats), torch.cat(oks)


def _cached_features(model: HeadedClassifier, dataset, out: Path, key: str, batch_size: int, workers: int,
                     dev: torch.device) -> tuple[Tensor, Tensor, float]:
    """All training images' features, computed once (sharded across torchrun ranks) and kept in ``out``."""
    path = out / FEATURES
    if path.exists():
        blob = torch.load(path, weights_only=True)
        if blob.get("key") == key:
            return blob["features"], blob["ok"], 0.0
    t0 = time.perf_counter()
    rows = dist.shard(len(dataset))
    f, ok = _features(model, dataset, rows, batch_size, workers, dev)
    parts = dist.gather_to_main((rows, f, ok))
    if dist.is_main():
        feats = torch.zeros((len(dataset),) + tuple(f.shape[1:]), dtype=f.dtype)
        oks = torch.zeros(len(dataset), dtype=torch.bool)
        for r, fr, okr in parts:  # type: ignore[union-attr]
            idx = torch.as_tensor(r, dtype=torch.long)
            feats[idx], oks[idx] = fr, okr
        torch_save({"key": key, "features": feats, "ok": oks}, path)
    dist.barrier()
    if not dist.is_main():
        blob = torch.load(path, weights_only=True)
        feats, oks = blob["features"], blob["ok"]
    return feats, oks, time.perf_counter() - t0


# ----------------------------------------------------------------------------- training
@dataclass
class _Run:
    """What one training run carries between its steps (set up by :func:`_setup`, then mutated per epoch)."""

    cfg: TrainConfig
    out: Path
    dev: torch.device
    workers: int
    spec: Any
    dataset: Any
    headed: HeadedClassifier
    targets: Tensor
    single: bool
    metric: str
    train_rows: np.ndarray
    val_rows: np.ndarray
    key: str
    feats: Optional[Tensor] = None
    feat_seconds: float = 0.0
    trainable: Optional[nn.Module] = None
    module: Optional[nn.Module] = None
    opt: Optional[torch.optim.Optimizer] = None
    base_lrs: list = field(default_factory=list)
    iters: int = 1
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": -1, "metric": -math.inf, "state": None})
    start_epoch: int = 0


def train_head(model: nn.Module, dataset, out_dir: Union[str, Path], *, config: TrainConfig = TrainConfig(),
               transform=None, resume: bool = False, force: bool = False, device: Optional[str] = None,
               workers: Optional[int] = None, source: Optional[str] = None,
               class_index: Optional[Sequence[int]] = None, progress: Optional[Progress] = None) -> TrainResult:
    """Attach a CSRA / attention-pooling head to ``model`` and train it on ``dataset``.

    Args:
        model: a pretrained classifier (any model :func:`patchcsra.patch` accepts) whose outputs match
            the dataset's classes (see :func:`patchcsra.data.align_classes`).
        dataset: a training :class:`~patchcsra.data.ImageDataset` (its ``transform`` is replaced).
        out_dir: run directory (checkpoints, history, model); must not exist unless ``resume``/``force``.
        config: the recipe (:class:`TrainConfig`).
        transform: the model's :class:`~patchcsra.data.TransformSpec` (default: resolved from the model).
        resume: continue from ``out_dir/checkpoint.pt`` (same config and data required).
        force: delete an existing ``out_dir`` first.
        device: ``auto``/``cpu``/``cuda``; under torchrun each rank uses its local GPU.
        workers: DataLoader workers (default: cores - 1).
        source: the model's spec, for the record.
        class_index: model output per dataset class (from :func:`patchcsra.data.align_classes`): the head
            starts from those rows of the pretrained classifier. Without it, a dataset whose class count
            differs from the model's gets a freshly initialised head.
        progress: called with a dict (``epoch, step, steps, loss, lr, images_per_s``) after every step.

    Returns:
        :class:`TrainResult` with the best epoch's model (chosen on the carved validation part).
    """
    run = _setup(model, dataset, _run_dir(out_dir, resume, force), config.check(), transform, device, workers,
                 class_index)
    state = _checkpoint(run) if resume else None
    _prepare_trainable(run)
    _make_optimizer(run, state)
    for epoch in range(run.start_epoch, run.cfg.epochs):
        row = _train_epoch(run, epoch, progress)
        _end_epoch(run, epoch, row, progress)
    dist.barrier()
    return _finish(run, source)


def _run_dir(out_dir: Union[str, Path], resume: bool, force: bool) -> Path:
    """The run directory, created; an existing one only with ``resume`` (kept) or ``force`` (emptied)."""
    out = Path(out_dir)
    if out.exists() and not (resume or force):
        raise PatchCSRAError(f"{out} exists; pass --resume to continue it or --force to start over")
    if (out.exists() or out.is_symlink()) and (force or resume):
        replaceable_dir(out, known=RUN_DIR_FILES)  # only a folder train-head wrote (or an empty one), never a link
    if force and not resume and out.exists() and dist.is_main():
        shutil.rmtree(out)
    dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _setup(model: nn.Module, dataset, out: Path, cfg: TrainConfig, transform, device: Optional[str],
           workers: Optional[int], class_index: Optional[Sequence[int]]) -> _Run:
    """Device, transform, the headed model (seeded), the carved validation part and the run's key."""
    from ..data import resolve_transform
    from ..runtime import default_workers, resolve_device

    dev = resolve_device(dist.local_device() or device)
    spec = transform or resolve_transform(model)
    torch.manual_seed(cfg.seed)
    headed = attach_head(model, cfg.kind, heads=cfg.heads, lam=cfg.lam, temperatures=cfg.temperatures,
                         input_size=spec.input_size, init=cfg.init, class_index=class_index,
                         num_classes=len(dataset.classes))
    for p in headed.parameters():
        p.requires_grad_(True)
    single = bool(dataset.single_label)
    train_rows, val_rows = carve_validation(len(dataset), cfg.val_fraction, cfg.seed)
    key = json.dumps({"data": dataset.fingerprint(), "config": cfg.as_dict(), "transform": spec.as_dict(),
                      "class_index": None if class_index is None else [int(i) for i in class_index]},
                     sort_keys=True)
    return _Run(cfg=cfg, out=out, dev=dev, workers=default_workers() if workers is None else workers, spec=spec,
                dataset=dataset, headed=headed, single=single, metric="top1" if single else "mAP",
                targets=torch.as_tensor(np.asarray(dataset.targets), dtype=torch.float32),
                train_rows=train_rows, val_rows=val_rows, key=key)


def _checkpoint(run: _Run) -> Optional[dict]:
    """The checkpoint of an interrupted run in ``run.out`` (None when there is none); another run's is refused."""
    path = run.out / CHECKPOINT
    if not path.exists():
        return None
    try:  # tensors, numbers and strings only: a planted pickle payload never runs
        state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise PatchCSRAError(f"{path} is not a checkpoint train-head wrote ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''}); use another --out or --force") from None
    if not isinstance(state, dict) or state.get("key") != run.key:
        raise PatchCSRAError(f"{path} belongs to another run (config, data or transform differ); "
                             "use another --out or --force")
    return state


def _prepare_trainable(run: _Run) -> None:
    """Frozen: cache the backbone's features, train the head only; finetune: train all (two lr groups)."""
    cfg, headed = run.cfg, run.headed
    run.dataset.transform = run.spec.build()
    if cfg.mode == "frozen":
        from ..stats import model_fingerprint

        feat_key = json.dumps({"data": run.dataset.fingerprint(), "transform": run.spec.as_dict(),
                               "model": model_fingerprint(headed.split)}, sort_keys=True)
        run.feats, oks, run.feat_seconds = _cached_features(headed, run.dataset, run.out, feat_key, cfg.batch_size,
                                                            run.workers, run.dev)
        good = oks.numpy()
        if not good.all():
            _logger.warning("training without %d unreadable image(s)", int((~good).sum()))
            run.train_rows, run.val_rows = run.train_rows[good[run.train_rows]], run.val_rows[good[run.val_rows]]
        run.trainable = headed.head
        groups = [{"params": list(headed.head.parameters()), "lr": cfg.lr_head}]
    else:
        run.trainable = headed
        groups = [{"params": headed.backbone_parameters(), "lr": cfg.lr_backbone},
                  {"params": headed.head_parameters(), "lr": cfg.lr_head}]
    for p in headed.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    headed.to(run.dev)
    run.opt = torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _make_optimizer(run: _Run, state: Optional[dict]) -> None:
    """Learning-rate schedule facts, the resumed state, and the DDP wrapper under torchrun."""
    assert run.trainable is not None and run.opt is not None
    world = dist.world_size()
    run.iters = max(1, math.ceil(len(run.train_rows) / (run.cfg.batch_size * world)))
    run.base_lrs = [g["lr"] for g in run.opt.param_groups]
    if state is not None:
        run.trainable.load_state_dict(state["trainable"])
        run.opt.load_state_dict(state["optimizer"])
        run.history, run.best, run.start_epoch = state["history"], state["best"], state["epoch"]
        _logger.info("resuming %s after epoch %d", run.out, run.start_epoch)
    run.module = run.trainable
    if world > 1:
        run.module = nn.parallel.DistributedDataParallel(
            run.trainable, device_ids=[run.dev.index] if run.dev.type == "cuda" else None)


def _epoch_batches(run: _Run, mine: np.ndarray, epoch: int) -> tuple[Any, int]:
    """``(iterator of (inputs, row indices), steps)``: cached features (frozen) or augmented images (finetune)."""
    cfg = run.cfg
    if cfg.mode == "frozen":
        run.headed.eval()
        batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        feats = run.feats
        assert feats is not None
        return ((feats[torch.as_tensor(b)].float(), torch.as_tensor(b)) for b in batches), len(batches)
    from torch.utils.data import DataLoader, Subset

    run.headed.train()
    train_ds = copy.copy(run.dataset)
    train_ds.transform = _train_transform(run.spec)
    loader = DataLoader(Subset(train_ds, mine.tolist()), batch_size=cfg.batch_size, shuffle=False,
                        num_workers=run.workers, pin_memory=run.dev.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed + epoch))
    return ((x[ok], i[ok]) for x, i, ok in loader), math.ceil(len(mine) / cfg.batch_size)


def _train_epoch(run: _Run, epoch: int, progress: Optional[Progress]) -> dict:
    """One epoch over this rank's shard of the seeded order; returns the history row (validated)."""
    cfg, opt, module = run.cfg, run.opt, run.module
    assert opt is not None and module is not None
    world, rank = dist.world_size(), dist.rank()
    torch.manual_seed(cfg.seed * 100003 + epoch)  # dropout etc.: the same on resume
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    mine = run.train_rows[torch.randperm(len(run.train_rows), generator=g).numpy()][rank::world]
    t0 = time.perf_counter()
    loss_sum, seen = 0.0, 0
    batches, steps = _epoch_batches(run, mine, epoch)
    for step, (x, idx) in enumerate(batches):
        for grp, lr0 in zip(opt.param_groups, run.base_lrs):
            grp["lr"] = lr0 * lr_factor(epoch * run.iters + step, run.iters, cfg)
        loss = _loss(module(x.to(run.dev, non_blocking=True)), run.targets[idx].to(run.dev), run.single)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * len(idx)
        seen += len(idx)
        if progress is not None and dist.is_main():
            progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": step + 1, "steps": steps,
                      "loss": loss_sum / max(1, seen), "lr": opt.param_groups[-1]["lr"],
                      "images_per_s": seen * world / max(time.perf_counter() - t0, 1e-9)})
    seconds = time.perf_counter() - t0
    if world > 1:  # the epoch's loss over every rank's images
        tot = torch.tensor([loss_sum, float(seen)], dtype=torch.float64)
        torch.distributed.all_reduce(tot)
        loss_sum, seen = float(tot[0]), int(tot[1])
    val = _validate(run.headed, run.dataset, run.val_rows, run.feats, cfg, run.workers, run.dev, run.targets,
                    run.single)
    return {"epoch": epoch + 1, "lr": opt.param_groups[-1]["lr"], "train_loss": loss_sum / max(1, seen),
            f"val_{run.metric}": val, "seconds": round(seconds, 3), "images_per_s": round(seen / max(seconds, 1e-9), 1)}


def _end_epoch(run: _Run, epoch: int, row: dict, progress: Optional[Progress]) -> None:
    """Record the epoch, keep the best weights, write the checkpoint and history atomically (rank 0)."""
    assert run.trainable is not None and run.opt is not None
    run.history.append(row)
    val = row[f"val_{run.metric}"]
    if val > run.best["metric"]:
        run.best = {"epoch": epoch + 1, "metric": val, "state": copy.deepcopy(run.trainable.state_dict())}
    if dist.is_main():
        torch_save({"key": run.key, "epoch": epoch + 1, "trainable": run.trainable.state_dict(),
                    "optimizer": run.opt.state_dict(), "history": run.history, "best": run.best},
                   run.out / CHECKPOINT)
        _write_history(run.out, run.history, run.metric)
    if progress is not None and dist.is_main():
        progress({"epoch": epoch + 1, "epochs": run.cfg.epochs, "done": True, **row})


def _finish(run: _Run, source: Optional[str]) -> TrainResult:
    """The best epoch's model on the CPU, its record, and (rank 0) ``model.pt`` + ``summary.json``."""
    assert run.trainable is not None
    if run.best["state"] is not None:
        run.trainable.load_state_dict(run.best["state"])
    headed = run.headed.cpu().eval()
    headed.patchcsra_source = {"transform": run.spec.as_dict(), "spec": source}  # the sweep reads its transform
    ds = run.dataset
    summary = {"config": run.cfg.as_dict(), "source": source, "metric": run.metric, "best_epoch": run.best["epoch"],
               f"best_val_{run.metric}": run.best["metric"], "train_images": int(len(run.train_rows)),
               "val_images": int(len(run.val_rows)), "dataset": {"name": ds.name, "split": ds.split,
                                                                  "fingerprint": ds.fingerprint()},
               "transform": run.spec.as_dict(), "head": headed.head_info, "world_size": dist.world_size(),
               "feature_seconds": round(run.feat_seconds, 3)}
    result = TrainResult(headed, pd.DataFrame(run.history), run.best["epoch"], run.best["metric"], run.metric,
                         summary)
    if dist.is_main():
        _write_model(result, run.out, run.spec)
    return result


def _validate(headed: HeadedClassifier, dataset, rows: np.ndarray, feats: Optional[Tensor], cfg: TrainConfig,
              workers: int, dev: torch.device, targets: Tensor, single: bool) -> float:
    """The selection metric on the carved validation images (eval mode, no augmentation)."""
    headed.eval()
    outs = []
    with torch.inference_mode():
        if feats is not None:
            for i in range(0, len(rows), 256):
                outs.append(headed.forward_head(feats[torch.as_tensor(rows[i:i + 256])].float().to(dev)).float().cpu())
        else:
            f, _ = _features(headed, dataset, rows.tolist(), cfg.batch_size, workers, dev)
            for i in range(0, len(f), 256):
                outs.append(headed.forward_head(f[i:i + 256].float().to(dev)).float().cpu())
    return _metric(torch.cat(outs).numpy(), targets[torch.as_tensor(rows)].numpy().astype(np.int8), single)


def _write_history(out: Path, history: list[dict], metric: str) -> None:
    from matplotlib.figure import Figure

    frame = pd.DataFrame(history)
    with atomic_path(out / "history.csv", force=True) as tmp:
        frame.to_csv(tmp, index=False)

    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.8), dpi=110)
    ax = fig.subplots()
    loss, = ax.plot(frame["epoch"], frame["train_loss"], color="tab:blue", marker="o", ms=3, label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax2 = ax.twinx()
    val, = ax2.plot(frame["epoch"], frame[f"val_{metric}"], color="tab:red", marker="s", ms=3,
                    label=f"val {metric}")
    ax2.set_ylabel(f"val {metric} (%)", color="tab:red")
    best = int(frame[f"val_{metric}"].idxmax())
    mark = ax2.scatter([frame["epoch"][best]], [frame[f"val_{metric}"][best]], marker="*", s=90, color="tab:red",
                       zorder=5, label=f"best: epoch {int(frame['epoch'][best])}")
    ax.legend(handles=[loss, val, mark], loc="best", fontsize=8)
    ax.set_title(f"train-head: train loss and validation {metric} per epoch ({len(frame)} epochs)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out / "curve.png", force=True) as tmp:
        fig.savefig(tmp)


def _write_model(result: TrainResult, out: Path, spec) -> None:
    from ..export import save_module

    meta = {"kind": "trained-head", "head": result.model.head_info, "transform": spec.as_dict(),
            "train": {k: v for k, v in result.summary.items() if k not in ("transform", "head")}}
    save_module(result.model, out / "model.pt", meta, spec.input_size, fmt="torchscript", force=True)
    write_text(out / "summary.json", json.dumps(result.summary, indent=1, default=str) + "\n")
