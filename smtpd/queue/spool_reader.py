"""The spool reader: a helper process that reads the committed envelope files for the daemon at start.

    python -I -S spool_reader.py QUEUE_DIR FD [FD ...]      (msgids on stdin: little-endian uint32s)

Run as a script with the standard library only (nothing of the daemon is imported, so it starts in a few
milliseconds). Why a process: reading 50,000 message folders is mostly system calls, and in the daemon they
would fight the event loop for the GIL; here they run on the other CPU. With a cold cache every folder and file
costs disk round trips: the reader forks one process per output FD (forking is safe here, this process has no
threads) and each keeps its own reads in flight, so the disk sees many at once.

Process k reads every len(FDS)-th message of the list, starting at k, in the given order (the daemon sorts
them by inode: neighbouring inodes share disk blocks), and writes frames to FDS[k]: a 4-byte little-endian
length, then a marshal'd list of ``(msgid, files)``, where files is a list of ``(name, content)`` of the
message's envelope files, or None when the folder is anything but the plain case (message file missing or not a
regular file, a leftover ``.tmp``, something that is not a regular file, no envelope, an error): the daemon
then loads that folder itself, with all the checks, moving corrupt files aside. The reader never changes the
spool. End of the data: the FD is closed.
"""

from __future__ import annotations

import array
import marshal
import os
import sys

MESSAGE_FILE = "message"
MAX_STORED_ENVELOPE_BYTES = 65 * 1024  # smtpd.queue.format.MAX_STORED_ENVELOPE_BYTES (a test checks they agree)
FRAME_MESSAGES = 256
_ROOT = os.geteuid() == 0
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC

Files = list[tuple[str, bytes]]


def read_folder(directory: str) -> Files | None:
    """The envelope files of one message folder, or None if it needs the daemon's careful loading."""
    files: Files = []
    has_message = False
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if not entry.is_file(follow_symlinks=False):
                return None
            if name == MESSAGE_FILE:
                has_message = True
                continue
            if name.startswith("."):
                return None
            fd = os.open(entry.path, _OPEN_FLAGS)
            try:
                files.append((name, os.read(fd, MAX_STORED_ENVELOPE_BYTES + 1)))
            finally:
                os.close(fd)
    if not has_message or not files:
        return None
    if not _ROOT:
        # The message file must open for reading (what the daemon checks too): its content is not read. For
        # root, permissions cannot refuse it, and the folder listing already said it is a regular file: the
        # open is spared (with a cold cache, 15% of the reading time).
        os.close(os.open(os.path.join(directory, MESSAGE_FILE), _OPEN_FLAGS))
    return files


def message_dir(queue_dir: str, msgid: int) -> str:
    return f"{queue_dir}/{msgid >> 24:02x}/{msgid:08x}"


def read_messages(queue_dir: str, msgids: list[int], fd: int) -> None:
    batch: list[tuple[int, Files | None]] = []
    for msgid in msgids:
        try:
            files = read_folder(message_dir(queue_dir, msgid))
        except OSError:
            files = None
        batch.append((msgid, files))
        if len(batch) >= FRAME_MESSAGES:
            write_frame(fd, batch)
            batch = []
    if batch:
        write_frame(fd, batch)


def write_frame(fd: int, batch: list[tuple[int, Files | None]]) -> None:
    payload = marshal.dumps(batch)
    data = memoryview(len(payload).to_bytes(4, "little") + payload)
    while data:
        data = data[os.write(fd, data):]


def main(argv: list[str]) -> int:
    queue_dir = argv[1]
    fds = [int(text) for text in argv[2:]]
    msgids = array.array("I")
    msgids.frombytes(sys.stdin.buffer.read())
    if sys.byteorder != "little":
        msgids.byteswap()
    ids = msgids.tolist()
    children = []
    for index, fd in enumerate(fds[1:], 1):
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                read_messages(queue_dir, ids[index::len(fds)], fd)
            except BrokenPipeError:
                pass  # the daemon stopped reading (it is stopping)
            except BaseException:  # noqa: BLE001 — a forked child must never return into main()
                status = 1
            os._exit(status)
        children.append(pid)
    for fd in fds[1:]:
        os.close(fd)  # the children hold them: EOF reaches the daemon when each child is done
    status = 0
    try:
        read_messages(queue_dir, ids[0::len(fds)], fds[0])
    except BrokenPipeError:
        pass
    os.close(fds[0])
    for pid in children:
        _, wait_status = os.waitpid(pid, 0)
        status = status or os.waitstatus_to_exitcode(wait_status)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
