"""The daemon's side of the file writer process (smtpd/queue/file_writer.py): start it, hand it batches of
acknowledged commits, take its answers on the event loop, stop it.

Batches are answered in the order they were sent. If the process goes away, every batch not answered gets
None for an answer: the queue then treats those commits as not written (their journal records keep them; the
queue writes them itself from then on).
"""

from __future__ import annotations

import asyncio
import collections
import marshal
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from smtpd import log
from smtpd.queue.file_writer import ANSWER_HEADER, REQUEST_HEADER

LOG = log.get("queue")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "file_writer.py")
# Asked for, capped by net.core.wmem_max/rmem_max. A batch is one journal round's commits (up to the journal's
# size); what the socket does not take at once is sent when it is writable.
_SOCKET_BUFFER = 4 << 20
STOP_TIMEOUT = 5.0

Results = list[tuple[int, int]]  # (stage, errno) per commit, see file_writer.py
Answer = Callable[[Results | None], None]


class FileWriterProcess:
    def __init__(self, loop: asyncio.AbstractEventLoop, spool_root: str) -> None:
        self.loop = loop
        self.spool_root = spool_root
        self.process: subprocess.Popen[bytes] | None = None
        self.socket: socket.socket | None = None
        self.usable = False
        self._pending: collections.deque[Answer] = collections.deque()
        self._batches = 0
        self._received = bytearray()
        self._unsent = bytearray()  # what the socket did not take at once (written when it is writable)

    def start(self) -> bool:
        """Start the process; False (and a log line) if it cannot be: the queue then writes files itself."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for side in (ours, theirs):
                side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
                side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", SCRIPT, self.spool_root, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except OSError as error:
            ours.close()
            LOG.warning("queue: cannot start the file writer process (%s); the daemon writes queue files itself",
                        error)
            return False
        finally:
            theirs.close()
        ours.setblocking(False)
        self.socket = ours
        self.loop.add_reader(ours.fileno(), self._readable)
        self.usable = True
        return True

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def write(self, commits: list[tuple[Any, ...]], answer: Answer) -> None:
        """Send one batch (see file_writer.py for a commit's shape); ``answer`` gets the results on the loop."""
        if not self.usable or self.socket is None:
            self.loop.call_soon(answer, None)
            return
        self._batches += 1
        # The messages go after the marshal'd rest, each as it is: marshal copies a 100 KB message in 39 us
        # (its output grows by doubling), sendmsg gathers them with no copy at all.
        messages = [commit[3] for commit in commits]
        described = marshal.dumps((self._batches, [(msgid, spare, old_envelope, len(data), envelopes)
                                                   for msgid, spare, old_envelope, data, envelopes in commits]))
        self._pending.append(answer)
        self._send([REQUEST_HEADER.pack(len(described), sum(map(len, messages))), described, *messages])

    def _send(self, parts: list[bytes]) -> None:
        assert self.socket is not None
        if self._unsent:
            for part in parts:
                self._unsent += part
            return
        try:
            sent = self.socket.sendmsg(parts)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._lost(f"sending to it failed: {error}")
            return
        for part in parts:  # keep what the socket did not take
            if sent >= len(part):
                sent -= len(part)
                continue
            self._unsent += memoryview(part)[sent:]
            sent = 0
        if self._unsent:
            self.loop.add_writer(self.socket.fileno(), self._writable)

    def _writable(self) -> None:
        assert self.socket is not None
        try:
            sent = self.socket.send(self._unsent)
        except BlockingIOError:
            return
        except OSError as error:
            self._lost(f"sending to it failed: {error}")
            return
        del self._unsent[:sent]
        if not self._unsent:
            self.loop.remove_writer(self.socket.fileno())

    def _readable(self) -> None:
        assert self.socket is not None
        try:
            data = self.socket.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as error:
            self._lost(f"reading from it failed: {error}")
            return
        if not data:
            self._lost("it ended")
            return
        self._received += data
        while len(self._received) >= ANSWER_HEADER.size:
            length = ANSWER_HEADER.unpack_from(self._received)[0]
            if len(self._received) < ANSWER_HEADER.size + length:
                break
            payload = bytes(self._received[ANSWER_HEADER.size:ANSWER_HEADER.size + length])
            del self._received[:ANSWER_HEADER.size + length]
            _, results = marshal.loads(payload)
            if self._pending:
                self._pending.popleft()(results)

    def _lost(self, why: str) -> None:
        """The process is gone (or unusable): no more batches to it; those not answered get None."""
        if not self.usable:
            return
        self.usable = False
        LOG.warning("queue: the file writer process is lost (%s); the daemon writes queue files itself", why)
        self._close_socket()
        pending, self._pending = self._pending, collections.deque()
        for answer in pending:  # (in a turn of their own: this may run inside write())
            self.loop.call_soon(answer, None)

    def _close_socket(self) -> None:
        if self.socket is not None:
            self.loop.remove_reader(self.socket.fileno())
            if self._unsent:
                self.loop.remove_writer(self.socket.fileno())
            self.socket.close()
            self.socket = None

    def close(self) -> None:
        """On the loop, after the queue drained (no batch pending): the process ends at the end of its input."""
        self.usable = False
        self._close_socket()

    def wait(self) -> None:
        """From any thread, after close(): wait for the process to end."""
        if self.process is not None:
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
