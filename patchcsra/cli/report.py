"""``patchcsra report``: merge sweep runs into one Table 1 (rows = dataset x model)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import PatchCSRAError
from ._common import OUTPUT, Force, check_out, done, fail, out


def report(
    runs: list[Path] = typer.Argument(..., help="run directories written by sweep-lambda"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="write table.csv, table.md, table.tex here "
                                           "(default: print only)", rich_help_panel=OUTPUT),
    force: Force = False,
) -> None:
    """Merge sweep runs into one Table 1 (rows = dataset x model)."""
    from ..report import merge_runs, rich_table, write_table

    try:
        if out_dir is not None:
            check_out(out_dir, "--out", {f"the run {r}": r for r in runs})
            if force and (out_dir.exists() or out_dir.is_symlink()):
                from .._io import replaceable_dir
                from ..report import TABLE_FILES

                replaceable_dir(out_dir, "--out", TABLE_FILES)
        table = merge_runs(runs)
        if out_dir is not None:
            write_table(table, out_dir, force=force)
    except (PatchCSRAError, OSError) as e:
        fail(e)
    out.print(rich_table(table, title="Table 1"))  # the result itself: kept by --quiet
    if out_dir is not None:
        done(f"[green]wrote[/] {out_dir}/")
