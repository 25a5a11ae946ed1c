"""Safe writes for the files a user keeps (checkpoints, models, results, plots), and the
lock that keeps two runs out of one output folder.

Everything is written to a temporary name in the destination's own folder and then
renamed over it, so a crash or a full disk leaves the previous version intact, never a
half-written one. A folder is swapped in with one atomic exchange (Linux ``renameat2``),
so two processes saving the same folder at once never fail and readers never see it
missing; elsewhere a short retry loop replaces it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from m2d_kernels import _files
from m2d_kernels._files import (
    TEMPORARY_PREFIX,
    TEMPORARY_SUFFIX,
    default_mode,
    open_no_follow,
    refuse_link,
    temporary_name,
)

try:
    import fcntl
except ImportError:  # not POSIX: no output-folder lock
    fcntl = None

_TEMPORARY_NAME = re.compile(re.escape(TEMPORARY_PREFIX) + r".+\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))
LOCK_NAME = ".m2d-train.lock"
_RENAME_EXCHANGE = 2  # linux/fs.h


class OutputWriteError(OSError):
    """A file or folder of the run could not be written (disk full, no permission); the previous
    version, if any, is intact and nothing was written half."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError while writing ``path`` as an OutputWriteError naming ``path`` (not the temporary)."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno == errno.ELOOP:  # refuse_link's message already names the path
            raise OutputWriteError(error.errno, f"could not write {path}: {reason}") from error
        raise OutputWriteError(error.errno, f"could not write {path}: {reason}; its previous version (if any) is "
                                            "intact. Free some space or fix the permissions, or choose another "
                                            "--output-dir") from error


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``
    (:func:`m2d_kernels._files.atomic_write`); an OSError becomes an OutputWriteError naming ``path``."""
    with _naming(Path(path)):
        _files.atomic_write(path, write)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically; False where the system cannot (not Linux, old libc,
    a file system without RENAME_EXCHANGE)."""
    libc_name = ctypes.util.find_library("c")
    try:
        renameat2 = ctypes.CDLL(libc_name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def atomic_directory(path: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Call ``fill(folder)`` on a temporary folder beside ``path``, then swap it in for ``path``.

    Safe with several writers in several processes: each has its own temporary names, and
    the last swap wins whole (never a mixture, never an error because another writer
    moved the old folder first).
    """
    path = Path(path)
    with _naming(path):
        refuse_link(path)
        _atomic_directory(path, fill)


def _atomic_directory(path: Path, fill: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, **temporary_name(path)))
    try:
        fill(staging)
        os.chmod(staging, default_mode(directory=True))
        for _ in range(100):  # each retry means another writer won a race; one of them always progresses
            try:
                os.rename(staging, path)  # succeeds only while ``path`` is absent (or an empty folder)
                return
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            try:
                if _exchange(staging, path):
                    return  # ``staging`` now holds the previous version, removed below
            except FileNotFoundError:  # another writer moved ``path`` away meanwhile: try again
                continue
            # No atomic exchange: move the old folder aside under a name of our own, then rename.
            previous = Path(tempfile.mkdtemp(dir=path.parent, **temporary_name(path)))
            try:
                os.replace(path, previous)
            except FileNotFoundError:
                pass
            shutil.rmtree(previous, ignore_errors=True)
        raise OSError(errno.EBUSY, f"could not replace {path}: other writers kept replacing it")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders that a killed writer of this module left in ``folder``
    (``.m2d-tmp.<name>.<8 random characters>.tmp``); call it only while holding the folder's
    :func:`output_lock`. A user's own ``.something.tmp`` is not of that form and stays."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not _TEMPORARY_NAME.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


class OutputFolderBusy(RuntimeError):
    """Another live process holds the output folder's lock."""


_held: dict[Path, int] = {}  # lock path -> open descriptor, for re-entry within one process


@contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if needed) or raise :class:`OutputFolderBusy`.

    The lock is an ``flock`` on ``folder/.m2d-train.lock``: the kernel drops it when its
    holder dies, so a killed run never blocks the next one. Re-entrant within a process.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder.resolve() / LOCK_NAME  # the folder resolved, never the lock itself: it is not followed
    if lock_path in _held or fcntl is None:
        yield
        return
    while True:
        descriptor = open_no_follow(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise OutputFolderBusy(f"output folder {folder} is in use by another run (it holds {lock_path.name}); "
                                   "wait for it or choose another --output-dir") from None
        # The previous holder deletes the file when it finishes: make sure ours is still the one on disk.
        if _same_file(lock_path, descriptor):
            break
        os.close(descriptor)
    _held[lock_path] = descriptor
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield
    finally:
        del _held[lock_path]
        if _same_file(lock_path, descriptor):  # only the file this process locked, never what replaced it
            lock_path.unlink(missing_ok=True)
        os.close(descriptor)


def _same_file(path: Path, descriptor: int) -> bool:
    """Whether ``path`` (not followed) is the file open as ``descriptor``."""
    try:
        entry, opened = os.lstat(path), os.fstat(descriptor)
    except FileNotFoundError:
        return False
    return (entry.st_dev, entry.st_ino) == (opened.st_dev, opened.st_ino)
