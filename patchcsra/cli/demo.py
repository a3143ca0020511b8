"""``patchcsra demo``: the embedded default, offline, end to end."""
from __future__ import annotations

from pathlib import Path

import typer

from ..errors import PatchCSRAError
from ._common import DATA, OUTPUT, RUN, done, fail, make_progress, show


def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="where data, model and the run go",
                                 rich_help_panel=OUTPUT),
    n_train: int = typer.Option(4000, "--n-train", help="training canvases (another value trains here)",
                                rich_help_panel=DATA),
    n_test: int = typer.Option(1000, "--n-test", help="test canvases", rich_help_panel=DATA),
    epochs: int = typer.Option(8, "--epochs", help="training epochs (another value trains here)",
                               rich_help_panel=RUN),
    seed: int = typer.Option(0, "--seed", help="canvas and training seed (another value trains here)",
                             rich_help_panel=RUN),
    retrain: bool = typer.Option(False, "--retrain", help="train DigitNet here instead of using the shipped "
                                 "weights (its figures then depend on this CPU's kernel set and thread count)",
                                 rich_help_panel=RUN),
    force: bool = typer.Option(False, "--force", help="run again over an existing OUT/run", rich_help_panel=OUTPUT),
) -> None:
    """The embedded default, offline: multi-digit canvases from sklearn's real digits, a GAP CNN (shipped
    weights, or --retrain), then patch + one-pass λ sweep + Table 1 (OUT/run)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from ..demo import run_demo
    from ..report import rich_table, table_frame

    try:
        if min(n_train, n_test, epochs) < 1:
            raise PatchCSRAError("--n-train, --n-test and --epochs must be >= 1")
        with make_progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), unit="it") as progress:
            task = progress.add_task("building canvases", total=None)

            def cb(msg: str, done: int, total: int) -> None:
                progress.update(task, description=msg, completed=done, total=total)

            run = run_demo(out_dir, n_train=n_train, n_test=n_test, epochs=epochs, seed=seed,
                           retrain=True if retrain else None, force=force, progress=cb)
    except (PatchCSRAError, OSError) as e:
        fail(e)
    show(rich_table(table_frame([run.summary]), title="Table 1 (embedded default)"))
    done(f"[green]wrote[/] {out_dir}/run/ (results.csv, summary.json, table.md, table.tex, curve.png), "
         f"{out_dir}/digitnet.pt ({run.summary['model']['weights']}) and the canvases in {out_dir}/data/")
