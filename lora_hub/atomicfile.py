"""Atomic file and folder replacement. A file: write a temporary file in the destination folder, fsync it, then
rename it over the destination. A folder (several files that belong together, such as a PEFT adapter's weights and
config): write a temporary folder beside it, then exchange the two in one step. A reader sees the old one or the
new one, never a mixture, and an interrupted write leaves the old one untouched (a process killed outright may
leave a `.NAME.*.tmp` beside it, never a partial or mixed NAME).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview]) -> Path:
    """Writes `chunks` to `path` atomically, creating missing parent folders.

    The chunks go out in large vectored writes (up to WRITE_BATCH_BYTES or IOV_MAX chunks per system call, without
    copying them): the page cache then holds the file in large pages, which a later read copies out about twice as
    fast as the small pages that one write per tensor leaves (a hot swap reads the file just written, typically).

    Returns:
        The path written.

    Raises:
        IsADirectoryError: `path` is an existing directory.
    """
    with atomic_file(path) as tmp:
        if hasattr(os, "writev"):
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
            try:
                _write_in_batches(fd, chunks)
            finally:
                os.close(fd)
        else:  # Windows
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
    return Path(path)


WRITE_BATCH_BYTES = 32 * 1024 * 1024
IOV_MAX = 1024
"""The POSIX minimum of IOV_MAX on Linux: buffers per vectored read or write."""


def _write_in_batches(fd: int, chunks: Iterable[bytes | memoryview]) -> None:
    batch: list[memoryview] = []
    size = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        if view.nbytes:
            batch.append(view)
            size += view.nbytes
        if size >= WRITE_BATCH_BYTES or len(batch) == IOV_MAX:
            _write_all(fd, batch)
            batch, size = [], 0
    _write_all(fd, batch)


def _write_all(fd: int, views: list[memoryview]) -> None:
    while views:
        done = os.writev(fd, views)
        if done <= 0:
            raise OSError(_errno.EIO, "a write made no progress")
        views = after(views, done)  # a short write (a signal, a huge batch): continue where it stopped


def after(views: list[memoryview], count: int) -> list[memoryview]:
    """The buffers left after `count` bytes of `views` were read or written."""
    out = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        out.append(view[count:])
        count = 0
    return out


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A file written all or nothing by a writer that wants a path (the gguf package's): yields a temporary path
    beside `path`; when the block ends without an error, the file there is synced and renamed over `path`. On an
    error `path` is untouched and the temporary file removed.

    Raises:
        IsADirectoryError: `path` is an existing directory.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"'{path}' is a directory; give a file name to write to")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_file(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


@functools.cache
def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def _fsync_directory(directory: Path) -> None:
    """Makes the rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A folder written all or nothing: yields a new temporary folder beside `path`; when the block ends without an
    error, that folder replaces `path` in one step (the entries of an existing `path` that the block did not write
    are carried over, by hard link where the file system allows), so a reader sees the old folder or the new one,
    never a mixture. On an error, or a full disk, `path` is untouched and the temporary folder removed; a process
    killed outright may leave a `.NAME.*.tmp` folder beside it, never a mixed `path`.

    Raises:
        NotADirectoryError: `path` exists and is not a folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"'{path}' exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(staging, path.stat().st_mode & 0o7777 if path.exists() else 0o777 & ~_umask())
        yield staging
        if path.is_dir():
            _carry_over(path, staging)
        for entry in staging.rglob("*"):
            if entry.is_file() and not entry.is_symlink():
                _fsync_file(entry)
        _fsync_directory(staging)
        _replace_folder(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(path.parent)


def _carry_over(old: Path, new: Path) -> None:
    """Entries of `old` that `new` lacks, hard-linked (copied where links are not possible) into `new`."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _replace_folder(new: Path, path: Path) -> None:
    """Puts folder `new` at `path`: a rename when `path` does not exist; else an atomic exchange of the two (Linux's
    renameat2), then the old one removed; where there is no exchange, two renames with the old folder kept aside in
    between (a kill there leaves `path` missing and the old folder at `.NAME.*.old`, never a mixture)."""
    if not path.exists():
        os.rename(new, path)
        return
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old folder
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    os.rename(path, aside / "old")
    os.rename(new, path)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically with renameat2(RENAME_EXCHANGE); False where the system has no such call."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (_errno.ENOSYS, _errno.EINVAL, _errno.EOPNOTSUPP):
        return False  # the kernel or file system cannot exchange: the two-rename path does it
    raise OSError(errno, os.strerror(errno), os.fspath(b))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
