"""``patchcsra report``: merge sweep runs into one Table 1 (rows = dataset x model) and one figure of their curves."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import PatchCSRAError
from ._common import OUTPUT, Force, check_out, done, fail, out


def report(
    runs: list[Path] = typer.Argument(..., help="run directories written by sweep-lambda"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="write table.csv, table.md, table.tex and "
                                           "curves.png (every run's curves) here (default: print only)",
                                           rich_help_panel=OUTPUT),
    sort: Optional[str] = typer.Option(None, "--sort", help="comma-separated table.csv columns to sort the rows "
                                       "by, e.g. dataset,model or baseline (default: the order given)",
                                       rich_help_panel=OUTPUT),
    names: Optional[list[str]] = typer.Option(None, "--name", help="the row's name for each run, in the order "
                                              "given (repeat once per run; default: the model's name)",
                                              rich_help_panel=OUTPUT),
    formats: str = typer.Option("png", "--formats", help="comma-separated figure formats of curves.*: png, pdf, "
                                "svg", rich_help_panel=OUTPUT),
    force: Force = False,
) -> None:
    """Merge sweep runs into one Table 1 (rows in the order given, or --sort) and one figure of their curves."""
    from ..report import figure_paths, merge_runs, rich_table, write_table

    try:
        fig_formats = tuple(f.strip().lower() for f in formats.split(",") if f.strip()) or ("png",)
        try:
            figure_paths("curves.png", fig_formats)
        except PatchCSRAError as e:
            raise PatchCSRAError(f"--formats: {e}") from None
        if out_dir is not None:
            check_out(out_dir, "--out", {f"the run {r}": r for r in runs})
            if force and (out_dir.exists() or out_dir.is_symlink()):
                from .._io import replaceable_dir
                from ..report import TABLE_FILES

                replaceable_dir(out_dir, "--out", TABLE_FILES)
        cols = tuple(c.strip() for c in sort.split(",") if c.strip()) if sort else None
        table, summaries = merge_runs(runs, sort=cols, names=names or None, with_summaries=True)
        if out_dir is not None:
            write_table(table, out_dir, force=force, summaries=summaries, formats=fig_formats)
    except (PatchCSRAError, OSError) as e:
        fail(e)
    out.print(rich_table(table, title="Table 1"))  # the result itself: kept by --quiet
    if out_dir is not None:
        done(f"[green]wrote[/] {out_dir}/")
