"""Write a patched model as a file that runs without patchcsra installed, at any input size the model accepts.

* ``.pt2`` -> ``torch.export`` archive: ``torch.export.load(f).module()``.
* ``.onnx`` -> ONNX (``torch.onnx.export``, dynamo), checked with onnxruntime; needs the extra
  ``pip install 'patchcsra[onnx]'``. Its record is ``metadata_props['patchcsra.json']``, λ the initializer ``_lam``.
* anything else (``.pt``, ``.ts``, ...) -> TorchScript: ``torch.jit.load(f)`` (traced; scripted when
  tracing bakes the input size into the graph).

Batch, height and width are dynamic (non-square too) where the model allows: the file is checked against the
in-memory model at the probe size with another batch size and at two other sizes the in-memory model accepts
(non-square first), within :data:`TOLERANCE`, before it is renamed into place; the sizes checked and whether
height/width are dynamic are recorded in ``patchcsra.json`` (``checked_sizes``, ``dynamic``). A model that
accepts only its own size, or whose sizes ``torch.export`` cannot keep symbolic, is written at that size.

TorchScript and ``.pt2`` carry ``patchcsra.json`` (λ, T, source, head facts, versions) as an extra file, and λ
as a buffer ``_lam`` that can be changed after loading (``m._lam.fill_(0.1)``). Files are written to a
temporary name in the target folder and renamed, so a failed write leaves nothing behind; an existing file is
only replaced with ``force=True``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ._io import atomic_path, ensure_space
from .errors import ExportError
from .heads.base import allclose_logits, probe_input
from .sources import META_FILE
from .patcher import PatchedClassifier, temperature_json

__all__ = ["save_patched", "save_module", "export_format", "patched_metadata", "check_sizes", "read_onnx_metadata",
           "TOLERANCE"]

_logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "export", "onnx")
#: parity of a written file with the in-memory model, ``max|a-b| <= tol * max(1, max|b|)`` (measured in
#: benchmarks/export_parity.py; ONNX Runtime's kernels reorder float sums)
TOLERANCE = {"export": 1e-5, "torchscript": 1e-5, "onnx": 1e-4}
ONNX_EXTRA = "pip install 'patchcsra[onnx]' (onnx, onnxruntime, onnxscript)"

Size = tuple[int, int, int]


def export_format(path: Union[str, os.PathLike], fmt: Optional[str] = None) -> str:
    """``'export'`` for ``.pt2``, ``'onnx'`` for ``.onnx``, ``'torchscript'`` otherwise, unless ``fmt`` says which."""
    if fmt in (None, "auto"):
        suffix = Path(path).suffix.lower()
        return {".pt2": "export", ".onnx": "onnx"}.get(suffix, "torchscript")
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
        "probe_guessed": bool(getattr(patched, "probe_guessed", False)),
        "head": info.as_dict(),
    }


def save_patched(patched: PatchedClassifier, path: Union[str, os.PathLike], *, fmt: Optional[str] = None,
                 source: Optional[dict] = None, force: bool = False) -> Path:
    """Write ``patched`` to ``path`` as TorchScript, a ``torch.export`` archive or ONNX; returns the path.

    The written file is checked against ``patched`` at several sizes (see module docstring) before it is
    renamed into place.
    """
    fmt = export_format(path, fmt)
    info = patched.info
    stride = None
    if info.grid and info.probe_input_size[1] % info.grid[0] == 0:
        stride = max(1, info.probe_input_size[1] // info.grid[0])
    return save_module(patched, path, patched_metadata(patched, source, fmt), info.probe_input_size,
                       fmt=fmt, force=force, stride=stride)


# ----------------------------------------------------------------------------- sizes to check
def _accepts(module: torch.nn.Module, size: Size) -> bool:
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.fx prints a failing graph's traceback
            y = module(probe_input(size, batch=1))
    except Exception:  # noqa: BLE001 - any failure: the model does not take this size
        return False
    return isinstance(y, Tensor) and y.ndim == 2


def check_sizes(module: torch.nn.Module, input_size: Sequence[int], stride: Optional[int] = None) -> list[Size]:
    """The probe ``(C, H, W)`` first, then up to two other sizes ``module`` itself accepts: non-square ones
    about 0.75x / 1.25x the probe (multiples of ``stride``, default 32, or 4 for probes under 128), else squares."""
    c, h, w = (int(v) for v in input_size)
    q = int(stride) if stride else (32 if min(h, w) >= 128 else 4)

    def rnd(v: float) -> int:
        return max(q, int(round(v / q)) * q)

    def pair(a: int, b: int) -> tuple[int, int]:
        return (a, b + q) if a == b else (a, b)

    small, large = pair(rnd(0.75 * h), rnd(0.85 * w)), pair(rnd(1.25 * h), rnd(1.15 * w))
    cands = [small, large, (small[0], small[0]), (large[0], large[0])]
    out: list[Size] = [(c, h, w)]
    with torch.no_grad():
        for hw in dict.fromkeys(cands):
            s = (c, *hw)
            if len(out) < 3 and s not in out and _accepts(module, s):
                out.append(s)  # type: ignore[arg-type]
    return out


# ----------------------------------------------------------------------------- writing
def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:160]}" if s else type(e).__name__


def _max_rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) / max(1.0, float(b.abs().max()))


class _Attempt:
    """One way of writing the file: ``write(tmp, meta)`` -> a runner ``x -> logits`` read back from ``tmp``."""

    def __init__(self, name: str, cases: list[tuple[int, Size]], write: Callable[[Path, dict], Callable]) -> None:
        self.name, self.cases, self.write = name, cases, write


def _dynamic_hw(ep) -> tuple[bool, bool]:
    """Whether an exported program kept the input's height / width symbolic."""
    users = set(ep.graph_signature.user_inputs)
    ph = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name in users)
    shape = ph.meta["val"].shape
    return not isinstance(shape[2], int), not isinstance(shape[3], int)


def _dims(dynamic_hw: bool) -> tuple[dict, ...]:
    from torch.export import Dim

    d: dict = {0: Dim("batch", min=1, max=65536)}
    if dynamic_hw:
        d.update({2: Dim.AUTO, 3: Dim.AUTO})
    return (d,)


def save_module(module: torch.nn.Module, path: Union[str, os.PathLike], meta: dict, input_size, *,
                fmt: Optional[str] = None, force: bool = False, stride: Optional[int] = None) -> Path:
    """Any classifier ``(B, C, H, W) -> (B, K)`` as TorchScript / ``.pt2`` / ONNX with ``meta`` as ``patchcsra.json``.

    Exported on a probe ``(2, *input_size)`` with dynamic batch, height and width where the model allows;
    checked against ``module`` at :func:`check_sizes` (the probe at batch 3, the others at batch 1) within
    :data:`TOLERANCE`; written atomically.

    Raises:
        ExportError: no way of writing ``fmt`` reproduces ``module`` (message names the file, the size and the
            measured error, and the format to try instead), or ``.onnx`` without the onnx extra.
    """
    fmt = export_format(path, fmt)
    size: Size = tuple(int(v) for v in input_size)  # type: ignore[assignment]
    if fmt == "onnx":
        _onnx_modules(path)
    module = module.eval()
    x = probe_input(size, batch=2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sizes = check_sizes(module, size, stride)
        every = [(3, size)] + [(1, s) for s in sizes[1:]]
        fixed = [(3, size), (1, size)]
        expected = {(b, s): module(probe_input(s, batch=b) * 0.5) for b, s in every + fixed}
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, Tensor))
    ensure_space(path, int(weights * 1.1) + len(json.dumps(meta, default=str)) + 2 ** 16)
    tol = TOLERANCE[fmt]
    attempts = _attempts(fmt, module, x, path, every, fixed)
    failures: list[str] = []
    with atomic_path(path, force=force) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for att in attempts:
            try:
                run = att.write(tmp, meta)
            except _Refused as e:
                failures.append(f"{att.name}: {e}")
                continue
            bad = _first_mismatch(run, att.cases, expected, tol)
            if bad is None:
                done = att
                break
            failures.append(f"{att.name}: {bad}")
        else:
            raise ExportError(f"{path}: the {fmt} file does not reproduce the in-memory model "
                              f"({'; '.join(failures)}); {_ALTERNATIVE[fmt]}")
    if len(sizes) > 1 and all(s == size for _, s in done.cases):
        _logger.warning("%s: %s keeps the input size fixed at %s (%s); the model itself accepts other sizes, "
                        "e.g. %s: write a .pt (TorchScript) file for those", path, fmt, "x".join(map(str, size)),
                        failures[0] if failures else "", "x".join(map(str, sizes[1])))
    return Path(path)


_ALTERNATIVE = {"torchscript": "write a .pt2 (torch.export) file instead",
                "export": "write a .pt (TorchScript) file instead", "onnx": "write a .pt2 or .pt file instead"}


class _Refused(Exception):
    """A way of writing the file that does not apply or failed before anything could be checked."""


def _first_mismatch(run: Callable, cases, expected, tol: float) -> Optional[str]:
    for b, s in cases:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                got = run(probe_input(s, batch=b) * 0.5)
        except Exception as e:  # noqa: BLE001
            return f"fails at {b}x{'x'.join(map(str, s))} ({_first_line(e)})"
        want = expected[(b, s)]
        if not allclose_logits(got, want, rel=tol):
            return (f"max relative error {_max_rel(got, want) if got.shape == want.shape else float('inf'):.2e} > "
                    f"{tol:g} at {b}x{'x'.join(map(str, s))}")
    return None


def _with_sizes(meta: dict, cases, dyn_hw: tuple[bool, bool]) -> dict:
    """``meta`` plus the sizes the file is checked at; height/width count as dynamic only where checked."""
    size = cases[0][1]
    dyn_hw = (dyn_hw[0] and any(s[1] != size[1] for _, s in cases), dyn_hw[1] and any(s[2] != size[2] for _, s in cases))
    return {**meta, "checked_sizes": [list(s) for s in dict.fromkeys(s for _, s in cases)],
            "dynamic": {"batch": True, "height": dyn_hw[0], "width": dyn_hw[1]}}


def _hw_checked(cases, size: Size) -> tuple[bool, bool]:
    return any(s[1] != size[1] for _, s in cases), any(s[2] != size[2] for _, s in cases)


def _attempts(fmt: str, module, x: Tensor, path, every, fixed) -> list[_Attempt]:
    size = tuple(x.shape[1:])
    if fmt == "torchscript":
        def traced(tmp: Path, meta: dict):
            try:
                ts = torch.jit.trace(module, x, check_trace=False)
            except Exception as e:  # noqa: BLE001
                raise _Refused(f"tracing failed ({_first_line(e)})") from e
            return _save_ts(ts, tmp, _with_sizes(meta, every, _hw_checked(every, size)))

        def scripted(tmp: Path, meta: dict):
            from ._script import scriptable

            m = scriptable(module)
            if m is None:
                raise _Refused("torch.jit.script applies to graph-split heads only")
            try:
                ts = torch.jit.script(m.eval())
            except Exception as e:  # noqa: BLE001
                raise _Refused(f"torch.jit.script failed ({_first_line(e)})") from e
            return _save_ts(ts, tmp, _with_sizes(meta, every, _hw_checked(every, size)))

        return [_Attempt("traced", every, traced), _Attempt("scripted", every, scripted)]
    writer = _export_pt2 if fmt == "export" else _export_onnx
    return [_Attempt("dynamic", every, lambda tmp, meta: writer(module, x, tmp, meta, every, True)),
            _Attempt("fixed size", fixed, lambda tmp, meta: writer(module, x, tmp, meta, fixed, False))]


def _save_ts(ts, tmp: Path, meta: dict):
    torch.jit.save(ts, str(tmp), _extra_files={META_FILE: json.dumps(meta, indent=1, default=str)})
    return torch.jit.load(str(tmp), map_location="cpu")


def _export(module, x: Tensor, dynamic_hw: bool):
    try:
        ep = torch.export.export(module, (x,), dynamic_shapes=_dims(dynamic_hw), strict=False)
    except Exception as e:  # noqa: BLE001
        raise _Refused(f"torch.export failed ({_first_line(e)})") from e
    hw = _dynamic_hw(ep)
    if dynamic_hw and not all(hw):
        raise _Refused("torch.export specialised height/width to the probe size")
    return ep, hw


def _export_pt2(module, x: Tensor, tmp: Path, meta: dict, cases, dynamic_hw: bool):
    ep, hw = _export(module, x, dynamic_hw)
    extra = {META_FILE: json.dumps(_with_sizes(meta, cases, hw), indent=1, default=str)}
    torch.export.save(ep, str(tmp), extra_files=extra)
    return torch.export.load(str(tmp)).module()


def _onnx_modules(path):
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx's dynamo exporter needs it
    except ImportError as e:
        raise ExportError(f"{path}: writing .onnx needs the onnx extra ({e.name or 'onnx'} is missing): "
                          f"{ONNX_EXTRA}") from None
    return onnx, onnxruntime


def _export_onnx(module, x: Tensor, tmp: Path, meta: dict, cases, dynamic_hw: bool):
    onnx, ort = _onnx_modules(tmp)
    hw = (dynamic_hw, dynamic_hw)
    try:
        prog = torch.onnx.export(module, (x,), None, dynamo=True, optimize=False, verbose=False,
                                 dynamic_shapes=_dims(dynamic_hw), input_names=["x"], output_names=["logits"])
        if dynamic_hw:
            hw = _dynamic_hw(prog.exported_program)
            if not all(hw):
                raise _Refused("torch.export specialised height/width to the probe size")
        proto = prog.model_proto
    except _Refused:
        raise
    except Exception as e:  # noqa: BLE001
        raise _Refused(f"torch.onnx.export failed ({_first_line(e)})") from e
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_FILE, json.dumps(_with_sizes(meta, cases, hw), indent=1, default=str)
    onnx.save(proto, str(tmp))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(str(tmp), sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(xx: Tensor) -> Tensor:
        return torch.from_numpy(sess.run(None, {name: xx.numpy()})[0])

    return run


def read_onnx_metadata(path: Union[str, os.PathLike]) -> Optional[dict]:
    """The ``patchcsra.json`` record of an ``.onnx`` file patchcsra wrote (None when it has none)."""
    onnx, _ = _onnx_modules(path)
    model = onnx.load(str(path), load_external_data=False)
    raw = next((p.value for p in model.metadata_props if p.key == META_FILE), None)
    return json.loads(raw) if raw else None
