"""Files that are never half-written: atomic files and directories, stale temporaries, JSON.

Every file patchcsra writes goes through here:

* :func:`atomic_path` -- a temporary beside the target, renamed onto it only if the block succeeds.
* :func:`write_bytes`, :func:`write_text`, :func:`write_json`, :func:`torch_save` -- one-call writers on top.
* :func:`atomic_dir` -- a whole directory filled under a temporary name and swapped into place
  (``renameat2(RENAME_EXCHANGE)`` where Linux has it; elsewhere via ``.<name>.old``, restored on the next call).
* :func:`temp_prefix` / :func:`remove_stale_temps` -- temporaries are named by host and pid
  (``.<name>.tmp.<host>-<pid>.``), so the next write into a folder removes what a killed process left.

Errors are :class:`~patchcsra.errors.OutputError` (an existing target without ``force``, a missing folder).

``force`` replaces only what patchcsra wrote: a regular file (never a device, FIFO, folder or socket) and a
directory that holds nothing but the names patchcsra writes there (a run's files, a table's, a training run's).
Without ``force`` the final name is claimed atomically (a no-replace link or rename), so of two processes
writing the same new name one wins and the other fails with one line; neither is overwritten silently.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from .errors import OutputError

__all__ = ["atomic_path", "atomic_dir", "write_bytes", "write_text", "write_json", "torch_save", "json_default",
           "temp_prefix", "remove_stale_temps", "umask", "replaceable_dir", "check_name", "describe_os_error",
           "write_failed", "ensure_space"]

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


def describe_os_error(e: OSError) -> str:
    """``path: what went wrong (ENOSPC)`` for a message of one line."""
    name = errno.errorcode.get(e.errno or 0, "")
    where = e.filename if e.filename is not None else ""
    hint = {errno.ENOSPC: "; free some space or write elsewhere", errno.EDQUOT: "; free some space or write elsewhere",
            errno.EACCES: "; choose a folder you can write", errno.EROFS: "; choose a writable folder",
            errno.ENAMETOOLONG: "; choose a shorter name"}.get(e.errno or 0, "")
    return f"{where}{': ' if where else ''}{e.strerror or e}{f' ({name})' if name else ''}{hint}"


def check_name(path: PathLike) -> None:
    """Refuse, before any work, a final name the file system cannot hold together with its temporary's."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    need = len(temp_prefix(p.name).encode()) + 12  # the temporary's name is the longest one written
    if len(p.name.encode()) > limit or need > limit:
        raise OutputError(f"{p}: the name is {len(p.name.encode())} bytes; this file system allows {limit} "
                          f"(and patchcsra's temporary needs {need - len(p.name.encode())} more); choose a shorter name")


def _claim(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (a hard link is atomic and never replaces)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"{path} was created by another process meanwhile; pass --force to replace it "
                          "or choose another name") from None
    except OSError:  # no hard links here (some network / FUSE file systems): best effort
        if path.exists():
            raise OutputError(f"{path} exists; pass force=True (CLI --force) to overwrite it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextmanager
def atomic_path(path: PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary has a hidden name (:func:`temp_prefix`); a process killed while writing leaves only
    that, and the next write into the same folder removes it (:func:`remove_stale_temps`). ``force``
    replaces a regular file only.

    Raises:
        OutputError: ``path`` exists and ``force`` is False, is not a regular file, or its folder is missing.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass force=True (CLI --force) to overwrite it")
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise OutputError(f"{path} is not a regular file (a device, FIFO or socket); patchcsra replaces only "
                          "files it can have written; choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: folder {parent} does not exist; create it first")
    check_name(path)
    remove_stale_temps(parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.stem), suffix=path.suffix or ".tmp", dir=parent)
    os.close(fd)
    try:
        try:
            yield Path(tmp)
        except OSError as e:
            raise _named(e, path) from None
        os.chmod(tmp, 0o666 & ~umask())
        if force:
            os.replace(tmp, path)
        else:
            _claim(tmp, path)
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
    """``torch.save(obj)`` atomically; a failed write (torch says ``RuntimeError``) becomes an ``OSError``."""
    import torch

    with atomic_path(path, force=force) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            raise write_failed(path, e) from None
    return Path(path)


def ensure_space(path: PathLike, nbytes: int) -> None:
    """Raise ``OSError(ENOSPC)`` naming ``path`` when its folder has less than ``nbytes`` (+ 4 MiB) free.

    For writers that abort the process instead of raising on a full disk (torch's TorchScript and
    ``torch.export`` archive writers terminate in C++): checked before they start.
    """
    parent = Path(path).parent if str(Path(path).parent) else Path(".")
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    need = int(nbytes) + 4 * 2 ** 20
    if free < need:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free // 2 ** 20} MiB free, about "
                      f"{need // 2 ** 20 + 1} MiB needed)", str(path))


def write_failed(path: PathLike, e: BaseException) -> OSError:
    """The ``OSError`` for a write that a library reported in its own way (torch's ``unexpected pos``)."""
    parent = Path(path).parent if str(Path(path).parent) else Path(".")
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        free = -1
    code = errno.ENOSPC if 0 <= free < 16 * 2 ** 20 else errno.EIO
    first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    return OSError(code, f"{os.strerror(code)} ({first}; {max(free, 0) // 2 ** 20} MiB free)", str(path))


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> Optional[int]:
    """Linux ``renameat2(a, b, flags)``: 0 on success, the errno on failure, None where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return 0
    err = ctypes.get_errno()
    return None if err in (errno.ENOSYS, errno.EINVAL) else err


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (``RENAME_EXCHANGE``); False where unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE) == 0


def replaceable_dir(out: PathLike, what: str = "--out", known: Iterable[str] = ()) -> None:
    """Refuse to replace ``out`` unless it is a real directory (not a link) that patchcsra wrote: it holds
    nothing but the names in ``known`` and patchcsra's hidden temporaries (an empty one is fine too)."""
    out = Path(out)
    if out.is_symlink():
        raise OutputError(f"{what} {out} is a symbolic link; patchcsra replaces only folders it wrote; "
                          "give the real folder or another name")
    if not out.is_dir():
        raise OutputError(f"{what} {out} exists and is not a folder; choose another {what}")
    names = set(known)
    foreign = sorted(e.name for e in os.scandir(out) if e.name not in names and ".tmp." not in e.name
                     and not e.name.endswith(".old"))
    if foreign:
        raise OutputError(f"{what} {out} holds files patchcsra did not write ({', '.join(foreign[:3])}"
                          f"{' ...' if len(foreign) > 3 else ''}); --force replaces only patchcsra's own output "
                          f"folders: choose another {what}")


def _claim_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to the new name ``out`` unless another process took it meanwhile (``RENAME_NOREPLACE``)."""
    res = _renameat2(tmp, out, _RENAME_NOREPLACE)
    if res == 0:
        return
    if res in (errno.EEXIST, errno.ENOTEMPTY):
        raise OutputError(f"{out} was created by another process meanwhile; pass --force to replace it or "
                          "choose another --out")
    if res is None and not out.exists():  # no renameat2 here: a plain rename (it may replace an empty folder)
        os.replace(tmp, out)
        return
    raise OSError(res or errno.EEXIST, os.strerror(res or errno.EEXIST), str(out))


def atomic_dir(out: PathLike, fill: Callable[[Path], None], *, force: bool = False,
               known: Iterable[str] = ()) -> Path:
    """Create the directory ``out`` by ``fill(tmp)`` into a temporary sibling, then renaming it into place.

    An existing ``out`` is swapped with the filled sibling in one atomic step where the system allows it,
    so a process killed at any point leaves either the old complete directory or the new one. Elsewhere
    the old one is first moved aside to ``.<name>.old`` (and restored from there by the next call if the
    process died in between). A killed write leaves only its hidden temporary, which the next call removes.

    Raises:
        OutputError: ``out`` exists and ``force`` is False, or it holds other names than ``known``
            (:func:`replaceable_dir`): patchcsra replaces only its own output folders.
    """
    out = Path(out)
    old = out.with_name(f".{out.name}.old")
    if not out.exists() and old.is_dir():  # a run killed between the two renames below: bring it back
        os.replace(old, out)
    if out.exists() and not force:
        raise OutputError(f"{out} exists; pass --force to overwrite it (or choose another --out)")
    if out.exists() or out.is_symlink():
        replaceable_dir(out, known=known)
    check_name(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)  # what a killed earlier write left
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
    except OSError as e:
        raise _named(e, out) from None
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~umask())
        if not force or not out.exists():  # a new name: claim it, never replace what another process made
            _claim_dir(tmp, out)
        elif out.is_dir() and _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        elif out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _named(e, out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _named(e: OSError, path: PathLike) -> OSError:
    """``e`` with ``path`` as its file name when the failing call did not say which file it was."""
    if e.filename is not None or e.errno is None:
        return e
    return OSError(e.errno, e.strerror, str(path))
