"""``patchcsra`` command line: a thin typer layer over the Python API.

Bad input exits with status 2 and one line on stderr (``error: ...``); nothing is half-written.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import PatchCSRAError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Training-free residual attention (CSRA) for any pretrained image classifier.")
_out = Console()
_err = Console(stderr=True)

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
    trust: bool = typer.Option(False, "--trust", help="allow unpickling a whole model (runs code from the file)"),
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
    trust: bool = typer.Option(False, "--trust"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Show the pooling head patchcsra finds in a model (or the record of a patched file)."""
    from .patcher import describe as do_describe

    try:
        size = _parse_input_size(input_size)
        with _err.status(f"loading {source}"):
            model = _load(source, arch, weights, trust, pretrained, num_classes)
        meta = getattr(model, "patchcsra_meta", None)
        info = do_describe(model, input_size=size).as_dict()
    except PatchCSRAError as e:
        _fail(str(e))
    record = {"patched": bool(meta), **({k: meta[k] for k in ("lam", "temperature", "source")} if meta else {}),
              **info}
    if as_json:
        sys.stdout.write(json.dumps(record, indent=1) + "\n")
    else:
        _out.print(_info_table(record, f"{source}"))


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
