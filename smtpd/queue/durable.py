"""The one durability helper every queue write goes through.

A file is durable once its data is flushed (fdatasync) and the directory entry naming it is flushed (fsync of
the directory). Replacing a file is: write a temporary file in the same directory, flush it, rename it over
the old one, flush the directory. Callers that make many files durable at once (the group commit) use the
same pieces but flush each directory only once per batch: ``DirectorySyncs`` collects them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

FILE_MODE = 0o600


def write_new_file(path: str, data: bytes, *, sync: bool = True) -> None:
    """Create ``path`` (it must not exist) holding ``data``; flush the data unless told not to."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        write_all(fd, data)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes, *, sync_directory: bool = True) -> None:
    """Atomically and durably replace (or create) ``path``: tmp file, fdatasync, rename, fsync the directory."""
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    try:
        os.unlink(temporary)  # a leftover of a crash in the middle of a previous replace
    except FileNotFoundError:
        pass
    write_new_file(temporary, data)
    os.rename(temporary, path)
    if sync_directory:
        fsync_directory(directory)


def _load_syncfs() -> Callable[[int], None] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if function(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return syncfs


SYNCFS = _load_syncfs()  # None where the C library has no syncfs(2) (not Linux)


def same_filesystem(paths: list[str]) -> bool:
    """Whether all the paths are on one filesystem (so one syncfs covers them all)."""
    return len({os.stat(path).st_dev for path in paths}) == 1


class FilesystemSync:
    """Flushes a whole filesystem with one syncfs(2): every dirty file, inode and directory block on it.

    One call makes a whole batch durable (all message files, envelope files and the folders naming them),
    instead of one fdatasync/fsync per file and folder. Since Linux 5.8 syncfs also reports write-back errors
    of the filesystem, so a failed write is not acknowledged. Its cost grows with whatever else is dirty on
    the same filesystem: give the spool its own filesystem on a busy machine, or set SMTPD_QUEUE_SYNC=fsync.
    """

    def __init__(self, path: str) -> None:
        if SYNCFS is None:
            raise OSError(38, "syncfs is not available")
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # Syncs started, and the number of the last one that succeeded: a change made (by any thread) while
        # ``started`` read N is on disk once ``covered`` > N (the sync numbered N + 1 began after that read).
        self.started = 0
        self.covered = 0

    def sync(self) -> None:
        assert SYNCFS is not None
        self.started += 1
        number = self.started
        SYNCFS(self.fd)
        self.covered = max(self.covered, number)

    def close(self) -> None:
        os.close(self.fd)


class DirectorySyncs:
    """Directories whose entries changed during a batch; each one is flushed once at the end."""

    def __init__(self) -> None:
        self.pending: dict[str, None] = {}  # insertion-ordered set

    def add(self, directory: str) -> None:
        self.pending[directory] = None

    def flush(self) -> None:
        directories, self.pending = list(self.pending), {}
        for directory in directories:
            fsync_directory(directory)


class ParallelFlusher:
    """Runs one batch's flushes at the same time.

    Concurrent fsync calls on one filesystem are served by the same journal commit and merged cache flushes, so
    a batch costs about one round trip to the disk instead of one per file. Every file and folder still gets its
    own fsync/fdatasync: nothing relies on a particular filesystem's ordering.
    """

    def __init__(self, workers: int = 32) -> None:
        # (imported here: the file writer process imports this module too, and has no use for a pool)
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="queue-flush")

    def run(self, calls: list[Callable[[], None]]) -> list[BaseException | None]:
        """Run the calls; return, in order, None or the exception each one raised."""
        if len(calls) <= 1:  # a thread hop costs more than it saves
            return [_call(function) for function in calls]
        futures = [self.pool.submit(function) for function in calls]
        return [future.exception() for future in futures]

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)


def _call(function: Callable[[], None]) -> BaseException | None:
    try:
        function()
    except Exception as error:  # noqa: BLE001 — returned to the caller, which fails that commit only
        return error
    return None
