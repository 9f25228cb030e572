"""Writing one message into an mbox file or a Maildir, as the process's current user.

These functions run in the delivery child after the privilege drop (or in a thread when the daemon runs
unprivileged). They use the standard library only (the fork helper imports this file alone), and the file also
runs as a program, for manual use and tests (a `wrapper` around mbox and maildir actions wraps `/bin/cat` instead,
and the daemon writes the wrapper's output: recipients usually cannot run the daemon's Python):

    python local.py mbox [-f SENDER] PATH        < message
    python local.py mboxfile [-f SENDER] PATH    < message
    python local.py maildir [-j] [-e EXTENSION] DIR  < message

Exit status: 0 delivered, 75 temporary failure, 73 permanent failure (the last stderr line says why).

mbox format: a `From <sender> <asctime>` line, the message with `>` before every line that starts with `From `
(mutt and Dovecot both split messages on such lines, wherever they are), and one empty line. The file is locked
with a dotlock (`PATH.lock`, when the directory lets us create it) and an fcntl write lock, the locks mutt and
Dovecot take. If anything fails after the first byte was written, the file is truncated back to its old size, so
a mailbox never holds half a message.

Maildir: the message is written to `tmp/`, fsynced, then linked into `new/` (and the directory fsynced) under a
unique name `<seconds>.M<microseconds>P<pid>Q<counter>R<random>.<host>`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

EX_TEMPFAIL = 75
EX_CANTCREAT = 73
LOCK_TIMEOUT = 60.0  # seconds to wait for a mailbox lock before a temporary failure
STALE_DOTLOCK = 300.0  # a dotlock older than this was left by a dead writer
CHUNK = 1 << 16
FOLDER_CHARACTERS = frozenset("!#$%&'*/?^`{|}~")
_counter = 0


class LocalDeliveryError(Exception):
    def __init__(self, text: str, temporary: bool = True) -> None:
        super().__init__(text)
        self.text = text
        self.temporary = temporary


class MailboxReplaced(LocalDeliveryError):
    """The mbox we opened was removed or replaced while we waited for its lock (temporary: open it again)."""


# -- message stream -----------------------------------------------------------------------------------------

def message_lines(prefix: bytes, message: BinaryIO) -> Iterator[bytes]:
    """The prefix lines then the message's lines, each ending in LF (a missing final LF is added)."""
    if prefix:
        yield from prefix.splitlines(keepends=True)
    for line in message:
        yield line if line.endswith(b"\n") else line + b"\n"


def mbox_chunks(from_line: bytes, prefix: bytes, message: BinaryIO) -> Iterator[bytes]:
    buffer = bytearray(from_line)
    for line in message_lines(prefix, message):
        if line.startswith(b"From "):
            buffer += b">"
        buffer += line
        if len(buffer) >= CHUNK:
            yield bytes(buffer)
            buffer.clear()
    buffer += b"\n"
    yield bytes(buffer)


def from_line(sender: str, when: float | None = None) -> bytes:
    stamp = time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(when))
    return f"From {sender or 'MAILER-DAEMON'} {stamp}\n".encode("utf-8", "surrogateescape")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# -- locks ---------------------------------------------------------------------------------------------------

class _Busy(Exception):
    """The lock is held by someone else."""


def take_locks(fd: int, path: str, deadline: float, dotlock: bool = True) -> str | None:
    """The fcntl write lock on fd and (when ``dotlock``) PATH.lock; returns the dotlock's path, None when none
    was taken (not asked, or the directory does not let us create it: the fcntl lock still protects the file).

    Never waits while holding one of the two: mail readers take them in different orders (mutt: fcntl, then
    the dotlock; Dovecot by default: the dotlock, then fcntl), and waiting on the second while holding the first
    would deadlock with one of them (mutt then asks its user whether to break the lock, holding its own)."""
    held = "fcntl"
    while True:
        try:
            _try_fcntl_lock(fd, path)
            try:
                return _try_dotlock(path) if dotlock else None
            except _Busy:
                held = "dotlock"
                fcntl.lockf(fd, fcntl.LOCK_UN)
        except _Busy:
            held = "fcntl"
        if time.monotonic() > deadline:
            raise LocalDeliveryError(f"{path}: mailbox is locked ({held})")
        time.sleep(0.05)


def _try_fcntl_lock(fd: int, path: str) -> None:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise _Busy from None
        raise LocalDeliveryError(f"{path}: lock: {error.strerror}") from None


def _try_dotlock(path: str) -> str | None:
    """Create PATH.lock (removing one left by a dead writer); None when the directory does not let us."""
    lock_path = path + ".lock"
    for _ in range(3):  # a stale lock removed, or one that vanished between our calls: try again at once
        try:
            fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            try:
                if time.time() - os.lstat(lock_path).st_mtime > STALE_DOTLOCK:
                    os.unlink(lock_path)
                    continue
            except FileNotFoundError:
                continue
            except OSError:
                pass
            raise _Busy from None
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise LocalDeliveryError(f"{lock_path}: {error.strerror}") from None
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        return lock_path
    raise _Busy


def release_dotlock(lock_path: str | None) -> None:
    if lock_path is not None:
        try:
            os.unlink(lock_path)
        except OSError:
            pass


# -- mbox ----------------------------------------------------------------------------------------------------

def open_mbox(path: str, create_mode: int = 0o600, owner: tuple[int, int] | None = None) -> int:
    """Open (creating if needed) an mbox for appending, refusing symlinks, links and non-files.

    ``owner``: when given (the caller is root), a new file is given to that uid:gid, and an existing file must
    already belong to that uid.
    """
    # Read-write (not write-only): the writer checks the file's last bytes through this descriptor, which it may
    # hold after dropping privileges (root's mailbox).
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
        created = False
    except FileNotFoundError:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, create_mode)
            created = True
        except FileExistsError:
            return open_mbox(path, create_mode, owner)
        except OSError as error:
            raise LocalDeliveryError(f"{path}: {error.strerror}") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            # Temporary, as mail.local's "linked or special file" (EX_OSERR): the administrator fixes the spool
            # and the mail is delivered; bouncing it would lose it for a local misconfiguration.
            raise LocalDeliveryError(f"{path}: is a symbolic link") from None
        raise LocalDeliveryError(f"{path}: {error.strerror}") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "not a regular file"
    elif info.st_nlink != 1:
        problem = "has more than one link"
    elif owner is not None and not created and info.st_uid != owner[0]:
        problem = f"owned by uid {info.st_uid}, not {owner[0]}"
    if problem is not None:
        os.close(fd)
        raise LocalDeliveryError(f"{path}: {problem}")
    if created and owner is not None:
        os.fchown(fd, owner[0], owner[1])
    return fd


def append_mbox(fd: int, path: str, sender: str, prefix: bytes, message: BinaryIO,
                dotlock: bool = True, lock_timeout: float = LOCK_TIMEOUT) -> None:
    """Append one message to the open mbox fd under both locks; truncate back on any failure."""
    deadline = time.monotonic() + lock_timeout
    lock_path = take_locks(fd, path, deadline, dotlock)
    try:
        if not _still_named(fd, path):
            # A reader holding the lock removed the file (BSD mail(1) removes an emptied spool mbox) or put
            # another in its place: what we wrote to this descriptor would be in no mailbox, and lost.
            fcntl.lockf(fd, fcntl.LOCK_UN)
            raise MailboxReplaced(f"{path}: mailbox removed or replaced while waiting for its lock")
        size = os.fstat(fd).st_size
        try:
            separator = _missing_separator(fd, size)
            first = True
            for chunk in mbox_chunks(from_line(sender), prefix, message):
                write_all(fd, separator + chunk if first else chunk)
                first = False
            os.fsync(fd)
        except BaseException as error:
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError:
                pass
            if isinstance(error, OSError):
                raise LocalDeliveryError(f"{path}: write: {error.strerror}") from None
            raise
        finally:
            try:
                fcntl.lockf(fd, fcntl.LOCK_UN)
            except OSError:
                pass
    finally:
        release_dotlock(lock_path)


def _still_named(fd: int, path: str) -> bool:
    """Whether path still names the file open on fd."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        # The user we write as may not search the folder (root's mail is written as the unprivileged user, the
        # mbox opened before the drop): nothing tells that the file went away, so it is taken as still there.
        return True
    info = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (info.st_dev, info.st_ino)


def _missing_separator(fd: int, size: int) -> bytes:
    """The newlines to add so that the new From_ line follows an empty line (a foreign writer may omit it)."""
    if size == 0:
        return b""
    try:
        tail = os.pread(fd, 2, max(0, size - 2))
    except OSError:
        return b""
    if tail.endswith(b"\n\n") or (size == 1 and tail == b"\n"):
        return b""
    return b"\n" if tail.endswith(b"\n") else b"\n\n"


def deliver_mbox(path: str, sender: str, prefix: bytes, message: BinaryIO,
                 owner: tuple[int, int] | None = None) -> None:
    for attempt in range(3):  # the file replaced while we waited for its lock: open the new one
        fd = open_mbox(path, owner=owner)
        try:
            append_mbox(fd, path, sender, prefix, message)
            return
        except MailboxReplaced:
            if attempt == 2:
                raise
            message.seek(0)
        finally:
            os.close(fd)


def deliver_mboxfile(path: str, sender: str, prefix: bytes, message: BinaryIO) -> None:
    """A `/file` item of an alias or a `.forward`: append in mbox format, as its owner or the unprivileged user.

    Unlike the spool mbox (opened as root, so it must not be a link), this file is opened with the writer's own
    rights, as OpenSMTPD's mail.mboxfile opens it: a symbolic link is followed and a file with several links is
    written; a character device (`/dev/null`, the usual "discard" alias) takes the message without locks or
    fsync. A FIFO, a directory or a socket is refused (temporary): a FIFO with no reader would hang the write.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | os.O_CREAT, 0o600)
    except OSError as error:
        raise LocalDeliveryError(f"{path}: {error.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISCHR(mode):
            try:
                for chunk in mbox_chunks(from_line(sender), prefix, message):
                    write_all(fd, chunk)
            except OSError as error:
                raise LocalDeliveryError(f"{path}: write: {error.strerror}") from None
            return
        if not stat.S_ISREG(mode):
            raise LocalDeliveryError(f"{path}: not a regular file")
        os.set_blocking(fd, True)
        append_mbox(fd, path, sender, prefix, message)
    finally:
        os.close(fd)


# -- maildir -------------------------------------------------------------------------------------------------

def ensure_maildir(directory: str) -> None:
    for sub in ("", "cur", "new", "tmp"):
        target = os.path.join(directory, sub) if sub else directory
        try:
            os.makedirs(target, mode=0o700, exist_ok=True)
        except OSError as error:
            raise LocalDeliveryError(f"{target}: {error.strerror}") from None
        if not os.path.isdir(target):
            raise LocalDeliveryError(f"{target}: not a directory")


def _ensure_once(directory: str, ensured: set[str] | None) -> None:
    if ensured is None or directory not in ensured:
        ensure_maildir(directory)
        if ensured is not None:
            ensured.add(directory)


def unique_name() -> str:
    global _counter
    _counter += 1
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int(now % 1 * 1_000_000):06d}P{os.getpid()}Q{_counter}R{os.urandom(6).hex()}.{host}"


def is_junk(message: BinaryIO) -> bool:
    """Whether the header says X-Spam: yes or X-Spam-Flag: yes (the message is rewound afterwards)."""
    position = message.tell()
    try:
        for line in message:
            if line in (b"\n", b"\r\n"):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() in (b"x-spam", b"x-spam-flag") and value.strip().lower() == b"yes":
                return True
        return False
    finally:
        message.seek(position)


def choose_folder(directory: str, extension: str, junk: bool, message: BinaryIO) -> str:
    if junk and is_junk(message):
        return os.path.join(directory, ".Junk")
    if extension:
        folder = "." + "".join(":" if char in FOLDER_CHARACTERS else char for char in extension)
        candidate = os.path.join(directory, folder)
        if folder not in (".", "..") and os.path.isdir(candidate):
            return candidate
    return directory


def deliver_maildir(directory: str, prefix: bytes, message: BinaryIO, extension: str = "",
                    junk: bool = False) -> str:
    """Deliver into the Maildir (or its extension/Junk folder); returns the new file's path."""
    final = write_maildir_file(directory, prefix, message, extension, junk)
    try:
        fsync_directory(os.path.dirname(final))
    except OSError as error:
        raise LocalDeliveryError(f"{os.path.dirname(final)}: {error.strerror}") from None
    return final


def write_maildir_file(directory: str, prefix: bytes, message: BinaryIO, extension: str = "",
                       junk: bool = False, ensured: set[str] | None = None) -> str:
    """Write the message to tmp/, fsync it, link it into new/; returns its path in new/.

    The new/ folder is not flushed here: the caller fsyncs it (once for all the files it linked there) before
    it counts any of them as delivered. ``ensured``: Maildirs this caller has made sure of already (a batch
    checks each once: eight system calls a message otherwise)."""
    _ensure_once(directory, ensured)
    target = choose_folder(directory, extension, junk, message)
    if target != directory:
        _ensure_once(target, ensured)
    name = unique_name()
    temporary = os.path.join(target, "tmp", name)
    final = os.path.join(target, "new", name)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        raise LocalDeliveryError(f"{temporary}: {error.strerror}") from None
    try:
        buffer = bytearray()
        for line in message_lines(prefix, message):
            buffer += line
            if len(buffer) >= CHUNK:
                write_all(fd, bytes(buffer))
                buffer.clear()
        write_all(fd, bytes(buffer))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.link(temporary, final)
        os.unlink(temporary)
    except OSError as error:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise LocalDeliveryError(f"{target}: {error.strerror}") from None
    return final


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- program -------------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    usage = "usage: local.py mbox|mboxfile [-f sender] PATH | maildir [-j] [-e extension] DIR"
    if not argv or argv[0] not in ("mbox", "mboxfile", "maildir"):
        print(usage, file=sys.stderr)
        return 64
    mode, args = argv[0], argv[1:]
    sender, extension, junk = "", "", False
    while len(args) > 1 and args[0].startswith("-"):
        option = args.pop(0)
        if option == "-f" and args:
            sender = args.pop(0)
        elif option == "-e" and args:
            extension = args.pop(0)
        elif option == "-j":
            junk = True
        elif option == "--":
            break
        else:
            print(usage, file=sys.stderr)
            return 64
    if len(args) != 1:
        print(usage, file=sys.stderr)
        return 64
    import tempfile

    with tempfile.TemporaryFile() as spool:
        while block := sys.stdin.buffer.read(CHUNK):
            spool.write(block)
        spool.seek(0)
        try:
            if mode == "maildir":
                deliver_maildir(args[0], b"", spool, extension, junk)
            elif mode == "mboxfile":
                deliver_mboxfile(args[0], sender, b"", spool)
            else:
                deliver_mbox(args[0], sender, b"", spool)
        except LocalDeliveryError as error:
            print(error.text, file=sys.stderr)
            return EX_TEMPFAIL if error.temporary else EX_CANTCREAT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
