"""``patchcsra sweep-lambda``: one forward pass over a dataset, the λ/T grid, a Table-1 run directory."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import PatchCSRAError
from ..options import DEFAULT_MAX_PIXELS
from ._common import (GRID, OUTPUT, RUN, SOURCE_HELP, Arch, CropPct, Ema, Device, Force, ImgSize, InputSize,
                      Interpolation, Json, MaxPixels, Mean, NumClasses, Pretrained, Std, Trust, Weights, Workers,
                      amp_choice, check_out, done, emit_json, err, fail, interruptible, make_progress, model_source,
                      parse_bytes, parse_float, parse_floats, run_inputs, show, transform_overrides)


def sweep_lambda(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    data: Path = typer.Option(..., "--data", help="VOCdevkit root, COCO root or instances json, ImageFolder tree, "
                              "CSV/JSON manifest, webdataset .tar shards (a shard, a folder, shards-{000..009}.tar) "
                              "or a Hugging Face datasets folder (save_to_disk or parquet)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="run directory to write (results.csv, summary.json, "
                                 "table.md, table.tex, curve.png)", rich_help_panel=OUTPUT),
    split: Optional[str] = typer.Option(None, "--split", help="split name (VOC: test/val/trainval; COCO: val2014, "
                                        "val2017; default: the evaluation split)"),
    data_format: Optional[str] = typer.Option(None, "--data-format", help="voc | coco | folder | manifest | "
                                              "webdataset (wds) | hf-datasets (default: detected)"),
    lams: Optional[str] = typer.Option(None, "--lams", help="comma-separated λ grid (default: 21 values 0..1)",
                                       rich_help_panel=GRID),
    temperatures: str = typer.Option("inf", "--temperatures", help="comma-separated T grid, e.g. inf,1,2,4",
                                     rich_help_panel=GRID),
    fixed_lam: Optional[str] = typer.Option(None, "--fixed-lam", help="the fixed-λ column (default: 0.02 for "
                                            "ResNets, 0.2 otherwise)", rich_help_panel=GRID),
    metric: Optional[str] = typer.Option(None, "--metric", help="selection metric (default: mAP; top1 for "
                                         "single-label data)", rich_help_panel=GRID),
    protocol: str = typer.Option("patchcsra", "--protocol", metavar="NAME", help="metric conventions: patchcsra "
                                 "(ours, tie-aware AP) | csra | mlgcn | asl | mmpretrain | voc07 | voc2010 | coco; "
                                 "written under the table", rich_help_panel=GRID),
    score_kind: str = typer.Option("auto", "--scores", metavar="KIND", help="auto | logit | prob: thresholds on "
                                   "sigmoid(score) or on the score itself (auto: prob when all scores are in [0, 1])",
                                   rich_help_panel=GRID),
    folds: int = typer.Option(5, "--folds", help="k of the cross-validated λ (0: off)", rich_help_panel=GRID),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="paired bootstrap resamples for Δ intervals (0: off)",
                                  rich_help_panel=GRID),
    seed: int = typer.Option(0, "--seed", help="seed of the folds and the bootstrap", rich_help_panel=GRID),
    class_map: Optional[Path] = typer.Option(None, "--class-map", help="JSON {class: index or list of "
                                             "indices}, CSV 'class,index' (a class may repeat) or a text file of one "
                                             "output name per line, when dataset and model classes differ"),
    class_reduce: str = typer.Option("max", "--class-reduce", help="max | logsumexp of the outputs a "
                                     "--class-map sends one class to (logits and per-location scores)"),
    class_names: Optional[Path] = typer.Option(None, "--class-names", help="names of the model's outputs: one "
                                               "per line (line i names output i) or a JSON list"),
    difficult: str = typer.Option("ignore", "--difficult", help="VOC difficult-only labels: ignore | positive"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="score without missing/unreadable images"),
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    limit: Optional[int] = typer.Option(None, "--limit", help="score a seeded (--seed), class-stratified subset of "
                                        "N images (recorded in summary.json)"),
    img_size: ImgSize = None, input_size: InputSize = None, crop_pct: CropPct = None,
    interpolation: Interpolation = None, mean: Mean = None, std: Std = None,
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="images per forward pass", rich_help_panel=RUN),
    workers: Workers = None, device: Device = "auto",
    amp: str = typer.Option("auto", "--amp", help="auto (bf16 on GPU) | bf16 | fp16 | none; a bare --amp (timm's "
                            "flag) is auto", rich_help_panel=RUN),
    amp_dtype: Optional[str] = typer.Option(None, "--amp-dtype", metavar="DTYPE", help="timm's spelling of the "
                                            "--amp dtype: bfloat16 | float16 (bf16 | fp16)", rich_help_panel=RUN),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="NHWC memory format (default: on GPU)", rich_help_panel=RUN),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="stats cache (default: $PATCHCSRA_CACHE "
                                             "or ~/.cache/patchcsra)", rich_help_panel=RUN),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not read or write the stats cache",
                                  rich_help_panel=RUN),
    save_interval: float = typer.Option(30.0, "--save-interval", help="seconds between stats cache parts (what an "
                                        "interruption can lose; also a part every 1024 images)", rich_help_panel=RUN),
    verify_cache: bool = typer.Option(False, "--verify-cache", help="hash every byte of every image and compute "
                                      "again the images changed since they were cached (the cache key holds each "
                                      "file's size, mtime and sampled bytes)", rich_help_panel=RUN),
    store_above: Optional[str] = typer.Option(None, "--store-above", metavar="SIZE", help="statistics larger than "
                                              "this (4·N·C·(3+nT) bytes) are kept on disk in the stats cache, "
                                              "memory-mapped, and evaluated in blocks of classes; 0: always "
                                              "[default: 2GiB]", rich_help_panel=RUN),
    arch: Arch = None, weights: Weights = None, num_classes: NumClasses = None, pretrained: Pretrained = True,
    trust: Trust = False, ema: Ema = False, force: Force = False, as_json: Json = False,
    formats: str = typer.Option("png", "--formats", help="comma-separated figure formats of the curve: png, pdf, "
                                "svg (curve.png is always written)", rich_help_panel=OUTPUT),
    results_file: Optional[Path] = typer.Option(None, "--results-file", metavar="FILE", help="also add the run's "
                                                "row to this timm-style results CSV (model, img_size, crop_pct, "
                                                "interpolation, metric, baseline, cv/fixed/oracle λ and scores; "
                                                "appended when FILE exists)", rich_help_panel=OUTPUT),
) -> None:
    """Sweep λ (and T) over a dataset in one forward pass; write a Table-1 report."""
    with _plot_worker() as plotter:  # started first: it imports matplotlib while this process imports torch
        from .. import dist
        from ..api import default_cache_dir, sweep_lambda as run_sweep
        from ..options import CollectOptions, DEFAULT_LAMS, SweepOptions

        distributed = dist.init_from_env()
        if distributed and device == "auto":
            device = dist.local_device() or "cpu"
        try:
            check_out(out_dir, "--out", run_inputs(data, source, weights, class_map))
            if out_dir.exists() and not force:
                raise PatchCSRAError(f"--out {out_dir} exists; pass --force to overwrite it")
            if out_dir.exists() or out_dir.is_symlink():  # before the pass: --force replaces only a run folder
                from .._io import replaceable_dir
                from ..report import RUN_FILES

                replaceable_dir(out_dir, "--out", RUN_FILES)
            from ..data.base import is_brace_pattern

            if not data.exists() and not is_brace_pattern(data):  # shards-{000..009}.tar: webdataset's reader expands it
                raise PatchCSRAError(f"--data {data} does not exist")
            if difficult not in ("ignore", "positive"):
                raise PatchCSRAError(f"--difficult {difficult!r}: choose ignore or positive")
            amp = amp_choice(amp, amp_dtype)
            from ..report import figure_paths

            fig_formats = tuple(f.strip().lower() for f in formats.split(",") if f.strip()) or ("png",)
            try:
                figure_paths("curve.png", fig_formats)
            except PatchCSRAError as e:
                raise PatchCSRAError(f"--formats: {e}") from None
            if results_file is not None:
                from ..report import check_results_file

                check_results_file(results_file, "--results-file")
            store_bytes = parse_bytes(store_above, "--store-above")
            if no_cache and store_bytes is not None:
                raise PatchCSRAError("--store-above keeps the statistics in the stats cache, which --no-cache turns "
                                     "off; drop one of them")
            grid = SweepOptions(lams=tuple(parse_floats(lams, "--lams") or DEFAULT_LAMS),
                                temperatures=tuple(parse_floats(temperatures, "--temperatures") or ()),
                                fixed_lam=None if fixed_lam is None else parse_float(fixed_lam, "--fixed-lam"),
                                metric=metric, folds=folds, bootstrap=bootstrap, seed=seed)
            tf = transform_overrides(img_size, input_size, crop_pct, interpolation, mean, std)
            opts = CollectOptions(batch_size=batch_size, device=device, amp=amp, channels_last=channels_last,
                                  workers=workers, cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
                                  verify_cache=verify_cache, save_interval=save_interval,
                                  store_above=store_bytes)
            note = ("nothing was kept (--no-cache)" if opts.cache_dir is None else
                    f"the images collected so far are in the stats cache {opts.cache_dir} (saved every "
                    f"{opts.save_interval:g} s or {opts.save_every} images); run the same command again to resume")
            with interruptible(note), _collect_progress(not dist.is_main()) as cb:
                run = run_sweep(model_source(source, arch, weights, num_classes, pretrained, trust, ema), data, split=split,
                                data_format=data_format, difficult=difficult, class_map=class_map, skip_bad=skip_bad,
                                class_reduce=class_reduce, class_names=class_names,
                                grid=grid, transform=tf, options=opts, progress=cb, max_pixels=max_pixels,
                                limit=limit, protocol=protocol, scores=score_kind)
            if run is None:  # another torchrun rank wrote nothing; rank 0 writes the run
                return
            run.write(out_dir, force=force, formats=fig_formats, plotter=plotter)
            if results_file is not None:
                from ..report import append_results_file

                append_results_file(results_file, run.summary)
        except (PatchCSRAError, OSError) as e:
            fail(e)
        _report(run.summary, out_dir, batch_size)
        if results_file is not None:
            err.print(f"added a row to {results_file}", highlight=False, soft_wrap=True)
        if as_json:
            emit_json(run.summary)



def _plot_worker():
    """A process that imports matplotlib now and draws the curve at the end (patchcsra.plot_worker), when a
    second core is free and this process is the one that writes (not a torchrun rank > 0)."""
    import contextlib
    import os

    from ..plot_worker import PlotWorker, worth_it

    if int(os.environ.get("RANK", "0") or 0) != 0 or not worth_it():
        return contextlib.nullcontext()
    return PlotWorker()


class _collect_progress:
    """Progress of the pass on stderr (``with ... as cb``: ``cb(done, total)``), with images/s: a bar on a
    terminal, a plain line every ~10 s elsewhere (:func:`~patchcsra.cli._common.make_progress`)."""

    def __init__(self, disable: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        self.progress = make_progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), unit="img",
                                      disable=disable)
        self.t0: Optional[tuple[float, int]] = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("collecting", total=None, rate="")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = (now, done)
        rate = (done - self.t0[1]) / max(now - self.t0[0], 1e-9)
        self.progress.update(self.task, completed=done, total=total, rate=f"{rate:.1f} img/s" if rate else "")


def _report(s: dict, out_dir: Path, batch_size: int) -> None:
    """Warnings and notes of a finished run, then its Table 1."""
    from ..report import rich_table, table_frame

    bad = s["images"]["bad"]
    if bad:
        err.print(f"[bold yellow]warning:[/] skipped {bad} unreadable image(s): "
                  f"{', '.join(s['images']['bad_ids'][:5])}", highlight=False)
    if s["classes"]["without_positives"]:
        err.print(f"[yellow]note:[/] classes without positives (left out of mAP): "
                  f"{', '.join(s['classes']['without_positives'])}", highlight=False)
    c = s["collect"]
    if c.get("oom_retries"):
        err.print(f"[yellow]note:[/] CUDA ran out of memory {c['oom_retries']} time(s) at batch size {batch_size}; "
                  f"collected at batch size {c['batch_size']}", highlight=False)
    show(rich_table(table_frame([s]), title=f"{s['model']['name']} on {s['dataset']['name']}"))
    done(f"[green]wrote[/] {out_dir}/ ({s['images']['scored']} images; pass: {c['forward_images']} forward, "
         f"{c['seconds']:.1f} s on {c['device']})")
