"""What produced a figure: package versions, CPU kernel set, threads and the command line.

Written into every ``summary.json`` (``environment``) and every bench result, so that a moved score can
be explained: :func:`environment_diff` lists what differs between two records, and ``patchcsra bench
--check`` prints it beside a failing score ("pillow 12.0.0 -> 13.0.0").

* :data:`FIGURE_PACKAGES` -- the installed distributions whose version can move a figure.
* :func:`kernel_set` -- the CPU kernels torch dispatches to: ATen's capability, oneDNN's ISA (from the CPU
  flags, capped by ``ONEDNN_MAX_CPU_ISA``), MKL's version string, and the environment variables that
  change either.
* :func:`environment` -- all of the above plus python, machine, threads and ``command``.
"""
from __future__ import annotations

import functools
import os
import platform
import shlex
import sys
from importlib import metadata
from typing import Any, Optional

__all__ = ["FIGURE_PACKAGES", "KERNEL_ENV", "package_versions", "kernel_set", "environment", "environment_diff"]

#: distributions that can move a figure (scores, canvases, metrics, plots) besides torch, torchvision and
#: timm (which :func:`environment` records at its top level, torch with its build tag, e.g. ``+cu130``).
FIGURE_PACKAGES = ("numpy", "scipy", "scikit-learn", "pandas", "pillow", "safetensors", "matplotlib",
                   "huggingface-hub")
#: environment variables that change which CPU kernels torch runs, or how many threads.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
              "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE")

# oneDNN's ISA ladder, best first: (name as oneDNN's verbose mode prints it, CPU flags it needs)
_ONEDNN_ISAS = (
    ("avx512_core_amx", ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512bw")),
    ("avx512_core_fp16", ("avx512_fp16", "avx512_bf16", "avx512_vnni", "avx512bw")),
    ("avx512_core_bf16", ("avx512_bf16", "avx512_vnni", "avx512bw", "avx512vl", "avx512dq")),
    ("avx512_core_vnni", ("avx512_vnni", "avx512bw", "avx512vl", "avx512dq")),
    ("avx512_core", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    ("avx2_vnni", ("avx_vnni", "avx2", "fma")),
    ("avx2", ("avx2", "fma")),
    ("avx", ("avx",)),
    ("sse41", ("sse4_1",)),
)


def package_versions(names: tuple[str, ...] = FIGURE_PACKAGES) -> dict[str, Optional[str]]:
    """``{distribution: version}`` for ``names`` (None when not installed)."""
    out: dict[str, Optional[str]] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


@functools.lru_cache(maxsize=1)
def _cpu() -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags (``/proc/cpuinfo``; elsewhere ``platform.processor()``)."""
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:  # the first processor's block is enough
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
                elif not key and flags:
                    break
    except OSError:
        pass
    return name, flags


def _onednn_isa(flags: frozenset[str]) -> Optional[str]:
    """The ISA oneDNN dispatches to on a CPU with ``flags``, capped by ``ONEDNN_MAX_CPU_ISA``."""
    names = [n for n, _ in _ONEDNN_ISAS]
    best = next((n for n, need in _ONEDNN_ISAS if all(f in flags for f in need)), None)
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().lower()
    if best is None or cap in ("", "all"):
        return best
    if cap in names and names.index(cap) > names.index(best):
        return cap
    return best


def _mkl_version() -> Optional[str]:
    """MKL's version string from the loaded torch library (None without MKL)."""
    import ctypes

    import torch

    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        fn = ctypes.CDLL(lib).MKL_Get_Version_String
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(256)
    fn(buf, len(buf))
    return buf.value.decode(errors="replace").strip() or None


@functools.lru_cache(maxsize=1)
def _static_kernels() -> dict[str, Any]:
    import torch

    name, flags = _cpu()
    return {"cpu": name, "aten": torch.backends.cpu.get_cpu_capability(), "onednn_isa": _onednn_isa(flags),
            "mkl": _mkl_version(), "mkldnn": bool(torch.backends.mkldnn.is_available())}


def kernel_set() -> dict[str, Any]:
    """The CPU kernels torch runs here: ``cpu``, ``aten`` capability, ``onednn_isa``, ``mkl``, and ``env``
    (the :data:`KERNEL_ENV` variables that are set)."""
    env = {k: os.environ[k] for k in KERNEL_ENV if os.environ.get(k)}
    return {**_static_kernels(), "env": env}


def environment(*, command: Optional[list[str]] = None) -> dict[str, Any]:
    """Everything that can move a figure, as one JSON-ready record.

    Keys: ``patchcsra``, ``torch`` (``torch.__version__``), ``torchvision``, ``timm``, ``python``, ``machine``,
    ``threads`` (torch intra-op), ``packages`` (:func:`package_versions`), ``kernels`` (:func:`kernel_set`),
    ``command`` (the exact command line, ``sys.argv`` shell-quoted: ``shlex.split`` gives the list back).
    """
    import torch

    from ._version import __version__

    argv = sys.argv if command is None else command
    top = package_versions(("torchvision", "timm"))
    return {"patchcsra": __version__, "torch": torch.__version__, **top,
            "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "packages": package_versions(), "kernels": kernel_set(),
            "command": shlex.join(str(a) for a in argv)}


def _flatten(rec: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


#: keys of an environment record that never move a figure (and so are left out of a diff)
_NOT_FIGURES = ("command", "patchcsra")


def environment_diff(expected: Optional[dict], got: Optional[dict]) -> list[tuple[str, Any, Any]]:
    """``[(key, expected value, got value)]`` for every figure-moving fact that differs.

    Keys are dotted (``packages.pillow``, ``kernels.onednn_isa``); facts only one side recorded are listed
    with ``None`` on the other side. The command line and patchcsra's own version are not compared.
    """
    a, b = _flatten(expected or {}), _flatten(got or {})
    out = []
    for k in sorted(set(a) | set(b)):
        if k.split(".")[0] in _NOT_FIGURES:
            continue
        if a.get(k) != b.get(k):
            out.append((k, a.get(k), b.get(k)))
    return out
