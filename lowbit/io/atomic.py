"""Atomic writes: build the output in a temporary sibling directory, rename it into place when complete.

An interrupted or failed write leaves nothing behind (the temporary directory is removed), and an existing
output is replaced only when asked to, and only once the new one is complete.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lowbit.errors import LowbitError


def check_output_dir(target: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless overwrite; call before long work so nothing is wasted."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise LowbitError(f"output {str(target)!r} exists and is not a directory; choose another --out.")
    if target.exists() and not overwrite:
        raise LowbitError(f"output directory {str(target)!r} already exists; pass --overwrite to replace it, or choose "
                          f"another --out.")
    return target


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` when the block completes without an exception."""
    target = check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        _default_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def check_writable_file(target: str | Path, flag: str) -> Path:
    """Refuse, before any work, a file output (`flag` names the option) that could not be written: a directory in
    its place, a file where a folder of its path should be, or a folder that cannot be written. Nothing is left."""
    target = Path(target).expanduser()
    if target.is_dir():
        raise LowbitError(f"{flag} {str(target)!r} is a directory; give a file name (e.g. {str(target / 'out')!r}).")
    _probe_nearest_folder(target.parent, target, flag)
    return target


def check_writable_folder(target: str | Path, flag: str) -> Path:
    """The same for an output folder that may already exist (a resumable one): it, or the nearest folder above it
    that exists, must be a folder this process can write in."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise LowbitError(f"{flag} {str(target)!r} is a file, not a folder. Choose another path.")
    _probe_nearest_folder(target, target, flag)
    return target


def _probe_nearest_folder(start: Path, target: Path, flag: str) -> None:
    """Create and remove a file in `start` or the nearest folder above it that exists (`target`, `flag`: for the
    message)."""
    parent = start
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LowbitError(f"cannot write {flag} {str(target)!r}: {str(parent)!r} is a file, not a folder. Choose "
                          f"another path.")
    try:  # the real test (permission bits do not bind root): create and remove a probe file
        fd, probe = tempfile.mkstemp(prefix=".lowbit-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LowbitError(f"cannot write {flag} {str(target)!r}: {str(parent)!r} is not a writable folder "
                          f"({e.strerror}). Choose another path.") from None


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` that replaces it when the block completes without an exception."""
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_permissions(directory: Path) -> None:
    """mkdtemp (and some writers) create private files; give the result the user's usual permissions."""
    umask = _umask()
    os.chmod(directory, 0o777 & ~umask)
    for p in directory.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
         errno.EFBIG: "a file grew past the size this process may write"}


def disk_full(e: BaseException) -> str | None:
    """Why a write failed for lack of room (an OSError, or safetensors' error quoting the OS's), else None."""
    if isinstance(e, OSError) and e.errno in _FULL:
        return _FULL[e.errno]
    found = re.search(r"os error (\d+)", str(e))
    return _FULL.get(int(found.group(1))) if found else None


def free_space(path: str | Path) -> str:
    """The free space on the disk holding `path` (or its nearest existing parent), in words."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return f"{shutil.disk_usage(path).free / 1e9:.1f} GB free there now"
