"""``patchcsra describe``: the pooling head patchcsra finds in a model (or the record of a patched file)."""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from ..errors import PatchCSRAError
from .patch import warnings_once
from ._common import (SOURCE_HELP, Arch, Ema, NumClasses, Pretrained, Trust, Weights, err, fail, info_table, model_source,
                      out, parse_input_size)


def describe(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W of the probe"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    arch: Arch = None, weights: Weights = None, num_classes: NumClasses = None, pretrained: Pretrained = True,
    trust: Trust = False, ema: Ema = False,
) -> None:
    """Show the pooling head patchcsra finds in a model (or the record of a patched file)."""
    from ..heads.probe import resolve_input_size
    from ..patcher import describe as do_describe

    try:
        size = parse_input_size(input_size)
        with err.status(f"loading {source}"):
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
        sys.stdout.write(json.dumps(record, indent=1) + "\n")
    else:
        out.print(info_table(record, f"{source}"))
