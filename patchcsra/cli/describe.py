"""``patchcsra describe``: the pooling head patchcsra finds in a model (or the record of a patched file)."""
from __future__ import annotations

from typing import Optional

import typer

from ..errors import PatchCSRAError
from .patch import warnings_once
from ._common import (SOURCE_HELP, Arch, Ema, NumClasses, Pretrained, Trust, Weights, emit_json, fail, info_table,
                      model_source, out, parse_input_size, status)


def describe(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    input_size: Optional[str] = typer.Option(None, "--input-size", metavar="C,H,W", help="size of the probe, e.g. "
                                             "3,224,224 or 3 224 224 (default: model config, else 3,224,224)",
                                             rich_help_panel="Preprocessing"),
    as_json: bool = typer.Option(False, "--json", help="print JSON on stdout instead of a table (nothing else goes "
                                 "to stdout)", rich_help_panel="Output"),
    arch: Arch = None, weights: Weights = None, num_classes: NumClasses = None, pretrained: Pretrained = True,
    trust: Trust = False, ema: Ema = False,
) -> None:
    """Show the pooling head patchcsra finds in a model (or the record of a patched file)."""
    from ..heads.probe import resolve_input_size
    from ..patcher import describe as do_describe

    try:
        size = parse_input_size(input_size)
        with status(f"loading {source}"):
            model = model_source(source, arch, weights, num_classes, pretrained, trust, ema).load()
        meta = getattr(model, "patchcsra_meta", None)
        if isinstance(meta, dict) and meta.get("kind") == "trained-head":  # a train-head model.pt: its record
            record = {"trained_head": True, **meta.get("head", {}),
                      "best_epoch": meta.get("train", {}).get("best_epoch"),
                      "input_size": (meta.get("transform") or {}).get("input_size")}
            _show(meta if as_json else record, as_json, source)
            return
        guessed = False
        if not meta:
            with warnings_once():
                size, guessed = resolve_input_size(model, size)
        info = {**do_describe(model, input_size=size).as_dict(), "probe_guessed": guessed}
    except (PatchCSRAError, OSError) as e:
        fail(e)
    record = {"patched": bool(meta), **({k: meta[k] for k in ("lam", "temperature", "source")} if meta else {}),
              **info}
    _show(record, as_json, source)


def _show(record: dict, as_json: bool, source: str) -> None:
    if as_json:
        emit_json(record)
    else:
        out.print(info_table(record, f"{source}"))  # the result itself: kept by --quiet
