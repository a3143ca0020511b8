"""What every verb shares: consoles, the one-line failure, string parsers, the --out check, option groups.

Verbs parse strings into the option dataclasses of :mod:`patchcsra.options` here and make one API call;
values are checked once, by the API. A :class:`~patchcsra.errors.PatchCSRAError` whose ``param`` names an
argument is shown with the flag's name (``lams=...`` -> ``--lams=...``), and the library's Python hints
(``pass trust=True (CLI --trust)``) in the flags' words (``pass --trust``): :func:`cli_message`.

Every verb is a :class:`VerbCommand`: it adds ``-q/--quiet`` and ``-v/--verbose``, accepts timm's
spellings (``--input-size 3 32 32``, a bare ``--amp``: :func:`habit_argv`), files each option in a help
panel, and runs the verb inside :func:`cli_session` (stdout keeps only results; library chatter and
everything else go to stderr).
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional, Sequence, Union

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table
from typer.core import TyperCommand

from ..errors import PatchCSRAError

_WIDE = 1000  # columns when not a terminal: a pipe, a CI log or nohup never wraps a line at 80


class _Console(Console):
    """A rich console that does not wrap at 80 columns when its stream is not a terminal (``$COLUMNS`` wins)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(_WIDE, size.height)
        return size

    @size.setter
    def size(self, new_size) -> None:
        Console.size.fset(self, new_size)


out = _Console()  # stdout: results only (tables, the final "wrote ..." line, --json)
err = _Console(stderr=True)  # stderr: progress, warnings, notes (muted by --quiet)
errors = _Console(stderr=True)  # stderr: errors and interruptions (never muted)

TRUST_HELP = ("load a file that runs code: a whole pickled model, a TorchScript or .pt2 archive (only from a "
              "source you trust)")
SOURCE_HELP = ("timm:NAME, torchvision:NAME, hf:ORG/NAME, ORG/NAME (a hub repo), a model folder (timm's save_for_hf, "
               "transformers' save_pretrained) or a checkpoint file (state dict, timm training checkpoint, "
               "safetensors, TorchScript, .pt2)")

MODEL, DATA, TRANSFORM, GRID, RUN, OUTPUT = "Model", "Data", "Preprocessing", "λ/T grid and selection", "Running", "Output"

# ----------------------------------------------------------------------------- shared options (one definition each)
Arch = Annotated[Optional[str], typer.Option("--arch", metavar="SPEC", help="architecture of a state-dict file: timm:NAME, "
                                             "torchvision:NAME, pkg.module:factory or file.py:factory (a module "
                                             "or file named here is imported: its code runs; default: read from "
                                             "the checkpoint)",
                                             rich_help_panel=MODEL)]
Weights = Annotated[Optional[str], typer.Option("--weights", metavar="NAME|FILE", help="torchvision weights name "
                                                "(e.g. IMAGENET1K_V2), or a state-dict file (default: the "
                                                "library's pretrained weights)", rich_help_panel=MODEL)]
NumClasses = Annotated[Optional[int], typer.Option("--num-classes", help="classes of the checkpoint's head "
                                                   "(default: read from the state dict)", rich_help_panel=MODEL)]
Pretrained = Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="fetch timm/torchvision/hub weights "
                                          "(--no-pretrained: random init, offline)",
                                          rich_help_panel=MODEL)]
Trust = Annotated[bool, typer.Option("--trust", help=TRUST_HELP, rich_help_panel=MODEL)]
Ema = Annotated[bool, typer.Option("--ema", help="take a training checkpoint's EMA weights (state_dict_ema, as "
                                   "timm's train.py writes them)", rich_help_panel=MODEL)]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", metavar="INT", help="evaluate at this square "
                                                "resolution (default: the model's config)",
                                                rich_help_panel=TRANSFORM)]
InputSize = Annotated[Optional[str], typer.Option("--input-size", metavar="C,H,W", help="input size for models "
                                                  "without a config, e.g. 3,32,32 or timm's 3 32 32 (default: the "
                                                  "model's config)", rich_help_panel=TRANSFORM)]
CropPct = Annotated[Optional[float], typer.Option("--crop-pct", metavar="FLOAT", help="center-crop fraction "
                                                  "(timm), e.g. 0.875 (default: the model's config)",
                                                  rich_help_panel=TRANSFORM)]
Interpolation = Annotated[Optional[str], typer.Option("--interpolation", metavar="NAME", help="resize filter: "
                                                      "bilinear | bicubic | nearest | ... (default: the model's "
                                                      "config)",
                                                      rich_help_panel=TRANSFORM)]
Mean = Annotated[Optional[str], typer.Option("--mean", metavar="R,G,B", help="channel means, e.g. 0.5,0.5,0.5 "
                                             "or timm's 0.5 0.5 0.5 (default: the model's config)",
                                             rich_help_panel=TRANSFORM)]
Std = Annotated[Optional[str], typer.Option("--std", metavar="R,G,B", help="channel stds, e.g. 0.25,0.25,0.25 "
                                            "or timm's 0.25 0.25 0.25 (default: the model's config)",
                                            rich_help_panel=TRANSFORM)]
Workers = Annotated[Optional[int], typer.Option("--workers", "-j", metavar="INT", help="DataLoader workers (default: cores-1)",
                                                rich_help_panel=RUN)]
Device = Annotated[str, typer.Option("--device", help="auto (cuda if available) | cpu | cuda[:N]",
                                     rich_help_panel=RUN)]
Force = Annotated[bool, typer.Option("--force", help="overwrite the output if it exists", rich_help_panel=OUTPUT)]
MaxPixels = Annotated[int, typer.Option("--max-pixels", help="images with more pixels are not decoded but reported "
                                        "unreadable, naming this limit (a guard against decompression bombs; "
                                        "default: PIL's 89478485, about 89.5 megapixels; 0: no limit)",
                                        rich_help_panel=DATA)]
Json = Annotated[bool, typer.Option("--json", help="print the result as one JSON document on stdout (all else goes "
                                    "to stderr)", rich_help_panel=OUTPUT)]


def fail(e: Union[str, PatchCSRAError, OSError]) -> None:
    """One line on stderr, exit status 2 (a file-system failure: the path and what the errno means).

    The message is put in the CLI's words (:func:`cli_message`): flags instead of Python keywords, and no
    suggestion of a flag the command line already holds.
    """
    from .._io import describe_os_error

    msg = describe_os_error(e) if isinstance(e, OSError) else str(e)
    param = getattr(e, "param", None)
    if param and msg.startswith(f"{param}="):  # the API names its argument; the CLI user typed a flag
        msg = f"--{param.replace('_', '-')}=" + msg[len(param) + 1:]
    msg = cli_message(msg, given_flags())
    errors.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(2)


# ----------------------------------------------------------------------------- Python hints -> CLI words
# The library writes its hints for Python callers: "pass trust=True (CLI --trust)", "pass arch=",
# "weights=FILE (CLI --weights FILE)". At the CLI edge each keyword becomes its flag.
KEYWORD_FLAGS = {
    "trust": "--trust", "force": "--force", "pretrained": "--pretrained", "weights": "--weights", "arch": "--arch",
    "ema": "--ema", "input_size": "--input-size", "img_size": "--img-size", "class_names": "--class-names",
    "class_map": "--class-map", "temperatures": "--temperatures", "heads": "--heads", "init": "--init",
    "format": "--data-format", "split": "--split", "classes": "--class-names", "num_classes": "--num-classes",
    "lam": "--lam", "temperature": "--temperature", "limit": "--limit",
}
_CLI_NOTE = re.compile(r"\b[a-z_]+(?:=('[^']*'(?:, '[^']*')*(?: or '[^']*')?|[^\s,;()]*))? \(CLI ([^)]*)\)")
_KWARG = re.compile(r"\b([a-z_]+)=('[^']*'|\([^)]*\)|\[[^\]]*\]|[^\s,;()]*)")
_HINT = re.compile(r"\b(pass|leave out|or) ")


def _flag_for(key: str, value: str) -> Optional[str]:
    flag = KEYWORD_FLAGS.get(key)
    if flag is None:
        return None
    if value == "True":
        return flag
    if value == "False":
        return "--no-" + flag[2:]
    v = value.strip("'")
    if key == "class_names" and v.startswith("["):  # the CLI reads the names from a file
        return f"{flag} FILE"
    if v.startswith(("(", "[")):
        inner = v[1:-1].replace(" ", "")
        v = "A,B,..." if inner in ("...", "") else inner
    return f"{flag} {v}" if v else flag


def cli_message(msg: str, given: Sequence[str] = ()) -> str:
    """``msg`` in the CLI's words: ``pass trust=True (CLI --trust)`` -> ``pass --trust``, ``pass arch=`` ->
    ``pass --arch ARCH``; a boolean flag in ``given`` (the command line's flags) is not suggested again, and a
    hint left with nothing to suggest is dropped."""
    def note(m: re.Match) -> str:  # the library named the flag: take it as written, with its example values
        value, flag = m.group(1) or "", m.group(2)
        if " " in flag or value in ("", "True", "False") or flag.startswith("--no-"):
            return flag
        return f"{flag} {value.replace(chr(39), '')}"

    msg = _CLI_NOTE.sub(note, msg)
    lead = re.match(r"([a-z_]+)=", msg)  # "arch='x': cannot import ..." names the flag the user typed
    if lead and lead.group(1) in KEYWORD_FLAGS:
        msg = KEYWORD_FLAGS[lead.group(1)] + msg[len(lead.group(1)):]

    def hint(m: re.Match) -> str:
        return _KWARG.sub(lambda k: _flag_for(k.group(1), k.group(2)) or k.group(0), m.group(0))

    parts = re.split(r"(; )", msg)
    for i, part in enumerate(parts):
        start = _HINT.search(part)
        if start:
            parts[i] = part[:start.start()] + re.sub(r".+", hint, part[start.start():])
    msg = "".join(parts)
    for flag in given:  # never suggest what the user typed: "pass --no-pretrained or --weights FILE" -> "pass ..."
        if flag.startswith("--") and not any(c.isspace() for c in flag):
            esc = re.escape(flag)
            msg = re.sub(rf"(pass|leave out) {esc}(?![\w-]) or ", r"\1 ", msg)
            msg = re.sub(rf" or {esc}(?![\w-])(?! [A-Z])", "", msg)
            msg = re.sub(rf"; pass {esc}(?![\w-])(?! [A-Z=])[^;]*", "", msg)
    return msg


def given_flags() -> list[str]:
    """The boolean flags the running command got on its command line (``--no-pretrained``, ``--trust``)."""
    try:  # typer >= 0.22 carries its own click
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - an older typer over click
        from click import get_current_context

    ctx = get_current_context(silent=True)
    if ctx is None:
        return []
    flags = []
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name)
        if p.param_type_name != "option" or not getattr(p, "is_flag", False) or getattr(source, "name", "") \
                != "COMMANDLINE":
            continue
        value, secondary = ctx.params.get(p.name), list(getattr(p, "secondary_opts", ()))
        flags += list(p.opts) if value else secondary
    return flags


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


_BYTE_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
               "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: Optional[str], name: str) -> Optional[int]:
    """``"2GiB"``, ``"500MB"``, ``"1.5g"``, ``"0"`` -> bytes (None stays None)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if m is None or m.group(2) not in _BYTE_UNITS:
        raise PatchCSRAError(f"{name} {text!r}: give a size, e.g. 0, 500MB or 2GiB")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2)])


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
            errors.print(f"[bold yellow]interrupted:[/] {self.note}", highlight=False, soft_wrap=True)
            raise typer.Exit(130 if kind is KeyboardInterrupt else 143)
        return False


def device_arg(device: str) -> Optional[str]:
    return None if device == "auto" else device


def emit_json(record: Any) -> None:
    """``record`` as one JSON document on stdout (the real one: inside a verb ``sys.stdout`` is stderr)."""
    import json

    from .._io import json_default

    def finite(v: Any) -> Any:  # strict JSON (jq, JavaScript): NaN and inf become null
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    text = json.dumps(record, default=json_default)  # numpy scalars, paths ... as summary.json writes them
    out.file.write(json.dumps(finite(json.loads(text)), indent=1, allow_nan=False) + "\n")
    out.file.flush()


def done(text: str) -> None:
    """The final result line on stdout (kept by --quiet; on stderr under --json, where stdout is the JSON)."""
    (err if state.json else out).print(text, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- progress that works everywhere
def progress_interval() -> float:
    """Seconds between plain progress lines when stderr is not a terminal ($PATCHCSRA_PROGRESS_INTERVAL, 10)."""
    try:
        return max(0.0, float(os.environ.get("PATCHCSRA_PROGRESS_INTERVAL", "10")))
    except ValueError:
        return 10.0


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class PlainProgress:
    """The part of :class:`rich.progress.Progress` the verbs use, as plain lines on stderr for logs and pipes:
    one line every :func:`progress_interval` seconds (``done/total (pct), rate unit/s, ETA``), one when the
    phase (description) changes, and a last one at the end if any was printed."""

    def __init__(self, unit: str = "img", interval: Optional[float] = None, clock=time.monotonic) -> None:
        self.unit, self.clock = unit, clock
        self.interval = progress_interval() if interval is None else interval
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, kind, *exc) -> None:
        for t in self.tasks.values():
            if kind is None and t["printed"] and t["last_line"] != t["completed"]:
                self._line(t, final=True)

    def add_task(self, description: str, total: Optional[float] = None, **fields: Any) -> int:
        now = self.clock()
        tid = len(self.tasks)
        self.tasks[tid] = {"description": description, "total": total, "completed": 0, "fields": fields,
                           "start": now, "t0": None, "done0": 0, "last": now, "printed": False, "last_line": None}
        return tid

    def update(self, task: int, *, completed: Optional[float] = None, total: Optional[float] = None,
               description: Optional[str] = None, advance: Optional[float] = None, **fields: Any) -> None:
        t, now = self.tasks[task], self.clock()
        phase = description is not None and description != t["description"]
        if phase or t["t0"] is None:  # the rate counts from the first update of a phase (not the set-up before it)
            t.update(description=description or t["description"], t0=now, done0=completed or 0)
        if total is not None:
            t["total"] = total
        if advance is not None:
            t["completed"] += advance
        if completed is not None:
            if completed < t["done0"]:  # a counter that starts again (a new epoch): so does the rate
                t.update(t0=now, done0=completed)
            t["completed"] = completed
        t["fields"].update(fields)
        if phase or now - t["last"] >= self.interval:
            t["last"] = now
            self._line(t)

    def _line(self, t: dict, final: bool = False) -> None:
        done_, total = t["completed"], t["total"]
        parts = [f"{done_:g}/{total:g}" + (f" ({100 * done_ / total:.0f}%)" if total else "") if total
                 else f"{done_:g}"]
        now = self.clock()
        dt = now - t["t0"] if t["t0"] is not None else 0.0
        rate = (done_ - t["done0"]) / dt if dt > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.1f} {self.unit}/s")
            if total and not final and done_ < total:
                parts.append(f"ETA {_duration((total - done_) / rate)}")
        if final:
            parts.append(f"in {_duration(now - t['start'])}")
        extra = [str(v) for k, v in t["fields"].items() if v not in ("", None) and k != "rate"]
        head = t["description"] + (" " + " ".join(extra[:1]) if extra else "")
        err.print(f"{head}: " + ", ".join(parts + extra[1:]), highlight=False, soft_wrap=True, markup=False)
        t["printed"], t["last_line"] = True, done_


def make_progress(*columns: Any, unit: str = "img", disable: bool = False):
    """A progress display on stderr: rich's bar on a terminal, :class:`PlainProgress` lines elsewhere, nothing
    under --quiet (or where ``disable``: another torchrun rank)."""
    from rich.progress import Progress

    if disable or state.quiet:
        return Progress(*columns, console=err, disable=True)
    if _isatty(sys.stderr):
        return Progress(*columns, console=err, transient=True)
    return PlainProgress(unit)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextmanager
def status(text: str) -> Iterator[None]:
    """A spinner on a terminal while a step runs; nothing elsewhere or under --quiet."""
    if state.quiet or not _isatty(sys.stderr):
        yield
        return
    with err.status(text):
        yield


# ----------------------------------------------------------------------------- one session per verb
class _State:
    quiet = False
    verbose = False
    json = False


state = _State()
_log = logging.getLogger("patchcsra.cli")


class LogLines(logging.Handler):
    """``patchcsra`` log records on stderr: each warning once as ``warning: ...`` (in the CLI's words), debug and
    info lines under --verbose as ``debug: LOGGER: ...``."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not end the run
            msg = str(record.msg)
        if record.levelno >= logging.WARNING:
            msg = cli_message(msg)
            if msg in self.seen:  # each warning once, however often the library says it
                return
            self.seen.add(msg)
            label = "[bold red]error:[/]" if record.levelno >= logging.ERROR else "[bold yellow]warning:[/]"
            (errors if record.levelno >= logging.ERROR else err).print(f"{label} {msg}", highlight=False,
                                                                      soft_wrap=True)
        else:
            err.print(f"[dim]{logging.getLevelName(record.levelno).lower()}: {record.name}:[/] {msg}",
                      highlight=False, soft_wrap=True)


@contextmanager
def cli_session(quiet: bool = False, verbose: bool = False, as_json: bool = False) -> Iterator[None]:
    """What a verb runs inside: --quiet / --verbose applied, ``patchcsra`` logging on stderr, and ``sys.stdout``
    pointed at stderr (library chatter such as torchvision's "Downloading: ..." must not reach the results;
    :data:`out` and :func:`emit_json` keep writing to the real stdout)."""
    from .._version import __version__

    logger = logging.getLogger("patchcsra")
    handler = LogLines(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    saved = (logger.level, logger.propagate, state.quiet, state.verbose, state.json, err.quiet)
    logger.addHandler(handler)
    logger.propagate = False
    if verbose:
        logger.setLevel(logging.DEBUG)
    state.quiet, state.verbose, state.json = quiet and not verbose, verbose, as_json
    err.quiet = state.quiet
    out.file = sys.stdout
    try:
        with redirect_stdout(sys.stderr):
            _log.debug("patchcsra %s, python %s, argv %s", __version__, sys.version.split()[0], sys.argv[1:])
            yield
    finally:
        out.file = None  # type: ignore[assignment]  # back to whatever sys.stdout is
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        state.quiet, state.verbose, state.json, err.quiet = saved[2:]


# ----------------------------------------------------------------------------- timm's spellings
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
JOINED_FLAGS = ("--input-size", "--mean", "--std")  # timm: nargs=3 / nargs='+'; ours: one comma-separated value
AMP_CHOICES = ("auto", "bf16", "fp16", "none")
AMP_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16"}


def habit_argv(args: Sequence[str], has_amp: bool = True) -> list[str]:
    """timm's validate.py spellings in ours, before click parses: ``--input-size 3 32 32`` -> ``--input-size
    3,32,32`` (also ``--mean``/``--std``: the numbers that follow are joined), and a bare ``--amp`` (timm's flag)
    -> ``--amp auto``. Everything after ``--`` is left alone."""
    args, res, i = list(args), [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            res += args[i:]
            break
        if a in JOINED_FLAGS:
            j = i + 1
            while j < len(args) and _NUMBER.match(args[j]):
                j += 1
            if j - i > 2:
                res += [a, ",".join(args[i + 1:j])]
                i = j
                continue
        if a == "--amp" and has_amp and (i + 1 == len(args) or args[i + 1] not in AMP_CHOICES):
            res += ["--amp", "auto"]
            i += 1
            continue
        res.append(a)
        i += 1
    return res


def amp_choice(amp: str, amp_dtype: Optional[str]) -> str:
    """``--amp`` with timm's ``--amp-dtype`` folded in (``--amp --amp-dtype bfloat16`` -> ``bf16``)."""
    if amp_dtype is None:
        return amp
    dt = AMP_DTYPES.get(amp_dtype.lower())
    if dt is None:
        raise PatchCSRAError(f"--amp-dtype {amp_dtype!r}: choose bfloat16 or float16 (bf16, fp16)")
    if amp not in ("auto", dt):
        raise PatchCSRAError(f"--amp {amp} and --amp-dtype {amp_dtype} disagree; give one of them")
    return dt


# ----------------------------------------------------------------------------- help panels, shared flags
# The panel of an option that names none (one table, so every verb files the same option in the same panel).
PANEL_OF = {
    **dict.fromkeys(("data", "split", "eval_split", "data_format", "class_map", "difficult", "skip_bad",
                     "max_pixels", "limit", "class_names", "n_train", "n_test"), DATA),
    **dict.fromkeys(("lam", "temperature", "lams", "temperatures", "fixed_lam", "metric", "folds", "bootstrap",
                     "classes", "top_k", "class_reduce"), GRID),
    **dict.fromkeys(("output", "out_dir", "out_file", "fmt", "force", "as_json", "results_file", "quiet",
                     "work_dir"), OUTPUT),
    **dict.fromkeys(("input_size", "img_size", "crop_pct", "interpolation", "mean", "std"), TRANSFORM),
    **dict.fromkeys(("device", "workers", "batch_size", "amp", "amp_dtype", "channels_last", "verbose", "seed",
                     "retrain", "epochs", "only"), RUN),
    **dict.fromkeys(("arch", "weights", "num_classes", "pretrained", "trust", "ema"), MODEL),
}

PANEL_ORDER = (MODEL, DATA, TRANSFORM, GRID, "Head", "Recipe", "Regression check", OUTPUT, RUN)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="print only errors and the final result line (no "
                                     "progress, warnings or tables)", rich_help_panel=OUTPUT)]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="debug log lines of the patchcsra loggers on stderr",
                                       rich_help_panel=RUN)]


def _shared(quiet: Quiet = False, verbose: Verbose = False) -> None:  # the flags VerbCommand adds to every verb
    pass


class VerbCommand(TyperCommand):
    """Every verb: ``-q/--quiet`` and ``-v/--verbose`` added, each option in a help panel (:data:`PANEL_OF`),
    timm's spellings accepted (:func:`habit_argv`), and the verb run inside :func:`cli_session`."""

    def __init__(self, *args: Any, params: Optional[list] = None, **kwargs: Any) -> None:
        from typer.main import _get_params_name_from_function

        params = list(params or [])
        names = {p.name for p in params}
        params += [p for p in _get_params_name_from_function(_shared)[0] if p.name not in names]
        for p in params:
            if getattr(p, "rich_help_panel", None) is None and p.param_type_name == "option":
                p.rich_help_panel = PANEL_OF.get(p.name)
        # the panels in one order on every verb (arguments first, in their order: the sort is stable)
        params.sort(key=lambda p: -1 if p.param_type_name != "option" else
                    PANEL_ORDER.index(p.rich_help_panel) if p.rich_help_panel in PANEL_ORDER else len(PANEL_ORDER) - 2)
        super().__init__(*args, params=params, **kwargs)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        has_amp = any("--amp" in getattr(p, "opts", ()) for p in self.params)
        return super().parse_args(ctx, habit_argv(args, has_amp))

    def invoke(self, ctx) -> Any:
        quiet, verbose = ctx.params.pop("quiet", False), ctx.params.pop("verbose", False)
        with cli_session(quiet, verbose, bool(ctx.params.get("as_json"))):
            return super().invoke(ctx)


def show(renderable: Any) -> None:
    """A result table on stdout (left out under --quiet, and on stderr under --json, where stdout is the JSON)."""
    if not state.quiet:
        (err if state.json else out).print(renderable)
