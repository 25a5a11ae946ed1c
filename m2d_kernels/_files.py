"""File-system helpers shared by the training loop's outputs and the C++ build folder."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def open_no_follow(path: str | os.PathLike, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that refuses a symbolic link at ``path``: a lock or marker file opened through one would
    truncate, write and later delete whatever the link points to."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as error:
        if error.errno == errno.ELOOP or Path(path).is_symlink():
            raise OSError(errno.ELOOP, f"{path} is a symbolic link; m2d-kernels never writes through one "
                                       "(remove it)") from None
        raise


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


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary beside ``path``, fsync it, rename it over ``path`` and fsync the folder."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = open_no_follow(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


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
