"""What every verb shares: consoles, the one-line failure, string parsers, the --out check, option groups.

Verbs parse strings into the option dataclasses of :mod:`patchcsra.options` here and make one API call;
values are checked once, by the API. A :class:`~patchcsra.errors.PatchCSRAError` whose ``param`` names an
argument is shown with the flag's name (``lams=...`` -> ``--lams=...``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional, Union

import typer
from rich.console import Console
from rich.table import Table

from ..errors import PatchCSRAError

out = Console()
err = Console(stderr=True)

TRUST_HELP = ("load a file that runs code: a whole pickled model, a TorchScript or .pt2 archive (only from a "
              "source you trust)")
SOURCE_HELP = ("timm:NAME, torchvision:NAME, hf:ORG/NAME, ORG/NAME (a hub repo), a model folder (timm's save_for_hf, "
               "transformers' save_pretrained) or a checkpoint file (state dict, timm training checkpoint, "
               "safetensors, TorchScript, .pt2)")

MODEL, TRANSFORM, RUN, OUTPUT = "Model", "Preprocessing", "Running", "Output"

# ----------------------------------------------------------------------------- shared options (one definition each)
Arch = Annotated[Optional[str], typer.Option("--arch", help="architecture of a state-dict file: timm:NAME, "
                                             "torchvision:NAME, pkg.module:factory or file.py:factory (a module "
                                             "or file named here is imported: its code runs)",
                                             rich_help_panel=MODEL)]
Weights = Annotated[Optional[str], typer.Option("--weights", help="torchvision weights name, or a state-dict file",
                                                rich_help_panel=MODEL)]
NumClasses = Annotated[Optional[int], typer.Option("--num-classes", help="classes of the checkpoint's head "
                                                   "(default: read from the state dict)", rich_help_panel=MODEL)]
Pretrained = Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="fetch timm/torchvision weights",
                                          rich_help_panel=MODEL)]
Trust = Annotated[bool, typer.Option("--trust", help=TRUST_HELP, rich_help_panel=MODEL)]
Ema = Annotated[bool, typer.Option("--ema", help="take a training checkpoint's EMA weights (state_dict_ema, as "
                                   "timm's train.py writes them)", rich_help_panel=MODEL)]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", help="evaluate at this square resolution",
                                                rich_help_panel=TRANSFORM)]
InputSize = Annotated[Optional[str], typer.Option("--input-size", help="C,H,W for models without a config, "
                                                  "e.g. 3,32,32", rich_help_panel=TRANSFORM)]
CropPct = Annotated[Optional[float], typer.Option("--crop-pct", help="center-crop fraction (timm), e.g. 0.875",
                                                  rich_help_panel=TRANSFORM)]
Interpolation = Annotated[Optional[str], typer.Option("--interpolation", help="bilinear | bicubic | nearest | ...",
                                                      rich_help_panel=TRANSFORM)]
Mean = Annotated[Optional[str], typer.Option("--mean", help="comma-separated channel means",
                                             rich_help_panel=TRANSFORM)]
Std = Annotated[Optional[str], typer.Option("--std", help="comma-separated channel stds", rich_help_panel=TRANSFORM)]
Workers = Annotated[Optional[int], typer.Option("--workers", "-j", help="DataLoader workers (default: cores-1)",
                                                rich_help_panel=RUN)]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N]", rich_help_panel=RUN)]
Force = Annotated[bool, typer.Option("--force", help="overwrite the output if it exists", rich_help_panel=OUTPUT)]
MaxPixels = Annotated[int, typer.Option("--max-pixels", help="images with more pixels are not decoded but reported "
                                        "unreadable, naming this limit (a guard against decompression bombs; "
                                        "default: PIL's 89478485, about 89.5 megapixels; 0: no limit)")]


def fail(e: Union[str, PatchCSRAError, OSError]) -> None:
    """One line on stderr, exit status 2 (a file-system failure: the path and what the errno means)."""
    from .._io import describe_os_error

    msg = describe_os_error(e) if isinstance(e, OSError) else str(e)
    param = getattr(e, "param", None)
    if param and msg.startswith(f"{param}="):  # the API names its argument; the CLI user typed a flag
        msg = f"--{param.replace('_', '-')}=" + msg[len(param) + 1:]
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def parse_input_size(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    if text is None:
        return None
    try:
        vals = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise PatchCSRAError(f"--input-size {text!r}: give C,H,W, e.g. 3,224,224")
    return vals  # type: ignore[return-value]


def parse_float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PatchCSRAError(f"{name} {text!r} is not a number") from None


def parse_floats(text: Optional[str], name: str) -> Optional[list[float]]:
    if text is None:
        return None
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise PatchCSRAError(f"{name} {text!r} is empty; give comma-separated numbers, e.g. 0,0.1,0.2")
    return [parse_float(v, name) for v in vals]


def model_source(source: str, arch: Optional[str], weights: Optional[str], num_classes: Optional[int],
                 pretrained: bool, trust: bool, ema: bool = False):
    from ..options import ModelSource

    return ModelSource(source, arch=arch, weights=weights, num_classes=num_classes, pretrained=pretrained,
                       trust=trust, ema=ema)


def transform_overrides(img_size: Optional[int], input_size: Optional[str], crop_pct: Optional[float],
                        interpolation: Optional[str], mean: Optional[str], std: Optional[str]):
    from ..options import TransformOverrides

    return TransformOverrides(img_size=img_size, input_size=parse_input_size(input_size), crop_pct=crop_pct,
                              interpolation=interpolation, mean=parse_floats(mean, "--mean"),
                              std=parse_floats(std, "--std"))


def check_out(path: Path, flag: str, inputs: dict) -> None:
    """Refuse, before any work, an output folder that would replace an input or cannot be created.

    ``inputs`` maps a description (``"--data"``, ``"the model file"``) to a path (or None / a non-path spec).
    The output folder is replaced as a whole, so it may be neither an input nor a folder holding one.
    Missing parent folders are created; a parent that is a file or not writable is refused.
    """
    from .._io import check_name

    o = Path(os.path.abspath(path.expanduser()))
    cwd = Path.cwd()
    if o == cwd or o in cwd.parents:
        raise PatchCSRAError(f"{flag} {path} is the current folder or one above it (the output folder is replaced "
                             f"as a whole); choose a new folder, e.g. {flag} runs/NAME")
    check_name(o)
    for what, p in inputs.items():
        if p is None or not Path(p).exists():
            continue
        q = Path(os.path.abspath(Path(p).expanduser()))
        if o == q or o in q.parents:
            raise PatchCSRAError(f"{flag} {path} would overwrite {what} {p} (the output folder is replaced as a "
                                 f"whole); choose another {flag}")
    parent = o.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PatchCSRAError(f"{flag} {path}: {parent} is not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PatchCSRAError(f"{flag} {path}: folder {parent} is not writable; choose another {flag}")


def run_inputs(data: Path, source: str, weights: Optional[str], class_map: Optional[Path]) -> dict:
    """What a run reads, for :func:`check_out` (a timm:/torchvision: name is no file and is left out)."""
    return {"--data": data, "the model file": source if Path(source).exists() else None, "--weights": weights,
            "--class-map": class_map}


def info_table(info_dict: dict, title: str) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    for k, v in info_dict.items():
        t.add_row(k, str(v))
    return t


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so it ends like Ctrl-C: one line, the saved state kept."""


class interruptible:
    """``with interruptible(note):`` -- Ctrl-C (exit 130) or SIGTERM (exit 143) print one line: what was
    interrupted and ``note`` (what was saved, how to resume), instead of a traceback."""

    def __init__(self, note: str) -> None:
        self.note = note

    def __enter__(self):
        import signal

        def on_term(signum, frame):
            raise Terminated()

        try:
            self.previous = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (tests, embedding): leave SIGTERM alone
            self.previous = None
        return self

    def __exit__(self, kind, value, tb) -> bool:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        if kind is KeyboardInterrupt or kind is Terminated:
            err.print(f"[bold yellow]interrupted:[/] {self.note}", highlight=False, soft_wrap=True)
            raise typer.Exit(130 if kind is KeyboardInterrupt else 143)
        return False


def device_arg(device: str) -> Optional[str]:
    return None if device == "auto" else device
