"""Reading a user's `~/.forward`, with the checks that keep another user from redirecting their mail.

The answer is one of: missing (deliver normally), found (its items), a temporary failure (try again later: a
sticky home, too many open files, an I/O error, a file too large or unparsable) or a permanent one (a symlink, a
file that is not the user's or is writable by others, a directory on the way that others may write).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from smtpd.lookup.items import Item, ItemError, ItemKind, parse_items, parse_lines

MAX_FORWARD_SIZE = 4096
MAX_FORWARD_NODES = 100


class ForwardStatus(StrEnum):
    MISSING = "missing"  # no file, or an empty one: deliver to the mailbox
    FOUND = "found"
    TEMPFAIL = "tempfail"
    PERMFAIL = "permfail"


@dataclass
class ForwardFile:
    status: ForwardStatus
    path: str
    items: list[Item] = field(default_factory=list)
    reason: str = ""
    denied: bool = False  # the home or the file could not be read (EACCES)


def secure_file(fd: int, path: str, home: str, uid: int) -> str | None:
    """Why the open file at path may not be trusted as uid's own, or None when it may be."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_uid != uid:
        return f"owned by uid {info.st_uid}, not {uid}"
    if info.st_mode & 0o022:
        return "writable by group or others"
    try:
        canonical = os.path.realpath(path, strict=True)
    except OSError as error:
        return f"realpath: {error.strerror}"
    try:
        canonical_home = os.path.realpath(home, strict=True)
    except OSError:
        canonical_home = ""
    directory = canonical
    while True:
        directory = os.path.dirname(directory)
        try:
            dir_info = os.stat(directory)
        except OSError as error:
            return f"{directory}: {error.strerror}"
        if dir_info.st_uid not in (0, uid):
            return f"directory {directory} owned by uid {dir_info.st_uid}"
        if dir_info.st_mode & 0o022:
            return f"directory {directory} writable by group or others"
        if directory in (canonical_home, "/"):
            return None


def read_forward(home: str, uid: int, gid: int | None = None) -> ForwardFile:
    """Open and check `<home>/.forward` and parse its items (`:include:` items are dropped).

    Read as root; when root may not read there (a home on NFS exported with root_squash, mode 0700), read again
    with the user's own file-system identity (gid: the user's group), as the user could: every RCPT to such a
    user used to be refused (524), whether or not a .forward was there."""
    found = _read_forward(home, uid)
    if found.denied and os.geteuid() == 0 and uid != 0:
        try:
            with _filesystem_identity(uid, gid if gid is not None else -1):
                found = _read_forward(home, uid)
        except OSError as error:
            return ForwardFile(ForwardStatus.TEMPFAIL, found.path, reason=f"{found.path}: {error.strerror}")
    return found


_libc: ctypes.CDLL | None = None


@contextlib.contextmanager
def _filesystem_identity(uid: int, gid: int) -> Iterator[None]:
    """This thread's file accesses made as uid (and gid, unless -1): Linux's fsuid and fsgid are per thread, so
    the daemon's other threads keep root's; restored on the way out. OSError when they cannot be set."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    libc = _libc
    previous_gid = libc.setfsgid(gid) if gid >= 0 else -1  # (each returns the id it replaced)
    previous_uid = libc.setfsuid(uid)
    try:
        if libc.setfsuid(-1) != uid or (gid >= 0 and libc.setfsgid(-1) != gid):
            raise OSError(errno.EPERM, "cannot take the user's file-system identity")
        yield
    finally:
        libc.setfsuid(previous_uid)
        if previous_gid >= 0:
            libc.setfsgid(previous_gid)


def _read_forward(home: str, uid: int) -> ForwardFile:
    path = os.path.join(home, ".forward")
    try:
        home_info = os.stat(home)
    except FileNotFoundError:
        return ForwardFile(ForwardStatus.MISSING, path, reason="no home directory")
    except OSError as error:
        return _open_failure(home, error)
    if home_info.st_mode & stat.S_ISVTX:
        return ForwardFile(ForwardStatus.TEMPFAIL, path, reason=f"{home} is sticky")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        return _open_failure(path, error)
    try:
        problem = secure_file(fd, path, home, uid)
        if problem is not None:
            return ForwardFile(ForwardStatus.PERMFAIL, path, reason=f"{path}: unsecure file: {problem}")
        size = os.fstat(fd).st_size
        if size == 0:
            return ForwardFile(ForwardStatus.MISSING, path, reason="empty file")
        if size >= MAX_FORWARD_SIZE:
            return ForwardFile(ForwardStatus.TEMPFAIL, path, reason="forward file exceeds max size")
        data = os.read(fd, MAX_FORWARD_SIZE)
    except OSError as error:
        return ForwardFile(ForwardStatus.TEMPFAIL, path, reason=f"{path}: {error.strerror}")
    finally:
        os.close(fd)
    return _parse_forward(path, data)


def _open_failure(path: str, error: OSError) -> ForwardFile:
    if error.errno == errno.ENOENT:
        return ForwardFile(ForwardStatus.MISSING, path, reason="no .forward")
    if error.errno == errno.EACCES and os.geteuid() != 0:
        # An unprivileged daemon (the trial run) cannot read other users' files and delivers as itself anyway.
        return ForwardFile(ForwardStatus.MISSING, path, reason="not readable by the unprivileged daemon")
    if error.errno in (errno.EMFILE, errno.ENFILE, errno.EIO, errno.EAGAIN):
        return ForwardFile(ForwardStatus.TEMPFAIL, path, reason=f"{path}: {error.strerror}")
    if error.errno == errno.ELOOP:
        return ForwardFile(ForwardStatus.PERMFAIL, path, reason=f"{path}: cannot follow symbolic links")
    return ForwardFile(ForwardStatus.PERMFAIL, path, reason=f"{path}: {error.strerror}",
                       denied=error.errno == errno.EACCES)


def _parse_forward(path: str, data: bytes) -> ForwardFile:
    text = data.decode("utf-8", errors="surrogateescape")
    items: list[Item] = []
    for line in parse_lines(text):
        try:
            line_items = parse_items(line)
        except ItemError as error:
            return ForwardFile(ForwardStatus.TEMPFAIL, path, reason=f"parse error in forward file: {error}")
        # A .forward may not include other files: such items are skipped.
        items.extend(item for item in line_items if item.kind is not ItemKind.INCLUDE)
        if len(items) > MAX_FORWARD_NODES:
            return ForwardFile(ForwardStatus.TEMPFAIL, path, reason="forward file expanded too many nodes")
    if not items:
        return ForwardFile(ForwardStatus.MISSING, path, reason="no items in forward file")
    return ForwardFile(ForwardStatus.FOUND, path, items)
