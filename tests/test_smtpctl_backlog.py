"""smtpctl against a daemon whose control socket's backlog is full (a burst of clients): connecting fails at once
with EAGAIN when the socket has a timeout, which smtpctl took for "smtpd doesn't seem to be running" (and
`show queue` then read the spool as if the daemon were down). It waits for room instead, up to its timeout."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from smtpctl.client import Client


def test_a_full_backlog_is_waited_for(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    waiting: list[socket.socket] = []
    accepted: list[socket.socket] = []
    try:
        for _ in range(64):  # fill the backlog (its size is the kernel's business): bounded
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(path)
            except BlockingIOError:
                client.close()
                break
            waiting.append(client)
        else:
            raise AssertionError("the backlog never filled")

        def drain() -> None:  # the busy daemon gets round to accepting, a little later
            server.settimeout(5)
            for _ in range(len(waiting) + 1):
                accepted.append(server.accept()[0])

        timer = threading.Timer(0.3, drain)
        timer.start()
        with Client(path, timeout=10) as control:
            connection = control.connect()
            assert connection.getpeername() == path
        timer.join(10)
        assert len(accepted) == len(waiting) + 1
    finally:
        for item in waiting + accepted:
            item.close()
        server.close()
