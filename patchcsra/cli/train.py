"""``patchcsra train-head``: train a CSRA / attention-pooling / linear head on a pretrained backbone."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import PatchCSRAError
from ..options import DEFAULT_MAX_PIXELS
from ._common import (OUTPUT, RUN, SOURCE_HELP, Arch, CropPct, Ema, Device, ImgSize, InputSize, Interpolation, Json,
                      MaxPixels, Mean, NumClasses, Pretrained, Std, Trust, Weights, Workers, check_out, device_arg,
                      done, emit_json, err, fail, interruptible, make_progress, model_source, parse_floats,
                      run_inputs, show, transform_overrides)

HEAD, RECIPE = "Head", "Recipe"


def train_head(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    data: Path = typer.Option(..., "--data", help="training dataset (VOC, COCO, ImageFolder, manifest, webdataset "
                              "shards, Hugging Face datasets folder)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="run directory (checkpoints, history, model.pt)",
                                 rich_help_panel=OUTPUT),
    split: Optional[str] = typer.Option("train", "--split", help="training split; a validation part is carved "
                                        "from it for model selection"),
    eval_split: Optional[str] = typer.Option(None, "--eval-split", help="after training, evaluate on this split "
                                             "(Table-1 run in OUT/eval)"),
    data_format: Optional[str] = typer.Option(None, "--data-format", help="voc | coco | folder | manifest | "
                                              "webdataset | hf-datasets"),
    class_map: Optional[Path] = typer.Option(None, "--class-map", help="JSON {class: output index} or CSV"),
    difficult: str = typer.Option("ignore", "--difficult", help="VOC difficult-only labels: ignore | positive"),
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    limit: Optional[int] = typer.Option(None, "--limit", help="at most N images of each split: a class-stratified "
                                        "subset seeded by --seed"),
    kind: str = typer.Option("csra", "--kind", help="csra | attention | linear (GAP + Linear)", rich_help_panel=HEAD),
    heads: int = typer.Option(1, "--heads", help="CSRA heads H (1, 2, 4, 6, 8: the paper's temperature sets)",
                              rich_help_panel=HEAD),
    lam: float = typer.Option(0.1, "--lam", help="λ of the CSRA head", rich_help_panel=HEAD),
    temperatures: Optional[str] = typer.Option(None, "--temperatures", help="override the H temperatures",
                                               rich_help_panel=HEAD),
    init: str = typer.Option("pretrained", "--init", help="pretrained (from the model's classifier) | random",
                             rich_help_panel=HEAD),
    mode: str = typer.Option("frozen", "--mode", help="frozen (cached features, head only) | finetune",
                             rich_help_panel=RECIPE),
    epochs: int = typer.Option(30, "--epochs", help="training epochs", rich_help_panel=RECIPE),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="images per step", rich_help_panel=RECIPE),
    lr_head: float = typer.Option(0.1, "--lr-head", help="learning rate of the head", rich_help_panel=RECIPE),
    lr_backbone: float = typer.Option(0.01, "--lr-backbone", help="learning rate of the backbone (finetune)",
                                      rich_help_panel=RECIPE),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum", rich_help_panel=RECIPE),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="SGD weight decay", rich_help_panel=RECIPE),
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs", help="linear warm-up", rich_help_panel=RECIPE),
    lr_step: int = typer.Option(10, "--lr-step", help="decay the lr every N epochs", rich_help_panel=RECIPE),
    lr_gamma: float = typer.Option(0.1, "--lr-gamma", help="lr decay factor", rich_help_panel=RECIPE),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="carved validation part", rich_help_panel=RECIPE),
    seed: int = typer.Option(0, "--seed", help="seed of the split, init and batch order", rich_help_panel=RECIPE),
    img_size: ImgSize = None, input_size: InputSize = None, crop_pct: CropPct = None,
    interpolation: Interpolation = None, mean: Mean = None, std: Std = None,
    workers: Workers = None, device: Device = "auto",
    arch: Arch = None, weights: Weights = None, num_classes: NumClasses = None, pretrained: Pretrained = True,
    trust: Trust = False, ema: Ema = False,
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run in OUT", rich_help_panel=RUN),
    force: bool = typer.Option(False, "--force", help="delete OUT and start over", rich_help_panel=OUTPUT),
    as_json: Json = False,
) -> None:
    """Train a CSRA (or attention-pooling) head on a pretrained backbone."""
    from .. import dist
    from ..api import train_and_evaluate
    from ..report import rich_table, table_frame
    from ..training.loop import TrainConfig

    dist.init_from_env()
    try:
        temps = parse_floats(temperatures, "--temperatures")
        cfg = TrainConfig(kind=kind, heads=heads, lam=lam, temperatures=tuple(temps) if temps else None, mode=mode,
                          epochs=epochs, batch_size=batch_size, lr_head=lr_head, lr_backbone=lr_backbone,
                          momentum=momentum, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                          lr_step=lr_step, lr_gamma=lr_gamma, val_fraction=val_fraction, seed=seed, init=init).check()
        check_out(out_dir, "--out", run_inputs(data, source, weights, class_map))
        if out_dir.exists() and not (resume or force):
            raise PatchCSRAError(f"--out {out_dir} exists; pass --resume to continue it or --force to start over")
        if difficult not in ("ignore", "positive"):
            raise PatchCSRAError(f"--difficult {difficult!r}: choose ignore or positive")
        note = (f"every finished epoch is in {out_dir}/checkpoint.pt; run the same command with --resume to "
                "continue")
        with interruptible(note), _EpochProgress(not dist.is_main()) as cb:
            run = train_and_evaluate(model_source(source, arch, weights, num_classes, pretrained, trust, ema), data,
                                     out_dir, split=split, eval_split=eval_split, data_format=data_format,
                                     difficult=difficult, class_map=class_map, config=cfg,
                                     transform=transform_overrides(img_size, input_size, crop_pct, interpolation,
                                                                   mean, std),
                                     resume=resume, force=force, device=device_arg(device), workers=workers,
                                     progress=cb, max_pixels=max_pixels, limit=limit)
    except (PatchCSRAError, OSError) as e:
        fail(e)
    if not dist.is_main():
        return
    r = run.train
    if run.evaluated is not None:
        show(rich_table(table_frame([run.evaluated.summary]), title=f"{eval_split}: trained head"))
    done(f"[green]wrote[/] {out_dir}/: best epoch {r.best_epoch} (val {r.metric} {r.best_metric:.2f}), "
         "model.pt, history.csv, curve.png")
    if as_json:
        emit_json({"out": str(out_dir), "best_epoch": r.best_epoch, "metric": r.metric, "best_metric": r.best_metric,
                   "train": r.summary, "eval": run.evaluated.summary if run.evaluated is not None else None})


class _EpochProgress:
    """A step bar per epoch on stderr (plain lines every ~10 s when not a terminal) and one line per finished
    epoch (``with ... as cb``: ``cb(event)``)."""

    def __init__(self, disable: bool) -> None:
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

        self.progress = make_progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), unit="step",
                                      disable=disable)

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("epoch", total=None, epoch="", info="")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, e: dict) -> None:
        if e.get("done"):
            err.print(f"epoch {e['epoch']}/{e['epochs']}: loss {e['train_loss']:.4f}, "
                      + ", ".join(f"{k} {v:.2f}" for k, v in e.items() if k.startswith("val_"))
                      + f", {e['images_per_s']} img/s", highlight=False)
            return
        self.progress.update(self.task, completed=e["step"], total=e["steps"], epoch=f"{e['epoch']}/{e['epochs']}",
                             info=f"loss {e['loss']:.4f} lr {e['lr']:.2g} {e['images_per_s']:.0f} img/s")
