"""``patchcsra bench``: run a benchmark suite into one JSON; with ``--check``, the regression gate (exit 1)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import PatchCSRAError
from ._common import OUTPUT, RUN, done, err, errors, fail, make_progress, out

CHECK = "Regression check"


def bench(
    suite: str = typer.Argument("demo", help="a built-in suite (demo) or a suite JSON file, e.g. benchmarks/ci.json"),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="result JSON (default: WORK_DIR/<suite>.json)",
                                            rich_help_panel=OUTPUT),
    check: Optional[Path] = typer.Option(None, "--check", help="expected JSON: exit 1 when a score moves "
                                          "beyond its tolerance or λ=0 exactness breaks", rich_help_panel=CHECK),
    results: Optional[Path] = typer.Option(None, "--results", help="check this result JSON instead of running",
                                           rich_help_panel=CHECK),
    work_dir: Path = typer.Option(Path("runs/bench"), "--work-dir", help="extracted data and each case's files",
                                  rich_help_panel=OUTPUT),
    only: Optional[str] = typer.Option(None, "--only", metavar="NAMES", help="comma-separated case names (default: "
                                       "all)", rich_help_panel=RUN),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers (0: in-process, deterministic)",
                                rich_help_panel=RUN),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out", rich_help_panel=OUTPUT),
) -> None:
    """Run a benchmark suite into one JSON; with --check, fail on regressions (the CI gate)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from .. import bench as B

    try:
        expected = B.read_json(check, "--check") if check is not None else None
        if results is not None:
            record = B.read_json(results, "--results")
            _bench_table(record)
        else:
            st = B.load_suite(suite)
            target = out_file or work_dir / f"{st.name}.json"
            if target.exists() and not force:
                raise PatchCSRAError(f"{target} exists; pass --force to overwrite it or choose another --out")
            names = [n.strip() for n in only.split(",") if n.strip()] if only else None
            with make_progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), unit="it") as progress:
                task = progress.add_task(f"suite {st.name}", total=None)

                def cb(msg: str, done: int, total: Optional[int]) -> None:
                    progress.update(task, description=msg, completed=done, total=total)

                record = B.run_suite(st, work_dir, only=names, workers=workers, progress=cb)
            B.write_json(record, target, force=force)
            _bench_table(record)
            done(f"[green]wrote[/] {target}")
        if check is not None:
            rows = B.check_results(record, expected)
    except (PatchCSRAError, OSError) as e:
        fail(e)
    if check is not None:
        _gate(rows, check, expected, record)


def _gate(rows: list, check: Path, expected: dict, record: dict) -> None:
    """The check's diff table, what moved in the environment, and exit 1 on any failed row."""
    from ..provenance import environment_diff

    t = Table(title=f"regression check against {check}")
    for c in ("case", "metric", "field", "expected", "got", "diff", "tolerance", "status"):
        t.add_column(c, justify="right" if c in ("expected", "got", "diff", "tolerance") else "left")
    fmt = lambda v, nd=3: "" if v is None else (f"{v:.2e}" if abs(v) < 1e-3 and v != 0 else f"{v:.{nd}f}")  # noqa: E731
    for r in rows:
        t.add_row(r.case, r.metric, r.field, fmt(r.expected), fmt(r.got), fmt(r.diff), fmt(r.tolerance, 3),
                  "[green]ok[/]" if r.ok else "[bold red]FAIL[/]")
    out.print(t)
    bad = [r for r in rows if not r.ok]
    moved = environment_diff(expected.get("environment"), record.get("environment"))
    if moved:
        (err if bad else out).print(
            f"{'[bold red]' if bad else ''}environment differs from {check}{'[/]' if bad else ''} (what can move a "
            "figure): " + "; ".join(f"{k} {a} -> {b}" for k, a, b in moved), highlight=False, soft_wrap=True)
    if bad:
        errors.print(f"[bold red]regression:[/] {len(bad)} of {len(rows)} checks failed "
                  f"({', '.join(sorted({f'{r.case}/{r.metric or r.field}' for r in bad}))})", highlight=False)
        raise typer.Exit(1)
    done(f"[green]all {len(rows)} checks passed[/]")


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
    out.print(t)
