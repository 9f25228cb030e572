"""Reading a user's `~/.forward`, with the checks that keep another user from redirecting their mail.

The answer is one of: missing (deliver normally), found (its items), a temporary failure (try again later: a
sticky home, too many open files, an I/O error, a file too large or unparsable) or a permanent one (a symlink, a
file that is not the user's or is writable by others, a directory on the way that others may write).
"""

from __future__ import annotations

import errno
import os
import stat
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


def read_forward(home: str, uid: int) -> ForwardFile:
    """Open and check `<home>/.forward` and parse its items (`:include:` items are dropped)."""
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
    return ForwardFile(ForwardStatus.PERMFAIL, path, reason=f"{path}: {error.strerror}")


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
