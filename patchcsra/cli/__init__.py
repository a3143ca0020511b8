"""``patchcsra`` command line: one small module per verb over the Python API (:mod:`patchcsra.api`).

Each verb parses strings into the option dataclasses of :mod:`patchcsra.options`, makes one API call and
renders the result; heavy imports (torch, timm, pandas) happen inside the verb, so ``patchcsra --help``
and ``--version`` start at once. Bad input exits with status 2 and one line on stderr (``error: ...``);
nothing is half-written.

Habits shared by every verb (:class:`~patchcsra.cli._common.VerbCommand`): ``-q/--quiet`` and ``-v/--verbose``;
results (tables, the final line, ``--json``) on stdout and everything else on stderr; progress as rich bars on
a terminal and one plain line every ~10 s elsewhere; timm's spellings (``--input-size 3 32 32``, a bare
``--amp``). Shell completion: ``patchcsra --install-completion`` (typer's own).
"""
from __future__ import annotations

import sys

import typer

from . import bench, demo, describe, explain, patch, report, sweep, train
from ._common import VerbCommand

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Training-free residual attention (CSRA) for any pretrained image classifier.")


def _print_version(value: bool) -> None:
    if value:
        from .._version import __version__

        sys.stdout.write(f"patchcsra {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Training-free residual attention (CSRA) for any pretrained image classifier."""


app.command(cls=VerbCommand)(patch.patch)
app.command(cls=VerbCommand)(describe.describe)
app.command("sweep-lambda", cls=VerbCommand)(sweep.sweep_lambda)
app.command(cls=VerbCommand)(report.report)
app.command(cls=VerbCommand)(explain.explain)
app.command("train-head", cls=VerbCommand)(train.train_head)
app.command(cls=VerbCommand)(demo.demo)
app.command(cls=VerbCommand)(bench.bench)


def main() -> None:
    """Console-script entry point (``patchcsra`` and ``python -m patchcsra``).

    Runs the app, then ends the process the way the interpreter would -- non-daemon threads joined, ``atexit``
    handlers run (logging, multiprocessing children, coverage), streams flushed -- but skips the teardown of
    every module object, which costs 0.6-1 s once torch is imported (``benchmarks/sweep_cost.py``). Set
    ``PATCHCSRA_FULL_EXIT=1`` for the interpreter's own exit. At start-up it sets glibc's malloc thresholds for
    a pass on the CPU (:mod:`patchcsra._malloc`; ``PATCHCSRA_MALLOC=system`` leaves them).
    """
    import os

    from .._malloc import tune_malloc

    tune_malloc()
    try:
        app()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if os.environ.get("PATCHCSRA_FULL_EXIT"):
        sys.exit(code)
    _fast_exit(code)


def _fast_exit(code: object) -> None:
    import atexit
    import os
    import threading

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message goes to stderr, status 1
        sys.stderr.write(f"{code}\n")
        status = 1
    shutdown = getattr(threading, "_shutdown", None)  # what Py_Finalize calls first: joins non-daemon threads
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head): nothing left to say
            if status == 0 and stream is sys.stdout:
                status = 120  # what the interpreter returns when flushing stdout fails at exit
    os._exit(status)


__all__ = ["app", "main"]
