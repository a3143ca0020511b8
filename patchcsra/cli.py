"""``patchcsra`` command line: a thin typer layer over the Python API.

Bad input exits with status 2 and one line on stderr (``error: ...``); nothing is half-written.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import PatchCSRAError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Training-free residual attention (CSRA) for any pretrained image classifier.")
_out = Console()
_err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from ._version import __version__

        sys.stdout.write(f"patchcsra {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Training-free residual attention (CSRA) for any pretrained image classifier."""

TRUST_HELP = ("load a file that runs code: a whole pickled model, a TorchScript or .pt2 archive (only from a "
              "source you trust)")
SOURCE_HELP = "timm:NAME, torchvision:NAME, or a checkpoint file (state dict, safetensors, TorchScript, .pt2)"


def _fail(msg: str) -> None:
    _err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _parse_input_size(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    if text is None:
        return None
    try:
        vals = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise PatchCSRAError(f"--input-size {text!r}: give C,H,W, e.g. 3,224,224")
    return vals  # type: ignore[return-value]


def _parse_float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PatchCSRAError(f"{name} {text!r} is not a number") from None


def _check_out(out: Path, flag: str, inputs: dict) -> None:
    """Refuse, before any work, an output folder that would replace an input or cannot be created.

    ``inputs`` maps a description (``"--data"``, ``"the model file"``) to a path (or None / a non-path spec).
    The output folder is replaced as a whole, so it may be neither an input nor a folder holding one.
    Missing parent folders are created; a parent that is a file or not writable is refused.
    """
    o = Path(os.path.abspath(out.expanduser()))
    for what, p in inputs.items():
        if p is None or not Path(p).exists():
            continue
        q = Path(os.path.abspath(Path(p).expanduser()))
        if o == q or o in q.parents:
            raise PatchCSRAError(f"{flag} {out} would overwrite {what} {p} (the output folder is replaced as a "
                                 f"whole); choose another {flag}")
    parent = o.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PatchCSRAError(f"{flag} {out}: {parent} is not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PatchCSRAError(f"{flag} {out}: folder {parent} is not writable; choose another {flag}")


def _run_inputs(data: Path, source: str, weights: Optional[str], class_map: Optional[Path]) -> dict:
    """What a run reads, for :func:`_check_out` (a timm:/torchvision: name is no file and is left out)."""
    return {"--data": data, "the model file": source if Path(source).exists() else None, "--weights": weights,
            "--class-map": class_map}


def _load(source: str, arch, weights, trust, pretrained, num_classes):
    from .sources import load

    return load(source, arch=arch, weights=weights, trust=trust, pretrained=pretrained, num_classes=num_classes)


def _info_table(info_dict: dict, title: str) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    for k, v in info_dict.items():
        t.add_row(k, str(v))
    return t


@app.command()
def patch(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="output file: .pt2 (torch.export) or .pt (TorchScript)"),
    lam: Optional[str] = typer.Option(None, "--lam", help="λ >= 0 (default: 0.02 for ResNets, 0.2 otherwise)"),
    temperature: str = typer.Option("inf", "--temperature", "-T", help="inf (max over locations) or T > 0"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture of a state-dict file"),
    weights: Optional[str] = typer.Option(None, "--weights", help="torchvision weights name, or a state-dict file"),
    fmt: str = typer.Option("auto", "--format", help="auto | torchscript | export"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W of the probe (default: model config)"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="classes of the checkpoint's head"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="fetch timm/torchvision weights"),
    trust: bool = typer.Option(False, "--trust", help=TRUST_HELP),
    force: bool = typer.Option(False, "--force", help="overwrite OUTPUT if it exists"),
) -> None:
    """Patch a classifier's head and write it as TorchScript or a torch.export archive."""
    from .export import export_format, save_patched
    from .patcher import patch as do_patch

    try:
        lam_v = None if lam is None else _parse_float(lam, "--lam")
        t_v = _parse_float(temperature, "--temperature")
        size = _parse_input_size(input_size)
        out_fmt = export_format(output, fmt)
        if output.exists() and not force:
            raise PatchCSRAError(f"{output} exists; pass --force to overwrite it")
        if Path(source).exists() and Path(source).resolve() == output.resolve():
            raise PatchCSRAError(f"-o {output} is the input file; write to another path")
        with _err.status(f"loading {source}"):
            model = _load(source, arch, weights, trust, pretrained, num_classes)
        with _err.status("finding the head and patching"):
            patched = do_patch(model, lam=lam_v, temperature=t_v, input_size=size)
        src = {"spec": source, "arch": arch, "weights": weights}
        with _err.status(f"writing {out_fmt} to {output}"):
            save_patched(patched, output, fmt=out_fmt, source=src, force=force)
    except PatchCSRAError as e:
        _fail(str(e))
    i = patched.info
    _out.print(f"[green]wrote[/] {output} ({out_fmt}): {i.model_class.rsplit('.', 1)[-1]} head {i.kind} "
               f"[{i.layout}, {i.num_locations} locations], λ={patched.lam:g}, "
               f"T={'inf' if math.isinf(patched.temperature) else patched.temperature:}", highlight=False)


@app.command()
def describe(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture of a state-dict file"),
    weights: Optional[str] = typer.Option(None, "--weights", help="torchvision weights name, or a state-dict file"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W of the probe"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained"),
    trust: bool = typer.Option(False, "--trust", help=TRUST_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Show the pooling head patchcsra finds in a model (or the record of a patched file)."""
    from .patcher import describe as do_describe

    try:
        size = _parse_input_size(input_size)
        with _err.status(f"loading {source}"):
            model = _load(source, arch, weights, trust, pretrained, num_classes)
        meta = getattr(model, "patchcsra_meta", None)
        if isinstance(meta, dict) and meta.get("kind") == "trained-head":  # a train-head model.pt: its record
            record = {"trained_head": True, **meta.get("head", {}),
                      "best_epoch": meta.get("train", {}).get("best_epoch"),
                      "input_size": (meta.get("transform") or {}).get("input_size")}
            if as_json:
                sys.stdout.write(json.dumps(meta, indent=1) + "\n")
            else:
                _out.print(_info_table(record, f"{source}"))
            return
        info = do_describe(model, input_size=size).as_dict()
    except PatchCSRAError as e:
        _fail(str(e))
    record = {"patched": bool(meta), **({k: meta[k] for k in ("lam", "temperature", "source")} if meta else {}),
              **info}
    if as_json:
        sys.stdout.write(json.dumps(record, indent=1) + "\n")
    else:
        _out.print(_info_table(record, f"{source}"))


def _parse_floats(text: Optional[str], name: str) -> Optional[list[float]]:
    if text is None:
        return None
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise PatchCSRAError(f"{name} {text!r} is empty; give comma-separated numbers, e.g. 0,0.1,0.2")
    return [_parse_float(v, name) for v in vals]


@app.command("sweep-lambda")
def sweep_lambda(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    data: Path = typer.Option(..., "--data", help="VOCdevkit root, COCO root or instances json, ImageFolder tree, "
                              "or a CSV/JSON manifest"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory to write (results.csv, summary.json, "
                             "table.md, table.tex, curve.png)"),
    split: Optional[str] = typer.Option(None, "--split", help="split name (VOC: test/val/trainval; COCO: val2014, "
                                        "val2017; default: the evaluation split)"),
    data_format: Optional[str] = typer.Option(None, "--data-format", help="voc | coco | folder | manifest "
                                              "(default: detected)"),
    lams: Optional[str] = typer.Option(None, "--lams", help="comma-separated λ grid (default: 21 values 0..1)"),
    temperatures: str = typer.Option("inf", "--temperatures", help="comma-separated T grid, e.g. inf,1,2,4"),
    fixed_lam: Optional[str] = typer.Option(None, "--fixed-lam", help="the fixed-λ column (default: 0.02 for "
                                            "ResNets, 0.2 otherwise)"),
    metric: Optional[str] = typer.Option(None, "--metric", help="selection metric (default: mAP; top1 for "
                                         "single-label data)"),
    folds: int = typer.Option(5, "--folds", help="k of the cross-validated λ (0: off)"),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="paired bootstrap resamples for Δ intervals (0: off)"),
    seed: int = typer.Option(0, "--seed"),
    class_map: Optional[Path] = typer.Option(None, "--class-map", help="JSON {class: output index} or CSV "
                                             "'class,index' when dataset and model classes differ"),
    difficult: str = typer.Option("ignore", "--difficult", help="VOC difficult-only labels: ignore | positive"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="score without missing/unreadable images"),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="evaluate at this square resolution"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W for models without a config"),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct"),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="bilinear | bicubic | ..."),
    mean: Optional[str] = typer.Option(None, "--mean", help="comma-separated channel means"),
    std: Optional[str] = typer.Option(None, "--std", help="comma-separated channel stds"),
    batch_size: int = typer.Option(32, "--batch-size", "-b"),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="DataLoader workers (default: cores-1)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
    amp: str = typer.Option("auto", "--amp", help="auto (bf16 on GPU) | bf16 | fp16 | none"),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="stats cache (default: $PATCHCSRA_CACHE "
                                             "or ~/.cache/patchcsra)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not read or write the stats cache"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture of a state-dict file"),
    weights: Optional[str] = typer.Option(None, "--weights", help="torchvision weights name, or a state-dict file"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained"),
    trust: bool = typer.Option(False, "--trust", help=TRUST_HELP),
    force: bool = typer.Option(False, "--force", help="overwrite --out if it exists"),
) -> None:
    """Sweep λ (and T) over a dataset in one forward pass; write a Table-1 report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from . import dist
    from .api import default_cache_dir, sweep_lambda as run_sweep
    from .patcher import check_lam, check_temperature
    from .report import rich_table, table_frame
    from .grid import DEFAULT_LAMS

    distributed = dist.init_from_env()
    if distributed and device == "auto":
        device = dist.local_device() or "cpu"
    try:
        _check_out(out, "--out", _run_inputs(data, source, weights, class_map))
        if out.exists() and not force:
            raise PatchCSRAError(f"--out {out} exists; pass --force to overwrite it")
        if not data.exists():
            raise PatchCSRAError(f"--data {data} does not exist")
        if difficult not in ("ignore", "positive"):
            raise PatchCSRAError(f"--difficult {difficult!r}: choose ignore or positive")
        lam_grid = [check_lam(v, "--lams") for v in _parse_floats(lams, "--lams") or DEFAULT_LAMS]
        t_grid = [check_temperature(v, "--temperatures") for v in _parse_floats(temperatures, "--temperatures")]
        fixed = None if fixed_lam is None else check_lam(_parse_float(fixed_lam, "--fixed-lam"), "--fixed-lam")
        size = _parse_input_size(input_size)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=_err,
                      transient=True, disable=not dist.is_main()) as progress:
            task = progress.add_task("collecting", total=None, rate="")
            t0 = [None]

            def cb(done: int, total: int) -> None:
                import time

                now = time.perf_counter()
                if t0[0] is None:
                    t0[0] = (now, done)
                rate = (done - t0[0][1]) / max(now - t0[0][0], 1e-9)
                progress.update(task, completed=done, total=total, rate=f"{rate:.1f} img/s" if rate else "")

            run = run_sweep(
                source, data, split=split, data_format=data_format, lams=lam_grid, temperatures=t_grid,
                fixed_lam=fixed, metric=metric, folds=folds, bootstrap=bootstrap, seed=seed, difficult=difficult,
                class_map=class_map, skip_bad=skip_bad, img_size=img_size, input_size=size, crop_pct=crop_pct,
                interpolation=interpolation, mean=_parse_floats(mean, "--mean"), std=_parse_floats(std, "--std"),
                batch_size=batch_size, device=device, amp=amp, channels_last=channels_last, workers=workers,
                cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
                load_kwargs={"arch": arch, "weights": weights, "trust": trust, "pretrained": pretrained,
                             "num_classes": num_classes},
                progress=cb)
        if run is None:  # another torchrun rank wrote nothing; rank 0 writes the run
            return
        run.write(out, force=force)
    except PatchCSRAError as e:
        _fail(str(e))
    s = run.summary
    bad = s["images"]["bad"]
    if bad:
        _err.print(f"[bold yellow]warning:[/] skipped {bad} unreadable image(s): "
                   f"{', '.join(s['images']['bad_ids'][:5])}", highlight=False)
    if s["classes"]["without_positives"]:
        _err.print(f"[yellow]note:[/] classes without positives (left out of mAP): "
                   f"{', '.join(s['classes']['without_positives'])}", highlight=False)
    c = s["collect"]
    if c.get("oom_retries"):
        _err.print(f"[yellow]note:[/] CUDA ran out of memory {c['oom_retries']} time(s) at batch size {batch_size}; "
                   f"collected at batch size {c['batch_size']}", highlight=False)
    _out.print(rich_table(table_frame([s]), title=f"{s['model']['name']} on {s['dataset']['name']}"))
    _out.print(f"[green]wrote[/] {out}/ ({s['images']['scored']} images; pass: {c['forward_images']} forward, "
               f"{c['seconds']:.1f} s on {c['device']})", highlight=False)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="run directories written by sweep-lambda"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write table.csv, table.md, table.tex here"),
    force: bool = typer.Option(False, "--force", help="overwrite --out if it exists"),
) -> None:
    """Merge sweep runs into one Table 1 (rows = dataset x model)."""
    from .report import merge_runs, rich_table, write_table

    try:
        if out is not None:
            _check_out(out, "--out", {f"the run {r}": r for r in runs})
        table = merge_runs(runs)
        if out is not None:
            write_table(table, out, force=force)
    except PatchCSRAError as e:
        _fail(str(e))
    _out.print(rich_table(table, title="Table 1"))
    if out is not None:
        _out.print(f"[green]wrote[/] {out}/", highlight=False)


@app.command()
def explain(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    images: list[Path] = typer.Argument(..., help="image files"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for <image>.png grids and raw .npy maps"),
    classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated class names or indices "
                                          "(default: the top predicted)"),
    top_k: int = typer.Option(3, "--top-k", help="how many top predicted classes when --classes is not given"),
    lam: Optional[str] = typer.Option(None, "--lam", help="λ of the patched logits shown (default: paper's rule)"),
    temperature: str = typer.Option("1", "--temperature", "-T", help="T of the attention map (inf: argmax)"),
    img_size: Optional[int] = typer.Option(None, "--img-size"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W for models without a config"),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct"),
    interpolation: Optional[str] = typer.Option(None, "--interpolation"),
    mean: Optional[str] = typer.Option(None, "--mean"),
    std: Optional[str] = typer.Option(None, "--std"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture of a state-dict file"),
    weights: Optional[str] = typer.Option(None, "--weights"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained"),
    trust: bool = typer.Option(False, "--trust", help=TRUST_HELP),
    force: bool = typer.Option(False, "--force", help="overwrite existing files in --out"),
) -> None:
    """Per-location class scores and attention maps over images (PNG grids + .npy)."""
    from .data import model_label_names, resolve_transform
    from .explain import explain_to_dir
    from .patcher import patch as do_patch

    try:
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise PatchCSRAError(f"image file(s) not found: {', '.join(missing[:5])}")
        t_v = _parse_float(temperature, "--temperature")
        lam_v = None if lam is None else _parse_float(lam, "--lam")
        with _err.status(f"loading {source}"):
            model = _load(source, arch, weights, trust, pretrained, num_classes)
        if img_size is not None and input_size is None and hasattr(model, "set_input_size"):
            model.set_input_size(img_size=(img_size, img_size))
        spec = resolve_transform(model, img_size=img_size, input_size=_parse_input_size(input_size),
                                 crop_pct=crop_pct, interpolation=interpolation, mean=_parse_floats(mean, "--mean"),
                                 std=_parse_floats(std, "--std"))
        patched = do_patch(model, lam=lam_v, temperature=t_v, input_size=spec.input_size)
        wanted = None
        if classes:
            wanted = [int(c) if c.strip().isdigit() else c.strip() for c in classes.split(",") if c.strip()]
        with _err.status("explaining"):
            paths = explain_to_dir(patched, [str(p) for p in images], out, transform_spec=spec, classes=wanted,
                                   top_k=top_k, temperature=t_v, class_names=model_label_names(model), force=force)
    except PatchCSRAError as e:
        _fail(str(e))
    pngs = [p for p in paths if p.suffix == ".png"]
    _out.print(f"[green]wrote[/] {len(pngs)} picture(s) and their maps to {out}/", highlight=False)


@app.command("train-head")
def train_head_cmd(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    data: Path = typer.Option(..., "--data", help="training dataset (VOC, COCO, ImageFolder, manifest)"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory (checkpoints, history, model.pt)"),
    split: Optional[str] = typer.Option("train", "--split", help="training split; a validation part is carved "
                                        "from it for model selection"),
    eval_split: Optional[str] = typer.Option(None, "--eval-split", help="after training, evaluate on this split "
                                             "(Table-1 run in OUT/eval)"),
    data_format: Optional[str] = typer.Option(None, "--data-format"),
    kind: str = typer.Option("csra", "--kind", help="csra | attention | linear (GAP + Linear)"),
    heads: int = typer.Option(1, "--heads", help="CSRA heads H (1, 2, 4, 6, 8: the paper's temperature sets)"),
    lam: float = typer.Option(0.1, "--lam", help="λ of the CSRA head"),
    temperatures: Optional[str] = typer.Option(None, "--temperatures", help="override the H temperatures"),
    mode: str = typer.Option("frozen", "--mode", help="frozen (cached features, head only) | finetune"),
    epochs: int = typer.Option(30, "--epochs"),
    batch_size: int = typer.Option(16, "--batch-size", "-b"),
    lr_head: float = typer.Option(0.1, "--lr-head"),
    lr_backbone: float = typer.Option(0.01, "--lr-backbone"),
    momentum: float = typer.Option(0.9, "--momentum"),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs"),
    lr_step: int = typer.Option(10, "--lr-step", help="decay the lr every N epochs"),
    lr_gamma: float = typer.Option(0.1, "--lr-gamma"),
    val_fraction: float = typer.Option(0.1, "--val-fraction"),
    seed: int = typer.Option(0, "--seed"),
    init: str = typer.Option("pretrained", "--init", help="pretrained (from the model's classifier) | random"),
    class_map: Optional[Path] = typer.Option(None, "--class-map"),
    difficult: str = typer.Option("ignore", "--difficult"),
    img_size: Optional[int] = typer.Option(None, "--img-size"),
    input_size: Optional[str] = typer.Option(None, "--input-size"),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct"),
    interpolation: Optional[str] = typer.Option(None, "--interpolation"),
    mean: Optional[str] = typer.Option(None, "--mean"),
    std: Optional[str] = typer.Option(None, "--std"),
    workers: Optional[int] = typer.Option(None, "--workers", "-j"),
    device: str = typer.Option("auto", "--device"),
    arch: Optional[str] = typer.Option(None, "--arch"),
    weights: Optional[str] = typer.Option(None, "--weights"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained"),
    trust: bool = typer.Option(False, "--trust", help=TRUST_HELP),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run in OUT"),
    force: bool = typer.Option(False, "--force", help="delete OUT and start over"),
) -> None:
    """Train a CSRA (or attention-pooling) head on a pretrained backbone."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import dist
    from .api import sweep_lambda as run_sweep
    from .data import align_classes, model_label_ids, model_label_names, open_dataset, resolve_transform
    from .report import rich_table, table_frame
    from .sources import PatchedArchive
    from .training.loop import TrainConfig, train_head

    dist.init_from_env()
    try:
        temps = _parse_floats(temperatures, "--temperatures")
        cfg = TrainConfig(kind=kind, heads=heads, lam=lam, temperatures=tuple(temps) if temps else None, mode=mode,
                          epochs=epochs, batch_size=batch_size, lr_head=lr_head, lr_backbone=lr_backbone,
                          momentum=momentum, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                          lr_step=lr_step, lr_gamma=lr_gamma, val_fraction=val_fraction, seed=seed,
                          init=init).check()
        _check_out(out, "--out", _run_inputs(data, source, weights, class_map))
        if out.exists() and not (resume or force):
            raise PatchCSRAError(f"--out {out} exists; pass --resume to continue it or --force to start over")
        if difficult not in ("ignore", "positive"):
            raise PatchCSRAError(f"--difficult {difficult!r}: choose ignore or positive")
        ds = open_dataset(data, format=data_format, split=split, difficult=difficult)
        model = _load(source, arch, weights, trust, pretrained, num_classes)
        if isinstance(model, PatchedArchive):
            raise PatchCSRAError(f"{source} is a patched file; train on the original model")
        if img_size is not None and input_size is None and hasattr(model, "set_input_size"):
            model.set_input_size(img_size=(img_size, img_size))
        spec = resolve_transform(model, img_size=img_size, input_size=_parse_input_size(input_size),
                                 crop_pct=crop_pct, interpolation=interpolation, mean=_parse_floats(mean, "--mean"),
                                 std=_parse_floats(std, "--std"))
        from .patcher import describe as do_describe

        n_out = do_describe(model, input_size=spec.input_size).num_classes
        index = None
        names = model_label_names(model)
        if class_map is not None or len(ds.classes) == n_out or names:
            try:
                index = align_classes(ds.classes, n_out, model_names=names,
                                      model_ids=model_label_ids(model), class_map=class_map).tolist()
            except PatchCSRAError:
                if class_map is not None:
                    raise
                index = None  # another label set: a fresh head of len(classes) outputs
        with Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=_err, transient=True, disable=not dist.is_main()) as progress:
            task = progress.add_task("train", total=None, epoch="", info="")

            def cb(e: dict) -> None:
                if e.get("done"):
                    _err.print(f"epoch {e['epoch']}/{e['epochs']}: loss {e['train_loss']:.4f}, "
                               + ", ".join(f"{k} {v:.2f}" for k, v in e.items() if k.startswith("val_"))
                               + f", {e['images_per_s']} img/s", highlight=False)
                    return
                progress.update(task, completed=e["step"], total=e["steps"], epoch=f"{e['epoch']}/{e['epochs']}",
                                info=f"loss {e['loss']:.4f} lr {e['lr']:.2g} {e['images_per_s']:.0f} img/s")

            result = train_head(model, ds, out, config=cfg, transform=spec, resume=resume, force=force,
                                device=None if device == "auto" else device, workers=workers, source=source,
                                class_index=index, progress=cb)
        evaluated = None
        if eval_split is not None:
            evaluated = run_sweep(result.model, data, split=eval_split, data_format=data_format,
                                  difficult=difficult, workers=workers, device=None if device == "auto" else device,
                                  cache_dir=None, bootstrap=1000)
            if evaluated is not None:
                name = f"{Path(source).name if Path(source).exists() else source} + {kind}"
                evaluated.summary["model"]["name"] = name + (f" H={heads}" if kind == "csra" else "")
                evaluated.write(out / "eval", force=True)
    except PatchCSRAError as e:
        _fail(str(e))
    if not dist.is_main():
        return
    _out.print(f"[green]wrote[/] {out}/: best epoch {result.best_epoch} (val {result.metric} "
               f"{result.best_metric:.2f}), model.pt, history.csv, curve.png", highlight=False)
    if evaluated is not None:
        _out.print(rich_table(table_frame([evaluated.summary]), title=f"{eval_split}: trained head"))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="where data, model and the run go"),
    n_train: int = typer.Option(4000, "--n-train", help="training canvases (another value trains here)"),
    n_test: int = typer.Option(1000, "--n-test", help="test canvases"),
    epochs: int = typer.Option(8, "--epochs", help="training epochs (another value trains here)"),
    seed: int = typer.Option(0, "--seed", help="canvas and training seed (another value trains here)"),
    retrain: bool = typer.Option(False, "--retrain", help="train DigitNet here instead of using the shipped "
                                 "weights (its figures then depend on this CPU's kernel set and thread count)"),
    force: bool = typer.Option(False, "--force", help="run again over an existing OUT/run"),
) -> None:
    """The embedded default, offline: multi-digit canvases from sklearn's real digits, a GAP CNN (shipped
    weights, or --retrain), then patch + one-pass λ sweep + Table 1 (OUT/run)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .demo import run_demo
    from .report import rich_table, table_frame

    try:
        if min(n_train, n_test, epochs) < 1:
            raise PatchCSRAError("--n-train, --n-test and --epochs must be >= 1")
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=_err, transient=True) as progress:
            task = progress.add_task("building canvases", total=None)

            def cb(msg: str, done: int, total: int) -> None:
                progress.update(task, description=msg, completed=done, total=total)

            run = run_demo(out, n_train=n_train, n_test=n_test, epochs=epochs, seed=seed,
                           retrain=True if retrain else None, force=force, progress=cb)
    except PatchCSRAError as e:
        _fail(str(e))
    _out.print(rich_table(table_frame([run.summary]), title="Table 1 (embedded default)"))
    _out.print(f"[green]wrote[/] {out}/run/ (results.csv, summary.json, table.md, table.tex, curve.png), "
               f"{out}/digitnet.pt ({run.summary['model']['weights']}) and the canvases in {out}/data/",
               highlight=False)


@app.command()
def bench(
    suite: str = typer.Argument("demo", help="a built-in suite (demo) or a suite JSON file, e.g. benchmarks/ci.json"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="result JSON (default: WORK_DIR/<suite>.json)"),
    check: Optional[Path] = typer.Option(None, "--check", help="expected JSON: exit 1 when a score moves "
                                          "beyond its tolerance or λ=0 exactness breaks"),
    results: Optional[Path] = typer.Option(None, "--results", help="check this result JSON instead of running"),
    work_dir: Path = typer.Option(Path("runs/bench"), "--work-dir", help="extracted data and each case's files"),
    only: Optional[str] = typer.Option(None, "--only", help="comma-separated case names"),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers (0: in-process, deterministic)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out"),
) -> None:
    """Run a benchmark suite into one JSON; with --check, fail on regressions (the CI gate)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import bench as B

    try:
        expected = B.read_json(check, "--check") if check is not None else None
        if results is not None:
            record = B.read_json(results, "--results")
            _bench_table(record)
        else:
            st = B.load_suite(suite)
            target = out or work_dir / f"{st.name}.json"
            if target.exists() and not force:
                raise PatchCSRAError(f"{target} exists; pass --force to overwrite it or choose another --out")
            names = [n.strip() for n in only.split(",") if n.strip()] if only else None
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=_err, transient=True) as progress:
                task = progress.add_task(f"suite {st.name}", total=None)

                def cb(msg: str, done: int, total: Optional[int]) -> None:
                    progress.update(task, description=msg, completed=done, total=total)

                record = B.run_suite(st, work_dir, only=names, workers=workers, progress=cb)
            B.write_json(record, target, force=force)
            _bench_table(record)
            _out.print(f"[green]wrote[/] {target}", highlight=False)
        if check is not None:
            rows = B.check_results(record, expected)
    except PatchCSRAError as e:
        _fail(str(e))
    if check is None:
        return
    t = Table(title=f"regression check against {check}")
    for c in ("case", "metric", "field", "expected", "got", "diff", "tolerance", "status"):
        t.add_column(c, justify="right" if c in ("expected", "got", "diff", "tolerance") else "left")
    fmt = lambda v, nd=3: "" if v is None else (f"{v:.2e}" if abs(v) < 1e-3 and v != 0 else f"{v:.{nd}f}")  # noqa: E731
    for r in rows:
        t.add_row(r.case, r.metric, r.field, fmt(r.expected), fmt(r.got), fmt(r.diff), fmt(r.tolerance, 3),
                  "[green]ok[/]" if r.ok else "[bold red]FAIL[/]")
    _out.print(t)
    bad = [r for r in rows if not r.ok]
    from .provenance import environment_diff

    moved = environment_diff(expected.get("environment"), record.get("environment"))  # type: ignore[union-attr]
    if moved:
        (_err if bad else _out).print(
            f"{'[bold red]' if bad else ''}environment differs from {check}{'[/]' if bad else ''} (what can move a "
            "figure): " + "; ".join(f"{k} {a} -> {b}" for k, a, b in moved), highlight=False, soft_wrap=True)
    if bad:
        _err.print(f"[bold red]regression:[/] {len(bad)} of {len(rows)} checks failed "
                   f"({', '.join(sorted({f'{r.case}/{r.metric or r.field}' for r in bad}))})", highlight=False)
        raise typer.Exit(1)
    _out.print(f"[green]all {len(rows)} checks passed[/]")


def _bench_table(record: dict) -> None:
    t = Table(title=f"suite {record['suite']}")
    for c in ("case", "images", "metric", "baseline", "fixed λ", "oracle λ, T", "CV λ", "λ=0 gap", "s"):
        t.add_column(c, justify="left" if c in ("case", "metric") else "right")
    for name, rec in record["cases"].items():
        for metric, sc in rec["scores"].items():
            def cell(k: str, with_t: bool = False) -> str:
                tt = f", T={sc[k + '_T']}" if with_t else ""
                return (f"{sc[k]:.2f} ({sc[k + '_delta']:+.2f}) @ {sc[k + '_lam']:g}{tt}")
            t.add_row(name, str(rec["images"]), metric, f"{sc['baseline']:.2f}", cell("fixed"), cell("oracle", True),
                      cell("cv"), f"{rec['lam0_max_abs_diff']:.1e}", f"{rec['seconds']:.0f}")
    _out.print(t)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
