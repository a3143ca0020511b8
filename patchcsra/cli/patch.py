"""``patchcsra patch``: patch a classifier's head and write it as TorchScript, a torch.export archive or ONNX."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from ..errors import PatchCSRAError
from ._common import (SOURCE_HELP, Arch, Ema, Force, NumClasses, Pretrained, Trust, Weights, err, fail, model_source,
                      out, parse_float, parse_input_size)


def patch(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="output file: .pt2 (torch.export), .onnx (ONNX, needs "
                                "patchcsra[onnx]) or .pt (TorchScript); dynamic batch, height and width where the "
                                "model allows"),
    lam: Optional[str] = typer.Option(None, "--lam", help="λ >= 0 (default: 0.02 for ResNets, 0.2 otherwise)"),
    temperature: str = typer.Option("inf", "--temperature", "-T", help="inf (max over locations) or T > 0"),
    fmt: str = typer.Option("auto", "--format", help="auto | torchscript | export | onnx"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W of the probe (default: model config, else 3,224,224 with a warning); the "
                                    "written file is not limited to it"),
    arch: Arch = None, weights: Weights = None, num_classes: NumClasses = None, pretrained: Pretrained = True,
    trust: Trust = False, ema: Ema = False, force: Force = False,
) -> None:
    """Patch a classifier's head and write it as TorchScript, a torch.export archive or ONNX."""
    from ..export import export_format, save_patched
    from ..patcher import patch as do_patch, temperature_text

    try:
        lam_v = None if lam is None else parse_float(lam, "--lam")
        t_v = parse_float(temperature, "--temperature")
        size = parse_input_size(input_size)
        out_fmt = export_format(output, fmt)
        if output.exists() and not force:
            raise PatchCSRAError(f"{output} exists; pass --force to overwrite it")
        if Path(source).exists() and Path(source).resolve() == output.resolve():
            raise PatchCSRAError(f"-o {output} is the input file; write to another path")
        with err.status(f"loading {source}"):
            model = model_source(source, arch, weights, num_classes, pretrained, trust, ema).load()
        with err.status("finding the head and patching"), warnings_once():
            patched = do_patch(model, lam=lam_v, temperature=t_v, input_size=size)
        with err.status(f"writing {out_fmt} to {output}"), warnings_once():
            save_patched(patched, output, fmt=out_fmt, source={"spec": source, "arch": arch, "weights": weights},
                         force=force)
    except (PatchCSRAError, OSError) as e:
        fail(e)
    i = patched.info
    out.print(f"[green]wrote[/] {output} ({out_fmt}): {i.model_class.rsplit('.', 1)[-1]} head {i.kind} "
              f"[{i.layout}, {i.num_locations} locations], λ={patched.lam:g}, "
              f"T={temperature_text(patched.temperature)}", highlight=False)


class _ErrConsole(logging.Handler):
    """The library's warnings (module loggers under ``patchcsra``) as one ``warning: ...`` line each on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.seen:  # each warning once, however often the library says it
            self.seen.add(msg)
            err.print(f"[bold yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


@contextmanager
def warnings_once() -> Iterator[None]:
    """While inside: ``patchcsra`` warnings go to stderr once each (not also through Python's last-resort handler)."""
    logger = logging.getLogger("patchcsra")
    handler, propagate = _ErrConsole(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
