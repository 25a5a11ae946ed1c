"""File-system helpers shared by the training loop's outputs and the C++ build folder: nothing is written
through a symbolic link, and a file is replaced whole (a temporary beside it, fsynced, then renamed)."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# Temporaries are ``.m2d-tmp.<name>.<tempfile's 8 random characters>.tmp``: only such names are ever removed.
TEMPORARY_PREFIX = ".m2d-tmp."
TEMPORARY_SUFFIX = ".tmp"


def temporary_name(path: Path) -> dict[str, str]:
    """``tempfile`` arguments for a temporary beside ``path``: ``.m2d-tmp.<name>.<random>.tmp``."""
    return {"prefix": f"{TEMPORARY_PREFIX}{path.name}.", "suffix": TEMPORARY_SUFFIX}


def default_mode(directory: bool) -> int:
    """The mode a plain create would give under the current umask (mkstemp/mkdtemp make 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _link_error(path: str | os.PathLike) -> OSError:
    return OSError(errno.ELOOP, f"{path} is a symbolic link; m2d-kernels never writes through one (remove it)")


def refuse_link(path: str | os.PathLike) -> None:
    """An OSError (ELOOP) naming ``path`` when it is a symbolic link."""
    if Path(path).is_symlink():
        raise _link_error(path)


def open_no_follow(path: str | os.PathLike, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that refuses a symbolic link at ``path``: a lock or marker file opened through one would
    truncate, write and later delete whatever the link points to."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as error:
        if error.errno == errno.ELOOP or Path(path).is_symlink():
            raise _link_error(path) from None
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over ``path`` and fsync
    the folder: a crash or a full disk leaves the previous version, never a half-written one."""
    path = Path(path)
    refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, **temporary_name(path))
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, default_mode(directory=False))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def not_private_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` (not followed) is not safe to load code from, or None: it must be owned by the current
    user and not writable by group or others, and not a symbolic link. A missing path is None."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"it belongs to user id {info.st_uid}, not to you ({os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if info.st_mode & stat.S_IWOTH else "its group"
        return f"it is writable by {who} (mode {info.st_mode & 0o777:o})"
    return None


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the system allows a folder to be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
