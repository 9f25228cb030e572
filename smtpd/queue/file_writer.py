"""The file writer: a helper process that writes acknowledged messages' files into the spool for the daemon.

    python -I -S file_writer.py SPOOL_ROOT FD

Run as a script with the standard library only: nothing of the daemon is imported but its stdlib-only
durability helper, durable.py, so it starts in a few milliseconds. Why a process: a message committed through
the journal is acknowledged before its files exist; writing them (a folder rename, two files opened, written
and closed, the rename under queue/) took a fifth of the event loop's CPU with 8 clients, and a thread of the
daemon could not take that off the loop, since it needs the GIL between its system calls (measured: the loop's
CPU per message did not drop). Here those calls run beside the loop, on the other CPU.

FD is a stream socket to the daemon. A request is two 4-byte little-endian lengths (of its description and of
its messages), a marshal'd description ``(batch, commits)``, then the messages one after the other. Each commit
is described as ``(msgid, spare, old_envelope, size, envelopes)``: ``spare`` the folder made ahead for it in
temporary/ (or None: the folder is made here), ``old_envelope`` the name of the emptied envelope file a
taken-back folder holds (or None), ``size`` its message's length among the messages, ``envelopes`` a list of
``(evpid, content)``. An answer is a 4-byte little-endian length and a marshal'd ``(batch, results)``, with one
``(stage, errno)`` per commit, in order: stage 0, its folder is complete under queue/; 1, writing failed (what
it left is removed: the daemon's journal keeps the message and it tries again); 2, written but not moved under
queue/ (it stays complete in incoming/, where the next start places it). Requests are answered in order. The
process ends at the end of its input, or at once when the daemon dies (the next start writes back from the
journal whatever was not written).
"""

from __future__ import annotations

import _signal  # (not signal nor socket: they pull in enum, 1.5 MB more for this small process)
import ctypes
import errno
import marshal
import os
import struct
import sys

# The daemon's one durability helper (stdlib only): every queue write goes through it. The daemon imports this
# module too (store.py shares make_folder); run as a script with -I, the package is not on the path, and the
# helper is imported from beside this file.
try:
    from smtpd.queue.durable import write_all
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from durable import write_all

MESSAGE_FILE = "message"  # smtpd.queue.spool.MESSAGE_FILE
# The wire format, shared with the daemon's side (writer_client.py imports these).
ANSWER_HEADER = struct.Struct("<I")  # an answer's length
REQUEST_HEADER = struct.Struct("<II")  # a request's lengths: its description, its messages
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_REUSE = os.O_WRONLY | os.O_CLOEXEC
_PR_SET_PDEATHSIG = 1
_SIGKILL = 9  # (Linux, where prctl exists)

Commit = tuple[int, "str | None", "str | None", "bytes | memoryview", list[tuple[int, bytes]]]


def write_commit(root: str, commit: Commit) -> tuple[int, int]:
    """Write one commit's folder and files in incoming/ and move the folder under queue/: (stage, errno)."""
    msgid, spare, old_envelope, data, envelopes = commit
    name = f"{msgid:08x}"
    directory = os.path.join(root, "incoming", name)
    try:
        old_envelope = make_folder(spare, old_envelope, directory)
        _write_file(os.path.join(directory, MESSAGE_FILE), data, reuse=old_envelope is not None)
        for evpid, content in envelopes:
            path = os.path.join(directory, f"{evpid:016x}")
            reuse = old_envelope is not None
            if old_envelope is not None:
                os.rename(os.path.join(directory, old_envelope), path)
                old_envelope = None
            _write_file(path, content, reuse=reuse)
    except OSError as error:
        _remove(directory)
        return 1, error.errno or errno.EIO
    try:
        os.rename(directory, os.path.join(root, "queue", f"{msgid >> 24:02x}", name))
    except OSError as error:
        return 2, error.errno or errno.EIO
    return 0, 0


def make_folder(spare: str | None, old_envelope: str | None, directory: str) -> str | None:
    """The commit's folder in incoming/, from the one made ahead when there is one; the name of the emptied
    envelope file it holds (None: a new, empty folder)."""
    if spare is not None:
        try:
            os.rename(spare, directory)
            return old_envelope
        except OSError:
            _remove(spare)
    os.mkdir(directory, 0o700)
    return None


def _write_file(path: str, content: bytes | memoryview, reuse: bool) -> None:
    # A taken-back folder's files were emptied by the daemon's writer thread: opened as they are, without
    # O_TRUNC (see smtpd/queue/store.py, _empty_files), and never created anew if one is missing.
    fd = os.open(path, _REUSE if reuse else _CREATE, 0o600)
    try:
        write_all(fd, content)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    """A file, or a message folder and its files (smtpd.queue.spool.remove_path, which the script, run with -I,
    cannot import: that module needs the daemon's packages)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            for entry in os.listdir(path):
                os.unlink(os.path.join(path, entry))
            os.rmdir(path)
        else:
            os.unlink(path)
    except OSError:
        pass


def _read_exactly(connection: int, count: int) -> bytes | None:
    chunks = []
    while count:
        chunk = os.read(connection, min(count, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _send_all(connection: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(connection, view):]


def serve(root: str, connection: int) -> None:
    while True:
        head = _read_exactly(connection, REQUEST_HEADER.size)
        if head is None:
            return
        described_size, messages_size = REQUEST_HEADER.unpack(head)
        payload = _read_exactly(connection, described_size + messages_size)
        if payload is None:
            return
        view = memoryview(payload)
        batch, described = marshal.loads(view[:described_size])
        results, offset = [], described_size
        for msgid, spare, old_envelope, size, envelopes in described:
            data = view[offset:offset + size]
            offset += size
            results.append(write_commit(root, (msgid, spare, old_envelope, data, envelopes)))
        answer = marshal.dumps((batch, results))
        _send_all(connection, ANSWER_HEADER.pack(len(answer)) + answer)


def _die_with_parent() -> None:
    """A write after the daemon died could race the next start writing the same message back from the journal."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent or parent == 1:
        sys.exit(0)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: file_writer.py SPOOL_ROOT FD", file=sys.stderr)
        return 2
    _die_with_parent()
    # A ^C at the daemon's terminal, or a SIGTERM to all its processes at once (systemd's stop, timeout(1)): the
    # daemon stops us itself, by closing our socket once it has drained; our end comes with its end anyway.
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    _signal.signal(_signal.SIGTERM, _signal.SIG_IGN)
    try:
        serve(argv[1], int(argv[2]))
    except (ConnectionError, BrokenPipeError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
