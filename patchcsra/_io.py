"""Files that are never half-written: atomic files and directories, stale temporaries, JSON.

Every file patchcsra writes goes through here:

* :func:`atomic_path` -- a temporary beside the target, renamed onto it only if the block succeeds.
* :func:`write_bytes`, :func:`write_text`, :func:`write_json`, :func:`torch_save` -- one-call writers on top.
* :func:`atomic_dir` -- a whole directory filled under a temporary name and swapped into place
  (``renameat2(RENAME_EXCHANGE)`` where Linux has it; elsewhere via ``.<name>.old``, restored on the next call).
* :func:`temp_prefix` / :func:`remove_stale_temps` -- temporaries are named by host and pid
  (``.<name>.tmp.<host>-<pid>.``), so the next write into a folder removes what a killed process left.

Errors are :class:`~patchcsra.errors.OutputError` (an existing target without ``force``, a missing folder).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from .errors import OutputError

__all__ = ["atomic_path", "atomic_dir", "write_bytes", "write_text", "write_json", "torch_save", "json_default",
           "temp_prefix", "remove_stale_temps", "umask"]

PathLike = Union[str, os.PathLike]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def temp_prefix(name: str) -> str:
    """Hidden name prefix of a temporary for ``name``: ``.<name>.tmp.<host>-<pid>.`` (see :func:`remove_stale_temps`)."""
    return f".{name}.tmp.{_host()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temps(folder: PathLike) -> list[Path]:
    """Delete the temporaries (files or folders named by :func:`temp_prefix`) in ``folder`` that a process
    of this host left behind when it died (killed while writing); live writers' ones are kept."""
    pattern = re.compile(rf"^\..+\.tmp\.{re.escape(_host())}-(\d+)\.")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for e in entries:
        m = pattern.match(e.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
        except OSError:
            continue
        removed.append(Path(e.path))
    return removed


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    m = os.umask(0)
    os.umask(m)
    return m


@contextmanager
def atomic_path(path: PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary has a hidden name (:func:`temp_prefix`); a process killed while writing leaves only
    that, and the next write into the same folder removes it (:func:`remove_stale_temps`).

    Raises:
        OutputError: ``path`` exists and ``force`` is False, is a directory, or its folder is missing.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass force=True (CLI --force) to overwrite it")
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: folder {parent} does not exist; create it first")
    remove_stale_temps(parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.stem), suffix=path.suffix or ".tmp", dir=parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: PathLike, data: bytes, *, force: bool = True) -> Path:
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str, *, force: bool = True) -> Path:
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy / torch scalars and arrays; anything else as ``str``."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_json(path: PathLike, obj: Any, *, force: bool = True, indent: int = 1, sort_keys: bool = False) -> Path:
    """``obj`` as JSON (numpy / torch values converted by :func:`json_default`) plus a newline, atomically."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=json_default) + "\n",
                      force=force)


def torch_save(obj: Any, path: PathLike, *, force: bool = True) -> Path:
    """``torch.save(obj)`` atomically."""
    import torch

    with atomic_path(path, force=force) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def atomic_dir(out: PathLike, fill: Callable[[Path], None], *, force: bool = False) -> Path:
    """Create the directory ``out`` by ``fill(tmp)`` into a temporary sibling, then renaming it into place.

    An existing ``out`` is swapped with the filled sibling in one atomic step where the system allows it,
    so a process killed at any point leaves either the old complete directory or the new one. Elsewhere
    the old one is first moved aside to ``.<name>.old`` (and restored from there by the next call if the
    process died in between). A killed write leaves only its hidden temporary, which the next call removes.

    Raises:
        OutputError: ``out`` exists and ``force`` is False.
    """
    out = Path(out)
    old = out.with_name(f".{out.name}.old")
    if not out.exists() and old.is_dir():  # a run killed between the two renames below: bring it back
        os.replace(old, out)
    if out.exists() and not force:
        raise OutputError(f"{out} exists; pass --force to overwrite it (or choose another --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)  # what a killed earlier write left
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~umask())
        if out.is_dir() and _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        elif out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
