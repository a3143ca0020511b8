"""``patchcsra patch``: patch a classifier's head and write it as TorchScript, a torch.export archive or ONNX."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from ..errors import PatchCSRAError
from ._common import (SOURCE_HELP, Arch, Ema, Force, Json, NumClasses, Pretrained, Trust, Weights, done, emit_json,
                      fail, model_source, parse_float, parse_input_size, status)


def patch(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="output file: .pt2 (torch.export), .onnx (ONNX, needs "
                                "patchcsra\\[onnx]) or .pt (TorchScript); dynamic batch, height and width where the "
                                "model allows", rich_help_panel="Output"),
    lam: Optional[str] = typer.Option(None, "--lam", metavar="FLOAT", help="λ >= 0 (default: 0.02 for ResNets, 0.2 "
                                      "otherwise)"),
    temperature: str = typer.Option("inf", "--temperature", "-T", metavar="FLOAT|inf", help="inf (max over "
                                    "locations, as sweep-lambda's default) or T > 0"),
    fmt: str = typer.Option("auto", "--format", help="auto (from -o's suffix) | torchscript | export | onnx"),
    input_size: Optional[str] = typer.Option(None, "--input-size", metavar="C,H,W", help="size of the probe, e.g. "
                                             "3,224,224 or 3 224 224 (default: model config, else 3,224,224 with a "
                                             "warning); the written file is not limited to it",
                                             rich_help_panel="Preprocessing"),
    arch: Arch = None, weights: Weights = None, num_classes: NumClasses = None, pretrained: Pretrained = True,
    trust: Trust = False, ema: Ema = False, force: Force = False, as_json: Json = False,
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
        with status(f"loading {source}"):
            model = model_source(source, arch, weights, num_classes, pretrained, trust, ema).load()
        with status("finding the head and patching"), warnings_once():
            patched = do_patch(model, lam=lam_v, temperature=t_v, input_size=size)
        with status(f"writing {out_fmt} to {output}"), warnings_once():
            save_patched(patched, output, fmt=out_fmt, source={"spec": source, "arch": arch, "weights": weights},
                         force=force)
    except (PatchCSRAError, OSError) as e:
        fail(e)
    i = patched.info
    done(f"[green]wrote[/] {output} ({out_fmt}): {i.model_class.rsplit('.', 1)[-1]} head {i.kind} "
         f"\\[{i.layout}, {i.num_locations} locations], λ={patched.lam:g}, T={temperature_text(patched.temperature)}")
    if as_json:
        from ..patcher import temperature_json

        emit_json({"output": str(output), "format": out_fmt, "bytes": output.stat().st_size, "lam": patched.lam,
                   "temperature": temperature_json(patched.temperature),
                   "source": {"spec": source, "arch": arch, "weights": weights}, "head": i.as_dict()})


@contextmanager
def warnings_once() -> Iterator[None]:
    """Kept for callers: inside a verb the session's handler (:class:`~patchcsra.cli._common.LogLines`) already
    shows each ``patchcsra`` warning once on stderr; outside one, this installs such a handler."""
    from ._common import LogLines

    logger = logging.getLogger("patchcsra")
    if any(isinstance(h, LogLines) for h in logger.handlers):
        yield
        return
    handler, propagate = LogLines(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
