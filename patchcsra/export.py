"""Write a patched model as a file that loads in plain PyTorch, without patchcsra installed.

* ``.pt2`` -> ``torch.export`` archive (dynamic batch size): ``torch.export.load(f).module()``.
* anything else (``.pt``, ``.ts``, ...) -> TorchScript: ``torch.jit.load(f)``.

Both carry ``patchcsra.json`` (λ, T, source, head facts, versions) as an extra file, and λ as a
buffer ``_lam`` that can be changed after loading (``m._lam.fill_(0.1)``). Files are written to a
temporary name in the target folder and renamed, so a failed write leaves nothing behind; an
existing file is only replaced with ``force=True``.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from ._io import atomic_path, ensure_space
from .errors import ExportError
from .heads.base import allclose_logits, probe_input
from .sources import META_FILE
from .patcher import PatchedClassifier, temperature_json

__all__ = ["save_patched", "save_module", "export_format", "patched_metadata"]

FORMATS = ("torchscript", "export")


def export_format(path: Union[str, os.PathLike], fmt: Optional[str] = None) -> str:
    """``'export'`` for ``.pt2`` files, ``'torchscript'`` otherwise, unless ``fmt`` says which."""
    if fmt in (None, "auto"):
        return "export" if Path(path).suffix.lower() == ".pt2" else "torchscript"
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r}: choose one of auto, {', '.join(FORMATS)}")
    return fmt


def patched_metadata(patched: PatchedClassifier, source: Optional[dict] = None, fmt: str = "") -> dict:
    from ._version import __version__

    info = patched.info
    return {
        "patchcsra": __version__,
        "torch": torch.__version__,
        "format": fmt,
        "lam": patched.lam,
        "temperature": temperature_json(patched.temperature),
        "formula": "logits = model(x) + lam * y_att(T), y_att(inf) = max_k head(x_k)",
        "source": dict(source or {}),
        "input_size": list(info.probe_input_size),
        "head": info.as_dict(),
    }


def save_patched(patched: PatchedClassifier, path: Union[str, os.PathLike], *, fmt: Optional[str] = None,
                 source: Optional[dict] = None, force: bool = False) -> Path:
    """Write ``patched`` to ``path`` as TorchScript or a ``torch.export`` archive; returns the path.

    The written model is checked against ``patched`` on a batch of another size before it is
    renamed into place.
    """
    fmt = export_format(path, fmt)
    return save_module(patched, path, patched_metadata(patched, source, fmt), patched.info.probe_input_size,
                       fmt=fmt, force=force)


def save_module(module: torch.nn.Module, path: Union[str, os.PathLike], meta: dict, input_size, *,
                fmt: Optional[str] = None, force: bool = False) -> Path:
    """Any classifier ``(B, C, H, W) -> (B, K)`` as TorchScript / ``.pt2`` with ``meta`` as ``patchcsra.json``.

    Traced/exported on a probe of ``input_size``, checked on a batch of another size, written atomically.
    """
    fmt = export_format(path, fmt)
    size = tuple(input_size)
    x = probe_input(size, batch=2)
    x_check = probe_input(size, batch=3) * 0.5
    module = module.eval()
    with torch.no_grad():
        expected = module(x_check)
    extra = {META_FILE: json.dumps(meta, indent=1, default=str)}
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))
    ensure_space(path, int(weights * 1.1) + len(extra[META_FILE]))  # torch's archive writers abort on a full disk
    with atomic_path(path, force=force) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            try:
                ts = torch.jit.trace(module, x, check_trace=False)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"{path}: TorchScript tracing failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160] if str(e) else ''}); try a .pt2 output") from e
            got = ts(x_check)
            torch.jit.save(ts, str(tmp), _extra_files=extra)
        else:
            batch = torch.export.Dim("batch", min=1, max=65536)
            try:
                ep = torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"{path}: torch.export failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160] if str(e) else ''}); try a .pt (TorchScript) output") from e
            got = ep.module()(x_check)
            torch.export.save(ep, str(tmp), extra_files=extra)
        if not allclose_logits(got, expected, rel=1e-4):
            raise ExportError(f"{path}: the {fmt} model does not reproduce the in-memory model on a batch of "
                              "another size; try the other format")
    return Path(path)
